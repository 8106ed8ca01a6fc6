r"""`SoFlowObjective`: one training step's loss, composed from the building blocks (see the Method page).

The objective owns no network, optimizer or state. Each call draws noise, times and label
masks from an explicit ``generator``, evaluates the backbone in as few batched calls as the
maths allows, and returns the scalar to backpropagate with detached metrics:

1. one no-grad call for every guidance velocity (unconditional for both sub-batches, the
   model's conditional velocity for the consistency sub-batch when m < 1);
2. one grad call over the Flow Matching and consistency samples together;
3. one no-grad teacher call at (x_ℓ, ℓ, s), replaying the random stream of call 2.

When the backbone has active dropout, a joint call 2 would draw masks for a batch shape the
teacher never sees, so ``forward_batching="auto"`` then splits call 2 into a Flow Matching
call and a consistency call, and the teacher replays the consistency call's masks exactly.
"""

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from soflow_core._rng import PassReplay, has_active_dropout, may_use_dropout, randn
from soflow_core._validation import (
    call_backbone,
    check_backbone_input,
    check_bool,
    check_choice,
    check_cond,
    check_generator,
    check_int,
    check_no_labels_for,
    check_omega,
    check_omega_use,
    check_real,
    check_same_dtype,
    check_same_shape,
    check_tensor,
    check_total_steps,
    check_values,
    checked_backbone,
    class_count,
    finite_check,
    is_tracing,
    label_checks,
    labels_unchecked,
    omega_checks,
    omega_range,
)
from soflow_core.guidance import ClassifierFreeGuidance, GuidanceScaleDistribution, drop_cond, sample_drop_mask
from soflow_core.losses import (
    ConsistencyOutput,
    FlowMatchingOutput,
    consistency_equivalent_loss,
    flow_matching_loss_from_output,
    guided_target_from_outputs,
    guided_teacher_state,
    solution_consistency_loss_from_teacher,
    teacher_state,
)
from soflow_core.ops._dispatch import BACKENDS, Backend
from soflow_core.parameterizations import AbstractParam, EulerParam, make_param
from soflow_core.paths import AbstractPath, LinearPath, make_path
from soflow_core.time_samplers import (
    AbstractTimeDistribution,
    ConsistencyTimeSampler,
    ExponentSchedule,
    LogitNormal,
    Uniform,
)
from soflow_core.typing import Backbone, Cond, Data, DropMask, GuidanceScale, Scalar, Time
from soflow_core.weighting import AdaptiveWeighting

__all__ = [
    "PRESETS",
    "ConsistencyBatch",
    "ConsistencyVelocity",
    "FlowMatchingBatch",
    "ForwardBatching",
    "ObjectiveOutput",
    "SoFlowObjective",
    "TrainingBatch",
    "has_active_dropout",
    "split_sizes",
    "with_pretrained_velocity",
]

ForwardBatching = Literal["auto", "joint", "split"]
"""How the grad calls of a step are grouped; see `SoFlowObjective.forward_batching`."""
ConsistencyVelocity = Literal["conditional", "pretrained"]
"""The velocity of the step to x_ℓ; see `SoFlowObjective.consistency_velocity`."""


@dataclass(frozen=True, kw_only=True)
class FlowMatchingBatch:
    """The random draws of the Flow Matching sub-batch.

    Attributes:
        x_t: Points on the path.
        v_t: Their conditional velocities.
        t: Times.
        cond: Conditions after the label drop, or None.
        drop_mask: True where the condition was dropped, or None without guidance.
        omega: The guidance scale ω of each sample for an ω-conditioned model, else None.
    """

    x_t: Data
    v_t: Data
    t: Time
    cond: Cond | None = None
    drop_mask: DropMask | None = None
    omega: GuidanceScale | None = None


@dataclass(frozen=True, kw_only=True)
class ConsistencyBatch:
    """The random draws of the solution-consistency sub-batch.

    Attributes:
        x_t: Points on the path at time t.
        v_t: Their conditional velocities.
        t: Times of x_t.
        s: Target times.
        ell: Intermediate times.
        cond: Conditions after the label drop, or None.
        drop_mask: True where the condition was dropped, or None without guidance.
        omega: The guidance scale ω of each sample for an ω-conditioned model, else None.
    """

    x_t: Data
    v_t: Data
    t: Time
    s: Time
    ell: Time
    cond: Cond | None = None
    drop_mask: DropMask | None = None
    omega: GuidanceScale | None = None


@dataclass(frozen=True, kw_only=True)
class TrainingBatch:
    """Everything random about one step; the loss is a deterministic function of it and the network.

    Attributes:
        flow_matching: The first int(λ·B) samples, or None if there are none.
        consistency: The remaining samples, or None if there are none.
    """

    flow_matching: FlowMatchingBatch | None
    consistency: ConsistencyBatch | None

    @property
    def batch_size(self) -> int:
        """B, the number of samples of both sub-batches together."""
        return sum(part.t.shape[0] for part in (self.flow_matching, self.consistency) if part is not None)


