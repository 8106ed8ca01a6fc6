"""A small residual MLP backbone for low-dimensional data (toy distributions, tests, quick start)."""

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from soflow_core._validation import check_int, check_real, class_labels
from soflow_core.nets._inputs import check_flat_inputs
from soflow_core.nets.checkpoints import AbstractBackbone, resolve_config, state_shape
from soflow_core.typing import Cond, Data, Time

__all__ = ["MLPBackbone", "fourier_features", "sinusoidal_embedding"]


def sinusoidal_embedding(t: Time, dim: int, *, max_period: float = 10_000.0) -> Float[Tensor, " b {dim}"]:
    r"""Sinusoidal features of an unscaled time t ∈ [0, 1] (as the SoFlow DiT embeds t and t − s).

    $$\phi(t) = [\cos(t f_i), \sin(t f_i)]_{i < d/2},\quad f_i = \exp(-\ln(\text{max\_period})\,i/(d/2)).$$

    Args:
        t: Times.
        dim: Even number of features.
        max_period: Largest period.

    Returns:
        The features, in the dtype of ``t``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    angles = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def fourier_features(x: Float[Tensor, "b d"], frequencies: Float[Tensor, "d k"]) -> Float[Tensor, "b d+2*k"]:
    r"""The input with random Fourier features of it (Tancik et al., NeurIPS 2020, Eq. 5).

    $$\gamma(x) = [\,x,\ \sin(2\pi\, x B),\ \cos(2\pi\, x B)\,],\qquad B \in \mathbb{R}^{d\times k}.$$

    A plain MLP of the coordinates learns sharp features (the straight edge of a square) only
    slowly; these features hand it oscillations of the scales in B to combine.

    Args:
        x: Flat inputs of shape (b, d).
        frequencies: B, one column per feature pair.

    Returns:
        The d + 2k features, in the dtype of ``x``.

    Examples:
        >>> import torch
        >>> fourier_features(torch.zeros(3, 2), torch.ones(2, 4)).shape
        torch.Size([3, 10])
    """
    angles = (2.0 * math.pi) * (x @ frequencies.to(x.dtype))
    return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1)


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(self.dropout(nn.functional.silu(self.fc1(nn.functional.silu(self.norm(h) + emb)))))


class MLPBackbone(AbstractBackbone):
    """F_θ(x, t, s, cond) for flat data of shape (b, dim): a residual MLP conditioned on t and t − s.

    Times are embedded as the SoFlow networks do (sinusoids of t and of t − s, unscaled), mapped
    by a small MLP and added in every block. With ``num_classes``, a label table of
    ``num_classes + 1`` rows embeds the labels, the last row being the null class used by
    classifier-free guidance; ``forward`` checks them by the objective's rule (see
    [Conventions](../conventions.md#class-labels)). With ``fourier_features`` = k > 0 the input layer sees
    [`fourier_features`][soflow_core.nets.mlp.fourier_features] of x, with B drawn once from
    N(0, ``fourier_scale``²) by a generator seeded with ``fourier_seed`` and kept as the buffer
    ``input_frequencies`` (saved in the state dict, so a loaded MLP uses the saved B whatever its
    scale and seed; None without features). The output layer starts at zero, so F_θ ≡ 0 at
    initialisation. ``save_pretrained`` and ``from_pretrained`` write and read shareable folders
    (see [`AbstractBackbone`][soflow_core.nets.checkpoints.AbstractBackbone]).

    Args:
        dim: Data dimension.
        width: Hidden width.
        depth: Number of residual blocks.
        time_features: Sinusoidal features per time input.
        num_classes: Number of classes for conditional models, or None.
        dropout: Dropout probability inside the blocks.
        fourier_features: k, the number of random Fourier frequencies of the input (0: none).
        fourier_scale: σ of the frequencies, in cycles per data unit.
        fourier_seed: Seed of the frequencies' generator.

    Examples:
        >>> import torch
        >>> net = MLPBackbone(dim=2, num_classes=8)
        >>> net(torch.randn(4, 2), torch.rand(4), torch.zeros(4), torch.tensor([0, 1, 8, 3])).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        dim: int,
        *,
        width: int = 256,
        depth: int = 3,
        time_features: int = 64,
        num_classes: int | None = None,
        dropout: float = 0.0,
        fourier_features: int = 0,
        fourier_scale: float = 1.0,
        fourier_seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, low=1)
        self.width = check_int("width", width, low=1)
        self.depth = check_int("depth", depth, low=1)
        self.time_features = check_int("time_features", time_features, low=2)
        if self.time_features % 2:
            raise ValueError(f"time_features must be even; got {time_features!r}")
        self.dropout = check_real("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes, low=1)
        self.null_class = self.num_classes is not None  # the label table always has the null row
        self.fourier_features = check_int("fourier_features", fourier_features, low=0)
        self.fourier_scale = check_real("fourier_scale", fourier_scale, low=0.0, low_open=True)
        self.fourier_seed = check_int("fourier_seed", fourier_seed, low=0)
        frequencies = None
        if self.fourier_features:
            generator = torch.Generator().manual_seed(fourier_seed)
            frequencies = fourier_scale * torch.randn(dim, self.fourier_features, generator=generator)
        self.register_buffer("input_frequencies", frequencies)
        self.input = nn.Linear(dim + 2 * self.fourier_features, width)
        self.time_mlp = nn.Sequential(nn.Linear(2 * time_features, width), nn.SiLU(), nn.Linear(width, width))
        self.label_embedding = None if num_classes is None else nn.Embedding(num_classes + 1, width)
        self.blocks = nn.ModuleList(_ResidualBlock(width, dropout) for _ in range(depth))
        self.output_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    signature_keys = frozenset({"input.weight", "time_mlp.0.weight", "output.weight"})

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input sample (the objective and the samplers check data against it)."""
        return (self.dim,)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this MLP."""
        return {
            "dim": self.dim,
            "width": self.width,
            "depth": self.depth,
            "time_features": self.time_features,
            "num_classes": self.num_classes,
            "dropout": self.dropout,
            "fourier_features": self.fourier_features,
            "fourier_scale": self.fourier_scale,
            "fourier_seed": self.fourier_seed,
        }

    @classmethod
    def config_from_state(cls, state: Mapping[str, Tensor], **hints: Any) -> dict[str, Any]:
        """The MLP a state dict belongs to; ``dropout`` leaves no trace in the weights (0 unless given).

        The Fourier frequencies are a buffer of the state dict, so ``fourier_features`` is read from
        its shape; ``fourier_scale`` and ``fourier_seed`` only draw them and are taken as given.

        Args:
            state: The state dict (prefixes stripped).
            **hints: Constructor arguments; ``dropout``, ``fourier_scale`` and ``fourier_seed`` are
                taken as given, the others must agree.

        Returns:
            Keyword arguments for ``MLPBackbone``.

        Raises:
            ValueError: If the keys or shapes are not an MLPBackbone's, or a hint contradicts them.
        """
        width, inputs = state_shape(state, "input.weight", 2)
        frequencies = state_shape(state, "input_frequencies", 2) if "input_frequencies" in state else (inputs, 0)
        table = state.get("label_embedding.weight")
        inferred = {
            "dim": frequencies[0],
            "fourier_features": frequencies[1],
            "width": width,
            "depth": len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}),
            "time_features": state_shape(state, "time_mlp.0.weight", 2)[1] // 2,
            "num_classes": None if table is None else int(table.shape[0]) - 1,
        }
        return resolve_config(cls, inferred, hints)

    def forward(self, x: Data, t: Time, s: Time, cond: Cond | None = None) -> Data:
        """Evaluate F_θ(x, t, s, cond).

        Args:
            x: States, shape (b, dim).
            t: Current times.
            s: Target times (the network sees t − s).
            cond: Class labels in [0, num_classes] (num_classes = null), or None (null class).

        Returns:
            The network output, shaped like ``x``.

        Raises:
            ValueError: If ``x`` is not (b, dim), labels are given to an unconditional model, or
                labels lie outside [0, num_classes].
            TypeError: On labels that are not integers (never cast: 3.9 is not class 3), times
                that are not floating point, or ``x`` in another dtype than the parameters
                outside autocast.
        """
        check_flat_inputs(x, t, s, dim=self.dim, model=self)
        t_feat = sinusoidal_embedding(t.to(x.dtype), self.time_features)
        gap_feat = sinusoidal_embedding((t - s).to(x.dtype), self.time_features)
        emb = self.time_mlp(torch.cat([t_feat, gap_feat], dim=1))
        if self.label_embedding is not None:
            labels = class_labels(cond, x, num_classes=self.num_classes, null_class=True, model="MLPBackbone")
            emb = emb + self.label_embedding(labels)
        elif cond is not None:
            raise ValueError("cond was given to an unconditional MLPBackbone (num_classes=None)")
        h = self.input(x if self.input_frequencies is None else fourier_features(x, self.input_frequencies))
        for block in self.blocks:
            h = block(h, emb)
        return self.output(nn.functional.silu(self.output_norm(h)))
