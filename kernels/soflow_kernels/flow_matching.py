"""Fused Flow Matching rows: Δ = c_F·F + c_x·x − target, per-sample mean of Δ², adaptive weight, loss.

Forward: one program per sample reads F, the target (and x when c_x is not identically zero)
once and writes three numbers per sample. Backward: recomputes Δ and writes dF (and dx when
asked) directly, dF = g·w·(2/n)·c_F·Δ. The target is a stop-gradient quantity and gets none.
The formulas and their reference live in ``soflow_core.ops.fused.flow_matching_rows_reference``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from soflow_kernels._rows import (
    as_rows,
    check_coefficients,
    check_same_shape,
    elementwise_block,
    inverse_power,
    reduction_block,
)

__all__ = ["flow_matching_rows"]


@triton.jit
def _delta(
    output,
    state,
    target,
    row,
    cols,
    mask,
    s_out,
    s_state,
    s_target,
    c_state,
    c_out,
    HAS_STATE: tl.constexpr,
):
    f = tl.load(output + row * s_out + cols, mask=mask, other=0.0).to(tl.float32)
    delta = c_out * f - tl.load(target + row * s_target + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_STATE:
        delta += c_state * tl.load(state + row * s_state + cols, mask=mask, other=0.0).to(tl.float32)
    return delta


@triton.jit
def _flow_matching_fwd_kernel(
    output,
    state,
    target,
    coefficients,
    per_sample,
    mse_out,
    weight_out,
    n_cols,
    out_stride,
    state_stride,
    target_stride,
    p,
    eps,
    HAS_STATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c_state = tl.load(coefficients + row * 3)
    c_out = tl.load(coefficients + row * 3 + 1)
    w_scale = tl.load(coefficients + row * 3 + 2)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        delta = _delta(
            output, state, target, row, cols, mask, out_stride, state_stride, target_stride, c_state, c_out, HAS_STATE
        )
        acc += delta * delta
    mse = tl.sum(acc, axis=0) / n_cols
    weight = w_scale * inverse_power(mse + eps, p)
    tl.store(mse_out + row, mse)
    tl.store(weight_out + row, weight)
    tl.store(per_sample + row, weight * mse)


@triton.jit
def _flow_matching_bwd_kernel(
    output,
    state,
    target,
    coefficients,
    grad_per_sample,
    weight,
    grad_output,
    grad_state,
    n_cols,
    out_stride,
    state_stride,
    target_stride,
    grad_stride,
    HAS_STATE: tl.constexpr,
    NEED_STATE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    c_state = tl.load(coefficients + row * 3)
    c_out = tl.load(coefficients + row * 3 + 1)
    scale = tl.load(grad_per_sample + row * grad_stride).to(tl.float32) * tl.load(weight + row) * 2.0 / n_cols
    delta = _delta(
        output, state, target, row, cols, mask, out_stride, state_stride, target_stride, c_state, c_out, HAS_STATE
    )
    offsets = row * n_cols + cols
    tl.store(grad_output + offsets, (scale * c_out * delta).to(grad_output.dtype.element_ty), mask=mask)
    if NEED_STATE_GRAD:
        tl.store(grad_state + offsets, (scale * c_state * delta).to(grad_state.dtype.element_ty), mask=mask)


def _prepare(output: Tensor, state: Tensor | None, target: Tensor, coefficients: Tensor):
    check_same_shape("output", output, state=state, target=target)
    batch = output.shape[0]
    table = check_coefficients(coefficients, batch, (3,))
    out_rows = as_rows("output", output, batch)
    state_rows = as_rows("state", state, batch) if state is not None else out_rows
    target_rows = as_rows("target", target, batch)
    return batch, table, out_rows, state_rows, target_rows


@torch.library.custom_op("soflow::flow_matching_rows", mutates_args=())
def flow_matching_rows(
    output: Tensor, state: Tensor | None, target: Tensor, coefficients: Tensor, p: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample Flow Matching terms (mirrors ``soflow_core.ops.fused.flow_matching_rows_reference``).

    Args:
        output: F, the network output (b, ...).
        state: x, or None when its coefficient is identically zero.
        target: The target velocity.
        coefficients: (b, 3): c_x, c_F and the weight scale.
        p: Power of the adaptive weight.
        eps: Offset of the adaptive weight.

    Returns:
        (weight·mse, mse, weight), each (b,) float32.
    """
    batch, table, out_rows, state_rows, target_rows = _prepare(output, state, target, coefficients)
    n_cols = out_rows.shape[1]
    per_sample, mse, weight = (torch.empty(batch, dtype=torch.float32, device=output.device) for _ in range(3))
    if batch > 0:
        block, warps = reduction_block(n_cols)
        _flow_matching_fwd_kernel[(batch,)](
            out_rows,
            state_rows,
            target_rows,
            table,
            per_sample,
            mse,
            weight,
            n_cols,
            out_rows.stride(0),
            state_rows.stride(0),
            target_rows.stride(0),
            float(p),
            float(eps),
            HAS_STATE=state is not None,
            BLOCK=block,
            num_warps=warps,
        )
    return per_sample, mse, weight


