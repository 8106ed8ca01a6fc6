r"""Adaptive loss weights w = 1 / (mse + ε)^p, always detached (SoFlow paper; see the Method page of the docs).

With p = 1 the weighted loss behaves like a log-loss (each sample contributes
≈ mse/(mse + ε)); with p = 0 it is the plain mean squared error.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from soflow_core._validation import check_real
from soflow_core.typing import PerSample

__all__ = ["AdaptiveWeighting", "adaptive_weight", "flow_matching_weight"]


def adaptive_weight(mse: PerSample, *, p: float, eps: float) -> PerSample:
    r"""The detached adaptive weight of the solution-consistency loss.

    $$w = \frac{1}{(\mathrm{mse} + \varepsilon)^p}.$$

    Args:
        mse: Per-sample mean squared error (mean over data dimensions).
        p: Power, ≥ 0 (reference ``adaptive_p``).
        eps: Offset, > 0.

    Returns:
        The weights, without gradient.

    Examples:
        >>> import torch
        >>> adaptive_weight(torch.tensor([0.99]), p=1.0, eps=0.01).item()
        1.0
    """
    mse = mse.detach()
    return torch.reciprocal((mse + eps) ** p)


def flow_matching_weight(mse: PerSample, d_s_b: Float[Tensor, " b"], *, p: float, eps: float) -> PerSample:
    r"""The detached adaptive weight of the Flow Matching loss.

    $$w = \frac{1}{|\partial_s b(t, t)|\,(\mathrm{mse} + \varepsilon)^p}.$$

    Args:
        mse: Per-sample mean squared velocity error.
        d_s_b: ∂ₛb(t, t) per sample (1 for Euler, π/2 for Trig).
        p: Power, ≥ 0.
        eps: Offset, > 0.

    Returns:
        The weights, without gradient.
    """
    return adaptive_weight(mse, p=p, eps=eps) / d_s_b.detach().abs()


@dataclass(frozen=True, kw_only=True)
class AdaptiveWeighting:
    """The hyperparameters of the adaptive weight (reference ``adaptive_p`` and ``eps``).

    Attributes:
        p: Power, ≥ 0; 0 gives the plain MSE.
        eps: Offset, > 0.
    """

    p: float = 1.0
    eps: float = 0.01

    def __post_init__(self) -> None:
        check_real("p", self.p, low=0.0)
        check_real("eps", self.eps, low=0.0, low_open=True)
