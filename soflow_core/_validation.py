"""Input checks shared by the public API.

Every check raises `ValueError` or `TypeError` naming the argument and showing the
offending value. Checks that read tensor values (finiteness, time ranges, label ranges)
force a device synchronisation, so callers skip them while `torch.compile` traces; checks
of types, shapes, dtypes and devices read metadata only and cost nothing.
"""

import math
import numbers
from collections.abc import Callable, Sequence

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
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor (a shape without values); got {_describe(x)} on device 'meta'")
    return x


def check_instance(name: str, value: object, cls: type, example: str) -> None:
    """Raise a TypeError unless ``value`` is a ``cls`` (``example`` shows how to make one)."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__} such as {example}; got {type(value).__name__}: {value!r}")


def check_generator(name: str, generator: object) -> None:
    """Check that ``generator`` is a ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator or None; got {type(generator).__name__}: {generator!r} "
            "(make one with torch.Generator(device).manual_seed(seed))"
        )


def check_same_dtype(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    """Raise unless ``x`` and ``ref`` have the same dtype."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}); got {x.dtype}")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device``, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def check_backbone_output(output: object, x: Tensor) -> Tensor:
    """Check what a backbone returned for input ``x``: a tensor of x's shape, dtype and device.

    Under autocast the autocast dtype is accepted too. Reads metadata only (no device
    synchronisation), so it runs on every call.
    """
    expected = f"a tensor shaped like its input x ({_describe(x)} on {x.device})"
    if not isinstance(output, Tensor):
        raise TypeError(f"the backbone must return {expected}; it returned {type(output).__name__}: {output!r}")
    if output.shape != x.shape:
        raise ValueError(
            f"the backbone must return {expected}; it returned shape {tuple(output.shape)}, which would only "
            "broadcast against x"
        )
    if output.dtype != x.dtype and output.dtype != _autocast_dtype(x.device):
        raise TypeError(f"the backbone must return {expected}; it returned dtype {output.dtype}")
    if output.device != x.device:
        raise ValueError(f"the backbone must return {expected}; it returned a tensor on {output.device}")
    return output


def check_finite(name: str, x: Tensor) -> None:
    """Raise if ``x`` holds NaN or Inf (skipped while compiling)."""
    if not is_tracing():
        check_values([finite_check(name, x)])


ValueCheck = tuple[Tensor, Callable[[int], Exception]]
"""An on-device count of bad values and the error to raise for a positive count."""


def check_values(checks: Sequence[ValueCheck]) -> None:
    """Read every count with one device synchronisation; raise the first failure (skipped while compiling)."""
    if is_tracing() or not checks:
        return
    device = checks[0][0].device
    counts = torch.stack([count.reshape(()).to(device=device, dtype=torch.int64) for count, _ in checks]).tolist()
    for bad, (_, error) in zip(counts, checks):
        if bad:
            raise error(int(bad))


def finite_check(name: str, x: Tensor) -> ValueCheck:
    """A value check: ``x`` holds no NaN or Inf."""

    def error(bad: int) -> Exception:
        return ValueError(f"{name} holds {bad} non-finite value(s) (NaN or Inf) in a {_describe(x)}")

    return (~torch.isfinite(x)).sum(), error


def label_checks(
    name: str, labels: Tensor, num_classes: int, *, null_allowed: bool | Tensor = False
) -> list[ValueCheck]:
    """Check class labels against a class count: metadata now, the value range as a deferred check.

    Args:
        name: The argument's name.
        labels: The labels, one integer per sample.
        num_classes: N; labels must lie in [0, N).
        null_allowed: Where the null index N is also allowed: False, True, or a boolean mask
            (the label-drop mask: only dropped samples may carry it).

    Returns:
        The value check to pass to ``check_values`` (empty while compiling).
    """
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"{name} must be integer class labels of shape (b,) for a model of {num_classes} classes; "
            f"got {_describe(labels)}"
        )
    if is_tracing():
        return []
    bad = (labels < 0) | (labels > num_classes)
    if isinstance(null_allowed, Tensor):
        bad = bad | ((labels == num_classes) & ~null_allowed.to(labels.device))
    elif not null_allowed:
        bad = bad | (labels == num_classes)
    allowed = f"[0, {num_classes})" + (f" or the null class {num_classes}" if null_allowed is not False else "")

    def error(count: int) -> Exception:
        first = int(bad.nonzero()[0, 0])
        return ValueError(
            f"{name} must hold class labels in {allowed}; {count} do not, the first is "
            f"{name}[{first}] = {int(labels[first])}"
        )

    return [(bad.sum(), error)]


def class_count(backbone: object) -> tuple[int, bool] | None:
    """The class count a backbone declares, and whether it has a null class, or None when it declares none.

    A backbone declares it with an integer ``num_classes`` attribute (the null class, index
    ``num_classes``, exists unless ``null_class`` is False). DDP/FSDP (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers are looked through.
    """
    seen = 0
    while seen < 8:
        count = getattr(backbone, "num_classes", None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            return count, bool(getattr(backbone, "null_class", True))
        inner = getattr(backbone, "_orig_mod", None) or getattr(backbone, "module", None)
        if inner is None:
            return None
        backbone, seen = inner, seen + 1
    return None


def _wrapper_chain(backbone: object) -> list[object]:
    """``backbone`` and what its wrappers hold: DDP/FSDP (``.module``), ``torch.compile`` (``._orig_mod``),
    and ``functools.wraps``-style wrappers (``__wrapped__``, e.g. ``checked_backbone``)."""
    chain = [backbone]
    while len(chain) < 8:
        inner = None
        for name in ("_orig_mod", "module", "__wrapped__"):
            inner = getattr(chain[-1], name, None)
            if inner is not None:
                break
        if inner is None:
            break
        chain.append(inner)
    return chain


def omega_range(backbone: object) -> tuple[float, float] | None:
    """The guidance scales an ω-conditioned backbone declares, or None for a backbone that takes no ω.

    A backbone declares that its forward accepts the keyword ``omega`` (one guidance scale per
    sample) with an attribute ``omega_range = (low, high)``, the ω it was built and trained for
    (``high`` may be ``math.inf``). The first object in the wrapper chain (DDP/FSDP ``.module``,
    ``torch.compile``'s ``._orig_mod``, ``__wrapped__``) that has a non-None ``omega_range``
    decides.

    Args:
        backbone: The backbone, possibly wrapped.

    Returns:
        (low, high), or None when nothing in the chain declares a range.

    Raises:
        TypeError: If the declared value is not a pair of real numbers with low <= high.
    """
    for obj in _wrapper_chain(backbone):
        declared = getattr(obj, "omega_range", None)
        if declared is None:
            continue
        try:
            low, high = (float(v) for v in declared)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            low = high = math.nan
        if not low <= high or any(isinstance(v, bool) for v in declared):  # type: ignore[union-attr]
            raise TypeError(
                f"{type(obj).__name__}.omega_range must be None or a pair (low, high) of guidance scales with "
                f"low <= high; got {declared!r}"
            )
        return low, high
    return None


def check_omega(name: str, omega: object, batch: int) -> Tensor:
    """Check that ``omega`` is a floating tensor of shape (batch,), one guidance scale per sample (metadata only)."""
    omega = check_tensor(name, omega, min_ndim=1)
    if omega.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), one guidance scale per sample; got {tuple(omega.shape)}")
    return omega


def omega_checks(name: str, omega: Tensor, allowed: tuple[float, float] | None) -> list[ValueCheck]:
    """Value checks of per-sample guidance scales: finite, and inside ``allowed`` when given (empty while compiling)."""
    if is_tracing():
        return []
    checks = [finite_check(name, omega)]
    if allowed is not None:
        low, high = allowed
        bad = (omega < low) | (omega > high)

        def error(count: int) -> Exception:
            first = int(bad.nonzero()[0, 0])
            return ValueError(
                f"{name} must lie in the backbone's omega_range [{low:g}, {high:g}], the guidance scales it was "
                f"trained for; {count} value(s) do not, the first is {name}[{first}] = {float(omega[first])!r}"
            )

        checks.append((bad.sum(), error))
    return checks


def call_backbone(
    backbone: Callable[..., object], x: Tensor, t: Tensor, s: Tensor, cond: object, omega: Tensor | None
) -> object:
    """``backbone(x, t, s, cond)``, with the keyword ``omega=`` only when a guidance scale is given."""
    if omega is None:
        return backbone(x, t, s, cond)
    return backbone(x, t, s, cond, omega=omega)


def check_omega_use(
    backbone: object, omega_in_use: bool, context: str, remedy: str = "pass omega"
) -> tuple[float, float] | None:
    """Match ``omega_in_use`` with the backbone's declaration; return its ``omega_range``.

    Args:
        backbone: The backbone.
        omega_in_use: Whether ``context`` gives the backbone ``omega=``.
        context: Who calls the backbone, for the messages (``"the sampler"``).
        remedy: What to do when an ω-conditioned backbone gets no ω.

    Returns:
        The backbone's ``omega_range``, or None.

    Raises:
        ValueError: If ω is to be given to a backbone that declares no ``omega_range``, or
            withheld from one that declares it.
    """
    declared = omega_range(backbone)
    if omega_in_use and declared is None:
        raise ValueError(
            f"{context} gives the backbone a guidance scale (omega=...), but the backbone declares no omega_range: "
            "a backbone that takes ω accepts the keyword omega and declares omega_range = (low, high) (build "
            "DiT, SongUNet or MLPBackbone with omega_range=...)"
        )
    if not omega_in_use and declared is not None:
        raise ValueError(
            f"the backbone is ω-conditioned (omega_range={declared}) and needs a guidance scale per sample, but "
            f"{context} gives none: {remedy}"
        )
    return declared


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


_TOTAL_STEPS_HINT = (
    "total_steps is the planned number of optimizer steps K >= 1 that drives the ℓ schedule. Under PyTorch "
    "Lightning pass self.trainer.estimated_stepping_batches (trainer.max_steps is -1 when only max_epochs is "
    "set); under Accelerate pass your own count, epochs * ceil(len(dataloader) / gradient_accumulation_steps), "
    "with step counted on accelerator.sync_gradients, not per micro-batch"
)


def check_total_steps(total_steps: object) -> int:
    """Check the planned run length K, explaining what to pass under Lightning and Accelerate."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral):
        kind = type(total_steps).__name__
        raise TypeError(f"total_steps must be an int; got {kind}: {total_steps!r}. {_TOTAL_STEPS_HINT}")
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps!r}. {_TOTAL_STEPS_HINT}")
    return int(total_steps)


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


def checked_backbone(backbone: Callable[..., object], context: str | None = None) -> Callable[..., Tensor]:
    """``backbone`` with every output checked against its input (``check_backbone_output``).

    With ``context``, an exception raised inside the backbone gets a note saying which call
    raised it (for shapes the caller built, such as an objective's concatenated sub-batches).
    While ``torch.compile`` traces, the backbone is returned as it is.
    """
    if is_tracing():
        return backbone  # type: ignore[return-value]

    def call(x: Tensor, t: Tensor, s: Tensor, cond: object = None, **kwargs: object) -> Tensor:
        try:
            output = backbone(x, t, s, cond, **kwargs)
        except Exception as error:
            if context is not None and hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(f"raised by the backbone called on x of shape {tuple(x.shape)} in {context}")
            raise
        return check_backbone_output(output, x)

    call.__wrapped__ = backbone  # type: ignore[attr-defined]  # dropout detection looks through it
    return call