@dataclass(frozen=True, kw_only=True)
class ObjectiveOutput:
    """Result of one objective call.

    Attributes:
        backprop: L_FM·N_fm/B + L_sur·N_c/B, the scalar to call ``.backward()`` on. Its gradient
            is that of the weighted losses; its value is not a loss (the consistency part is a
            surrogate).
        flow_matching: The Flow Matching output, or None when N_fm = 0.
        consistency: The consistency output, or None when N_c = 0.
        metrics: Detached 0-dim tensors for logging (no device sync until you read them):
            ``fm_loss``, ``fm_mse``, ``fm_weight``, ``consistency_mse``, ``consistency_weight``,
            ``consistency_loss`` (the value of the loss the surrogate's gradient belongs to),
            and ``finite`` (1.0 when every loss term is finite, else 0.0). A part's keys are
            present only when it has samples: with N_fm = 0 (λ = 0, as in the CIFAR-10 recipe,
            or a batch of 1) there are no ``fm_*`` keys, with N_c = 0 no ``consistency_*`` keys.
            The split depends only on the batch size and λ, so at a fixed batch size the keys
            are the same on every step and every rank; read them with ``metrics.get(key)``. (By design: a filler
            would be NaN, which finiteness checks must then special-case, or 0, which reads as
            a perfect loss.)
        differentiable_loss: With ``SoFlowObjective(differentiable_loss=True)``, L_FM·N_fm/B +
            L_eq·N_c/B with gradient, where L_eq is the explicit weighted MSE
            ([`consistency_equivalent_loss`][soflow_core.losses.consistency_equivalent_loss]):
            the same gradient as ``backprop`` and the loss's own second derivatives, for
            Hessian-vector products or MAML. None otherwise.
    """

    backprop: Scalar
    flow_matching: FlowMatchingOutput | None
    consistency: ConsistencyOutput | None
    metrics: dict[str, Tensor]
    differentiable_loss: Scalar | None = None


def split_sizes(batch_size: int, fm_fraction: float) -> tuple[int, int]:
    """The reference's per-device split: N_fm = int(λ·B) Flow Matching samples, the rest consistency.

    Args:
        batch_size: B, the per-device batch.
        fm_fraction: λ ∈ [0, 1] (reference ``velocity_loss_ratio``).

    Returns:
        (N_fm, N_c).

    Examples:
        >>> split_sizes(32, 0.75)
        (24, 8)
    """
    n_fm = int(fm_fraction * batch_size)
    return n_fm, batch_size - n_fm


def with_pretrained_velocity(batch: TrainingBatch, velocity_model: Backbone, *, param: AbstractParam) -> TrainingBatch:
    r"""The batch whose consistency samples step to x_ℓ along a pretrained model's velocity.

    The paper steps along the conditional velocity of each sample's own path,
    ṽ = α'_t·data + β'_t·noise (consistency *training*). With a frozen pretrained velocity
    model v_pre, as in consistency *distillation* (Song et al., "Consistency Models", ICML 2023),

    $$x_\ell = x_t + v_{\mathrm{pre}}(x_t, t, c)\,(\ell - t),$$

    the step follows the pretrained ODE, so the consistency target has far less variance. For a
    backbone made by [`from_velocity_model`][soflow_core.nets.convert.from_velocity_model] and
    fine-tuned from its own weights, the start is then a fixed point: with r(k, K) = 1 the
    target f(x_ℓ, s, s) = x_t + v_pre·(s − t) is what the untrained network already returns.
    The Flow Matching samples keep the conditional velocity as their target (measured: the
    pretrained velocity there made the one-step samples worse; see the Fine-tune page). With
    guidance, ṽ replaces v_t inside the guided velocity, so the guided step uses the pretrained
    conditional velocity and the online model's unconditional one. Dropped labels call the
    pretrained model with the null class, as the batch's ``cond`` holds it. A pretrained model
    that is itself ω-conditioned (it declares ``omega_range``) gets each sample's ω; any other
    gets none, whether or not the batch draws ω.

    Args:
        batch: The draws from [`sample_batch`][soflow_core.objective.SoFlowObjective.sample_batch].
        velocity_model: The pretrained backbone, called without gradient at s = t; its velocity is
            ``param.velocity(velocity_model, x_t, t, cond)``.
        param: The parameterization both networks use.

    Returns:
        The batch with ``consistency.v_t`` replaced (the Flow Matching part as it was).

    Examples:
        >>> import torch
        >>> from soflow_core.nets import MLPBackbone
        >>> objective = SoFlowObjective.from_preset("toy")
        >>> batch = objective.sample_batch(torch.randn(8, 2), step=0, total_steps=10)
        >>> frozen = MLPBackbone(dim=2)  # F ≡ 0: a zero velocity
        >>> with_pretrained_velocity(batch, frozen, param=objective.param).consistency.v_t.abs().max()
        tensor(0.)
    """
    part = batch.consistency
    if part is None:
        return batch
    with torch.no_grad():
        omega = part.omega if omega_range(velocity_model) is not None else None
        v_pre = param.velocity(velocity_model, part.x_t, part.t, part.cond, omega=omega)
    return dataclasses.replace(batch, consistency=dataclasses.replace(part, v_t=v_pre.detach()))


def _cat(parts: Sequence[Tensor | None]) -> Tensor | None:
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError("cond must be given for every sub-batch or for none")
    return torch.cat(list(parts), dim=0)  # type: ignore[arg-type]


Request = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]
"""One backbone call: (x, t, s, cond, omega)."""


