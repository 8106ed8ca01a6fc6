"""Small tensor helpers used throughout the package."""

import torch
from torch import Tensor


def bcast_right(t: Tensor, like: Tensor) -> Tensor:
    """Append singleton dimensions to a per-sample tensor so it broadcasts against ``like``.

    Args:
        t: A tensor of shape ``(b,)``.
        like: A tensor of shape ``(b, *shape)``.

    Returns:
        ``t`` viewed as ``(b, 1, ..., 1)`` with ``like.ndim`` dimensions.

    Examples:
        >>> import torch
        >>> bcast_right(torch.ones(4), torch.zeros(4, 3, 8, 8)).shape
        torch.Size([4, 1, 1, 1])
    """
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype losses accumulate in: float64 when any input is float64, float32 otherwise (None is skipped)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(b, *shape) -> (b,)``."""
    return x.flatten(1).mean(dim=1)