@flow_matching_rows.register_fake
def _(output, state, target, coefficients, p, eps):
    rows = output.new_empty(output.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.custom_op("soflow::flow_matching_rows_backward", mutates_args=())
def flow_matching_rows_backward(
    output: Tensor,
    state: Tensor | None,
    target: Tensor,
    coefficients: Tensor,
    weight: Tensor,
    grad_per_sample: Tensor,
    need_state_grad: bool,
) -> tuple[Tensor, Tensor]:
    """dF = g·w·(2/n)·c_F·Δ and, when asked, dx = g·w·(2/n)·c_x·Δ (an empty tensor otherwise).

    Args:
        output: F.
        state: x, or None.
        target: The target.
        coefficients: (b, 3) as in the forward.
        weight: The forward's weights.
        grad_per_sample: Upstream gradient of the weighted per-sample loss, (b,).
        need_state_grad: Whether to write dx.

    Returns:
        (dF, dx).
    """
    batch, table, out_rows, state_rows, target_rows = _prepare(output, state, target, coefficients)
    n_cols = out_rows.shape[1]
    grad_output = torch.empty((batch, n_cols), dtype=output.dtype, device=output.device)
    need_state_grad = need_state_grad and state is not None
    state_dtype = state.dtype if need_state_grad else output.dtype
    grad_state = torch.empty((batch, n_cols) if need_state_grad else (0,), dtype=state_dtype, device=output.device)
    if batch * n_cols > 0:
        block = elementwise_block(n_cols)
        _flow_matching_bwd_kernel[(batch, triton.cdiv(n_cols, block))](
            out_rows,
            state_rows,
            target_rows,
            table,
            grad_per_sample,
            weight.contiguous(),
            grad_output,
            grad_state if need_state_grad else grad_output,
            n_cols,
            out_rows.stride(0),
            state_rows.stride(0),
            target_rows.stride(0),
            grad_per_sample.stride(0),
            HAS_STATE=state is not None,
            NEED_STATE_GRAD=need_state_grad,
            BLOCK=block,
        )
    grad_state = grad_state.view(output.shape) if need_state_grad else grad_state
    return grad_output.view(output.shape), grad_state


@flow_matching_rows_backward.register_fake
def _(output, state, target, coefficients, weight, grad_per_sample, need_state_grad):
    need = need_state_grad and state is not None
    grad_state = state.new_empty(state.shape) if need else output.new_empty((0,))
    return output.new_empty(output.shape), grad_state


def _setup_context(ctx, inputs, output) -> None:
    out, state, target, coefficients, ctx.p, ctx.eps = inputs
    _, mse, weight = output
    ctx.mark_non_differentiable(mse, weight)
    ctx.has_state = state is not None
    ctx.save_for_backward(out, state if state is not None else out, target, coefficients, weight)


def _backward(ctx, grad_per_sample, _grad_mse, _grad_weight):
    out, state, target, coefficients, weight = ctx.saved_tensors
    state = state if ctx.has_state else None
    need_state_grad = ctx.has_state and ctx.needs_input_grad[1]
    grad_out, grad_state = flow_matching_rows_backward(
        out, state, target, coefficients, weight, grad_per_sample, need_state_grad
    )
    return grad_out, (grad_state if need_state_grad else None), None, None, None, None


flow_matching_rows.register_autograd(_backward, setup_context=_setup_context)
