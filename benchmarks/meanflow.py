r"""MeanFlow's training step, as the baseline the benchmarks compare SoFlow with.

MeanFlow (Geng, Deng, Bai, Kolter, He, *Mean Flows for One-step Generative Modeling*, arXiv
2505.13447) is written here from the paper's formulas. It is benchmark code, not part of the
``soflow_core`` API.

Conventions (the same as SoFlow's):

* time runs from data (t = 0) to noise (t = 1): $z_t = (1 - t)\,\text{data} + t\,\text{noise}$,
  with conditional velocity $v = \text{noise} - \text{data}$;
* the network predicts the average velocity $u_\theta(z, r, t)$ over $[r, t]$, $r \le t$;
* backbones are the SoFlow backbones, called as ``model(x, t, s, cond)`` and embedding t and
  t − s. MeanFlow's $u_\theta(z, r, t)$ is ``model(z, t, r, cond)``: the second time argument is
  r, so the network embeds (t, t − r), the paper's best choice. $u_\theta(z, t, t)$ is the
  instantaneous velocity.

The MeanFlow identity $u(z_t, r, t) = v - (t - r)\,\tfrac{d}{dt}u(z_t, r, t)$ with the total
derivative $\tfrac{d}{dt}u = v\cdot\partial_z u + \partial_t u$ (r fixed) gives the regression
target. The pair $(u_\theta, \tfrac{d}{dt}u_\theta)$ comes from one Jacobian-vector product
(``torch.func.jvp``) at the primal $(z_t, r, t)$ with tangent $(v, 0, 1)$.

Cost facts this module respects:

* PyTorch's flash and memory-efficient attention kernels have no forward-mode AD (under
  ``torch.func.jvp`` they raise ``NotImplementedError``, on CPU as well), so with
  ``math_attention=True`` the JVP runs under ``sdpa_kernel(SDPBackend.MATH)``;
* ``torch.func.jvp`` does not accept a ``DistributedDataParallel`` module. Calling it on
  ``ddp.module`` runs, but bypasses DDP's gradient synchronisation, which then has to be done
  by hand (all-reduce the gradients after ``backward``).
"""

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from soflow_core._rng import rand, randn
from soflow_core._tensor import bcast_right
from soflow_core._validation import (
    check_choice,
    check_cond,
    check_finite,
    check_int,
    check_real,
    check_same_shape,
    check_tensor,
    check_values,
    class_count,
    is_tracing,
    label_checks,
    labels_unchecked,
)
from soflow_core.guidance import drop_cond, sample_drop_mask
from soflow_core.time_samplers import LogitNormal

__all__ = [
    "JVP_VARIANTS",
    "JvpVariant",
    "MeanFlowBatch",
    "MeanFlowObjective",
    "MeanFlowOutput",
    "MeanFlowTimes",
    "average_velocity_and_derivative",
    "guided_meanflow_velocity",
    "jvp_subset",
    "math_attention_context",
    "meanflow_loss",
    "meanflow_sample",
    "meanflow_target",
    "sample_meanflow_times",
]

JvpVariant = Literal["shared_primal", "separate", "subset"]
JVP_VARIANTS: tuple[str, ...] = ("shared_primal", "separate", "subset")

Model = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True, kw_only=True)
class MeanFlowTimes:
    """The two times of each sample.

    Attributes:
        t: End times, in (0, 1).
        r: Start times, r ≤ t.
        r_neq_t: True on the samples that kept an r drawn below t (False: r = t, plain Flow Matching).
    """

    t: Tensor
    r: Tensor
    r_neq_t: Tensor


@dataclass(frozen=True, kw_only=True)
class MeanFlowBatch:
    """Everything random about one MeanFlow step; the loss is a deterministic function of it and the network.

    Attributes:
        z: Points z_t = (1 − t)·data + t·noise.
        v: Conditional velocities noise − data.
        times: The sampled (t, r).
        cond: Conditions after the label drop, or None.
        drop_mask: True where the label was dropped, or None.
    """

    z: Tensor
    v: Tensor
    times: MeanFlowTimes
    cond: Tensor | None = None
    drop_mask: Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class MeanFlowOutput:
    """Result of one MeanFlow objective call.

    Attributes:
        loss: mean over the batch of sg(w)·‖Δ‖², the scalar to backpropagate.
        per_sample: sg(w)·‖Δ‖² per sample.
        u: The network's average velocity u_θ(z_t, r, t), detached.
        target: The stop-gradient target u_tgt.
        times: The sampled times.
        metrics: Detached 0-dim tensors: ``loss``, ``sq_error`` (mean ‖Δ‖²), ``mse`` (mean over
            dimensions too), ``weight`` (mean adaptive weight), ``r_neq_t`` (share of samples
            with r ≠ t) and ``finite`` (1.0 when the loss is finite).
    """

    loss: Tensor
    per_sample: Tensor
    u: Tensor
    target: Tensor
    times: MeanFlowTimes
    metrics: dict[str, Tensor]

    @property
    def backprop(self) -> Tensor:
        """The loss under the name `soflow_core.train.make_training_step` backpropagates."""
        return self.loss


