r"""The Flow Matching loss and the JVP-free solution-consistency loss (SoFlow paper; see the Method page of the docs).

Two layers, EDM-style:

* pure functions on tensors ([`flow_matching_loss`][soflow_core.flow_matching_loss],
  [`solution_consistency_loss`][soflow_core.solution_consistency_loss]) that take network
  outputs and never call a network: these are the references that fused kernels mirror;
* loss objects ([`FlowMatchingLoss`][soflow_core.FlowMatchingLoss],
  [`SolutionConsistencyLoss`][soflow_core.SolutionConsistencyLoss]) that take the backbone as
  an argument, call it, and hand its outputs to the pure functions.

Every output carries ``backprop``, the scalar to call ``.backward()`` on, and detached
per-sample diagnostics. The consistency ``backprop`` is a surrogate whose *gradient* is that
of a weighted MSE; its *value* is not a loss and is never reported as one.
"""

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from soflow_core._rng import PassReplay, may_use_dropout
from soflow_core._tensor import bcast_right
from soflow_core._validation import (
    check_choice,
    check_cond,
    check_finite,
    check_instance,
    check_same_dtype,
    check_same_shape,
    check_tensor,
    check_time,
    check_time_order,
    prepared_backbone,
)
from soflow_core.guidance import ClassifierFreeGuidance, drop_cond, guidance_coefficients
from soflow_core.ops._dispatch import BACKENDS, Backend
from soflow_core.ops.fused import consistency_rows, flow_matching_rows, linear_combination
from soflow_core.parameterizations import AbstractParam, EulerParam
from soflow_core.typing import Backbone, Cond, Data, DropMask, PerSample, Scalar, Time
from soflow_core.weighting import AdaptiveWeighting

__all__ = [
    "ConsistencyOutput",
    "FlowMatchingLoss",
    "FlowMatchingOutput",
    "SolutionConsistencyLoss",
    "consistency_coefficients",
    "consistency_equivalent_loss",
    "consistency_quotient",
    "flow_matching_loss",
    "flow_matching_loss_from_output",
    "guided_target_from_outputs",
    "guided_teacher_state",
    "solution_consistency_loss",
    "solution_consistency_loss_from_teacher",
    "teacher_state",
]


@dataclass(frozen=True, kw_only=True)
class FlowMatchingOutput:
    """Result of the Flow Matching loss on one sub-batch.

    Attributes:
        backprop: mean_i sg(w_i)·mse_i, the tensor to backpropagate (a genuine loss value).
        per_sample: sg(w_i)·mse_i, with gradient.
        mse: mse_i = mean over dimensions of (v_θ − target)², detached.
        weight: w_i, detached.
    """

    backprop: Scalar
    per_sample: PerSample
    mse: PerSample
    weight: PerSample

    def metrics(self) -> dict[str, Tensor]:
        """Detached batch means: ``fm_loss``, ``fm_mse``, ``fm_weight``."""
        return {
            "fm_loss": self.per_sample.detach().mean(),
            "fm_mse": self.mse.mean(),
            "fm_weight": self.weight.mean(),
        }


@dataclass(frozen=True, kw_only=True)
class ConsistencyOutput:
    r"""Result of the solution-consistency loss on one sub-batch.

    Attributes:
        backprop: The division-free surrogate mean_i sgn(b_i)·w_i·mean_d(F_t ⊙ sg(q)). Its
            gradient equals that of ``equivalent_loss``; its value means nothing.
        per_sample: The per-sample surrogate, with gradient.
        quotient_mse: mean_d q², q = (f_t − f_ℓ)/(t − ℓ), detached (the reference's ``Con_MSE``).
        weight: w_i = 1/(quotient_mse + ε)^p, detached.
        equivalent_loss: Value of the weighted MSE whose gradient the surrogate has,
            $\frac{w\,(t-\ell)}{2|b(t,s)|}\,\overline{q^2}$, detached.
    """

    backprop: Scalar
    per_sample: PerSample
    quotient_mse: PerSample
    weight: PerSample
    equivalent_loss: PerSample

    def metrics(self) -> dict[str, Tensor]:
        """Detached batch means: ``consistency_mse``, ``consistency_weight``, ``consistency_loss``."""
        return {
            "consistency_mse": self.quotient_mse.mean(),
            "consistency_weight": self.weight.mean(),
            "consistency_loss": self.equivalent_loss.mean(),
        }


