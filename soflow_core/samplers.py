r"""One-step and few-step sampling with a trained solution function.

Sampling runs from noise (t = 1) to data (t = 0). Every function is stateless and takes an
explicit ``generator`` where it draws noise.
"""

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from soflow_core._rng import randn
from soflow_core._validation import (
    check_cond,
    check_generator,
    check_instance,
    check_int,
    check_tensor,
    check_time_list,
    check_time_order,
    finite_check,
    prepared_backbone,
)
from soflow_core.parameterizations import AbstractParam
from soflow_core.paths import AbstractPath
from soflow_core.typing import Backbone, Cond, Data

TimeGrid = Sequence[float] | torch.Tensor | np.ndarray
"""Times given to a sampler: a list or tuple of floats, or a 1-d floating-point tensor or array (never booleans)."""

__all__ = ["renoise_times", "sample_chain", "sample_few_step", "sample_one_step", "uniform_time_grid"]


def uniform_time_grid(num_steps: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""The reference grid τ_i = 1 − i/N, i = 0..N (N = number of network evaluations).

    Args:
        num_steps: N ≥ 1.
        dtype: Result dtype.

    Returns:
        A decreasing 1-D tensor of N + 1 times from 1 to 0.

    Examples:
        >>> uniform_time_grid(4).tolist()
        [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    n = check_int("num_steps", num_steps, low=1)
    return 1.0 - torch.arange(n + 1, dtype=dtype) / n


def _check_inputs(backbone: Backbone, noise: object, cond: object, param: object) -> tuple[Backbone, torch.Tensor]:
    """Check the sampler's inputs (one device sync for noise and labels); return the output-checking backbone.

    Noise must be in the dtype of the backbone's parameters. Class labels are checked against a
    backbone that declares ``num_classes``; the null class (index ``num_classes``) is a valid
    label when the backbone has one. A backbone that hides its class count (behind a function)
    checks them itself: the library's backbones refuse a bad label in their ``forward``.
    """
    check_instance("param", param, AbstractParam, "EulerParam()")
    noise = check_tensor("noise", noise, min_ndim=2)
    check_cond("cond", cond, noise.shape[0], device=noise.device)
    return prepared_backbone(backbone, "noise", noise, cond, checks=[finite_check("noise", noise)]), noise


def _full(x: torch.Tensor, value: float) -> torch.Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=dtype)


def _solve(
    backbone: Backbone, param: AbstractParam, x: torch.Tensor, t_value: float, s_value: float, cond: Cond | None
) -> torch.Tensor:
    """f_θ(x, t, s) with the same t and s for every sample (inputs already checked)."""
    t, s = _full(x, t_value), _full(x, s_value)
    return param.combine(x, backbone(x, t, s, cond), t, s)


@torch.no_grad()
def sample_one_step(backbone: Backbone, noise: Data, *, param: AbstractParam, cond: Cond | None = None) -> Data:
    r"""One network evaluation from noise to data: $\hat x_0 = f_\theta(\text{noise}, 1, 0)$.

    Args:
        backbone: The trained network F_θ (in eval mode, usually the EMA weights).
        noise: Standard normal noise.
        param: The solution parameterization used in training.
        cond: Conditions (class labels), or None.

    Returns:
        Samples shaped like ``noise``.

    Raises:
        ValueError: On bad shapes, non-finite noise, labels outside the backbone's class count,
            or a backbone output not shaped like its input.
        TypeError: On a ``param`` that is not a parameterization object, non-integer labels, or
            noise in another dtype than the backbone's parameters (outside autocast).

    Examples:
        >>> import torch
        >>> from soflow_core import EulerParam
        >>> from soflow_core.nets import MLPBackbone
        >>> x = sample_one_step(MLPBackbone(dim=2).eval(), torch.randn(5, 2), param=EulerParam())
        >>> x.shape
        torch.Size([5, 2])
    """
    backbone, noise = _check_inputs(backbone, noise, cond, param)
    return _solve(backbone, param, noise, 1.0, 0.0, cond)


def renoise_times(num_steps: int | None = None, times: TimeGrid | None = None) -> list[float]:
    r"""The evaluation times τ_0 = 1 > τ_1 > … > τ_{N−1} > 0 of the re-noising few-step sampler.

    Without ``times`` it is the reference grid τ_i = 1 − i/N
    ([`uniform_time_grid`][soflow_core.samplers.uniform_time_grid] without its final 0). Given
    ``times``, they are checked and returned; ``num_steps``, when also given, must equal their
    number.

    Args:
        num_steps: N ≥ 1 network evaluations, or None when ``times`` is given.
        times: The N evaluation times, or None for the uniform grid.

    Returns:
        The N times as Python floats.

    Raises:
        ValueError: If neither is given, if they disagree, or if ``times`` does not start at 1,
            decrease strictly and stay above 0.

    Examples:
        >>> renoise_times(4)
        [1.0, 0.75, 0.5, 0.25]
        >>> renoise_times(times=[1.0, 0.3])
        [1.0, 0.3]
    """
    if times is None:
        if num_steps is None:
            raise ValueError("give num_steps or times; got neither")
        n = check_int("num_steps", num_steps, low=1)
        return uniform_time_grid(n).tolist()[:n]
    grid = check_time_list("times", times)
    if num_steps is not None and check_int("num_steps", num_steps, low=1) != len(grid):
        raise ValueError(f"num_steps must equal the number of times; got num_steps={num_steps} and times={grid}")
    if not grid or grid[0] != 1.0:
        raise ValueError(f"times must start at 1.0 (the noise); got {grid}")
    if any(b >= a for a, b in itertools.pairwise(grid)) or grid[-1] <= 0.0:
        raise ValueError(f"times must decrease strictly and stay above 0; got {grid}")
    return grid


@torch.no_grad()
def sample_few_step(
    backbone: Backbone,
    noise: Data,
    *,
    param: AbstractParam,
    path: AbstractPath,
    num_steps: int | None = None,
    times: TimeGrid | None = None,
    cond: Cond | None = None,
    generator: torch.Generator | None = None,
) -> Data:
    r"""The reference's stochastic N-step sampler: jump to t = 0, re-noise to the next time, repeat.

    With evaluation times τ_0 = 1 > τ_1 > … > τ_{N−1}: for i = 0..N−2,
    $\hat x_0 = f_\theta(x, \tau_i, 0)$ and
    $x = \alpha(\tau_{i+1})\,\hat x_0 + \beta(\tau_{i+1})\,\varepsilon$ with fresh ε; finally
    $\hat x_0 = f_\theta(x, \tau_{N-1}, 0)$. The reference uses τ_i = 1 − i/N (the default), so
    N = 1 is the one-step sampler and N = 2 goes through t = 0.5; ``times`` sets the
    re-noising times instead, e.g. ``[1.0, 0.3]`` for two steps through t = 0.3.

    Args:
        backbone: The trained network F_θ.
        noise: Standard normal noise (the state at t = 1).
        param: The solution parameterization used in training.
        path: The noising path used in training (for re-noising).
        num_steps: N ≥ 1 network evaluations on the uniform grid (or the length of ``times``).
        times: The N evaluation times, starting at 1 and strictly decreasing, or None for the
            uniform grid; see [`renoise_times`][soflow_core.samplers.renoise_times].
        cond: Conditions, or None.
        generator: Source of the re-noising draws, or None for the global RNG.

    Returns:
        Samples shaped like ``noise``.

    Raises:
        ValueError: On bad shapes, non-finite noise, N < 1, bad ``times``, labels outside the
            backbone's class count, or a backbone output not shaped like its input.
        TypeError: On a ``param``, ``path`` or ``generator`` of the wrong type.

    Examples:
        >>> import torch
        >>> from soflow_core import EulerParam, LinearPath
        >>> from soflow_core.nets import MLPBackbone
        >>> net = MLPBackbone(dim=2).eval()
        >>> x = sample_few_step(net, torch.randn(5, 2), param=EulerParam(), path=LinearPath(), num_steps=2)
        >>> y = sample_few_step(net, torch.randn(5, 2), param=EulerParam(), path=LinearPath(), times=[1.0, 0.3])
        >>> x.shape, y.shape
        (torch.Size([5, 2]), torch.Size([5, 2]))
    """
    backbone, noise = _check_inputs(backbone, noise, cond, param)
    check_instance("path", path, AbstractPath, "LinearPath()")
    check_generator("generator", generator)
    grid = renoise_times(num_steps, times)
    x = noise
    for tau, tau_next in itertools.pairwise(grid):
        eps = randn(tuple(x.shape), device=x.device, dtype=x.dtype, generator=generator)
        x = path.interpolate(_solve(backbone, param, x, tau, 0.0, cond), eps, _full(x, tau_next)).x_t
    return _solve(backbone, param, x, grid[-1], 0.0, cond)


@torch.no_grad()
def sample_chain(
    backbone: Backbone,
    noise: Data,
    times: TimeGrid,
    *,
    param: AbstractParam,
    cond: Cond | None = None,
) -> Data:
    r"""The deterministic chain $x_{i+1} = f_\theta(x_i, t_i, t_{i+1})$ along decreasing ``times``.

    ``times = [1, 0]`` is the one-step sampler; a finer grid follows the learned ODE
    solution piecewise without re-noising.

    Args:
        backbone: The trained network F_θ.
        noise: The state at ``times[0]`` (standard normal noise when it is 1).
        times: Non-increasing times in [0, 1], at least two.
        param: The solution parameterization used in training.
        cond: Conditions, or None.

    Returns:
        The state at ``times[-1]``.

    Raises:
        ValueError: If ``times`` has fewer than two entries, is not finite, leaves [0, 1] or
            increases; as the other samplers on bad noise, labels or backbone outputs.

    Examples:
        >>> import torch
        >>> from soflow_core import EulerParam
        >>> from soflow_core.nets import MLPBackbone
        >>> x = sample_chain(MLPBackbone(dim=2).eval(), torch.randn(5, 2), [1.0, 0.5, 0.0], param=EulerParam())
        >>> x.shape
        torch.Size([5, 2])
    """
    backbone, noise = _check_inputs(backbone, noise, cond, param)
    grid = torch.tensor(check_time_list("times", times), dtype=torch.float64)
    if grid.numel() < 2:
        raise ValueError(f"times must hold at least two times; got {grid.tolist()}")
    if not bool(torch.isfinite(grid).all()) or bool((grid < 0).any() or (grid > 1).any()):
        raise ValueError(f"times must be finite and lie in [0, 1]; got {grid.tolist()}")
    check_time_order("times[i+1]", grid[1:], "times[i]", grid[:-1], strict=False)
    x = noise
    for t_value, s_value in itertools.pairwise(grid.tolist()):
        x = _solve(backbone, param, x, t_value, s_value, cond)
    return x