def sample_meanflow_times(
    n: int,
    *,
    ratio_r_neq_t: float,
    t_mean: float,
    t_std: float,
    r_mean: float,
    r_std: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> MeanFlowTimes:
    r"""Draw (t, r): two logit-normal times, ordered so that t ≥ r, then r = t on a random share.

    $$a \sim \mathrm{LN}(\mu_t, \sigma_t),\; b \sim \mathrm{LN}(\mu_r, \sigma_r),\quad
      t = \max(a, b),\; r = \begin{cases}\min(a, b) & \text{with probability } \rho \\
      t & \text{otherwise,}\end{cases}$$

    where $\mathrm{LN}(\mu, \sigma)$ is $\mathrm{sigmoid}(\mathcal{N}(\mu, \sigma^2))$ and ρ is
    ``ratio_r_neq_t``. Draw order: a, b, the Bernoulli mask.

    Args:
        n: Number of samples.
        ratio_r_neq_t: ρ, the expected share of samples with r ≠ t.
        t_mean: μ of the first time.
        t_std: σ of the first time.
        r_mean: μ of the second time.
        r_std: σ of the second time.
        device: Where the times live.
        dtype: Their dtype.
        generator: Source of randomness, or None for the global RNG.

    Returns:
        The times.
    """
    device = torch.device(device)
    a = LogitNormal(mean=t_mean, std=t_std).sample(n, device=device, dtype=dtype, generator=generator)
    b = LogitNormal(mean=r_mean, std=r_std).sample(n, device=device, dtype=dtype, generator=generator)
    keep = rand((n,), device=device, dtype=torch.float32, generator=generator) < ratio_r_neq_t
    t = torch.maximum(a, b)
    r = torch.where(keep, torch.minimum(a, b), t)
    return MeanFlowTimes(t=t, r=r, r_neq_t=keep)


@contextlib.contextmanager
def math_attention_context(enabled: bool = True) -> Iterator[None]:
    """Restrict ``scaled_dot_product_attention`` to the math backend (the only one with forward-mode AD).

    Args:
        enabled: When False, the block runs with the backends already allowed.

    Yields:
        Nothing.
    """
    if not enabled:
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def average_velocity_and_derivative(
    model: Model,
    z: Tensor,
    r: Tensor,
    t: Tensor,
    v: Tensor,
    cond: Tensor | None = None,
    *,
    jvp_variant: JvpVariant = "shared_primal",
    math_attention: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""u_θ(z, r, t) with gradient and its total time derivative along the flow, without gradient.

    $$\frac{d}{dt}u_\theta(z, r, t) = v\cdot\partial_z u_\theta + \partial_t u_\theta
      = \mathrm{JVP}\big(u_\theta;\ (z, r, t);\ (v, 0, 1)\big).$$

    ``"shared_primal"`` runs one ``torch.func.jvp`` with gradient and uses its primal output as
    u (one graph holding both passes). ``"separate"`` runs the JVP under ``torch.no_grad`` and
    then a plain forward with gradient; that forward runs with the attention backends of the
    caller (only the JVP is restricted to math attention). ``"subset"`` is ``"separate"`` with
    the no-grad JVP run only on the samples with r ≠ t: the target multiplies du/dt by t − r,
    so elsewhere it is returned as 0 without being computed, and the target is unchanged
    (see [`jvp_subset`][benchmarks.meanflow.jvp_subset]).

    Args:
        model: Backbone called as ``model(z, t, r, cond)``.
        z: Points z_t.
        r: Start times.
        t: End times.
        v: Tangent of z (the conditional or guided velocity).
        cond: Conditions, or None.
        jvp_variant: ``"shared_primal"``, ``"separate"`` or ``"subset"``.
        math_attention: Run the JVP with the math attention backend.

    Returns:
        (u, du/dt), u carrying gradient, du/dt detached (0 where r = t for ``"subset"``).

    Raises:
        ValueError: If ``jvp_variant`` is unknown.
    """
    jvp_variant = check_choice("jvp_variant", jvp_variant, JVP_VARIANTS)  # type: ignore[assignment]

    def u_fn(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model(z_, t_, r_, cond)

    primals = (z, r, t)
    tangents = (v.to(z.dtype), torch.zeros_like(r), torch.ones_like(t))
    if jvp_variant == "shared_primal":
        with math_attention_context(math_attention):
            u, dudt = torch.func.jvp(u_fn, primals, tangents)
        return u, dudt.detach()
    with torch.no_grad(), math_attention_context(math_attention):
        if jvp_variant == "separate":
            _, dudt = torch.func.jvp(u_fn, primals, tangents)
        else:
            dudt = jvp_subset(model, z, r, t, tangents[0], cond)
    return u_fn(z, r, t), dudt


def jvp_subset(model: Model, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Tensor | None) -> Tensor:
    r"""du/dt on the samples with r ≠ t only, 0 on the others (no gradient).

    $$\frac{d}{dt}u_\theta\Big|_{r_i \ne t_i} = \mathrm{JVP}\big(u_\theta;\ (z, r, t)_S;\ (v, 0, 1)_S\big),
      \quad S = \{i : r_i \ne t_i\},$$

    and 0 for i ∉ S, where the target $v - (t - r)\,\tfrac{d}{dt}u_\theta$ multiplies it by
    t − r = 0. In the ImageNet recipe 75 % of the samples have r = t, so the JVP (about three
    forward passes' work) runs on a quarter of the batch. The subset's size depends on the draws,
    so it costs a device synchronisation and gives ``torch.compile`` a data-dependent shape.

    Args:
        model: Backbone called as ``model(z, t, r, cond)``.
        z: Points z_t.
        r: Start times.
        t: End times.
        v: Tangent of z.
        cond: Conditions, or None.

    Returns:
        du/dt, shaped like ``z``.
    """
    keep = torch.nonzero(r != t).squeeze(1)  # an empty subset runs an empty JVP

    def u_fn(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model(z_, t_, r_, None if cond is None else cond[keep])

    primals = (z[keep], r[keep], t[keep])
    tangents = (v[keep].to(z.dtype), torch.zeros_like(r[keep]), torch.ones_like(t[keep]))
    _, dudt_keep = torch.func.jvp(u_fn, primals, tangents)
    return torch.zeros_like(z).index_copy(0, keep, dudt_keep.to(z.dtype))


def meanflow_target(v: Tensor, dudt: Tensor, r: Tensor, t: Tensor) -> Tensor:
    r"""The MeanFlow regression target, under stop-gradient.

    $$u_\text{tgt} = v - (t - r)\,\big(v\cdot\partial_z u_\theta + \partial_t u_\theta\big).$$

    Args:
        v: The (possibly guided) velocity.
        dudt: The total derivative d/dt u_θ from the JVP.
        r: Start times.
        t: End times.

    Returns:
        u_tgt, detached, in the dtype of ``v`` (at least float32).
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    gap = bcast_right((t - r).to(dtype), v)
    return (v.to(dtype) - gap * dudt.to(dtype)).detach()


def guided_meanflow_velocity(
    v: Tensor,
    u_uncond: Tensor | None,
    u_cond: Tensor | None,
    drop_mask: Tensor | None,
    *,
    scale: float,
    mix: float,
) -> Tensor:
    r"""MeanFlow's training-time CFG velocity, used as target velocity and as JVP tangent.

    $$\tilde v = \omega\,v + \kappa\,u_\theta(z_t, t, t\mid c) + (1 - \omega - \kappa)\,
      u_\theta(z_t, t, t\mid\varnothing)$$

    with both network terms detached; samples whose label was dropped keep $\tilde v = v$.
    The effective guidance scale is ω / (1 − κ).

    Args:
        v: Conditional velocity of the path.
        u_uncond: u_θ(z_t, t, t | ∅), or None when 1 − ω − κ = 0.
        u_cond: u_θ(z_t, t, t | c), or None when κ = 0.
        drop_mask: True where the label was dropped, or None.
        scale: ω.
        mix: κ.

    Returns:
        ṽ, detached, in at least float32.

    Raises:
        ValueError: If a network term with a non-zero coefficient is missing.
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    out = scale * v.to(dtype)
    for name, term, k in (("u_cond", u_cond, mix), ("u_uncond", u_uncond, 1.0 - scale - mix)):
        if k == 0.0:
            continue
        if term is None:
            raise ValueError(f"{name} is needed when its coefficient is {k!r}; got None")
        out = out + k * term.detach().to(dtype)
    if drop_mask is not None:
        out = torch.where(bcast_right(drop_mask, v), v.to(dtype), out)
    return out.detach()


def meanflow_loss(u: Tensor, target: Tensor, *, p: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""MeanFlow's adaptively weighted loss per sample.

    $$\Delta = u_\theta - \mathrm{sg}(u_\text{tgt}),\quad w = \frac{1}{(\|\Delta\|^2 + c)^p},\quad
      \ell = \mathrm{sg}(w)\,\|\Delta\|^2,$$

    with ‖Δ‖² summed over the data dimensions. The gradient equals that of
    $\|\Delta\|^{2(1-p)}/(1-p)$ near c = 0 (p = 1: a log loss).

    Args:
        u: Network output u_θ(z_t, r, t).
        target: u_tgt.
        p: Power of the adaptive weight, ≥ 0.
        eps: c, > 0.

    Returns:
        (per-sample loss, ‖Δ‖² detached, w).
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    delta = u.to(dtype) - target.detach().to(dtype)
    sq = delta.square().flatten(1).sum(dim=1)
    w = torch.reciprocal((sq.detach() + eps) ** p)
    return w * sq, sq.detach(), w


@dataclass(frozen=True, kw_only=True)
class MeanFlowObjective:
    r"""One MeanFlow training step's loss, for a SoFlow backbone ``model(x, t, s, cond)``.

    MeanFlow's $u_\theta(z, r, t)$ is evaluated as ``model(z, t, r, cond)``, so the backbone
    embeds (t, t − r). Per call: draw times, noise and label drops; build
    $z_t = (1 - t)\,\text{data} + t\,\text{noise}$ and $v = \text{noise} - \text{data}$; with CFG,
    one no-grad call for u(z_t, t, t | ∅) and, when κ ≠ 0, u(z_t, t, t | c) (batched together);
    then the JVP with tangent (ṽ, 0, 1), the target and the weighted loss.

    Attributes:
        jvp_variant: ``"shared_primal"``: one ``torch.func.jvp`` whose primal output is the
            loss's u; ``"separate"``: a no-grad JVP for the target plus a forward with gradient;
            ``"subset"``: as ``"separate"`` with the JVP only on the samples with r ≠ t.
        ratio_r_neq_t: Expected share of samples with r ≠ t (ImageNet: 0.25).
        time_mean: μ of the logit-normal of the first time (ImageNet: −0.4).
        time_std: σ of the logit-normal of the first time (ImageNet: 1.0).
        r_mean: μ of the second time, or None for ``time_mean``.
        r_std: σ of the second time, or None for ``time_std``.
        p: Power of the adaptive weight 1/(‖Δ‖² + c)^p.
        eps: c.
        guidance_scale: ω (1.0 with κ = 0: no CFG).
        guidance_mix: κ.
        cond_drop: Probability that a label is replaced by ``null_cond`` (applied whenever
            ``cond`` is given).
        null_cond: The null condition (the null class index for labels).
        math_attention: Run the JVP under ``sdpa_kernel(SDPBackend.MATH)``.
        check_inputs: Check that data and noise are finite before any model call (one device
            sync per step; benchmarks turn it off).
    """

    jvp_variant: JvpVariant = "shared_primal"
    ratio_r_neq_t: float = 0.25
    time_mean: float = -0.4
    time_std: float = 1.0
    r_mean: float | None = None
    r_std: float | None = None
    p: float = 1.0
    eps: float = 1e-3
    guidance_scale: float = 1.0
    guidance_mix: float = 0.0
    cond_drop: float = 0.1
    null_cond: int | float | Tensor = 1000
    math_attention: bool = True
    check_inputs: bool = True

    def __post_init__(self) -> None:
        check_choice("jvp_variant", self.jvp_variant, JVP_VARIANTS)
        check_real("ratio_r_neq_t", self.ratio_r_neq_t, low=0.0, high=1.0)
        check_real("time_mean", self.time_mean)
        check_real("time_std", self.time_std, low=0.0, low_open=True)
        if self.r_mean is not None:
            check_real("r_mean", self.r_mean)
        if self.r_std is not None:
            check_real("r_std", self.r_std, low=0.0, low_open=True)
        check_real("p", self.p, low=0.0)
        check_real("eps", self.eps, low=0.0, low_open=True)
        check_real("guidance_scale", self.guidance_scale, low=0.0, low_open=True)
        check_real("guidance_mix", self.guidance_mix, low=0.0, high=1.0, high_open=True)
        check_real("cond_drop", self.cond_drop, low=0.0, high=1.0)
        if self.guided and self.cond_drop == 0.0:
            # u(·|∅) is only learned from dropped labels.
            raise ValueError(
                f"cond_drop must be > 0 with CFG (guidance_scale={self.guidance_scale!r}, "
                f"guidance_mix={self.guidance_mix!r}); got cond_drop=0.0"
            )

    @property
    def guided(self) -> bool:
        """Whether training-time CFG is on (ω ≠ 1 or κ ≠ 0)."""
        return not (math.isclose(self.guidance_scale, 1.0) and self.guidance_mix == 0.0)

    @property
    def uncond_coefficient(self) -> float:
        """1 − ω − κ, the weight of u(z_t, t, t | ∅) in ṽ."""
        return 1.0 - self.guidance_scale - self.guidance_mix

    def sample_times(
        self, n: int, *, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None
    ) -> MeanFlowTimes:
        """Draw (t, r) with this objective's distributions.

        Args:
            n: Number of samples.
            device: Where the times live.
            dtype: Their dtype.
            generator: Source of randomness, or None for the global RNG.

        Returns:
            The times.
        """
        return sample_meanflow_times(
            n,
            ratio_r_neq_t=self.ratio_r_neq_t,
            t_mean=self.time_mean,
            t_std=self.time_std,
            r_mean=self.time_mean if self.r_mean is None else self.r_mean,
            r_std=self.time_std if self.r_std is None else self.r_std,
            device=device,
            dtype=dtype,
            generator=generator,
        )

    def __call__(
        self,
        model: Model,
        data: Tensor,
        cond: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> MeanFlowOutput:
        """Draw times, noise and label drops, and evaluate the MeanFlow loss on ``model``.

        ``self.loss(model, self.sample_batch(data, cond, generator=generator, noise=noise))``.

        Args:
            model: Backbone called as ``model(x, t, s, cond)`` (not a DDP wrapper: pass
                ``.module`` and synchronise gradients yourself).
            data: Clean samples, batch first.
            cond: Per-sample conditions (labels), or None.
            generator: Source of every random draw, or None for the global RNG.
            noise: Noise to use instead of drawing it, shaped like ``data``.

        Returns:
            The `MeanFlowOutput`.
        """
        return self.loss(model, self.sample_batch(data, cond, generator=generator, noise=noise))

    def sample_batch(
        self,
        data: Tensor,
        cond: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> MeanFlowBatch:
        """Make every random draw of one step and build z_t and v.

        Draw order: the times (see ``sample_meanflow_times``), the noise, the label-drop mask.

        Args:
            data: Clean samples, batch first.
            cond: Per-sample conditions (labels), or None.
            generator: Source of every random draw, or None for the global RNG.
            noise: Noise to use instead of drawing it, shaped like ``data``.

        Returns:
            The `MeanFlowBatch`.

        Raises:
            ValueError: On bad shapes, non-finite inputs, or CFG without ``cond``.
        """
        check_tensor("data", data, min_ndim=2)
        check_cond("cond", cond, data.shape[0])
        if noise is not None:
            check_tensor("noise", noise, min_ndim=2)
            check_same_shape("noise", noise, "data", data)
        if self.check_inputs:
            check_finite("data", data)
            if noise is not None:
                check_finite("noise", noise)
        if self.guided and cond is None:
            raise ValueError(
                f"cond must be given with CFG (guidance_scale={self.guidance_scale!r}, "
                f"guidance_mix={self.guidance_mix!r}); got cond=None"
            )
        n = data.shape[0]
        device = data.device
        time_dtype = torch.float64 if data.dtype == torch.float64 else torch.float32
        times = self.sample_times(n, device=device, dtype=time_dtype, generator=generator)
        if noise is None:
            noise = randn(tuple(data.shape), device=device, dtype=data.dtype, generator=generator)
        drop_mask = None
        if cond is not None and self.cond_drop > 0:
            drop_mask = sample_drop_mask(n, self.cond_drop, device=device, generator=generator)
            cond = drop_cond(cond, drop_mask, self.null_cond)
        t_b = bcast_right(times.t.to(data.dtype), data)
        z = (1 - t_b) * data + t_b * noise
        return MeanFlowBatch(z=z, v=noise - data, times=times, cond=cond, drop_mask=drop_mask)

    def loss(self, model: Model, batch: MeanFlowBatch) -> MeanFlowOutput:
        """Evaluate the MeanFlow loss on a batch of draws (deterministic given the batch and the network).

        Args:
            model: Backbone called as ``model(x, t, s, cond)``.
            batch: The draws from `sample_batch`.

        Returns:
            The `MeanFlowOutput`.
        """
        z, v, cond, times = batch.z, batch.v, batch.cond, batch.times
        t, r = times.t, times.r
        n = z.shape[0]
        # The labels' values are read once per step, as SoFlowObjective.loss does, and the SoFlow backbones
        # then skip their own per-call value check (a device sync each), so both objectives pay the same.
        declared = class_count(model)
        if declared is not None and cond is not None and not is_tracing():
            check_values(label_checks("cond", cond, declared[0], null_allowed=declared[1]))
            model = labels_unchecked(model)

        # CFG: u(z, t, t | ∅) and, for κ ≠ 0, u(z, t, t | c) in one no-grad call.
        if self.guided:
            assert cond is not None
            null = drop_cond(cond, torch.ones(n, dtype=torch.bool, device=z.device), self.null_cond)
            need_uncond = self.uncond_coefficient != 0.0
            need_cond = self.guidance_mix != 0.0
            xs = [z] * (int(need_uncond) + int(need_cond))
            cs = ([null] if need_uncond else []) + ([cond] if need_cond else [])
            u_uncond = u_cond = None
            if xs:
                with torch.no_grad():
                    out = model(torch.cat(xs), t.repeat(len(xs)), t.repeat(len(xs)), torch.cat(cs))
                parts = list(out.split(n))
                u_uncond = parts.pop(0) if need_uncond else None
                u_cond = parts.pop(0) if need_cond else None
            v = guided_meanflow_velocity(
                v, u_uncond, u_cond, batch.drop_mask, scale=self.guidance_scale, mix=self.guidance_mix
            )

        # The JVP, the target and the loss.
        u, dudt = average_velocity_and_derivative(
            model, z, r, t, v, cond, jvp_variant=self.jvp_variant, math_attention=self.math_attention
        )
        target = meanflow_target(v, dudt, r, t)
        per_sample, sq, w = meanflow_loss(u, target, p=self.p, eps=self.eps)
        loss = per_sample.mean()
        detached = loss.detach()
        metrics = {
            "loss": detached,
            "sq_error": sq.mean(),
            "mse": sq.mean() / z[0].numel(),
            "weight": w.mean(),
            "r_neq_t": times.r_neq_t.float().mean(),
            "finite": torch.isfinite(detached).to(detached.dtype),
        }
        return MeanFlowOutput(
            loss=loss, per_sample=per_sample, u=u.detach(), target=target, times=times, metrics=metrics
        )


def meanflow_sample(model: Model, noise: Tensor, *, steps: int = 1, cond: Tensor | None = None) -> Tensor:
    r"""Generate with a MeanFlow model in 1 or more steps of the average velocity.

    $$z_r = z_t - (t - r)\,u_\theta(z_t, r, t),$$

    on the uniform grid 1 → 0: one step is $x = \varepsilon - u_\theta(\varepsilon, 0, 1)$, two
    steps go through t = 0.5.

    Args:
        model: Backbone called as ``model(z, t, r, cond)``.
        noise: ε, batch first.
        steps: Number of network evaluations, ≥ 1.
        cond: Conditions, or None.

    Returns:
        The samples.

    Raises:
        ValueError: If ``steps`` < 1 or ``noise`` has no batch dimension.
    """
    steps = check_int("steps", steps, low=1)
    check_tensor("noise", noise, min_ndim=2)
    check_cond("cond", cond, noise.shape[0])
    n = noise.shape[0]
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    z = noise
    time_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        for t_value, r_value in itertools.pairwise(grid):
            t = torch.full((n,), t_value, device=noise.device, dtype=time_dtype)
            r = torch.full((n,), r_value, device=noise.device, dtype=time_dtype)
            z = z - (t_value - r_value) * model(z, t, r, cond).to(z.dtype)
    return z
