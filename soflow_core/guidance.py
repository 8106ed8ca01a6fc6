r"""Classifier-free guidance baked in at training time (SoFlow paper; see the Method page of the docs).

The trained network already produces guided samples: its training target is
$v_g = v_t + c(t)(\omega - 1)(v_t - v_\theta(x_t, t\mid\varnothing))$, mixed with the model's
own detached velocity. Samples whose condition was dropped keep the plain target v_t.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from soflow_core._rng import rand
from soflow_core._tensor import bcast_right
from soflow_core._validation import check_cond, check_generator, check_int, check_real
from soflow_core.typing import Cond, Data, DropMask, Time

__all__ = [
    "ClassifierFreeGuidance",
    "cfg_decay",
    "drop_cond",
    "guidance_coefficients",
    "guided_target",
    "guided_velocity",
    "mixed_velocity",
    "sample_drop_mask",
]

CFG_DECAY_RATE = 0.025
"""The reference's k in c(t) = 1 − exp(−k·u/(1 − u))."""


def sample_drop_mask(
    batch_size: int, drop_rate: float, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> DropMask:
    """Draw the label-drop mask: ``True`` (drop the condition) with probability ``drop_rate``.

    Args:
        batch_size: Number of samples.
        drop_rate: Probability of dropping, in [0, 1].
        device: Where the mask lives.
        generator: Source of randomness, or None for the global RNG.

    Returns:
        A boolean mask, True = drop.

    Examples:
        >>> sample_drop_mask(4, 0.0).tolist()
        [False, False, False, False]
    """
    check_int("batch_size", batch_size, low=1)
    check_real("drop_rate", drop_rate, low=0.0, high=1.0)
    check_generator("generator", generator)
    u = rand((batch_size,), device=torch.device(device), dtype=torch.float32, generator=generator)
    return u < drop_rate


def drop_cond(cond: Cond, mask: DropMask, null_cond: int | float | Tensor) -> Cond:
    """Replace the condition of the masked samples by the null condition.

    For class labels ``null_cond`` is the null class index (the reference uses
    ``num_classes``); for embeddings it is a tensor broadcastable to one sample's condition.

    Args:
        cond: Per-sample conditions.
        mask: True where the condition is dropped.
        null_cond: The null condition.

    Returns:
        The conditions with dropped samples set to ``null_cond``.

    Raises:
        ValueError: If the mask does not have one entry per sample.
        TypeError: If ``null_cond`` is not an integer for integer labels (2.7 would become class 2).

    Examples:
        >>> import torch
        >>> drop_cond(torch.tensor([3, 5, 7]), torch.tensor([False, True, False]), 1000).tolist()
        [3, 1000, 7]
    """
    check_cond("cond", cond, mask.shape[0], device=mask.device)
    _check_null_cond(null_cond)
    integer_labels = not (cond.is_floating_point() or cond.is_complex())
    integer_null = isinstance(null_cond, int) or (
        isinstance(null_cond, Tensor) and not (null_cond.is_floating_point() or null_cond.is_complex())
    )
    if integer_labels and not integer_null:
        raise TypeError(
            f"null_cond must be an integer (the null class index) for integer labels of dtype {cond.dtype}; "
            f"got {type(null_cond).__name__}: {null_cond!r}"
        )
    null = torch.as_tensor(null_cond, dtype=cond.dtype, device=cond.device)
    return torch.where(bcast_right(mask, cond), null, cond)


def _check_null_cond(null_cond: object) -> None:
    if isinstance(null_cond, bool) or not isinstance(null_cond, (int, float, Tensor)):
        raise TypeError(
            "null_cond must be an int (the null class index), a float or a tensor (a null embedding); "
            f"got {type(null_cond).__name__}: {null_cond!r}"
        )
    if isinstance(null_cond, float) and not math.isfinite(null_cond):
        raise ValueError(f"null_cond must be finite; got {null_cond!r}")


def cfg_decay(t: Time, decay_time: float, *, rate: float = CFG_DECAY_RATE) -> Time:
    r"""The smooth switch-off c(t) of guidance near pure noise (SoFlow paper; see the Method page of the docs).

    $$c(t) = \begin{cases} 1 & t \le t_d \\ 1 - \exp\!\left(-k\,\frac{u}{1-u}\right),\;
      u = \mathrm{clamp}\!\left(\frac{1-t}{1-t_d}, 0, 1 - 10^{-6}\right) & t > t_d \end{cases}$$

    with k = 0.025. If t_d ≥ 1, c ≡ 1.

    Args:
        t: Time of each sample.
        decay_time: t_d (reference ``cfg_decay_time``).
        rate: k.

    Returns:
        c(t) ∈ [0, 1].

    Examples:
        >>> import torch
        >>> [round(v, 3) for v in cfg_decay(torch.tensor([0.5, 0.81, 1.0]), 0.8).tolist()]
        [1.0, 0.378, 0.0]
    """
    if decay_time >= 1.0:
        return torch.ones_like(t)
    u = torch.clamp((1.0 - t) / (1.0 - decay_time), 0.0, 1.0 - 1e-6)
    decayed = 1.0 - torch.exp(-rate * u / (1.0 - u))
    return torch.where(t <= decay_time, torch.ones_like(t), decayed)


def guided_velocity(v_t: Data, v_uncond: Data, t: Time, *, scale: float, decay_time: float) -> Data:
    r"""The guided velocity target (SoFlow paper; see the Method page of the docs).

    $$v_g = v_t + c(t)\,(\omega - 1)\,(v_t - v_\theta(x_t, t \mid \varnothing)).$$

    Args:
        v_t: Conditional velocity of the path.
        v_uncond: The model's unconditional velocity (detached).
        t: Time of each sample.
        scale: ω ≥ 1 (reference ``cfg_scale``).
        decay_time: t_d.

    Returns:
        v_g.
    """
    c = bcast_right(cfg_decay(t, decay_time), v_t)
    return v_t + c * (scale - 1.0) * (v_t - v_uncond)


def mixed_velocity(v_guided: Data, v_model: Data, *, mix: float) -> Data:
    r"""Mix the guided target with the model's own detached velocity (SoFlow paper; see the Method page of the docs).

    $$v_\text{mix} = m\,v_g + (1 - m)\,\mathrm{sg}(v_\theta(x_t, t \mid c)).$$

    The regression fixed point is unchanged (it is still E[v_g]); m only lowers the
    variance of the target.

    Args:
        v_guided: v_g.
        v_model: The model's conditional velocity.
        mix: m ∈ [0, 1] (reference ``mix_ratio``).

    Returns:
        v_mix.
    """
    return mix * v_guided + (1.0 - mix) * v_model.detach()


@dataclass(frozen=True, kw_only=True)
class ClassifierFreeGuidance:
    """Training-time guidance settings (reference ``cfg_scale``, ``mix_ratio``, ``cfg_drop_rate``, ...).

    Guidance terms are active when ``scale > 1``; label dropping whenever ``drop_rate > 0``.

    Attributes:
        scale: ω ≥ 1; the guidance strength baked into the model.
        mix: m ∈ [0, 1]; share of the guided target in the mixed target.
        drop_rate: Probability that a sample's condition is dropped.
        decay_time: t_d; guidance fades out above it (≥ 1 disables the fade).
        null_cond: The null condition: for class labels an int, the null class index, which is
            also the class count (the reference's ``num_classes``); for embeddings a float or a
            tensor.
    """

    scale: float = 3.0
    mix: float = 0.25
    drop_rate: float = 0.1
    decay_time: float = 0.8
    null_cond: int | float | Tensor = 1000

    def __post_init__(self) -> None:
        check_real("scale", self.scale, low=1.0)
        check_real("mix", self.mix, low=0.0, high=1.0)
        check_real("drop_rate", self.drop_rate, low=0.0, high=1.0)
        check_real("decay_time", self.decay_time, low=0.0)
        _check_null_cond(self.null_cond)
        if isinstance(self.null_cond, int) and self.null_cond < 1:
            raise ValueError(f"null_cond, the null class index (= the class count), must be >= 1; got {self.null_cond}")
        if self.scale > 1.0 and self.drop_rate == 0.0:
            # ω > 1 needs v(·|∅) to be learned; without dropped labels it never is.
            raise ValueError(f"drop_rate must be > 0 when scale > 1 (got scale={self.scale!r}, drop_rate=0.0)")

    @property
    def num_classes(self) -> int | None:
        """The class count an integer ``null_cond`` implies (null class = ``num_classes``), else None."""
        return self.null_cond if isinstance(self.null_cond, int) else None

    @property
    def active(self) -> bool:
        """Whether the guided target is used (ω > 1)."""
        return self.scale > 1.0

    @property
    def needs_model_velocity(self) -> bool:
        """Whether the target mixes in the model's own conditional velocity (m < 1)."""
        return self.active and not math.isclose(self.mix, 1.0)


def guided_target(
    v_t: Data, v_uncond: Data, v_model: Data, mask: DropMask, t: Time, guidance: ClassifierFreeGuidance
) -> Data:
    r"""The full training target with guidance: mix of v_g and the model, plain v_t where dropped.

    $$\tilde v = \begin{cases} v_t & \text{condition dropped} \\
      m\,v_g + (1 - m)\,\mathrm{sg}(v_\theta(x_t, t\mid c)) & \text{otherwise.}\end{cases}$$

    Args:
        v_t: Conditional velocity of the path.
        v_uncond: The model's unconditional velocity v_θ(x_t, t | ∅) (detached).
        v_model: The model's conditional velocity v_θ(x_t, t | c) (detached here).
        mask: True where the condition was dropped.
        t: Time of each sample.
        guidance: The guidance settings.

    Returns:
        The target velocity ṽ, without gradient.
    """
    v_uncond = v_uncond.detach()
    v_g = guided_velocity(v_t, v_uncond, t, scale=guidance.scale, decay_time=guidance.decay_time)
    v_mix = mixed_velocity(v_g, v_model, mix=guidance.mix)
    return torch.where(bcast_right(mask, v_t), v_t, v_mix).detach()


def guidance_coefficients(mask: DropMask, t: Time, guidance: ClassifierFreeGuidance) -> Float[Tensor, "b 3"]:
    r"""The guided target as a per-sample combination of v_t, v_uncond and v_model (for the fused ops).

    Expanding [`guided_target`][soflow_core.guidance.guided_target] with g = c(t)(ω − 1):

    $$\tilde v = k_v\,v_t + k_u\,v_\theta(x_t,t\mid\varnothing) + k_m\,\mathrm{sg}(v_\theta(x_t,t\mid c)),\quad
      (k_v, k_u, k_m) = \begin{cases} (1, 0, 0) & \text{condition dropped} \\
      (m(1 + g),\ -m g,\ 1 - m) & \text{otherwise.} \end{cases}$$

    Args:
        mask: True where the condition was dropped.
        t: Time of each sample.
        guidance: The guidance settings.

    Returns:
        The (b, 3) columns k_v, k_u, k_m.

    Examples:
        >>> import torch
        >>> g = ClassifierFreeGuidance(scale=3.0, mix=0.5, drop_rate=0.1, decay_time=1.0)
        >>> guidance_coefficients(torch.tensor([False, True]), torch.tensor([0.5, 0.5]), g).tolist()
        [[1.5, -1.0, 0.5], [1.0, 0.0, 0.0]]
    """
    g = cfg_decay(t, guidance.decay_time) * (guidance.scale - 1.0)
    m = guidance.mix
    kept = torch.stack([m * (1.0 + g), -m * g, torch.full_like(g, 1.0 - m)], dim=1)
    dropped = torch.tensor([1.0, 0.0, 0.0], dtype=kept.dtype, device=kept.device).expand_as(kept)
    return torch.where(mask[:, None], dropped, kept)