def _batched_call(model: Backbone, calls: Sequence[Request], joint: bool) -> list[Tensor]:
    """Evaluate ``model(x, t, s, cond[, omega=])`` for each request, as one concatenated call when ``joint``."""
    if not joint or len(calls) == 1:
        return [call_backbone(model, x, t, s, c, o) for x, t, s, c, o in calls]  # type: ignore[misc]
    xs, ts, ss, cs, os_ = zip(*calls)
    omega = None if os_[0] is None else torch.cat(os_)
    out = call_backbone(model, torch.cat(xs), torch.cat(ts), torch.cat(ss), _cat(cs), omega)
    return list(torch.split(out, [x.shape[0] for x in xs]))  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class SoFlowObjective:
    """The SoFlow training objective: Flow Matching plus solution consistency, with optional CFG.

    Defaults are the reference ImageNet recipe without guidance; see
    [`from_preset`][soflow_core.objective.SoFlowObjective.from_preset] for the two released recipes
    and a recipe for low-dimensional data.

    Attributes:
        path: The noising path (reference ``noising_type``), an object or its name
            (``"linear"``, ``"trig"``).
        param: The solution parameterization (reference ``coefficient_type``), an object or its
            name (``"euler"``, ``"trig"``).
        fm_fraction: λ, the share of each per-device batch used for Flow Matching
            (reference ``velocity_loss_ratio``).
        fm_time: Distribution of the Flow Matching times (``time_mean[0]``, ``time_std[0]``).
        consistency_times: Sampler of (t, s, ℓ) including the r(k, K) schedule.
        weighting: p and ε of both adaptive weights (``adaptive_p``, ``eps``).
        guidance: Training-time classifier-free guidance, or None.
        forward_batching: ``"joint"`` evaluates FM and consistency samples in one grad call;
            ``"split"`` uses separate calls (needed to share dropout masks); ``"auto"`` picks
            ``"joint"`` only when the backbone reaches modules without active dropout, seen
            through DDP, FSDP2, ``torch.compile``, ``functools.partial`` and closures over
            ``torch.func.functional_call``; a callable that reaches no module, or a module with
            active dropout, gets ``"split"``. Functional dropout inside ``forward`` (or in a
            wrapper function) is not detected: choose ``"split"`` then.
            Both evaluate the same formulas; they agree up to the rounding of the backbone's
            batched matmuls, and bit for bit only for a batch-invariant backbone (see
            [Network calls per training step](../method.md#network-calls-per-training-step)).
        check_inputs: Check data, cond and noise before any model call: shapes and dtypes, data
            and noise finite, class labels in range (one device sync in ``sample_batch``, one more
            in ``loss`` for a backbone that declares ``num_classes``; the value checks are skipped
            automatically under ``torch.compile``), and every backbone output against its input's
            shape, dtype and device (metadata only). Class labels are recognised by an integer
            ``guidance.null_cond`` (the class count) or a ``num_classes`` attribute of the
            backbone (see [Conventions](../conventions.md#class-labels)); other conditions
            (embeddings, augmentation labels) are passed through unchecked. The data must be in
            the dtype of the backbone's parameters (outside autocast). The library's backbones
            check their labels in ``forward`` too (so a wrapper that hides ``num_classes``
            cannot let a bad label through); where this objective has checked them, they skip
            the value check (no extra sync). False also turns those backbone value checks off
            during the step.
        backend: Where the fused loss-path ops (path build, guided target, teacher state, both
            loss rows) run: ``"auto"`` uses the Triton kernels for CUDA tensors when
            ``soflow_kernels`` is installed and PyTorch otherwise; ``"torch"`` always runs the
            references; ``"triton"`` insists on the kernels and warns once when a call must
            fall back. See [Kernels](../kernels.md).
        differentiable_loss: Also return ``ObjectiveOutput.differentiable_loss``, the loss in an
            explicit form that may be differentiated twice. ``backprop`` is right to first order
            only: its gradient is the loss's, its second derivatives are not. Costs one
            elementwise pass over the consistency samples.
        consistency_velocity: The velocity of the step to the intermediate time,
            x_ℓ = x_t + ṽ·(ℓ − t): ``"conditional"`` (the paper's: ṽ = α'_t·data + β'_t·noise,
            the sample's own path) or ``"pretrained"`` (ṽ = the velocity of a frozen pretrained
            model, passed to each call as ``velocity_model``; see
            [`with_pretrained_velocity`][soflow_core.objective.with_pretrained_velocity]). The
            ``"finetune"`` preset uses ``"pretrained"``.

    Examples:
        >>> import torch
        >>> from soflow_core.nets import MLPBackbone
        >>> objective = SoFlowObjective.from_preset("cifar10")
        >>> out = objective(MLPBackbone(dim=2), torch.randn(16, 2), step=0, total_steps=100,
        ...                 generator=torch.Generator().manual_seed(0))
        >>> out.backprop.backward()
    """

    path: AbstractPath | str = field(default_factory=LinearPath)
    param: AbstractParam | str = field(default_factory=EulerParam)
    fm_fraction: float = 0.75
    fm_time: AbstractTimeDistribution = field(default_factory=lambda: LogitNormal(mean=-0.2, std=1.0))
    consistency_times: ConsistencyTimeSampler = field(default_factory=ConsistencyTimeSampler)
    weighting: AdaptiveWeighting = field(default_factory=AdaptiveWeighting)
    guidance: ClassifierFreeGuidance | None = None
    forward_batching: ForwardBatching = "auto"
    check_inputs: bool = True
    backend: Backend = "auto"
    differentiable_loss: bool = False
    consistency_velocity: ConsistencyVelocity = "conditional"

    def __post_init__(self) -> None:
        # Names are resolved once, here; afterwards `path` and `param` are always objects.
        if isinstance(self.path, str):
            object.__setattr__(self, "path", make_path(self.path))
        if isinstance(self.param, str):
            object.__setattr__(self, "param", make_param(self.param))
        expected = {
            "path": AbstractPath,
            "param": AbstractParam,
            "fm_time": AbstractTimeDistribution,
            "consistency_times": ConsistencyTimeSampler,
            "weighting": AdaptiveWeighting,
        }
        for name, cls in expected.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__}; got {type(value).__name__}: {value!r}")
        if self.guidance is not None and not isinstance(self.guidance, ClassifierFreeGuidance):
            raise TypeError(f"guidance must be a ClassifierFreeGuidance or None; got {self.guidance!r}")
        check_real("fm_fraction", self.fm_fraction, low=0.0, high=1.0)
        check_choice("forward_batching", self.forward_batching, ("auto", "joint", "split"))
        check_choice("backend", self.backend, BACKENDS)
        object.__setattr__(self, "check_inputs", check_bool("check_inputs", self.check_inputs))
        object.__setattr__(self, "differentiable_loss", check_bool("differentiable_loss", self.differentiable_loss))
        check_choice("consistency_velocity", self.consistency_velocity, ("conditional", "pretrained"))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(cls, name: str, *, num_classes: int | None = None, **overrides: object) -> "SoFlowObjective":
        """One of the two released recipes or the library's toy and fine-tuning recipes, with field overrides.

        * ``"imagenet"``: DiT-B/4 on ImageNet-256 latents with CFG (ω = 3, m = 0.25, drop 0.1,
          t_d = 0.8, null class 1000), λ = 0.75, p = 1, ε = 0.01, times [FM, s, t] logit-normal
          μ = [−0.2, −1.0, 0.2], σ = [1.0, 0.8, 0.8], r Exponent 0.1 → 0.002.
        * ``"cifar10"``: unconditional CIFAR-10, λ = 0, p = 0.75, ε = 1e-3, μ = [−0.9, −4.0, −0.9],
          σ = 1.6, r Exponent 1.0 → 0.0003125, no guidance.
        * ``"toy"``: not from the paper; this library's recipe for low-dimensional data (the 2-D
          toys), tuned on the checkerboard: λ = 0.25, p = 0.35, ε = 1, FM times logit-normal
          (−0.2, 1.0), t uniform on [0, 1], s logit-normal (−3.0, 1.5), r Exponent 1.0 → 0.002,
          no guidance. See [Benchmarks](../benchmarks/toy-recipe.md).
        * ``"finetune"``: not from the paper; this library's recipe for fine-tuning a velocity
          model converted by [`from_velocity_model`][soflow_core.nets.convert.from_velocity_model]
          (a Flow Matching model, SiT): the ``"toy"`` recipe with ``consistency_velocity="pretrained"``,
          so every call takes ``velocity_model=`` the frozen converted network. r starts at 1.0, where
          the converted network is a fixed point. Measured on the 2-D toys and 8×8 digits; see
          [Fine-tune a pretrained flow model](../finetune.md).

        Args:
            name: ``"imagenet"``, ``"cifar10"``, ``"toy"`` or ``"finetune"``.
            num_classes: The class count of a class-conditional model (``"imagenet"``: 1000). Dropped
                labels become the null class ``num_classes``, the last row of a label table with
                ``num_classes + 1`` rows, so a model with fewer classes needs it (with 10 classes the
                preset's null class 1000 would index past the table).
            **overrides: Fields to replace, e.g. ``backend="torch"``.

        Returns:
            The objective.

        Raises:
            ValueError: If the preset is unknown, or ``num_classes`` is given for a preset without
                guidance (``"cifar10"``).

        Examples:
            >>> SoFlowObjective.from_preset("imagenet").guidance.scale
            3.0
            >>> SoFlowObjective.from_preset("imagenet", num_classes=10).guidance.null_cond
            10
        """
        key = check_choice("preset", name, tuple(PRESETS))
        objective = dataclasses.replace(PRESETS[key], **overrides)
        if num_classes is None:
            return objective
        check_int("num_classes", num_classes, low=1)
        if objective.guidance is None:
            raise ValueError(f"num_classes: preset {key!r} has no guidance, so no null class to set; got {num_classes}")
        return dataclasses.replace(objective, guidance=dataclasses.replace(objective.guidance, null_cond=num_classes))

    # ------------------------------------------------------------------ the step

    def __call__(
        self,
        model: Backbone,
        data: Data,
        cond: Cond | None = None,
        *,
        step: int,
        total_steps: int,
        generator: torch.Generator | None = None,
        noise: Data | None = None,
        velocity_model: Backbone | None = None,
    ) -> ObjectiveOutput:
        """Draw a training batch from ``data`` and evaluate the objective on ``model``.

        Under a ``torch.compile`` of your own around this call, the draws run eagerly, outside
        the graph (one graph break per step, with a warning the first time): dynamo can trace
        neither an explicit ``torch.Generator`` nor the Python float r(k, K) of the schedule
        without guarding on it, and a guard on a value that moves every step would recompile
        every step. So the draws are exactly the eager ones, and the loss after them compiles
        once and is reused at every step. For one graph without a break, draw with
        ``sample_batch`` outside the compiled function and compile ``loss``, as
        [`make_training_step`][soflow_core.train.make_training_step] does.

        Args:
            model: The backbone F_θ (a module, a DDP/FSDP wrapper or any callable).
            data: Clean samples, batch first.
            cond: Per-sample conditions (class labels for guidance), or None.
            step: Optimizer steps done so far, k ≥ 0 (drives r(k, K)).
            total_steps: Planned run length K ≥ 1.
            generator: Source of every random draw of the step, or None for the global RNG.
            noise: Noise to use instead of drawing it, shaped like ``data``.
            velocity_model: With ``consistency_velocity="pretrained"`` (and only then), the frozen
                pretrained backbone whose velocity steps the consistency samples to x_ℓ.

        Returns:
            The [`ObjectiveOutput`][soflow_core.ObjectiveOutput].

        Raises:
            ValueError: On bad shapes, non-finite data, bad step counts, guidance without ``cond``,
                or a ``velocity_model`` missing for (or given to) the consistency velocity.
            TypeError: On non-tensor inputs or non-integer step counts.
        """
        pretrained = self.consistency_velocity == "pretrained"
        if pretrained and velocity_model is None:
            raise ValueError(
                "velocity_model: consistency_velocity='pretrained' steps to x_ℓ along a pretrained model's velocity; "
                "pass the frozen pretrained backbone (e.g. a copy of the converted model before fine-tuning)"
            )
        if not pretrained and velocity_model is not None:
            raise ValueError(
                "velocity_model was given, but consistency_velocity='conditional' does not use it; build the "
                "objective with consistency_velocity='pretrained' (or the 'finetune' preset)"
            )
        # torch.compiler.disable is applied here, only while tracing: at import it would load dynamo (and Triton).
        draw = torch.compiler.disable(_sample_batch_eagerly) if is_tracing() else SoFlowObjective.sample_batch
        batch = draw(self, data, cond, step=step, total_steps=total_steps, generator=generator, noise=noise)
        if pretrained:
            batch = with_pretrained_velocity(batch, velocity_model, param=self.param)  # type: ignore[arg-type]
        return self.loss(model, batch)

    def sample_batch(
        self,
        data: Data,
        cond: Cond | None = None,
        *,
        step: int,
        total_steps: int,
        generator: torch.Generator | None = None,
        noise: Data | None = None,
    ) -> TrainingBatch:
        """Make every random draw of one step (noise, times, label masks, guidance scales), in a fixed order.

        Draw order: FM times, FM noise, FM mask, FM ω; then s, t, consistency noise, consistency
        mask, consistency ω. ω is drawn only for an ω-conditioned model (``guidance.scale`` a
        [`GuidanceScaleDistribution`][soflow_core.guidance.GuidanceScaleDistribution]), for every
        sample, dropped or not; otherwise the draws are those of the fixed-ω objective. Times (and
        ω) are float64 for float64 data and float32 otherwise.

        Args:
            data: Clean samples, batch first.
            cond: Per-sample conditions, or None.
            step: Optimizer steps done so far, k ≥ 0.
            total_steps: Planned run length K ≥ 1.
            generator: Source of every draw, or None for the global RNG.
            noise: Noise to use instead of drawing it, shaped like ``data``.

        Returns:
            The [`TrainingBatch`][soflow_core.TrainingBatch].

        Raises:
            ValueError: On bad shapes, non-finite data or bad step counts.
            TypeError: On non-tensor inputs or non-integer step counts.
        """
        check_int("step", step, low=0)
        check_total_steps(total_steps)
        check_generator("generator", generator)
        if self.check_inputs:
            self._check_draw_inputs(data, cond, noise)
        guidance = self.guidance
        if guidance is not None and cond is None and (guidance.active or guidance.drop_rate > 0):
            raise ValueError(
                f"cond must be given when guidance is set (scale={guidance.scale}, "
                f"drop_rate={guidance.drop_rate}); got cond=None"
            )
        n_fm, n_c = split_sizes(data.shape[0], self.fm_fraction)
        device = data.device
        time_dtype = torch.float64 if data.dtype == torch.float64 else torch.float32

        def draw_noise(part: slice) -> Tensor:
            if noise is not None:
                return noise[part]
            shape = (part.stop - part.start, *data.shape[1:])
            return randn(shape, device=device, dtype=data.dtype, generator=generator)

        def draw_cond(part: slice, size: int) -> tuple[Tensor | None, Tensor | None]:
            if cond is None:
                return None, None
            if guidance is None or guidance.drop_rate == 0:
                return cond[part], None
            mask = sample_drop_mask(size, guidance.drop_rate, device=device, generator=generator)
            return drop_cond(cond[part], mask, guidance.null_cond), mask

        def draw_omega(size: int) -> Tensor | None:
            if guidance is None or not isinstance(guidance.scale, GuidanceScaleDistribution):
                return None
            return guidance.scale.sample(size, device=device, dtype=time_dtype, generator=generator)

        fm_batch = sc_batch = None
        if n_fm > 0:
            part = slice(0, n_fm)
            t = self.fm_time.sample(n_fm, device=device, dtype=time_dtype, generator=generator)
            sample = self.path.interpolate(data[part], draw_noise(part), t, backend=self.backend)
            fm_cond, fm_mask = draw_cond(part, n_fm)
            fm_batch = FlowMatchingBatch(
                x_t=sample.x_t, v_t=sample.v_t, t=t, cond=fm_cond, drop_mask=fm_mask, omega=draw_omega(n_fm)
            )
        if n_c > 0:
            part = slice(n_fm, n_fm + n_c)
            times = self.consistency_times.sample(
                n_c, step=step, total_steps=total_steps, device=device, dtype=time_dtype, generator=generator
            )
            sample = self.path.interpolate(data[part], draw_noise(part), times.t, backend=self.backend)
            sc_cond, sc_mask = draw_cond(part, n_c)
            sc_batch = ConsistencyBatch(
                x_t=sample.x_t,
                v_t=sample.v_t,
                t=times.t,
                s=times.s,
                ell=times.ell,
                cond=sc_cond,
                drop_mask=sc_mask,
                omega=draw_omega(n_c),
            )
        return TrainingBatch(flow_matching=fm_batch, consistency=sc_batch)

    def _check_draw_inputs(self, data: object, cond: object, noise: object) -> None:
        """Types, shapes and dtypes, then finiteness and label ranges with one device sync."""
        data = check_tensor("data", data, min_ndim=2)
        check_cond("cond", cond, data.shape[0], device=data.device)
        checks = [finite_check("data", data)]
        if noise is not None:
            noise = check_tensor("noise", noise, min_ndim=2)
            check_same_shape("noise", noise, "data", data)
            check_same_dtype("noise", noise, "data", data)
            checks.append(finite_check("noise", noise))
        num_classes = self.guidance.num_classes if self.guidance is not None else None
        if num_classes is not None and cond is not None:
            checks += label_checks("cond", cond, num_classes)  # type: ignore[arg-type]
        check_values(checks)

    def _check_omega_use(self, model: Backbone) -> tuple[float, float] | None:
        """An ω-conditioned objective needs a backbone that declares ``omega_range`` covering its ω, and vice versa."""
        guidance = self.guidance
        conditioned = guidance is not None and guidance.conditioned
        context = (
            f"the objective (guidance.scale={guidance.scale!r})"  # type: ignore[union-attr]
            if conditioned
            else "the objective (its guidance scale is fixed, or it has no guidance)"
        )
        remedy = "set guidance.scale to a GuidanceScaleDistribution within that range"
        declared = check_omega_use(model, conditioned, context, remedy)
        if conditioned and declared is not None:
            low, high = guidance.scale_range  # type: ignore[union-attr]
            if low < declared[0] or high > declared[1]:
                raise ValueError(
                    f"guidance.scale draws ω in [{low:g}, {high:g}], outside the backbone's omega_range "
                    f"[{declared[0]:g}, {declared[1]:g}]"
                )
        return declared

    def _check_backbone(
        self, model: Backbone, batch: TrainingBatch, declared_range: tuple[float, float] | None
    ) -> Backbone:
        """Check the batch against the backbone before any call; wrap it to check every output.

        The data's dtype must be the backbone's parameters' (outside autocast). The labels are
        checked against the class count the backbone declares (one device sync); inside the
        step the backbone then skips its own value check (`label_values_checked`). A backbone
        that hides its class count (a function around the network) is not checked here, but the
        library's backbones check their labels in ``forward``: a bad label (or a guidance
        ``null_cond`` that is not the model's class count) fails at the first call, with the
        library's message. Each sample's ω must be finite and inside the backbone's
        ``omega_range`` (read in the same synchronisation).
        """
        first = batch.flow_matching or batch.consistency
        check_backbone_input("data", first.x_t, model)  # type: ignore[union-attr]
        check_no_labels_for(model, first.cond)  # type: ignore[union-attr]
        checks: list = []
        for name, part in (("flow_matching.omega", batch.flow_matching), ("consistency.omega", batch.consistency)):
            if part is None:
                continue
            if (part.omega is None) != (declared_range is None):
                state = "has no" if part.omega is None else "has an"
                raise ValueError(
                    f"{name}: the batch {state} ω per sample, but the backbone's omega_range is {declared_range}; "
                    "draw the batch with this objective's sample_batch"
                )
            if part.omega is not None:
                check_omega(name, part.omega, part.t.shape[0])
                checks += omega_checks(name, part.omega, declared_range)
        declared = class_count(model)
        guidance = self.guidance
        if declared is not None:
            num_classes, has_null = declared
            if guidance is not None and guidance.num_classes not in (None, num_classes):
                raise ValueError(
                    f"guidance.null_cond = {guidance.num_classes} says the model has {guidance.num_classes} classes; "
                    f"the backbone declares num_classes = {num_classes}"
                )
            if guidance is not None and guidance.drop_rate > 0 and not has_null:
                raise ValueError(
                    f"guidance drops labels to the null class {num_classes} (drop_rate={guidance.drop_rate}), "
                    "but the backbone has no null class (null_class=False)"
                )
            for name, part in (("flow_matching.cond", batch.flow_matching), ("consistency.cond", batch.consistency)):
                if part is not None and part.cond is not None:
                    dropped = part.drop_mask if part.drop_mask is not None else False
                    checks += label_checks(name, part.cond, num_classes, null_allowed=dropped)
        check_values(checks)
        context = (
            f"the objective's step over {batch.batch_size} samples (its backbone calls concatenate sub-batches: "
            "guidance, Flow Matching and consistency samples; forward_batching='split' calls them one by one)"
        )
        if guidance is not None and guidance.num_classes is not None:
            context += (
                f"; dropped labels become guidance.null_cond = {guidance.num_classes}, which must be the model's "
                "class count (SoFlowObjective.from_preset(..., num_classes=N))"
            )
        return checked_backbone(model, context, labels_checked=declared is not None)

    def use_joint_forward(self, model: Backbone) -> bool:
        """Whether the grad calls of the two sub-batches are concatenated into one call for ``model``.

        Args:
            model: The backbone.

        Returns:
            True for one joint grad call, False for separate calls.
        """
        if self.forward_batching == "auto":
            return not may_use_dropout(model)
        return self.forward_batching == "joint"

    def replays_dropout(self, model: Backbone) -> bool:
        """Whether the teacher pass replays the random draws of the consistency grad call for ``model``.

        True when the backbone has active dropout layers or is not an ``nn.Module`` (so cannot be
        inspected), or when ``forward_batching="split"`` declares dropout the layer scan cannot
        see. Otherwise nothing is snapshot or replayed (no generator read, no device
        synchronisation).

        Args:
            model: The backbone.

        Returns:
            True if the step replays the student pass's random draws in the teacher pass.
        """
        return self.forward_batching == "split" or may_use_dropout(model)

    def loss(self, model: Backbone, batch: TrainingBatch) -> ObjectiveOutput:
        """Evaluate the objective on a batch of draws (deterministic given the batch and the network).

        Args:
            model: The backbone F_θ.
            batch: The draws from [`sample_batch`][soflow_core.objective.SoFlowObjective.sample_batch].

        Returns:
            The [`ObjectiveOutput`][soflow_core.ObjectiveOutput].

        Every call of an ω-conditioned model gets each sample's own ω (``omega=``): the
        student, the teacher, and the no-grad guidance passes, the unconditional one included (see
        [Guidance chosen at sampling](../method.md#guidance-chosen-at-sampling)).

        Raises:
            ValueError: With ``check_inputs``, on labels outside the backbone's class count or a
                backbone output of the wrong shape or device; always, when ``guidance.scale`` is a
                distribution and the backbone declares no ``omega_range`` (or the reverse).
            TypeError: With ``check_inputs``, on non-integer labels or a backbone output that is
                not a tensor of the input's dtype.
        """
        fm, sc = batch.flow_matching, batch.consistency
        guidance = self.guidance if self.guidance is not None and self.guidance.active else None
        joint = self.use_joint_forward(model)
        param = self.param
        declared = self._check_omega_use(model)
        model = self._check_backbone(model, batch, declared) if self.check_inputs else labels_unchecked(model)
        fm_omega = fm.omega if fm is not None else None
        sc_omega = sc.omega if sc is not None else None

        # 1. Guidance outputs, all without gradient, in one call when joint.
        uncond_fm = uncond_sc = model_sc = None
        if guidance is not None:
            requests: list[Request] = []
            for part in (fm, sc):
                if part is not None:
                    null = drop_cond(part.cond, torch.ones_like(part.drop_mask), guidance.null_cond)
                    requests.append((part.x_t, part.t, part.t, null, part.omega))
            if sc is not None and guidance.needs_model_velocity:
                requests.append((sc.x_t, sc.t, sc.t, sc.cond, sc.omega))
            with torch.no_grad():
                outs = iter(_batched_call(model, requests, joint))
                uncond_fm = next(outs) if fm is not None else None
                if sc is not None:
                    uncond_sc = next(outs)
                    model_sc = next(outs) if guidance.needs_model_velocity else None

        # 2. The grad call(s); the consistency samples' call is recorded for the teacher's replay.
        device = (fm or sc).x_t.device  # type: ignore[union-attr]
        replay = PassReplay(device, enabled=sc is not None and self.replays_dropout(model))
        fm_out = sc_out = None
        if joint:
            requests = []
            if fm is not None:
                requests.append((fm.x_t, fm.t, fm.t, fm.cond, fm.omega))
            if sc is not None:
                requests.append((sc.x_t, sc.t, sc.s, sc.cond, sc.omega))
            with replay.record():
                outs = iter(_batched_call(model, requests, joint=True))
            fm_out = next(outs) if fm is not None else None
            sc_out = next(outs) if sc is not None else None
        else:
            if fm is not None:
                fm_out = call_backbone(model, fm.x_t, fm.t, fm.t, fm.cond, fm.omega)
            if sc is not None:
                with replay.record():
                    sc_out = call_backbone(model, sc.x_t, sc.t, sc.s, sc.cond, sc.omega)

        # 3. Losses; the teacher call replays the random draws of the consistency grad call.
        fm_result = sc_result = None
        options = {"param": param, "backend": self.backend}
        if fm is not None:
            target = fm.v_t
            if guidance is not None:
                target = guided_target_from_outputs(
                    fm.v_t, fm.x_t, uncond_fm, fm_out, fm.drop_mask, fm.t, guidance=guidance, omega=fm_omega, **options
                )
            fm_result = flow_matching_loss_from_output(
                fm_out, fm.x_t, target, fm.t, weighting=self.weighting, **options
            )
        if sc is not None:
            with torch.no_grad(), replay.replay():
                if guidance is not None:
                    x_ell = guided_teacher_state(
                        sc.x_t,
                        sc.v_t,
                        uncond_sc,
                        model_sc,
                        sc.drop_mask,
                        sc.t,
                        sc.ell,
                        guidance=guidance,
                        omega=sc_omega,
                        **options,
                    )
                else:
                    x_ell = teacher_state(sc.x_t, sc.v_t, sc.t, sc.ell, backend=self.backend)
                teacher_output = call_backbone(model, x_ell, sc.ell, sc.s, sc.cond, sc.omega)
            sc_result = solution_consistency_loss_from_teacher(
                sc_out, sc.x_t, teacher_output, x_ell, sc.t, sc.s, sc.ell, weighting=self.weighting, **options
            )
        sc_equivalent = None
        if self.differentiable_loss and sc is not None:
            f_ell = param.combine(x_ell, teacher_output, sc.ell, sc.s)
            sc_equivalent = consistency_equivalent_loss(
                sc_out, sc.x_t, f_ell, sc.t, sc.s, sc.ell, sc_result.weight, param=param
            )
        return _combine(fm_result, sc_result, batch.batch_size, sc_equivalent, self.differentiable_loss)