# ---------------------------------------------------------------------------- pure functions


def _check_options(param: object, weighting: object) -> None:
    check_instance("param", param, AbstractParam, "EulerParam()")
    check_instance("weighting", weighting, AdaptiveWeighting, "AdaptiveWeighting(p=1.0, eps=0.01)")


def _check_like(reference_name: str, reference: object, outputs: dict[str, object], **others: object) -> Tensor:
    """``reference`` is a batch-first float tensor; the others have its shape (metadata only).

    Network ``outputs`` may have another floating dtype (autocast); the other tensors must have
    the reference's dtype.
    """
    reference = check_tensor(reference_name, reference, min_ndim=2)
    for name, value in {**outputs, **others}.items():
        check_tensor(name, value, min_ndim=2)
        check_same_shape(name, value, reference_name, reference)  # type: ignore[arg-type]
        if name in others:
            check_same_dtype(name, value, reference_name, reference)  # type: ignore[arg-type]
    return reference


def _check_times(batch: int, **times: object) -> None:
    """Per-sample time tensors of shape (batch,) (metadata only)."""
    for name, value in times.items():
        value = check_tensor(name, value, min_ndim=1)
        if value.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), one time per sample; got {tuple(value.shape)}")


def _flow_matching_output(rows: tuple[Tensor, Tensor, Tensor]) -> FlowMatchingOutput:
    per_sample, mse, weight = rows
    return FlowMatchingOutput(backprop=per_sample.mean(), per_sample=per_sample, mse=mse, weight=weight)


def flow_matching_loss(
    v_pred: Data,
    target: Data,
    t: Time,
    *,
    param: AbstractParam,
    weighting: AdaptiveWeighting,
    backend: Backend = "auto",
) -> FlowMatchingOutput:
    r"""The adaptively weighted Flow Matching loss (SoFlow paper; see the Method page of the docs).

    $$\mathrm{mse}_i = \tfrac{1}{n}\lVert v_\theta(x_t, t) - \tilde v\rVert^2,\quad
      w_i = \frac{1}{|\partial_s b(t,t)|\,(\mathrm{mse}_i + \varepsilon)^p},\quad
      L_\text{FM} = \operatorname{mean}_i\,\mathrm{sg}(w_i)\,\mathrm{mse}_i .$$

    Its gradient is w·(2/n)·Σ(v_θ − ṽ)·∂v_θ (note the factor 2, absent from the consistency
    surrogate; both match the reference).

    Args:
        v_pred: The model velocity v_θ(x_t, t), with gradient.
        target: The target velocity ṽ (treated as constant).
        t: Time of each sample.
        param: The parameterization (for ∂ₛb(t, t)).
        weighting: The adaptive weight's p and ε.
        backend: Where the fused rows run: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The [`FlowMatchingOutput`][soflow_core.FlowMatchingOutput].

    Raises:
        ValueError: If ``target`` is not shaped like ``v_pred``, ``t`` is not one time per sample
            in [0, 1], or an input is not finite.
        TypeError: On a non-tensor input, mismatched dtypes, or ``param``/``weighting`` of the
            wrong type.
    """
    _check_options(param, weighting)
    target = _check_like("target", target, {"v_pred": v_pred})
    check_time("t", t, target.shape[0])
    check_finite("target", target)
    d_s_b = param.d_s_b(t, t).detach()
    coefficients = torch.stack([torch.zeros_like(d_s_b), torch.ones_like(d_s_b), d_s_b.abs().reciprocal()], dim=1)
    rows = flow_matching_rows(v_pred, None, target, coefficients, p=weighting.p, eps=weighting.eps, backend=backend)
    return _flow_matching_output(rows)


