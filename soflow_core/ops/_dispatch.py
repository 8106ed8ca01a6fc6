"""Backend selection for the fused loss-path ops: the one place that imports the Triton kernels.

``backend="torch"`` runs the pure-PyTorch references in `soflow_core.ops.fused`. ``"triton"`` runs
the kernels of the ``soflow_kernels`` package; a call they cannot serve (no Triton, a CPU
tensor outside ``TRITON_INTERPRET=1``, float64, tensors on different devices) falls back to
the reference with a warning shown once per reason. ``"auto"`` picks the kernels exactly when
they can serve the call (CUDA tensors of a supported dtype with Triton installed), silently;
it never picks the CPU interpreter, which exists for testing.

Importing soflow_core never imports Triton: the kernels are imported on the first call that
resolves to them.
"""

import functools
import importlib
import importlib.util
import warnings
from types import ModuleType
from typing import Literal, get_args

import torch
from torch import Tensor

from soflow_core._validation import check_choice

__all__ = ["BACKENDS", "Backend", "kernel_op", "kernels_available", "kernels_interpreted", "resolve_backend"]

Backend = Literal["auto", "torch", "triton"]
"""Where the fused loss-path ops run: ``"auto"``, ``"torch"`` (the references) or ``"triton"``."""

BACKENDS: tuple[str, ...] = get_args(Backend)

_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INTERPRETER_DTYPES = (torch.float32,)


def _constant_under_compile(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (which imports Triton).

    Dynamo evaluates a function carrying this mark once while tracing and keeps its result as a
    constant; the test suite checks that the loss path then traces without graph breaks.
    """
    fn._dynamo_marked_constant = True
    return fn


@functools.cache
def _import_kernels() -> ModuleType | None:
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("soflow_kernels") is None:
        return None
    return importlib.import_module("soflow_kernels")


@_constant_under_compile
def kernels_available() -> bool:
    """Whether Triton and the ``soflow_kernels`` package are installed, importing them if so.

    ``torch.compile`` runs this once while tracing and keeps the answer as a constant.

    Returns:
        True if the Triton backend can be used at all.
    """
    return _import_kernels() is not None


@_constant_under_compile
def kernels_interpreted() -> bool:
    """Whether the imported kernels were built for Triton's CPU interpreter."""
    kernels = _import_kernels()
    return kernels is not None and bool(kernels.INTERPRETED)


def kernel_op(name: str) -> object:
    """The registered custom op ``torch.ops.soflow.<name>`` (import the kernels first).

    Args:
        name: The op's name.

    Returns:
        The op, callable like its reference.
    """
    return getattr(torch.ops.soflow, name)


def _unsupported_reason(tensors: tuple[Tensor | None, ...], *, explicit: bool) -> str | None:
    """Why the kernels cannot serve a call on ``tensors``, or None when they can."""
    present = [x for x in tensors if x is not None]
    devices = {x.device for x in present}
    if len(devices) > 1:
        return f"tensors on several devices ({', '.join(sorted(map(str, devices)))})"
    device = next(iter(devices))
    if device.type != "cuda" and not (explicit and device.type == "cpu"):
        return f"device {device.type!r} (the kernels need CUDA, or the CPU under TRITON_INTERPRET=1)"
    if not kernels_available():
        return "Triton or the soflow_kernels package is not installed"
    if device.type == "cuda":
        allowed = _GPU_DTYPES
    elif kernels_interpreted():
        allowed = _INTERPRETER_DTYPES
    else:
        return "device 'cpu' without TRITON_INTERPRET=1 set before the kernels were imported"
    for x in present:
        if x.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            return f"dtype {x.dtype} on {device.type} (supported there: {names})"
    return None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"backend='triton' cannot run the fused kernels here: {reason}; using the PyTorch reference instead.",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve_backend(backend: str, *tensors: Tensor | None) -> Literal["torch", "triton"]:
    """Decide which implementation serves one call on ``tensors``.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        *tensors: The call's tensor arguments (None entries are ignored).

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: If ``backend`` is not one of the three names.
    """
    choice = check_choice("backend", backend, BACKENDS)
    if choice == "torch":
        return "torch"
    reason = _unsupported_reason(tensors, explicit=choice == "triton")
    if reason is None:
        return "triton"
    if choice == "triton":
        _warn_once(reason)
    return "torch"