_EAGER_DRAWS_WARNING = (
    "SoFlowObjective(...) is being compiled with torch.compile: its random draws run eagerly, outside the graph "
    "(one graph break per step; explicit generators and the moving schedule r(k, K) cannot be traced without "
    "recompiling every step). For one graph without a break, draw with objective.sample_batch(...) outside the "
    "compiled function and compile objective.loss(model, batch), as soflow_core.train.make_training_step does."
)


def _sample_batch_eagerly(objective: SoFlowObjective, data: Data, cond: Cond | None, **kwargs: object) -> TrainingBatch:
    """``objective.sample_batch``, kept out of a user's ``torch.compile`` of ``objective(...)``.

    dynamo breaks the graph here and runs the draws eagerly: the explicit generator cannot be
    traced, and the schedule's float r(k, K), were it traced, would be guarded on and recompile
    the step whenever it moves. Warns once per process.
    """
    _warn_eager_draws()
    return objective.sample_batch(data, cond, **kwargs)  # type: ignore[arg-type]


@functools.cache
def _warn_eager_draws() -> None:
    # Cached rather than left to the default warnings filter, which dynamo's catch_warnings blocks reset.
    warnings.warn(_EAGER_DRAWS_WARNING, UserWarning, stacklevel=2)


def _combine(
    fm: FlowMatchingOutput | None,
    sc: ConsistencyOutput | None,
    batch_size: int,
    sc_equivalent: Tensor | None = None,
    differentiable: bool = False,
) -> ObjectiveOutput:
    """L = L_FM·N_fm/B + L_sur·N_c/B with merged metrics (see the Method page), and L_eq in place of L_sur if asked."""
    terms: list[Tensor] = []
    explicit: list[Tensor] = []
    metrics: dict[str, Tensor] = {}
    for part in (fm, sc):
        if part is None:
            continue
        share = part.per_sample.shape[0] / batch_size
        terms.append(part.backprop * share)
        equivalent = part.backprop if part is fm else sc_equivalent
        if equivalent is not None:
            explicit.append(equivalent.mean() * share)
        metrics.update(part.metrics())
    backprop = torch.stack(terms).sum() if len(terms) > 1 else terms[0]
    finite = torch.stack([torch.isfinite(v).all() for v in (backprop.detach(), *metrics.values())]).all()
    metrics["finite"] = finite.to(backprop.dtype)
    loss = torch.stack(explicit).sum() if differentiable else None
    return ObjectiveOutput(
        backprop=backprop, flow_matching=fm, consistency=sc, metrics=metrics, differentiable_loss=loss
    )