def flow_matching_loss_from_output(
    network_output: Data,
    x_t: Data,
    target: Data,
    t: Time,
    *,
    param: AbstractParam,
    weighting: AdaptiveWeighting,
    backend: Backend = "auto",
) -> FlowMatchingOutput:
    r"""[`flow_matching_loss`][soflow_core.flow_matching_loss] with v_θ = ∂ₛa·x_t + ∂ₛb·F_θ fused in.

    The model velocity v_θ(x_t, t) is never materialised: the fused rows read F_θ(x_t, t, t) (and x_t
    only when ∂ₛa(t, t) is not identically zero) and write dF directly in the backward.

    Args:
        network_output: F_θ(x_t, t, t), with gradient.
        x_t: The state at time t.
        target: The target velocity ṽ (treated as constant).
        t: Time of each sample.
        param: The parameterization.
        weighting: The adaptive weight's p and ε.
        backend: Where the fused rows run.

    Returns:
        The [`FlowMatchingOutput`][soflow_core.FlowMatchingOutput].

    Raises:
        ValueError: If the tensors are not shaped alike or ``t`` is not one time per sample
            (shapes only: this is the objective's hot path, its callers check values).
        TypeError: On a non-tensor input, mismatched dtypes, or ``param``/``weighting`` of the
            wrong type.
    """
    _check_options(param, weighting)
    x_t = _check_like("x_t", x_t, {"network_output": network_output}, target=target)
    _check_times(x_t.shape[0], t=t)
    d_s_a, d_s_b = param.d_s_a(t, t).detach(), param.d_s_b(t, t).detach()
    coefficients = torch.stack([d_s_a, d_s_b, d_s_b.abs().reciprocal()], dim=1)
    state = x_t if param.velocity_uses_state else None
    rows = flow_matching_rows(
        network_output, state, target, coefficients, p=weighting.p, eps=weighting.eps, backend=backend
    )
    return _flow_matching_output(rows)


def consistency_quotient(f_t: Data, f_ell: Data, t: Time, ell: Time) -> Data:
    r"""The finite-difference quotient of the solution-consistency loss (SoFlow paper; see the Method page of the docs).

    $$q = \frac{f_\theta(x_t, t, s) - f_\theta(x_\ell, \ell, s)}{t - \ell}
        \approx \partial_1 f_\theta\, v + \partial_2 f_\theta .$$

    Args:
        f_t: f_θ(x_t, t, s).
        f_ell: f_θ(x_ℓ, ℓ, s) from the no-grad teacher pass.
        t: Time of x_t.
        ell: Intermediate time ℓ < t.

    Returns:
        q, shaped like ``f_t``.
    """
    return (f_t - f_ell) / bcast_right(t - ell, f_t)


def consistency_coefficients(
    param: AbstractParam, t: Time, s: Time, ell: Time, *, teacher_is_solution: bool
) -> Float[Tensor, "b 7"]:
    r"""Per-sample constants of the consistency loss, in the column order the fused rows take.

    (a(t,s), b(t,s), a(ℓ,s), b(ℓ,s), t − ℓ, sgn b(t,s), (t − ℓ)/(2|b(t,s)|)); when the teacher
    is given as the solution f_ℓ itself, a(ℓ,s) and b(ℓ,s) are replaced by 1 and 0.

    Args:
        param: The parameterization.
        t: Time of x_t.
        s: Target time.
        ell: Intermediate time.
        teacher_is_solution: Whether the teacher is passed as f_ℓ rather than (x_ℓ, F_ℓ).

    Returns:
        The (b, 7) table.
    """
    b_t = param.b(t, s)
    gap = t - ell
    if teacher_is_solution:
        a_ell, b_ell = torch.ones_like(t), torch.zeros_like(t)
    else:
        a_ell, b_ell = param.a(ell, s), param.b(ell, s)
    columns = [param.a(t, s), b_t, a_ell, b_ell, gap, torch.sign(b_t), gap / (2.0 * b_t.abs())]
    return torch.stack(columns, dim=1).detach()


def _consistency_output(rows: tuple[Tensor, Tensor, Tensor, Tensor]) -> ConsistencyOutput:
    surrogate, quotient_mse, weight, equivalent = rows
    return ConsistencyOutput(
        backprop=surrogate.mean(),
        per_sample=surrogate,
        quotient_mse=quotient_mse,
        weight=weight,
        equivalent_loss=equivalent,
    )


