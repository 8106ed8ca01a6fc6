"""Input checks shared by the public API.

Every check raises `ValueError` or `TypeError` naming the argument and showing the
offending value. Checks that read tensor values (finiteness, time ranges) force a
device synchronisation, so callers skip them while `torch.compile` traces.
"""

import math
import numbers

import torch
from torch import Tensor


def is_tracing() -> bool:
    """Whether torch.compile is tracing (value checks must not run then)."""
    return torch.compiler.is_compiling()


def _describe(x: Tensor) -> str:
    return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"


def check_tensor(name: str, x: object, *, min_ndim: int = 1, floating: bool = True) -> Tensor:
    """Check that ``x`` is a (floating) tensor with at least ``min_ndim`` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}: {x!r}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {_describe(x)}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s) (batch first); got {_describe(x)}")
    if x.ndim >= 1 and x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample; got {_describe(x)}")
    return x


def check_finite(name: str, x: Tensor) -> None:
    """Raise if ``x`` holds NaN or Inf (skipped while compiling)."""
    if is_tracing():
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or Inf) in a {_describe(x)}")


def check_same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    """Raise unless ``x`` and ``ref`` have the same shape."""
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}; got {tuple(x.shape)}")


def check_time(name: str, t: object, batch: int, *, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Check a per-sample time tensor of shape (batch,) with values in [low, high]."""
    t = check_tensor(name, t, min_ndim=1)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), one time per sample; got {tuple(t.shape)}")
    if is_tracing():
        return t
    check_finite(name, t)
    lo, hi = float(t.min()), float(t.max())
    if lo < low or hi > high:
        raise ValueError(f"{name} must lie in [{low}, {high}]; got values in [{lo}, {hi}]")
    return t


def check_time_order(lower_name: str, lower: Tensor, upper_name: str, upper: Tensor, *, strict: bool) -> None:
    """Check ``lower <= upper`` (or ``<`` when strict) sample by sample."""
    if is_tracing():
        return
    bad = (lower >= upper) if strict else (lower > upper)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        relation = "<" if strict else "<="
        raise ValueError(
            f"{lower_name} {relation} {upper_name} must hold for every sample; sample {i} has "
            f"{lower_name}={float(lower[i])!r}, {upper_name}={float(upper[i])!r}"
        )


def check_cond(name: str, cond: object, batch: int) -> None:
    """Check that a conditioning tensor (or None) has one entry per sample."""
    if cond is None:
        return
    if not isinstance(cond, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(cond).__name__}")
    if cond.ndim == 0 or cond.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} in its first dimension; got {tuple(cond.shape)}")


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check a finite real number against an optional (open or closed) interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}: {value!r}")
    v = float(value)
    lo_ok = low is None or (v > low if low_open else v >= low)
    hi_ok = high is None or (v < high if high_open else v <= high)
    if not math.isfinite(v) or not lo_ok or not hi_ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo_s = "-inf" if low is None else repr(low)
        hi_s = "inf" if high is None else repr(high)
        raise ValueError(f"{name} must lie in {left}{lo_s}, {hi_s}{right}; got {value!r}")
    return v


def check_int(name: str, value: object, *, low: int) -> int:
    """Check an integer (not a bool) that is at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}: {value!r}")
    if int(value) < low:
        raise ValueError(f"{name} must be >= {low}; got {value!r}")
    return int(value)


def check_choice(name: str, value: object, choices: "dict[str, object] | tuple[str, ...]") -> str:
    """Check that ``value`` is one of the known names (case-insensitive)."""
    known = tuple(choices)
    if not isinstance(value, str) or value.lower() not in known:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(repr(k) for k in known)}")
    return value.lower()


def registered_name(name: str, value: object, registry: "dict[str, type]") -> str:
    """The registry name whose class ``value`` is exactly (the inverse of building from a name)."""
    for key, cls in registry.items():
        if type(value) is cls:
            return key
    raise ValueError(f"{name} {value!r} is not one of the named ones: {', '.join(repr(k) for k in registry)}")
