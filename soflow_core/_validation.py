"""Input checks shared by the public API.

Every check raises `ValueError` or `TypeError` naming the argument and showing the
offending value. Checks that read tensor values (finiteness, time ranges, label ranges)
force a device synchronisation, so callers skip them while `torch.compile` traces; checks
of types, shapes, dtypes and devices read metadata only and cost nothing.

Class labels follow one rule wherever they enter (`label_checks`): integer labels of shape
(b,), in [0, N), and N itself (the null class) only where the model has a null row and the
caller allows it. The objective, the samplers and the loss objects apply it before any model
call when the backbone declares its class count; the library's backbones apply it again in
their ``forward`` (`class_labels`), so a wrapper that hides the class count cannot let a bad
label reach the embedding. A caller that has checked the labels (or was told not to) runs the
backbone inside `label_values_checked`, where the backbones check metadata only and add no
device synchronisation to the step.
"""

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
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


def _values_readable(x: Tensor) -> bool:
    """Whether ``x``'s values can be read: not a meta tensor, not batched by ``torch.func.vmap``."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            return False
        x = functorch.get_unwrapped(x)
    return not x.is_meta


def label_checks(
    name: str, labels: Tensor, num_classes: int, *, null_allowed: bool | Tensor = False
) -> list[ValueCheck]:
    """Check class labels against a class count: metadata now, the value range as a deferred check.

    The one rule for class labels, shared by the objective, the samplers, the loss objects and
    the backbones' ``forward`` (through `class_labels`).

    Args:
        name: The argument's name.
        labels: The labels, one integer per sample.
        num_classes: N; labels must lie in [0, N).
        null_allowed: Where the null index N is also allowed: False, True, or a boolean mask
            (the label-drop mask: only dropped samples may carry it).

    Returns:
        The value check to pass to ``check_values`` (empty while compiling, and for labels whose
        values cannot be read: meta tensors, or labels batched by ``torch.func.vmap``).

    Raises:
        TypeError: If ``labels`` is not a 1-d integer tensor.
    """
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"{name} must be integer class labels of shape (b,) for a model of {num_classes} classes; "
            f"got {_describe(labels)}"
        )
    if is_tracing() or not _values_readable(labels):
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


_LABEL_VALUES_CHECKED: ContextVar[bool] = ContextVar("soflow_label_values_checked", default=False)


@contextmanager
def label_values_checked() -> Iterator[None]:
    """A block in which the backbones' ``forward`` skips the value check of its labels.

    For callers that checked every label they pass against the backbone's class count with
    `label_checks` (the objective, the samplers and the loss objects, when the backbone
    declares ``num_classes``), or that were told not to check (``check_inputs=False``): the
    backbones still check the labels' type, shape, dtype and device, which reads metadata only,
    but do not read their values again, so the step has no device synchronisation per call.

    Yields:
        None.
    """
    token = _LABEL_VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _LABEL_VALUES_CHECKED.reset(token)


def class_labels(cond: object, x: Tensor, *, num_classes: int, null_class: bool, model: str) -> Tensor:
    """The labels a class-conditional backbone embeds: ``cond`` checked by the objective's rule, or the null class.

    Called at the top of the library's backbones' ``forward``. ``cond=None`` selects the null
    class (index ``num_classes``) when the model has one. Otherwise ``cond`` must be one integer
    label per sample of ``x`` on its device (metadata, always checked) with values in
    [0, num_classes), or num_classes where the model has a null row (`label_checks`). The value
    check reads the labels, one device synchronisation on an accelerator, so it is skipped where
    it would repeat a caller's check or cannot run: inside `label_values_checked`, while
    ``torch.compile`` traces, and for meta or vmap-batched labels.

    Args:
        cond: The labels, or None.
        x: The backbone's input (its batch size and device).
        num_classes: N, the classes of the label table.
        null_class: Whether the table has the null row N.
        model: The model's name for the messages, e.g. ``"DiT"``.

    Returns:
        int64 labels of shape (b,), on ``x``'s device.

    Raises:
        ValueError: On ``cond=None`` without a null row, a batch size or device other than
            ``x``'s, or labels out of range.
        TypeError: If ``cond`` is not an integer tensor of shape (b,).
    """
    batch = x.shape[0]
    if cond is None:
        if not null_class:
            raise ValueError(
                f"cond=None asks for the null class, but this {model} has no null row (num_classes={num_classes}, "
                "null_class=False); pass labels or build it with null_class=True"
            )
        return torch.full((batch,), num_classes, dtype=torch.long, device=x.device)
    if not isinstance(cond, Tensor):
        raise TypeError(f"cond must be a tensor of class labels for {model}, or None; got {type(cond).__name__}")
    checks = label_checks("cond", cond, num_classes, null_allowed=null_class)
    if cond.shape[0] != batch:
        raise ValueError(f"cond must hold one class label per sample of x ({batch}); got shape {tuple(cond.shape)}")
    if cond.device != x.device:
        raise ValueError(f"cond must be on the device of x ({x.device}); got labels on {cond.device}")
    if checks and not _LABEL_VALUES_CHECKED.get():  # no checks while compiling: the context is not read there
        check_values(checks)
    return cond.long()


def _unwrapped(backbone: object) -> Iterator[object]:
    """``backbone``, then what its DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers hold."""
    for _ in range(8):
        yield backbone
        inner = getattr(backbone, "_orig_mod", None) or getattr(backbone, "module", None)
        if inner is None:
            return
        backbone = inner


def class_count(backbone: object) -> tuple[int, bool] | None:
    """The class count a backbone declares, and whether it has a null class, or None when it declares none.

    A backbone declares it with an integer ``num_classes`` attribute (the null class, index
    ``num_classes``, exists unless ``null_class`` is False). DDP/FSDP (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers are looked through.
    """
    for candidate in _unwrapped(backbone):
        count = getattr(candidate, "num_classes", None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            return count, bool(getattr(candidate, "null_class", True))
    return None


def check_no_labels_for(backbone: object, cond: object) -> None:
    """Refuse a condition for a backbone that declares itself unconditional (``num_classes = None``).

    The library's backbones declare it (an unconditional DiT or MLP, the SongUNet), looked up
    through DDP and ``torch.compile`` wrappers; a network that declares nothing is passed its
    conditions unchecked.

    Args:
        backbone: The network, or a wrapper around it.
        cond: The conditions it would be called with.

    Raises:
        ValueError: If ``cond`` is given to a declared unconditional backbone.
    """
    if cond is None:
        return
    for candidate in _unwrapped(backbone):
        if hasattr(candidate, "num_classes"):
            if candidate.num_classes is None:
                raise ValueError(
                    f"cond was given, but the backbone ({type(candidate).__name__}) is unconditional "
                    "(num_classes=None): pass cond=None"
                )
            return


def _declared_sample_shape(backbone: object) -> tuple[int, ...] | None:
    """The per-sample input shape a backbone declares (``sample_shape``, as the library's do), or None."""
    for candidate in _unwrapped(backbone):
        shape = getattr(candidate, "sample_shape", None)
        if isinstance(shape, tuple):
            return shape
    return None


def _first_parameter(backbone: object) -> Tensor | None:
    """A backbone's first floating-point parameter, looked through DDP and ``torch.compile`` wrappers.

    None for a function, a module without floating parameters, or sharded (FSDP2, DTensor)
    parameters, whose compute dtype and device the sharding decides.
    """
    for candidate in _unwrapped(backbone):
        if isinstance(candidate, torch.nn.Module):
            for parameter in candidate.parameters():
                if parameter.is_floating_point():
                    return None if hasattr(parameter, "device_mesh") else parameter
            return None
    return None


def check_backbone_input(name: str, x: Tensor, backbone: object, *, shape: bool = True) -> None:
    """Raise, before the call, if ``x`` is not what the backbone takes: its sample shape, device and dtype.

    The sample shape is checked where the backbone declares one (``sample_shape``, as the
    library's backbones do). Outside autocast a network whose parameters are float32 cannot take float64 input (torch
    fails inside the first layer with "mat1 and mat2 must have the same dtype"), and a network
    on one kind of device cannot take input on another (or any input while its parameters are
    on the meta device). The device check compares device types only, so a model spread over
    several GPUs is not refused. Metadata only; skipped while ``torch.compile`` traces.

    Args:
        name: The argument the input came from (``data``, ``noise``, ``x``).
        x: The input.
        backbone: The network, or a wrapper around it.
        shape: Check the sample shape too (the backbones' own ``forward`` checks it with its own message).

    Raises:
        TypeError: If the dtypes differ outside autocast.
        ValueError: If the sample shape differs, the devices differ in type, or the parameters
            are on the meta device.
    """
    if is_tracing():
        return
    expected = _declared_sample_shape(backbone) if shape else None
    if expected is not None and tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{name} holds samples of shape {tuple(x.shape[1:])}, but the backbone takes samples of shape {expected}"
        )
    parameter = _first_parameter(backbone)
    if parameter is None:
        return
    if parameter.is_meta and not x.is_meta:
        raise ValueError(
            f"the backbone's parameters are on the meta device (shapes without values); load or initialise them "
            f"on {x.device} before passing {name} ({_describe(x)} on {x.device})"
        )
    if parameter.device.type != x.device.type:
        raise ValueError(
            f"{name} is on {x.device} but the backbone's parameters are on {parameter.device}: pass "
            f"{name}.to({str(parameter.device)!r}), or move the model with model.to({str(x.device)!r})"
        )
    if x.dtype != parameter.dtype and _autocast_dtype(x.device) is None:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the backbone's parameters are {parameter.dtype}: pass "
            f"{name}.to({parameter.dtype}), or convert the model with model.to({x.dtype}), or run the step under "
            "torch.autocast"
        )


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