def solution_consistency_loss(
    network_output: Data,
    x_t: Data,
    f_ell: Data,
    t: Time,
    s: Time,
    ell: Time,
    *,
    param: AbstractParam,
    weighting: AdaptiveWeighting,
    backend: Backend = "auto",
) -> ConsistencyOutput:
    r"""The solution-consistency loss through its division-free surrogate (see the Method page).

    With f_t = a(t,s)·x_t + b(t,s)·F_t, q = (f_t − f_ℓ)/(t − ℓ) and w = 1/(mean_d q² + ε)^p
    (q and w detached), the surrogate is

    $$L_\text{sur} = \operatorname{mean}_i\; \mathrm{sgn}(b(t_i, s_i))\, w_i\,
        \tfrac{1}{n}\textstyle\sum_d F_t[i,d]\, q[i,d] .$$

    Since ∂f_t/∂F_t = b(t, s), its gradient equals the gradient of the explicit weighted MSE

    $$L_\text{eq} = \operatorname{mean}_i\; \frac{w_i}{2\,|b(t_i,s_i)|\,(t_i - \ell_i)}\,
        \tfrac{1}{n}\lVert f_t - \mathrm{sg}(f_\ell)\rVert^2
      = \operatorname{mean}_i\; \frac{w_i\,(t_i - \ell_i)}{2\,|b(t_i,s_i)|}\,
        \tfrac{1}{n}\lVert q_i\rVert^2 ,$$

    i.e. the paper's weighted MSE over (t − ℓ)² with the constant 1/2. L_sur's value is
    not a loss; ``equivalent_loss`` reports L_eq per sample.

    Args:
        network_output: F_θ(x_t, t, s), with gradient.
        x_t: The state at time t.
        f_ell: f_θ(x_ℓ, ℓ, s) from the teacher pass (treated as constant).
        t: Time of x_t.
        s: Target time, s ≤ ℓ.
        ell: Intermediate time, ℓ < t.
        param: The parameterization.
        weighting: The adaptive weight's p and ε.
        backend: Where the fused rows run: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The [`ConsistencyOutput`][soflow_core.ConsistencyOutput].

    Raises:
        ValueError: If the tensors are not shaped alike, the times are not one per sample in
            [0, 1] with s ≤ ℓ < t, or an input is not finite.
        TypeError: On a non-tensor input, mismatched dtypes, or ``param``/``weighting`` of the
            wrong type.
    """
    _check_options(param, weighting)
    x_t = _check_like("x_t", x_t, {"network_output": network_output}, f_ell=f_ell)
    for name, value in (("t", t), ("s", s), ("ell", ell)):
        check_time(name, value, x_t.shape[0])
    check_time_order("s", s, "ell", ell, strict=False)
    check_time_order("ell", ell, "t", t, strict=True)
    check_finite("x_t", x_t)
    check_finite("f_ell", f_ell)
    coefficients = consistency_coefficients(param, t, s, ell, teacher_is_solution=True)
    rows = consistency_rows(
        network_output, x_t, f_ell, None, coefficients, p=weighting.p, eps=weighting.eps, backend=backend
    )
    return _consistency_output(rows)


