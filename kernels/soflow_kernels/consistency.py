"""Fused solution-consistency rows: the finite-difference quotient, its weight and the surrogate.

Per sample, with f_t = a_t·x_t + b_t·F_t, f_ℓ = a_ℓ·x_ℓ (+ b_ℓ·F_ℓ) and q = (f_t − f_ℓ)/gap,
the forward reads every input once and writes mean q², w = (mean q² + ε)^−p, the surrogate
sgn·w·mean(F_t·q) and the equivalent loss scale·w·mean q². The backward recomputes q rather
than storing it and writes dF_t = g·sgn·w·q/n. The formulas and their reference live in
``soflow_core.ops.fused.consistency_rows_reference``.
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

__all__ = ["consistency_rows"]

N_COEFFICIENTS = 7  # a_t, b_t, a_ell, b_ell, gap, sign, equivalent scale


@triton.jit
def _quotient(
    output,
    x_t,
    teacher_state,
    teacher_output,
    row,
    cols,
    mask,
    s_out,
    s_x,
    s_ts,
    s_to,
    a_t,
    b_t,
    a_ell,
    b_ell,
    gap,
    HAS_TEACHER_OUTPUT: tl.constexpr,
):
    f = tl.load(output + row * s_out + cols, mask=mask, other=0.0).to(tl.float32)
    f_t = a_t * tl.load(x_t + row * s_x + cols, mask=mask, other=0.0).to(tl.float32) + b_t * f
    f_ell = a_ell * tl.load(teacher_state + row * s_ts + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_TEACHER_OUTPUT:
        f_ell += b_ell * tl.load(teacher_output + row * s_to + cols, mask=mask, other=0.0).to(tl.float32)
    return f, (f_t - f_ell) / gap


@triton.jit
def _consistency_fwd_kernel(
    output,
    x_t,
    teacher_state,
    teacher_output,
    coefficients,
    surrogate,
    quotient_mse,
    weight_out,
    equivalent,
    n_cols,
    s_out,
    s_x,
    s_ts,
    s_to,
    p,
    eps,
    HAS_TEACHER_OUTPUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = coefficients + row * 7
    a_t = tl.load(c)
    b_t = tl.load(c + 1)
    a_ell = tl.load(c + 2)
    b_ell = tl.load(c + 3)
    gap = tl.load(c + 4)
    sign = tl.load(c + 5)
    eq_scale = tl.load(c + 6)
    acc_qq = tl.zeros([BLOCK], dtype=tl.float32)
    acc_fq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        f, q = _quotient(
            output,
            x_t,
            teacher_state,
            teacher_output,
            row,
            cols,
            mask,
            s_out,
            s_x,
            s_ts,
            s_to,
            a_t,
            b_t,
            a_ell,
            b_ell,
            gap,
            HAS_TEACHER_OUTPUT,
        )
        acc_qq += q * q
        acc_fq += f * q
    q_mse = tl.sum(acc_qq, axis=0) / n_cols
    fq = tl.sum(acc_fq, axis=0) / n_cols
    weight = inverse_power(q_mse + eps, p)
    tl.store(quotient_mse + row, q_mse)
    tl.store(weight_out + row, weight)
    tl.store(surrogate + row, sign * weight * fq)
    tl.store(equivalent + row, eq_scale * weight * q_mse)


@triton.jit
def _consistency_bwd_kernel(
    output,
    x_t,
    teacher_state,
    teacher_output,
    coefficients,
    weight,
    grad_surrogate,
    grad_output,
    n_cols,
    s_out,
    s_x,
    s_ts,
    s_to,
    s_grad,
    HAS_TEACHER_OUTPUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    c = coefficients + row * 7
    _, q = _quotient(
        output,
        x_t,
        teacher_state,
        teacher_output,
        row,
        cols,
        mask,
        s_out,
        s_x,
        s_ts,
        s_to,
        tl.load(c),
        tl.load(c + 1),
        tl.load(c + 2),
        tl.load(c + 3),
        tl.load(c + 4),
        HAS_TEACHER_OUTPUT,
    )
    scale = tl.load(grad_surrogate + row * s_grad).to(tl.float32) * tl.load(c + 5) * tl.load(weight + row) / n_cols
    tl.store(grad_output + row * n_cols + cols, (scale * q).to(grad_output.dtype.element_ty), mask=mask)


def _prepare(output, x_t, teacher_state, teacher_output, coefficients):
    check_same_shape("output", output, x_t=x_t, teacher_state=teacher_state, teacher_output=teacher_output)
    batch = output.shape[0]
    table = check_coefficients(coefficients, batch, (N_COEFFICIENTS,))
    rows = [
        as_rows("output", output, batch),
        as_rows("x_t", x_t, batch),
        as_rows("teacher_state", teacher_state, batch),
    ]
    rows.append(as_rows("teacher_output", teacher_output, batch) if teacher_output is not None else rows[0])
    return batch, table, rows


@torch.library.custom_op("soflow::consistency_rows", mutates_args=())
def consistency_rows(
    output: Tensor,
    x_t: Tensor,
    teacher_state: Tensor,
    teacher_output: Tensor | None,
    coefficients: Tensor,
    p: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample consistency terms (mirrors ``soflow_core.ops.fused.consistency_rows_reference``).

    Args:
        output: F_t, the network output at (x_t, t, s).
        x_t: The state at time t.
        teacher_state: x_ℓ (or f_ℓ itself, with a_ℓ = 1 and no teacher output).
        teacher_output: F_ℓ, or None.
        coefficients: (b, 7): a_t, b_t, a_ℓ, b_ℓ, t − ℓ, sgn(b_t), equivalent-loss scale.
        p: Power of the adaptive weight.
        eps: Offset of the adaptive weight.

    Returns:
        (surrogate, quotient_mse, weight, equivalent), each (b,) float32.
    """
    batch, table, rows = _prepare(output, x_t, teacher_state, teacher_output, coefficients)
    n_cols = rows[0].shape[1]
    results = [torch.empty(batch, dtype=torch.float32, device=output.device) for _ in range(4)]
    if batch > 0:
        block, warps = reduction_block(n_cols)
        _consistency_fwd_kernel[(batch,)](
            *rows,
            table,
            *results,
            n_cols,
            *(r.stride(0) for r in rows),
            float(p),
            float(eps),
            HAS_TEACHER_OUTPUT=teacher_output is not None,
            BLOCK=block,
            num_warps=warps,
        )
    return tuple(results)