def check_cond(name: str, cond: object, batch: int, *, device: torch.device | None = None) -> None:
    """Check that a conditioning tensor (or None) has one entry per sample, on ``device`` when given."""
    if cond is None:
        return
    if not isinstance(cond, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(cond).__name__}")
    if cond.ndim == 0 or cond.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} in its first dimension; got {tuple(cond.shape)}")
    if device is not None and cond.device != device:
        raise ValueError(f"{name} must be on the device of the samples ({device}); got {name} on {cond.device}")


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


def check_bool(name: str, value: object) -> bool:
    """Check a switch: True or False only.

    Strings, numbers and None are refused: ``bool("no")`` is True, so a switch read from a
    config file or a command line as text would silently mean the opposite.

    Args:
        name: The argument's name.
        value: The value given.

    Returns:
        The value.

    Raises:
        TypeError: If ``value`` is not a bool.
    """
    if isinstance(value, bool):
        return value
    raise TypeError(f"{name} must be True or False; got {type(value).__name__}: {value!r}")


def check_sequence(
    name: str, value: object, check_item: Callable[[str, object], object], *, min_length: int = 0
) -> list:
    """Check a list or tuple (not a string, not a lone number), each entry with ``check_item``.

    Args:
        name: The argument's name.
        value: The value given.
        check_item: Checks one entry, called with ``name[i]`` and the entry; returns it converted.
        min_length: The fewest entries allowed.

    Returns:
        The converted entries, as a list.

    Raises:
        TypeError: If ``value`` is not a list or tuple, or an entry fails ``check_item``'s type check.
        ValueError: If it is too short, or an entry fails ``check_item``'s value check.
    """
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple; got {type(value).__name__}: {value!r}")
    if len(value) < min_length:
        raise ValueError(
            f"{name} must hold at least {min_length} entr{'y' if min_length == 1 else 'ies'}; got {value!r}"
        )
    return [check_item(f"{name}[{i}]", item) for i, item in enumerate(value)]


