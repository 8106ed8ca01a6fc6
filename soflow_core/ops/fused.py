r"""The loss path as three fused operations, with the pure-PyTorch references the kernels mirror.

Everything between the network calls of a SoFlow step reduces to three per-sample mechanics:

* [`linear_combination`][soflow_core.ops.fused.linear_combination]: out_j = Σ_k C[:, j, k]·in_k. The
  path build (x_t, v_t from data and noise), the teacher state x_ℓ and the guided target are
  all of this form; their coefficients come from the paths, parameterizations and guidance.
* [`flow_matching_rows`][soflow_core.ops.fused.flow_matching_rows]: the Flow Matching error of each
  sample, its adaptive weight and the weighted loss.
* [`consistency_rows`][soflow_core.ops.fused.consistency_rows]: the finite-difference quotient of
  each sample, its weight, the division-free surrogate and the equivalent loss.

Each dispatching function takes ``backend`` (``"auto"``, ``"torch"``, ``"triton"``; see
[Kernels](../kernels.md)) and otherwise has the signature of its ``*_reference``, which is the
specification, the CPU path and the benchmark baseline. The maths that produces the
coefficients lives with the paths, parameterizations, guidance and losses.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from soflow_core._tensor import bcast_right, compute_dtype, per_sample_mean
from soflow_core.ops._dispatch import kernel_op, resolve_backend
from soflow_core.typing import Data, PerSample
from soflow_core.weighting import adaptive_weight

__all__ = [
    "consistency_rows",
    "consistency_rows_reference",
    "flow_matching_rows",
    "flow_matching_rows_reference",
    "linear_combination",
    "linear_combination_reference",
]


def _column(coefficients: Tensor, index: int, like: Tensor) -> Tensor:
    return bcast_right(coefficients[:, index], like)


# ---------------------------------------------------------------------------- references


def linear_combination_reference(inputs: Sequence[Data], coefficients: Float[Tensor, "b m k"]) -> list[Data]:
    r"""Per-sample linear combinations of same-shaped tensors.

    $$\text{out}_j[i] = \sum_k C[i, j, k]\;\text{in}_k[i],$$

    accumulated in float32 (float64 for float64 inputs) and returned in the promoted dtype of
    the inputs. Gradients flow to the inputs and to the coefficients.

    Args:
        inputs: k tensors of shape (b, ...), 1 ≤ k ≤ 4.
        coefficients: C, of shape (b, m, k), 1 ≤ m ≤ 4.

    Returns:
        The m combinations.

    Examples:
        >>> import torch
        >>> out, = linear_combination_reference([torch.ones(2, 3), torch.ones(2, 3)], torch.tensor([[[1.0, 2.0]]] * 2))
        >>> out[0].tolist()
        [3.0, 3.0, 3.0]
    """
    dtype = compute_dtype(*inputs)
    out_dtype = inputs[0].dtype
    for x in inputs[1:]:
        out_dtype = torch.promote_types(out_dtype, x.dtype)
    table = coefficients.to(dtype)
    xs = [x.to(dtype) for x in inputs]
    outs = []
    for j in range(table.shape[1]):
        acc = _column(table[:, j], 0, xs[0]) * xs[0]
        for k in range(1, len(xs)):
            acc = acc + _column(table[:, j], k, xs[k]) * xs[k]
        outs.append(acc.to(out_dtype))
    return outs


def flow_matching_rows_reference(
    output: Data, state: Data | None, target: Data, coefficients: Float[Tensor, "b 3"], p: float, eps: float
) -> tuple[PerSample, PerSample, PerSample]:
    r"""Per-sample Flow Matching error, adaptive weight and weighted loss.

    With the columns of C = (c_x, c_F, c_w):

    $$\Delta = c_F\,F + c_x\,x - \mathrm{sg}(\text{target}),\quad
      \mathrm{mse} = \tfrac1n\lVert\Delta\rVert^2,\quad
      w = c_w\,(\mathrm{sg}(\mathrm{mse}) + \varepsilon)^{-p},\quad
      \ell = w\cdot\mathrm{mse} .$$

    The gradient reaches F (and x): ∂ℓ/∂F = w·(2/n)·c_F·Δ. The target and the coefficients
    are constants.

    Args:
        output: F, the network output.
        state: x, or None when c_x ≡ 0 (skips a read).
        target: The target velocity.
        coefficients: (b, 3) columns c_x, c_F, c_w.
        p: Power of the adaptive weight.
        eps: Offset of the adaptive weight.

    Returns:
        (ℓ, mse, w): the weighted loss with gradient, the detached mse and weight.
    """
    dtype = compute_dtype(output, state, target)
    table = coefficients.detach().to(dtype)
    delta = _column(table, 1, output) * output.to(dtype) - target.detach().to(dtype)
    if state is not None:
        delta = delta + _column(table, 0, state) * state.to(dtype)
    mse = per_sample_mean(delta.square())
    weight = adaptive_weight(mse, p=p, eps=eps) * table[:, 2]
    return weight * mse, mse.detach(), weight


def consistency_rows_reference(
    output: Data,
    x_t: Data,
    teacher_state: Data,
    teacher_output: Data | None,
    coefficients: Float[Tensor, "b 7"],
    p: float,
    eps: float,
) -> tuple[PerSample, PerSample, PerSample, PerSample]:
    r"""Per-sample consistency quotient, weight, surrogate and equivalent loss.

    With the columns of C = (a_t, b_t, a_ℓ, b_ℓ, g, σ, κ), all detached:

    $$f_t = a_t x_t + b_t F_t,\quad f_\ell = a_\ell x_\ell + b_\ell F_\ell,\quad
      q = \frac{f_t - f_\ell}{g},\quad \overline{q^2} = \tfrac1n\lVert q\rVert^2,\quad
      w = (\overline{q^2} + \varepsilon)^{-p},$$
    $$\text{surrogate} = \sigma\,w\,\tfrac1n\textstyle\sum_d F_t\,\mathrm{sg}(q),\qquad
      \text{equivalent} = \kappa\,w\,\overline{q^2} .$$

    Only the surrogate has a gradient, σ·w·q/n with respect to F_t. Passing f_ℓ itself as
    ``teacher_state`` with a_ℓ = 1 and no ``teacher_output`` is the same computation.

    Args:
        output: F_t, the network output at (x_t, t, s).
        x_t: The state at time t.
        teacher_state: x_ℓ (or f_ℓ).
        teacher_output: F_ℓ, or None.
        coefficients: (b, 7) columns a_t, b_t, a_ℓ, b_ℓ, g = t − ℓ, σ = sgn(b_t), κ.
        p: Power of the adaptive weight.
        eps: Offset of the adaptive weight.

    Returns:
        (surrogate, mean q², w, equivalent); only the surrogate carries a gradient.
    """
    dtype = compute_dtype(output, x_t, teacher_state, teacher_output)
    table = coefficients.detach().to(dtype)
    output = output.to(dtype)
    with torch.no_grad():
        f_t = _column(table, 0, x_t) * x_t.to(dtype) + _column(table, 1, output) * output
        f_ell = _column(table, 2, teacher_state) * teacher_state.to(dtype)
        if teacher_output is not None:
            f_ell = f_ell + _column(table, 3, teacher_output) * teacher_output.to(dtype)
        q = (f_t - f_ell) / _column(table, 4, f_t)
        quotient_mse = per_sample_mean(q.square())
        weight = adaptive_weight(quotient_mse, p=p, eps=eps)
        equivalent = table[:, 6] * weight * quotient_mse
    surrogate = table[:, 5] * weight * per_sample_mean(output * q)
    return surrogate, quotient_mse, weight, equivalent


# ---------------------------------------------------------------------------- dispatch


def linear_combination(
    inputs: Sequence[Data], coefficients: Float[Tensor, "b m k"], *, backend: str = "auto"
) -> list[Data]:
    """[`linear_combination_reference`][soflow_core.ops.fused.linear_combination_reference] on the chosen backend.

    Args:
        inputs: k tensors of shape (b, ...), 1 ≤ k ≤ 4.
        coefficients: (b, m, k).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The m combinations.

    Raises:
        ValueError: If there are more than four inputs or outputs, or the shapes disagree.
    """
    if not 1 <= len(inputs) <= 4 or coefficients.ndim != 3 or not 1 <= coefficients.shape[1] <= 4:
        raise ValueError(
            f"linear_combination takes 1 to 4 inputs and coefficients of shape (b, 1..4, inputs); got "
            f"{len(inputs)} inputs and coefficients of shape {tuple(coefficients.shape)}"
        )
    if coefficients.shape[0] != inputs[0].shape[0] or coefficients.shape[2] != len(inputs):
        raise ValueError(
            f"coefficients must have shape ({inputs[0].shape[0]}, m, {len(inputs)}); got {tuple(coefficients.shape)}"
        )
    if resolve_backend(backend, *inputs) == "triton":
        return kernel_op("linear_combination")(list(inputs), coefficients)
    return linear_combination_reference(inputs, coefficients)


def flow_matching_rows(
    output: Data,
    state: Data | None,
    target: Data,
    coefficients: Float[Tensor, "b 3"],
    *,
    p: float,
    eps: float,
    backend: str = "auto",
) -> tuple[PerSample, PerSample, PerSample]:
    """[`flow_matching_rows_reference`][soflow_core.ops.fused.flow_matching_rows_reference] on the chosen backend.

    Args:
        output: F, the network output.
        state: x, or None when c_x ≡ 0.
        target: The target velocity.
        coefficients: (b, 3) columns c_x, c_F, c_w.
        p: Power of the adaptive weight.
        eps: Offset of the adaptive weight.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        (weighted loss, mse, weight).
    """
    if resolve_backend(backend, output, state, target) == "triton":
        return kernel_op("flow_matching_rows")(output, state, target, coefficients, float(p), float(eps))
    return flow_matching_rows_reference(output, state, target, coefficients, p, eps)


def consistency_rows(
    output: Data,
    x_t: Data,
    teacher_state: Data,
    teacher_output: Data | None,
    coefficients: Float[Tensor, "b 7"],
    *,
    p: float,
    eps: float,
    backend: str = "auto",
) -> tuple[PerSample, PerSample, PerSample, PerSample]:
    """[`consistency_rows_reference`][soflow_core.ops.fused.consistency_rows_reference] on the chosen backend.

    Args:
        output: F_t.
        x_t: The state at time t.
        teacher_state: x_ℓ (or f_ℓ).
        teacher_output: F_ℓ, or None.
        coefficients: (b, 7) columns a_t, b_t, a_ℓ, b_ℓ, t − ℓ, sgn(b_t), κ.
        p: Power of the adaptive weight.
        eps: Offset of the adaptive weight.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        (surrogate, mean q², weight, equivalent).
    """
    if resolve_backend(backend, output, x_t, teacher_state, teacher_output) == "triton":
        op = kernel_op("consistency_rows")
        return op(output, x_t, teacher_state, teacher_output, coefficients, float(p), float(eps))
    return consistency_rows_reference(output, x_t, teacher_state, teacher_output, coefficients, p, eps)
