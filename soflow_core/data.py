"""Two-dimensional toy distributions generated in code (no downloads), with labels for conditional tests."""

import math
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from soflow_core._rng import rand, randn
from soflow_core._validation import check_choice, check_int

__all__ = ["TOY_DISTRIBUTIONS", "ToyName", "on_checkerboard", "sample_toy_2d"]

ToyName = Literal["checkerboard", "eight_gaussians", "two_moons"]
"""The toy distributions of [`sample_toy_2d`][soflow_core.data.sample_toy_2d]."""
TOY_DISTRIBUTIONS: tuple[str, ...] = get_args(ToyName)
"""Names accepted by [`sample_toy_2d`][soflow_core.data.sample_toy_2d]."""


def _checkerboard(n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    # 8 unit squares on a 4 x 4 board in [-2, 2]^2, alternating like a chessboard.
    u = rand((n, 2), device=torch.device("cpu"), dtype=torch.float64, generator=generator)
    cell = torch.floor(rand((n,), device=torch.device("cpu"), dtype=torch.float64, generator=generator) * 8)
    cell = cell.clamp(max=7).long()
    col = cell % 4
    row = 2 * (cell // 4) + (col % 2)
    x = torch.stack([col + u[:, 0], row + u[:, 1]], dim=1) - 2.0
    return x, cell


def on_checkerboard(points: Float[Tensor, " n 2"]) -> Bool[Tensor, " n"]:
    """Whether each point lies on one of the 8 squares of ``checkerboard`` (its support).

    Every checkerboard sample is on a square; the share of generated points that are tells how
    sharply a model resolves the squares' edges, which a distance between distributions barely
    sees.

    Args:
        points: Points in the plane.

    Returns:
        True for the points on a square.

    Examples:
        >>> import torch
        >>> on_checkerboard(torch.tensor([[-1.5, -1.5], [-0.5, -1.5], [3.0, 0.0]])).tolist()
        [True, False, False]
    """
    cell = torch.floor(points + 2.0)
    on_board = ((cell >= 0) & (cell <= 3)).all(dim=1)
    # the squares are the cells (column, row) with column + row even, as _checkerboard lays them out
    return on_board & ((cell[:, 0] + cell[:, 1]) % 2 == 0)


def _eight_gaussians(n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    mode = torch.floor(rand((n,), device=torch.device("cpu"), dtype=torch.float64, generator=generator) * 8)
    mode = mode.clamp(max=7).long()
    angle = mode.double() * (2 * math.pi / 8)
    centers = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + 0.2 * randn((n, 2), device=torch.device("cpu"), dtype=torch.float64, generator=generator), mode


def _two_moons(n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    moon = (rand((n,), device=torch.device("cpu"), dtype=torch.float64, generator=generator) < 0.5).long()
    angle = math.pi * rand((n,), device=torch.device("cpu"), dtype=torch.float64, generator=generator)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    lower = torch.stack([1.0 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    x = torch.where(moon[:, None] == 0, upper, lower) - torch.tensor([0.5, 0.25], dtype=torch.float64)
    x = 1.5 * x + 0.08 * randn((n, 2), device=torch.device("cpu"), dtype=torch.float64, generator=generator)
    return x, moon


_SAMPLERS = {"checkerboard": _checkerboard, "eight_gaussians": _eight_gaussians, "two_moons": _two_moons}


def sample_toy_2d(
    name: str, num_samples: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Float[Tensor, " n 2"], Int[Tensor, " n"]]:
    """Draw points and labels from a 2-D toy distribution (CPU).

    * ``checkerboard``: uniform on 8 unit squares of a 4 × 4 board in [−2, 2]²; label = square.
    * ``eight_gaussians``: 8 Gaussians (σ = 0.2) on a circle of radius 2; label = mode.
    * ``two_moons``: two interleaved half circles; label = moon.

    Args:
        name: The distribution.
        num_samples: Number of points, ≥ 1.
        generator: Source of randomness, or None for the global RNG.
        dtype: Dtype of the points.

    Returns:
        (points of shape (n, 2), integer labels of shape (n,)).

    Raises:
        ValueError: If the name is unknown or ``num_samples`` < 1.

    Examples:
        >>> import torch
        >>> x, y = sample_toy_2d("checkerboard", 100, generator=torch.Generator().manual_seed(0))
        >>> x.shape, int(y.max()) <= 7
        (torch.Size([100, 2]), True)
    """
    key = check_choice("toy distribution", name, TOY_DISTRIBUTIONS)
    n = check_int("num_samples", num_samples, low=1)
    x, labels = _SAMPLERS[key](n, generator)
    return x.to(dtype), labels
