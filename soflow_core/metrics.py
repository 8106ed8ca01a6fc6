"""Sample-quality metrics for low-dimensional data."""

import torch
from jaxtyping import Float
from torch import Tensor

from soflow_core._validation import check_finite, check_tensor

__all__ = ["energy_distance"]


def energy_distance(x: Float[Tensor, " n d"], y: Float[Tensor, " m d"]) -> float:
    r"""The (squared) energy distance between two samples, V-statistic form.

    $$D^2(X, Y) = 2\,\mathbb{E}\lVert X - Y\rVert - \mathbb{E}\lVert X - X'\rVert
      - \mathbb{E}\lVert Y - Y'\rVert \;\ge 0,$$

    with every expectation a plain average over all pairs (diagonal included), so the
    estimate is non-negative and zero only for identical samples. Two independent draws of
    the same distribution give a small positive floor of order 1/n: compare against that
    real-vs-real floor, not against 0. Computed in float64.

    Args:
        x: First sample, one row per point.
        y: Second sample, same number of columns.

    Returns:
        The energy distance as a Python float.

    Raises:
        ValueError: If the samples have different dimensions or hold NaN/Inf.

    Examples:
        >>> import torch
        >>> x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
        >>> energy_distance(x, x)
        0.0
    """
    check_tensor("x", x, min_ndim=2)
    check_tensor("y", y, min_ndim=2)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (n, d) and (m, d) with the same d; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    check_finite("x", x)
    check_finite("y", y)
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return max(float(2 * xy - xx - yy), 0.0)
