"""Shape-annotated type aliases and the backbone protocol.

Every public signature in `soflow_core` is written with these aliases. The shapes are
checked by beartype during the test run (pytest's jaxtyping hook), never by decorators
on hot paths, so `torch.compile` sees plain functions.

Dimension names: ``b`` is the batch, ``*shape`` the data dimensions of one sample
(``(2,)`` for 2-D points, ``(C, H, W)`` for images), ``*cond`` the per-sample shape of
a conditioning tensor (empty for class labels).
"""

from typing import Protocol, TypeAlias, runtime_checkable

from jaxtyping import Bool, Float, Shaped
from torch import Tensor

__all__ = ["Backbone", "Cond", "Data", "DropMask", "GuidanceScale", "PerSample", "Scalar", "Time"]

Data: TypeAlias = Float[Tensor, " b *shape"]
"""A batch of samples: data, noise, x_t, velocities or network outputs."""

Time: TypeAlias = Float[Tensor, " b"]
"""One time per sample, in [0, 1]; t = 0 is data, t = 1 is noise. Never rescaled."""

PerSample: TypeAlias = Float[Tensor, " b"]
"""One value per sample (a loss term, an mse, a weight)."""

Scalar: TypeAlias = Float[Tensor, ""]
"""A 0-dim tensor (a reduced loss or a metric)."""

Cond: TypeAlias = Shaped[Tensor, " b *cond"]
"""Conditioning passed through to the backbone untouched (class labels, embeddings).

Only [`drop_cond`][soflow_core.guidance.drop_cond] ever looks inside it, to swap dropped
samples for the null condition.
"""

DropMask: TypeAlias = Bool[Tensor, " b"]
"""Classifier-free-guidance label-drop mask: ``True`` means *drop the condition*."""

GuidanceScale: TypeAlias = Float[Tensor, " b"]
"""One guidance scale ω per sample, for an ω-conditioned backbone (passed as ``omega=``)."""


@runtime_checkable
class Backbone(Protocol):
    """The network F_θ: any callable ``model(x, t, s, cond)`` returning a tensor shaped like ``x``.

    ``t`` is the current time of ``x`` and ``s`` the target time of the solution
    (s ≤ t). A backbone is free to embed ``t`` and ``t - s`` (as the SoFlow DiT does)
    or ``(t, s)``; nothing in the losses depends on how. ``cond`` is ``None`` for
    unconditional models. An `nn.Module`, a DDP/FSDP wrapper, a compiled module or a
    plain function all qualify.

    An ω-conditioned backbone (one model for every guidance scale) also accepts the keyword
    ``omega``, one guidance scale per sample, and declares it with an attribute
    ``omega_range = (low, high)``. The library passes ``omega=`` to exactly those backbones,
    finding the attribute through DDP/FSDP (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, and never to any other, so a plain ``model(x, t, s, cond)``
    keeps working; see [the backbone protocol](../api/backbone.md#the-guidance-scale-input).
    """

    def __call__(self, x: Data, t: Time, s: Time, cond: Cond | None) -> Data:
        """Evaluate the network F_θ(x, t, s, cond)."""
        ...