def solution_consistency_loss_from_teacher(
    network_output: Data,
    x_t: Data,
    teacher_output: Data,
    x_ell: Data,
    t: Time,
    s: Time,
    ell: Time,
    *,
    param: AbstractParam,
    weighting: AdaptiveWeighting,
    backend: Backend = "auto",
) -> ConsistencyOutput:
    r"""[`solution_consistency_loss`][soflow_core.solution_consistency_loss] with f_ℓ fused in.

    The teacher's solution $f_\ell = a(\ell,s)\,x_\ell + b(\ell,s)\,F_\theta(x_\ell,\ell,s)$ is
    never materialised: the fused rows read x_ℓ and F_ℓ directly.

    Args:
        network_output: F_θ(x_t, t, s), with gradient.
        x_t: The state at time t.
        teacher_output: F_θ(x_ℓ, ℓ, s) from the no-grad teacher pass.
        x_ell: The teacher's input x_ℓ.
        t: Time of x_t.
        s: Target time, s ≤ ℓ.
        ell: Intermediate time, ℓ < t.
        param: The parameterization.
        weighting: The adaptive weight's p and ε.
        backend: Where the fused rows run.

    Returns:
        The [`ConsistencyOutput`][soflow_core.ConsistencyOutput].

    Raises:
        ValueError: If the tensors are not shaped alike or the times are not one per sample
            (shapes only: this is the objective's hot path, its callers check values).
        TypeError: On a non-tensor input, mismatched dtypes, or ``param``/``weighting`` of the
            wrong type.
    """
    _check_options(param, weighting)
    outputs = {"network_output": network_output, "teacher_output": teacher_output}
    x_t = _check_like("x_t", x_t, outputs, x_ell=x_ell)
    _check_times(x_t.shape[0], t=t, s=s, ell=ell)
    coefficients = consistency_coefficients(param, t, s, ell, teacher_is_solution=False)
    rows = consistency_rows(
        network_output, x_t, x_ell, teacher_output, coefficients, p=weighting.p, eps=weighting.eps, backend=backend
    )
    return _consistency_output(rows)


def consistency_equivalent_loss(
    network_output: Data,
    x_t: Data,
    f_ell: Data,
    t: Time,
    s: Time,
    ell: Time,
    weight: Float[Tensor, " b"],
    *,
    param: AbstractParam,
) -> Float[Tensor, " b"]:
    r"""The explicit weighted MSE of the solution-consistency loss, per sample, with its gradient.

    $$L_{\text{eq},i} = \frac{w_i}{2\,|b(t_i,s_i)|\,(t_i - \ell_i)}\,
        \tfrac{1}{n}\lVert f_t - \mathrm{sg}(f_\ell)\rVert^2 ,
      \qquad f_t = a(t,s)\,x_t + b(t,s)\,F_\theta(x_t,t,s),$$

    with w and f_ℓ held constant. Its gradient equals that of the division-free surrogate
    (``backprop``), and unlike the surrogate its second derivatives are those of the loss, so
    Hessian-vector products, MAML inner steps or gradient penalties may differentiate it twice.
    Computed in plain PyTorch (no fused kernel): one extra elementwise pass over the batch.

    Args:
        network_output: The student's F_θ(x_t, t, s); the gradient flows through it.
        x_t: Student input, the state at t.
        f_ell: The teacher's solution f_θ(x_ℓ, ℓ, s), detached here.
        t: Student time per sample.
        s: Target time per sample (s ≤ ℓ).
        ell: Teacher time per sample (ℓ < t).
        weight: w_i, the adaptive weight (treated as constant), e.g. ``ConsistencyOutput.weight``.
        param: The parameterization.

    Returns:
        L_eq per sample, with gradient through ``network_output``.
    """
    f_t = param.combine(x_t, network_output, t, s)
    scale = weight.detach() / (2.0 * param.b(t, s).abs() * (t - ell))
    squared = (f_t - f_ell.detach()).square().flatten(1).mean(dim=1)
    return scale.to(squared.dtype) * squared


def teacher_state(x_t: Data, velocity: Data, t: Time, ell: Time, *, backend: Backend = "auto") -> Data:
    r"""The teacher's input x_ℓ, one Euler step of the (guided) conditional velocity (as the official code builds it).

    $$x_\ell = x_t + \tilde v\,(\ell - t).$$

    It is not resampled on the path: under CFG or the Trig path it differs from
    α(ℓ)·data + β(ℓ)·noise.

    Args:
        x_t: The state at time t.
        velocity: ṽ, the conditional (or guided) velocity.
        t: Time of x_t.
        ell: The intermediate time.
        backend: Where the fused combination runs.

    Returns:
        x_ℓ.
    """
    coefficients = torch.stack([torch.ones_like(t), ell - t], dim=1)[:, None, :]
    return linear_combination([x_t, velocity], coefficients, backend=backend)[0]