PRESETS: dict[str, SoFlowObjective] = {
    "imagenet": SoFlowObjective(
        fm_fraction=0.75,
        fm_time=LogitNormal(mean=-0.2, std=1.0),
        consistency_times=ConsistencyTimeSampler(
            t_distribution=LogitNormal(mean=0.2, std=0.8),
            s_distribution=LogitNormal(mean=-1.0, std=0.8),
            schedule=ExponentSchedule(r_init=0.1, r_end=0.002),
        ),
        weighting=AdaptiveWeighting(p=1.0, eps=0.01),
        guidance=ClassifierFreeGuidance(scale=3.0, mix=0.25, drop_rate=0.1, decay_time=0.8, null_cond=1000),
    ),
    "cifar10": SoFlowObjective(
        fm_fraction=0.0,
        fm_time=LogitNormal(mean=-0.9, std=1.6),
        consistency_times=ConsistencyTimeSampler(
            t_distribution=LogitNormal(mean=-0.9, std=1.6),
            s_distribution=LogitNormal(mean=-4.0, std=1.6),
            schedule=ExponentSchedule(r_init=1.0, r_end=0.0003125),
        ),
        weighting=AdaptiveWeighting(p=0.75, eps=1e-3),
        guidance=None,
    ),
    # Not the paper's: tuned for 2-D data with the ablation in docs/benchmarks/toy-recipe.md.
    "toy": SoFlowObjective(
        fm_fraction=0.25,
        fm_time=LogitNormal(mean=-0.2, std=1.0),
        consistency_times=ConsistencyTimeSampler(
            t_distribution=Uniform(low=0.0, high=1.0),
            s_distribution=LogitNormal(mean=-3.0, std=1.5),
            schedule=ExponentSchedule(r_init=1.0, r_end=0.002),
        ),
        weighting=AdaptiveWeighting(p=0.35, eps=1.0),
        guidance=None,
    ),
}
# Not the paper's: fine-tuning a converted velocity model (nets.from_velocity_model), measured in docs/finetune.md:
# the "toy" recipe, stepping to x_ℓ along the frozen pretrained velocity.
PRESETS["finetune"] = dataclasses.replace(PRESETS["toy"], consistency_velocity="pretrained")
"""The two released recipes (``imagenet``, ``cifar10``) and the library's ``toy`` and ``finetune``
recipes; use [`SoFlowObjective.from_preset`][soflow_core.objective.SoFlowObjective.from_preset]."""
