"""Fused per-sample linear combination: out_j[i] = Σ_k C[i, j, k] · in_k[i] (up to 4 inputs, 4 outputs).

One pass over the inputs writes every output. The path build (x_t, v_t from data and noise),
the teacher state x_ℓ and the guided target are all instances; their coefficients, and the
maths behind them, live in soflow_core. The backward of a combination is the combination with
the transposed coefficients, so the same kernel serves both directions.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from soflow_kernels._rows import as_rows, check_coefficients, check_same_shape, elementwise_block, flat_rows

__all__ = ["linear_combination"]

MAX_TERMS = 4


@triton.jit
def _combine(c, x0, x1, x2, x3, N_IN: tl.constexpr):
    acc = tl.load(c) * x0
    if N_IN > 1:
        acc += tl.load(c + 1) * x1
    if N_IN > 2:
        acc += tl.load(c + 2) * x2
    if N_IN > 3:
        acc += tl.load(c + 3) * x3
    return acc


@triton.jit
def _linear_combination_kernel(
    in0,
    in1,
    in2,
    in3,
    out0,
    out1,
    out2,
    out3,
    coefficients,
    n_cols,
    stride0,
    stride1,
    stride2,
    stride3,
    N_IN: tl.constexpr,
    N_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x0 = tl.load(in0 + row * stride0 + cols, mask=mask, other=0.0).to(tl.float32)
    x1 = x0
    x2 = x0
    x3 = x0
    if N_IN > 1:
        x1 = tl.load(in1 + row * stride1 + cols, mask=mask, other=0.0).to(tl.float32)
    if N_IN > 2:
        x2 = tl.load(in2 + row * stride2 + cols, mask=mask, other=0.0).to(tl.float32)
    if N_IN > 3:
        x3 = tl.load(in3 + row * stride3 + cols, mask=mask, other=0.0).to(tl.float32)
    c = coefficients + row * (N_OUT * N_IN)
    offsets = row * n_cols + cols
    tl.store(out0 + offsets, _combine(c, x0, x1, x2, x3, N_IN).to(out0.dtype.element_ty), mask=mask)
    if N_OUT > 1:
        tl.store(out1 + offsets, _combine(c + N_IN, x0, x1, x2, x3, N_IN).to(out1.dtype.element_ty), mask=mask)
    if N_OUT > 2:
        tl.store(out2 + offsets, _combine(c + 2 * N_IN, x0, x1, x2, x3, N_IN).to(out2.dtype.element_ty), mask=mask)
    if N_OUT > 3:
        tl.store(out3 + offsets, _combine(c + 3 * N_IN, x0, x1, x2, x3, N_IN).to(out3.dtype.element_ty), mask=mask)


def _check(inputs: list[Tensor], coefficients: Tensor) -> None:
    if not 1 <= len(inputs) <= MAX_TERMS:
        raise ValueError(f"inputs must hold 1 to {MAX_TERMS} tensors; got {len(inputs)}")
    if coefficients.ndim != 3 or not 1 <= coefficients.shape[1] <= MAX_TERMS:
        raise ValueError(
            f"coefficients must have shape (b, outputs ≤ {MAX_TERMS}, inputs); got {tuple(coefficients.shape)}"
        )
    check_same_shape("inputs[0]", inputs[0], **{f"inputs[{k}]": x for k, x in enumerate(inputs[1:], 1)})


def _result_dtype(inputs: list[Tensor]) -> torch.dtype:
    dtype = inputs[0].dtype
    for x in inputs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _launch(inputs: list[Tensor], coefficients: Tensor, out_dtypes: list[torch.dtype]) -> list[Tensor]:
    shape, batch = inputs[0].shape, inputs[0].shape[0]
    n_out, n_in = len(out_dtypes), len(inputs)
    table = check_coefficients(coefficients, batch, (n_out, n_in))
    rows = [as_rows(f"inputs[{k}]", x, batch) for k, x in enumerate(inputs)]
    n_cols = rows[0].shape[1]
    outs = [torch.empty((batch, n_cols), dtype=dtype, device=rows[0].device) for dtype in out_dtypes]
    if batch * n_cols > 0:
        padded_in = rows + [rows[0]] * (MAX_TERMS - n_in)
        padded_out = outs + [outs[0]] * (MAX_TERMS - n_out)
        block = elementwise_block(n_cols)
        grid = (batch, triton.cdiv(n_cols, block))
        _linear_combination_kernel[grid](
            *padded_in,
            *padded_out,
            table,
            n_cols,
            *(x.stride(0) for x in padded_in),
            N_IN=n_in,
            N_OUT=n_out,
            BLOCK=block,
        )
    return [out.view(shape) for out in outs]


@torch.library.custom_op("soflow::linear_combination", mutates_args=())
def linear_combination(inputs: list[Tensor], coefficients: Tensor) -> list[Tensor]:
    """Per-sample linear combinations of same-shaped tensors, one pass (mirrors the reference in soflow_core).

    Args:
        inputs: k tensors of identical shape (b, ...), 1 ≤ k ≤ 4.
        coefficients: C of shape (b, m, k), 1 ≤ m ≤ 4.

    Returns:
        m tensors out_j = Σ_k C[:, j, k]·inputs[k], in the promoted dtype of the inputs.
    """
    _check(inputs, coefficients)
    return _launch(inputs, coefficients, [_result_dtype(inputs)] * coefficients.shape[1])


@linear_combination.register_fake
def _(inputs: list[Tensor], coefficients: Tensor) -> list[Tensor]:
    _check(inputs, coefficients)
    dtype = _result_dtype(inputs)
    return [inputs[0].new_empty(inputs[0].shape, dtype=dtype) for _ in range(coefficients.shape[1])]


def _setup_context(ctx, inputs, output) -> None:
    tensors, coefficients = inputs
    ctx.input_dtypes = [x.dtype for x in tensors]
    ctx.save_coefficient_inputs = coefficients.requires_grad
    saved = [coefficients, *tensors] if coefficients.requires_grad else [coefficients]
    ctx.save_for_backward(*saved)


def _backward(ctx, grads):
    coefficients, *tensors = ctx.saved_tensors
    grads = list(grads)
    # d in_k = Σ_j C[:, j, k]·g_j: the same kernel with the table transposed.
    transposed = coefficients.detach().transpose(1, 2)
    grad_inputs = linear_combination(grads, transposed)
    grad_inputs = [g if g.dtype == dtype else g.to(dtype) for g, dtype in zip(grad_inputs, ctx.input_dtypes)]
    grad_coefficients = None
    if ctx.save_coefficient_inputs:
        # Only when times carry gradients (never in training): a per-row reduction in PyTorch.
        g = torch.stack([flat_rows(x).float() for x in grads], dim=1)
        x = torch.stack([flat_rows(x).float() for x in tensors], dim=1)
        grad_coefficients = torch.einsum("bjd,bkd->bjk", g, x).to(coefficients.dtype)
    return grad_inputs, grad_coefficients


linear_combination.register_autograd(_backward, setup_context=_setup_context)
