r"""The Flow Matching loss and the JVP-free solution-consistency loss (spec §5).

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
from torch import Tensor

from soflow_core._tensor import bcast_right, compute_dtype, per_sample_mean
from soflow_core._validation import (
    check_cond,
    check_finite,
    check_same_shape,
    check_tensor,
    check_time,
    check_time_order,
)
from soflow_core.guidance import ClassifierFreeGuidance, drop_cond, guided_target
from soflow_core.parameterizations import AbstractParam, EulerParam
from soflow_core.rng import replay_rng, snapshot_rng
from soflow_core.typing import Backbone, Cond, Data, DropMask, PerSample, Scalar, Time
from soflow_core.weighting import AdaptiveWeighting, adaptive_weight, flow_matching_weight

__all__ = [
    "ConsistencyOutput",
    "FlowMatchingLoss",
    "FlowMatchingOutput",
    "SolutionConsistencyLoss",
    "consistency_quotient",
    "flow_matching_loss",
    "solution_consistency_loss",
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


def flow_matching_loss(
    v_pred: Data, target: Data, t: Time, *, param: AbstractParam, weighting: AdaptiveWeighting
) -> FlowMatchingOutput:
    r"""The adaptively weighted Flow Matching loss (spec §5.1).

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

    Returns:
        The [`FlowMatchingOutput`][soflow_core.FlowMatchingOutput].
    """
    dtype = compute_dtype(v_pred)
    delta = v_pred.to(dtype) - target.detach().to(dtype)
    mse = per_sample_mean(delta.square())
    weight = flow_matching_weight(mse, param.d_s_b(t, t).to(dtype), p=weighting.p, eps=weighting.eps)
    per_sample = weight * mse
    return FlowMatchingOutput(backprop=per_sample.mean(), per_sample=per_sample, mse=mse.detach(), weight=weight)


def consistency_quotient(f_t: Data, f_ell: Data, t: Time, ell: Time) -> Data:
    r"""The finite-difference quotient of the solution-consistency loss (spec §4.3, §5.2).

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
) -> ConsistencyOutput:
    r"""The solution-consistency loss through its division-free surrogate (spec §5.2).

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

    Returns:
        The [`ConsistencyOutput`][soflow_core.ConsistencyOutput].
    """
    dtype = compute_dtype(network_output)
    network_output = network_output.to(dtype)
    t, s, ell = t.to(dtype), s.to(dtype), ell.to(dtype)
    with torch.no_grad():
        f_t = param.combine(x_t.to(dtype), network_output, t, s)
        q = consistency_quotient(f_t, f_ell.to(dtype), t, ell)
        quotient_mse = per_sample_mean(q.square())
        weight = adaptive_weight(quotient_mse, p=weighting.p, eps=weighting.eps)
        b = param.b(t, s)
        equivalent = weight * (t - ell) * quotient_mse / (2.0 * b.abs())
    per_sample = torch.sign(b) * weight * per_sample_mean(network_output * q)
    return ConsistencyOutput(
        backprop=per_sample.mean(),
        per_sample=per_sample,
        quotient_mse=quotient_mse,
        weight=weight,
        equivalent_loss=equivalent,
    )


def teacher_state(x_t: Data, velocity: Data, t: Time, ell: Time) -> Data:
    r"""The teacher's input x_ℓ, one Euler step of the (guided) conditional velocity (spec §14.5).

    $$x_\ell = x_t + \tilde v\,(\ell - t).$$

    It is not resampled on the path: under CFG or the Trig path it differs from
    α(ℓ)·data + β(ℓ)·noise.

    Args:
        x_t: The state at time t.
        velocity: ṽ, the conditional (or guided) velocity.
        t: Time of x_t.
        ell: The intermediate time.

    Returns:
        x_ℓ.
    """
    return x_t + velocity * bcast_right(ell - t, x_t).to(velocity.dtype)