def check_time_list(name: str, times: object) -> list[float]:
    """A grid of times as Python floats: a 1-d floating-point tensor or array, or a list or tuple of reals.

    Booleans are refused (``True`` would be read as the time 1.0), and so are integer tensors;
    ranges and order are the caller's checks.

    Args:
        name: The argument's name.
        times: The times.

    Returns:
        The times as a list of floats.

    Raises:
        TypeError: On anything but real numbers or a floating-point tensor.
        ValueError: On a tensor without values (meta).
    """
    if isinstance(times, Tensor):
        if not times.is_floating_point() or times.ndim != 1:
            raise TypeError(f"{name} must be a 1-d floating-point tensor or a list of floats; got {_describe(times)}")
        if not _values_readable(times):
            raise ValueError(f"{name} must hold values; got a {_describe(times)} on {times.device}")
        return times.detach().to("cpu", torch.float64).tolist()
    if isinstance(times, np.ndarray):
        if times.dtype.kind != "f" or times.ndim != 1:
            raise TypeError(f"{name} must be a 1-d floating-point array or a list of floats; got {times!r}")
        return times.astype(np.float64).tolist()

    def real(item_name: str, value: object) -> float:
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            kind = type(value).__name__
            raise TypeError(f"{item_name} must be a real number (a time in [0, 1]); got {kind}: {value!r}")
        return float(value)

    return check_sequence(name, times, real)


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