@consistency_rows.register_fake
def _(output, x_t, teacher_state, teacher_output, coefficients, p, eps):
    rows = output.new_empty(output.shape[0], dtype=torch.float32)
    return tuple(torch.empty_like(rows) for _ in range(4))


@torch.library.custom_op("soflow::consistency_rows_backward", mutates_args=())
def consistency_rows_backward(
    output: Tensor,
    x_t: Tensor,
    teacher_state: Tensor,
    teacher_output: Tensor | None,
    coefficients: Tensor,
    weight: Tensor,
    grad_surrogate: Tensor,
) -> Tensor:
    """dF_t = g·sgn(b_t)·w·q/n with q recomputed from the inputs.

    Args:
        output: F_t.
        x_t: The state at time t.
        teacher_state: x_ℓ (or f_ℓ).
        teacher_output: F_ℓ, or None.
        coefficients: (b, 7) as in the forward.
        weight: The forward's weights.
        grad_surrogate: Upstream gradient of the per-sample surrogate, (b,).

    Returns:
        dF_t, shaped and typed like ``output``.
    """
    batch, table, rows = _prepare(output, x_t, teacher_state, teacher_output, coefficients)
    n_cols = rows[0].shape[1]
    grad_output = torch.empty((batch, n_cols), dtype=output.dtype, device=output.device)
    if batch * n_cols > 0:
        block = elementwise_block(n_cols)
        _consistency_bwd_kernel[(batch, triton.cdiv(n_cols, block))](
            *rows,
            table,
            weight.contiguous(),
            grad_surrogate,
            grad_output,
            n_cols,
            *(r.stride(0) for r in rows),
            grad_surrogate.stride(0),
            HAS_TEACHER_OUTPUT=teacher_output is not None,
            BLOCK=block,
        )
    return grad_output.view(output.shape)


@consistency_rows_backward.register_fake
def _(output, x_t, teacher_state, teacher_output, coefficients, weight, grad_surrogate):
    return output.new_empty(output.shape)


def _setup_context(ctx, inputs, output) -> None:
    out, x_t, teacher_state, teacher_output, coefficients, _p, _eps = inputs
    _, quotient_mse, weight, equivalent = output
    ctx.mark_non_differentiable(quotient_mse, weight, equivalent)
    ctx.has_teacher_output = teacher_output is not None
    saved = teacher_output if teacher_output is not None else out
    ctx.save_for_backward(out, x_t, teacher_state, saved, coefficients, weight)


def _backward(ctx, grad_surrogate, _grad_mse, _grad_weight, _grad_equivalent):
    out, x_t, teacher_state, teacher_output, coefficients, weight = ctx.saved_tensors
    teacher_output = teacher_output if ctx.has_teacher_output else None
    grad_out = consistency_rows_backward(out, x_t, teacher_state, teacher_output, coefficients, weight, grad_surrogate)
    return grad_out, None, None, None, None, None, None


consistency_rows.register_autograd(_backward, setup_context=_setup_context)