# ---------------------------------------------------------------------------- loss objects


def _check_batch(x_t: object, v: object, v_name: str, cond: object) -> Tensor:
    x_t = check_tensor("x_t", x_t, min_ndim=2)
    check_tensor(v_name, v, min_ndim=2)
    check_same_shape(v_name, v, "x_t", x_t)
    check_finite("x_t", x_t)
    check_finite(v_name, v)
    check_cond("cond", cond, x_t.shape[0])
    return x_t


@dataclass(frozen=True, kw_only=True)
class FlowMatchingLoss:
    """Flow Matching on the diagonal s = t, with optional training-time guidance.

    Attributes:
        param: The solution parameterization.
        weighting: The adaptive weight's p and ε.
    """

    param: AbstractParam = field(default_factory=EulerParam)
    weighting: AdaptiveWeighting = field(default_factory=AdaptiveWeighting)

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
            >>> from soflow_core import LinearPath, MLPBackbone
            >>> data, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
            >>> path = LinearPath().sample(data, noise, t)
            >>> out = FlowMatchingLoss()(MLPBackbone(dim=2), path.x_t, path.v_t, t)
            >>> out.backprop.backward()
        """
        x_t = _check_batch(x_t, v_t, "v_t", cond)
        check_time("t", t, x_t.shape[0])
        if drop_mask is not None:
            if guidance is None or cond is None:
                raise ValueError(
                    "drop_mask needs cond and guidance (for its null_cond); got "
                    f"cond={'None' if cond is None else 'a tensor'}, guidance={guidance!r}"
                )
            cond = drop_cond(cond, drop_mask, guidance.null_cond)
        if guidance is None or not guidance.active:
            v_pred = self.param.velocity_from_output(x_t, backbone(x_t, t, t, cond), t)
            return flow_matching_loss(v_pred, v_t, t, param=self.param, weighting=self.weighting)
        if cond is None or drop_mask is None:
            raise ValueError(
                f"guidance with scale={guidance.scale} needs cond and drop_mask; got "
                f"cond={'None' if cond is None else 'a tensor'}, "
                f"drop_mask={'None' if drop_mask is None else 'a tensor'}"
            )
        with torch.no_grad():
            null = drop_cond(cond, torch.ones_like(drop_mask), guidance.null_cond)
            v_uncond = self.param.velocity_from_output(x_t, backbone(x_t, t, t, null), t)
        v_pred = self.param.velocity_from_output(x_t, backbone(x_t, t, t, cond), t)
        target = guided_target(v_t, v_uncond, v_pred, drop_mask, t, guidance)
        return flow_matching_loss(v_pred, target, t, param=self.param, weighting=self.weighting)


@dataclass(frozen=True, kw_only=True)
class SolutionConsistencyLoss:
    """The JVP-free solution-consistency loss: a grad pass at (x_t, t, s) and a no-grad teacher at (x_ℓ, ℓ, s).

    The teacher is the same online network under ``no_grad`` (not an EMA copy), run with the
    random-number stream rewound to where the grad pass started, so dropout layers draw the
    same masks in both passes (on CPU and on accelerators).

    Attributes:
        param: The solution parameterization.
        weighting: The adaptive weight's p and ε.
    """

    param: AbstractParam = field(default_factory=EulerParam)
    weighting: AdaptiveWeighting = field(default_factory=AdaptiveWeighting)

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
            >>> from soflow_core import LinearPath, MLPBackbone
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
        snapshot = snapshot_rng(x_t.device)
        network_output = backbone(x_t, t, s, cond)
        with torch.no_grad(), replay_rng(snapshot):
            x_ell = teacher_state(x_t, velocity, t, ell)
            f_ell = self.param.combine(x_ell, backbone(x_ell, ell, s, cond), ell, s)
        return solution_consistency_loss(
            network_output, x_t, f_ell, t, s, ell, param=self.param, weighting=self.weighting
        )