def _guided_terms(
    v_t: Data,
    uncond_output: Data,
    model_output: Data | None,
    mask: DropMask,
    t: Time,
    param: AbstractParam,
    guidance: ClassifierFreeGuidance,
) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """ṽ = Σ coefficient·input over (v_t, F_uncond, sg F_model), plus the coefficient of x_t (or None)."""
    if model_output is None and guidance.needs_model_velocity:
        raise ValueError(f"model_output is required when guidance mixes in the model (mix={guidance.mix})")
    k = guidance_coefficients(mask, t, guidance)
    d_s_a, d_s_b = param.d_s_a(t, t), param.d_s_b(t, t)
    inputs, columns = [v_t, uncond_output], [k[:, 0], k[:, 1] * d_s_b]
    k_state = k[:, 1]
    if model_output is not None:
        inputs.append(model_output.detach())
        columns.append(k[:, 2] * d_s_b)
        k_state = k_state + k[:, 2]
    state_column = k_state * d_s_a if param.velocity_uses_state else None
    return inputs, columns, state_column


def guided_target_from_outputs(
    v_t: Data,
    x_t: Data,
    uncond_output: Data,
    model_output: Data | None,
    mask: DropMask,
    t: Time,
    *,
    param: AbstractParam,
    guidance: ClassifierFreeGuidance,
    backend: Backend = "auto",
) -> Data:
    r"""[`guided_target`][soflow_core.guidance.guided_target] from raw network outputs, in one fused pass.

    With (k_v, k_u, k_m) from [`guidance_coefficients`][soflow_core.guidance.guidance_coefficients] and
    v_θ = ∂ₛa(t,t)·x_t + ∂ₛb(t,t)·F_θ,

    $$\tilde v = k_v\,v_t + k_u\,v_\theta(x_t, t\mid\varnothing) + k_m\,\mathrm{sg}(v_\theta(x_t, t\mid c)).$$

    Args:
        v_t: Conditional velocity of the path.
        x_t: The state at time t (read only when ∂ₛa(t, t) is not identically zero).
        uncond_output: F_θ(x_t, t, t | ∅), without gradient.
        model_output: F_θ(x_t, t, t | c) (detached here), or None when the mix m is 1.
        mask: True where the condition was dropped.
        t: Time of each sample.
        param: The parameterization.
        guidance: The guidance settings.
        backend: Where the fused combination runs.

    Returns:
        ṽ, without gradient.
    """
    inputs, columns, state_column = _guided_terms(v_t, uncond_output, model_output, mask, t, param, guidance)
    if state_column is not None:
        inputs.append(x_t)
        columns.append(state_column)
    coefficients = torch.stack(columns, dim=1)[:, None, :].detach()
    return linear_combination(inputs, coefficients, backend=backend)[0].detach()


def guided_teacher_state(
    x_t: Data,
    v_t: Data,
    uncond_output: Data,
    model_output: Data | None,
    mask: DropMask,
    t: Time,
    ell: Time,
    *,
    param: AbstractParam,
    guidance: ClassifierFreeGuidance,
    backend: Backend = "auto",
) -> Data:
    r"""[`teacher_state`][soflow_core.losses.teacher_state] with the guided velocity, in one fused pass.

    \(x_\ell = x_t + (\ell - t)\,\tilde v\) with ṽ as in
    [`guided_target_from_outputs`][soflow_core.losses.guided_target_from_outputs]; ṽ itself is
    never materialised.

    Args:
        x_t: The state at time t.
        v_t: Conditional velocity of the path.
        uncond_output: F_θ(x_t, t, t | ∅), without gradient.
        model_output: F_θ(x_t, t, t | c), or None when the mix m is 1.
        mask: True where the condition was dropped.
        t: Time of each sample.
        ell: The intermediate time.
        param: The parameterization.
        guidance: The guidance settings.
        backend: Where the fused combination runs.

    Returns:
        x_ℓ, without gradient.
    """
    inputs, columns, state_column = _guided_terms(v_t, uncond_output, model_output, mask, t, param, guidance)
    step = ell - t
    x_column = torch.ones_like(t) if state_column is None else 1.0 + step * state_column
    coefficients = torch.stack([x_column, *(step * c for c in columns)], dim=1)[:, None, :].detach()
    return linear_combination([x_t, *inputs], coefficients, backend=backend)[0].detach()