def checked_backbone(
    backbone: Callable[..., object], context: str | None = None, *, labels_checked: bool = False
) -> Callable[..., Tensor]:
    """``backbone`` with every output checked against its input (``check_backbone_output``).

    With ``context``, an exception raised inside the backbone gets a note saying which call
    raised it (for shapes the caller built, such as an objective's concatenated sub-batches).
    With ``labels_checked`` (the caller checked every label it passes), each call runs inside
    `label_values_checked`. While ``torch.compile`` traces, the backbone is returned as it is.
    """
    if is_tracing():
        return backbone  # type: ignore[return-value]

    def call(x: Tensor, t: Tensor, s: Tensor, cond: object = None) -> Tensor:
        try:
            if labels_checked:
                with label_values_checked():
                    output = backbone(x, t, s, cond)
            else:
                output = backbone(x, t, s, cond)
        except Exception as error:
            if context is not None and hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(f"raised by the backbone called on x of shape {tuple(x.shape)} in {context}")
            raise
        return check_backbone_output(output, x)

    call.__wrapped__ = backbone  # type: ignore[attr-defined]  # dropout detection looks through it
    return call


def prepared_backbone(
    backbone: Callable[..., object],
    x_name: str,
    x: Tensor,
    cond: object,
    *,
    checks: Sequence[ValueCheck] = (),
    context: str | None = None,
) -> Callable[..., Tensor]:
    """The checks before a public function's first backbone call, and the backbone to call.

    ``x`` (named ``x_name``) must be on the device and in the dtype of the backbone's
    parameters (`check_backbone_input`); class labels in ``cond`` must fit the class count the
    backbone declares (`label_checks`, the null class allowed where it has one), read with the other
    value ``checks`` in one device synchronisation. The result checks every output
    (`checked_backbone`) and, when the labels were checked, calls the backbone inside
    `label_values_checked`, so its own ``forward`` does not read them again.

    Args:
        backbone: The network, or a wrapper around it.
        x_name: The argument ``x`` came from, for the messages.
        x: The first input the backbone will see.
        cond: The conditions it will see (already checked to have one entry per sample), or None.
        checks: Other value checks to read in the same synchronisation.
        context: Passed to `checked_backbone`.

    Returns:
        The output-checking backbone.
    """
    check_backbone_input(x_name, x, backbone)
    check_no_labels_for(backbone, cond)
    checks = list(checks)
    declared = class_count(backbone)
    if declared is not None and isinstance(cond, Tensor):
        checks += label_checks("cond", cond, declared[0], null_allowed=declared[1])
    check_values(checks)
    return checked_backbone(backbone, context, labels_checked=declared is not None)


def labels_unchecked(backbone: Callable[..., object]) -> Callable[..., object]:
    """``backbone`` called inside `label_values_checked` (for ``check_inputs=False``: no value checks at all).

    While ``torch.compile`` traces, the backbone is returned as it is (value checks are off there).
    """
    if is_tracing():
        return backbone

    def call(x: Tensor, t: Tensor, s: Tensor, cond: object = None) -> object:
        with label_values_checked():
            return backbone(x, t, s, cond)

    call.__wrapped__ = backbone  # type: ignore[attr-defined]  # dropout detection looks through it
    return call
