"""Launcher helpers shared by the kernels: row views, block sizes, argument checks."""

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Element types the kernels read and write (accumulation is always float32)."""


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_rows(name: str, x: Tensor, batch: int) -> Tensor:
    """View ``x`` as (batch, n) with unit column stride, copying only when no such view exists.

    Args:
        name: Argument name for error messages.
        x: A tensor whose first dimension is the batch.
        batch: The expected batch size.

    Returns:
        A 2-D tensor whose rows are the flattened samples.

    Raises:
        ValueError: If ``x`` has no batch dimension of size ``batch`` or an unsupported dtype.
    """
    if x.ndim < 1 or x.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} in its first dimension; got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 for the Triton kernels; got {x.dtype}")
    rows = flat_rows(x)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def flat_rows(x: Tensor) -> Tensor:
    """``x`` as (b, n), n the product of its trailing sizes (``reshape(b, -1)`` fails for b = 0).

    Args:
        x: A tensor whose first dimension is the batch.

    Returns:
        The rows, a view where one exists.
    """
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


@triton.jit
def inverse_power(x, p):
    """x^−p as the reference's ``1 / x**p``: exp2(−p·log2 x), and 1 for p = 0 whatever x is.

    IEEE pow gives x^0 = 1 for every x, 0, ∞ and NaN included, where exp2(−0·log2 x) is NaN.
    """
    return tl.where(p == 0.0, 1.0, tl.exp2(-p * tl.log2(x)))


def check_same_shape(reference_name: str, reference: Tensor, **others: Tensor | None) -> None:
    """Raise a ValueError naming the first tensor whose shape or device differs from ``reference``."""
    for name, other in others.items():
        if other is None:
            continue
        if other.shape != reference.shape:
            raise ValueError(
                f"{name} must have the shape of {reference_name} {tuple(reference.shape)}; got {tuple(other.shape)}"
            )
        if other.device != reference.device:
            raise ValueError(f"{name} is on {other.device} but {reference_name} is on {reference.device}")


def check_coefficients(coefficients: Tensor, batch: int, shape: tuple[int, ...]) -> Tensor:
    """Check the per-sample coefficient table and return it as contiguous float32.

    Args:
        coefficients: The table, (batch, *shape).
        batch: The batch size.
        shape: Its expected trailing shape.

    Returns:
        The table as a contiguous float32 tensor.

    Raises:
        ValueError: If the shape is wrong.
    """
    if tuple(coefficients.shape) != (batch, *shape):
        raise ValueError(f"coefficients must have shape {(batch, *shape)}; got {tuple(coefficients.shape)}")
    return coefficients.detach().to(torch.float32).contiguous()


def elementwise_block(n_cols: int) -> int:
    """Columns per program for the elementwise (2-D grid) kernels."""
    return min(triton.next_power_of_2(max(n_cols, 16)), 1024)


def reduction_block(n_cols: int) -> tuple[int, int]:
    """Columns per loop iteration and warps for the one-program-per-row reduction kernels."""
    block = min(triton.next_power_of_2(max(n_cols, 16)), 4096)
    return block, (8 if block >= 2048 else 4)