# ---------------------------------------------------------------------------- loss objects


def _check_batch(x_t: object, v: object, v_name: str, cond: object) -> Tensor:
    x_t = _check_like("x_t", x_t, {}, **{v_name: v})
    check_finite("x_t", x_t)
    check_finite(v_name, v)  # type: ignore[arg-type]
    check_cond("cond", cond, x_t.shape[0], device=x_t.device)
    return x_t


def _checked_labels(backbone: Backbone, x_t: Tensor, cond: object) -> Backbone:
    """Check x_t's dtype and the class labels against the backbone (null class allowed); wrap its outputs.

    The conditions reach these losses after any label drop, so the null class is a valid label
    when the backbone has one.
    """
    return prepared_backbone(backbone, "x_t", x_t, cond)


@dataclass(frozen=True, kw_only=True)
class FlowMatchingLoss:
    """Flow Matching on the diagonal s = t, with optional training-time guidance.

    Attributes:
        param: The solution parameterization.
        weighting: The adaptive weight's p and ε.
        backend: Where the fused loss-path ops run: ``"auto"`` (Triton kernels for CUDA tensors
            when installed, else PyTorch), ``"torch"`` or ``"triton"``.
    """

    param: AbstractParam = field(default_factory=EulerParam)
    weighting: AdaptiveWeighting = field(default_factory=AdaptiveWeighting)
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        _check_options(self.param, self.weighting)
        check_choice("backend", self.backend, BACKENDS)

    def __call__(
        self,
        backbone: Backbone,
        x_t: Data,
        v_t: Data,
        t: Time,
        cond: Cond | None = None,
        *,
        guidance: ClassifierFreeGuidance | None = None,
        drop_mask: DropMask | None = None,
    ) -> FlowMatchingOutput:
        """Evaluate the loss with one grad call of the backbone (two with active guidance).

        Args:
            backbone: The network F_θ.
            x_t: Points on the path.
            v_t: Their conditional velocities.
            t: Time of each sample, in [0, 1].
            cond: Conditions, or None.
            guidance: Training-time guidance; needs ``cond`` and ``drop_mask`` when active.
            drop_mask: True where the condition is dropped (null condition, plain target).

        Returns:
            The [`FlowMatchingOutput`][soflow_core.FlowMatchingOutput].

        Raises:
            ValueError: On bad shapes, non-finite inputs, times outside [0, 1], or guidance
                without ``cond``/``drop_mask``.

        Examples:
            >>> import torch
            >>> from soflow_core import LinearPath
            >>> from soflow_core.nets import MLPBackbone
            >>> data, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
            >>> path = LinearPath().sample(data, noise, t)
            >>> out = FlowMatchingLoss()(MLPBackbone(dim=2), path.x_t, path.v_t, t)
            >>> out.backprop.backward()
        """
        x_t = _check_batch(x_t, v_t, "v_t", cond)
        check_time("t", t, x_t.shape[0])
        if guidance is not None:
            check_instance("guidance", guidance, ClassifierFreeGuidance, "ClassifierFreeGuidance(scale=3.0)")
        if drop_mask is not None:
            if guidance is None or cond is None:
                raise ValueError(
                    "drop_mask needs cond and guidance (for its null_cond); got "
                    f"cond={'None' if cond is None else 'a tensor'}, guidance={guidance!r}"
                )
            cond = drop_cond(cond, drop_mask, guidance.null_cond)
        backbone = _checked_labels(backbone, x_t, cond)
        options = {"param": self.param, "weighting": self.weighting, "backend": self.backend}
        if guidance is None or not guidance.active:
            return flow_matching_loss_from_output(backbone(x_t, t, t, cond), x_t, v_t, t, **options)
        if cond is None or drop_mask is None:
            raise ValueError(
                f"guidance with scale={guidance.scale} needs cond and drop_mask; got "
                f"cond={'None' if cond is None else 'a tensor'}, "
                f"drop_mask={'None' if drop_mask is None else 'a tensor'}"
            )
        with torch.no_grad():
            null = drop_cond(cond, torch.ones_like(drop_mask), guidance.null_cond)
            uncond_output = backbone(x_t, t, t, null)
        output = backbone(x_t, t, t, cond)
        target = guided_target_from_outputs(
            v_t, x_t, uncond_output, output, drop_mask, t, param=self.param, guidance=guidance, backend=self.backend
        )
        return flow_matching_loss_from_output(output, x_t, target, t, **options)


@dataclass(frozen=True, kw_only=True)
class SolutionConsistencyLoss:
    """The JVP-free solution-consistency loss: a grad pass at (x_t, t, s) and a no-grad teacher at (x_ℓ, ℓ, s).

    The teacher is the same online network under ``no_grad`` (not an EMA copy), run with the
    random draws of the grad pass replayed (see [shared dropout masks](../method.md#shared-dropout-masks)), so
    dropout layers apply the same masks in both passes, on CPU and on accelerators, eagerly and
    under ``torch.compile``. The replay is skipped for a module without active dropout layers
    (dropout applied functionally in its ``forward`` is then not replayed); a backbone that is not
    an ``nn.Module`` is always replayed.

    Attributes:
        param: The solution parameterization.
        weighting: The adaptive weight's p and ε.
        backend: Where the fused loss-path ops run: ``"auto"`` (Triton kernels for CUDA tensors
            when installed, else PyTorch), ``"torch"`` or ``"triton"``.
    """

    param: AbstractParam = field(default_factory=EulerParam)
    weighting: AdaptiveWeighting = field(default_factory=AdaptiveWeighting)
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        _check_options(self.param, self.weighting)
        check_choice("backend", self.backend, BACKENDS)

    def __call__(
        self, backbone: Backbone, x_t: Data, velocity: Data, t: Time, s: Time, ell: Time, cond: Cond | None = None
    ) -> ConsistencyOutput:
        """Evaluate the loss with one grad and one no-grad call of the backbone.

        Args:
            backbone: The network F_θ.
            x_t: Points on the path at time t.
            velocity: ṽ, the (guided) conditional velocity that moves x_t to x_ℓ.
            t: Time of x_t, in [0, 1].
            s: Target time, 0 ≤ s ≤ ℓ.
            ell: Intermediate time, s ≤ ℓ < t.
            cond: Conditions (after any label drop), or None.

        Returns:
            The [`ConsistencyOutput`][soflow_core.ConsistencyOutput].

        Raises:
            ValueError: On bad shapes, non-finite inputs, times outside [0, 1] or out of order.

        Examples:
            >>> import torch
            >>> from soflow_core import LinearPath
            >>> from soflow_core.nets import MLPBackbone
            >>> data, noise = torch.randn(8, 2), torch.randn(8, 2)
            >>> t, s = torch.full((8,), 0.8), torch.full((8,), 0.2)
            >>> path = LinearPath().sample(data, noise, t)
            >>> out = SolutionConsistencyLoss()(MLPBackbone(dim=2), path.x_t, path.v_t, t, s, t - 0.01)
            >>> out.backprop.backward()
        """
        x_t = _check_batch(x_t, velocity, "velocity", cond)
        n = x_t.shape[0]
        for name, value in (("t", t), ("s", s), ("ell", ell)):
            check_time(name, value, n)
        check_time_order("s", s, "ell", ell, strict=False)
        check_time_order("ell", ell, "t", t, strict=True)
        backbone = _checked_labels(backbone, x_t, cond)
        replay = PassReplay(x_t.device, enabled=may_use_dropout(backbone))
        with replay.record():
            network_output = backbone(x_t, t, s, cond)
        with torch.no_grad(), replay.replay():
            x_ell = teacher_state(x_t, velocity, t, ell, backend=self.backend)
            teacher_output = backbone(x_ell, ell, s, cond)
        return solution_consistency_loss_from_teacher(
            network_output,
            x_t,
            teacher_output,
            x_ell,
            t,
            s,
            ell,
            param=self.param,
            weighting=self.weighting,
            backend=self.backend,
        )
