r"""DiT with adaLN-Zero, as the SoFlow ImageNet backbone: F_θ(x, t, s, cond) on latent images.

The network is the class-conditional Diffusion Transformer (Peebles & Xie) without a learned
variance, so it returns as many channels as it receives, plus one extra time embedder: the
conditioning vector is

$$c = \mathrm{emb}_t(t) + \mathrm{emb}_{t-s}(t - s) + \mathrm{emb}_y(y),$$

with both times fed unscaled in [0, 1]. Parameter names and shapes follow the reference DiT
checkpoint layout, so the official SoFlow checkpoints load through
[`load_weights`][soflow_core.nets.checkpoints.load_weights] and
[`load_backbone`][soflow_core.nets.checkpoints.load_backbone], which read the size from the shapes.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from soflow_core._validation import check_bool, check_int, check_real, class_labels
from soflow_core.nets._inputs import check_image_inputs
from soflow_core.nets.checkpoints import AbstractBackbone, resolve_config, state_shape
from soflow_core.nets.mlp import sinusoidal_embedding
from soflow_core.typing import Cond, Data, Time

__all__ = ["DIT_SIZES", "DiT", "DiTSize", "sincos_pos_embed_2d"]

_TIME_FEATURES = 256  # sinusoidal features per time input, f_i = exp(−ln(1e4)·i/128)
_LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class DiTSize:
    """The size of a DiT: patch size, hidden width, number of blocks and attention heads.

    Attributes:
        patch_size: Side of the square patches.
        hidden_size: Token width H.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
    """

    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int


DIT_SIZES: dict[str, DiTSize] = {
    "DiT-S/4": DiTSize(patch_size=4, hidden_size=384, depth=12, num_heads=6),
    "DiT-S/2": DiTSize(patch_size=2, hidden_size=384, depth=12, num_heads=6),
    "DiT-B/4": DiTSize(patch_size=4, hidden_size=768, depth=12, num_heads=12),
    "DiT-B/2": DiTSize(patch_size=2, hidden_size=768, depth=12, num_heads=12),
    "DiT-M/2": DiTSize(patch_size=2, hidden_size=1024, depth=16, num_heads=16),
    "DiT-L/2": DiTSize(patch_size=2, hidden_size=1024, depth=24, num_heads=16),
    "DiT-XL/2": DiTSize(patch_size=2, hidden_size=1152, depth=28, num_heads=16),
}
"""The model sizes by name (``"DiT-B/2"`` etc.): SoFlow's B to XL, and S for benchmarks; all use mlp_ratio 4."""


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[sin(p ω_k), cos(p ω_k)] with ω_k = 10000^(−2k/dim), k < dim/2."""
    omega = 1.0 / 10_000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.reshape(-1, 1) * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> Tensor:
    """The fixed 2-D sin-cos positional table of DiT/MAE, shape (grid_size², hidden_size), float64.

    Tokens are numbered row by row. The first half of the channels encodes the column of a
    token and the second half its row, each as a 1-D table [sin, cos] with 10000^(−2k/(H/2)).

    Args:
        hidden_size: Token width H (a multiple of 4).
        grid_size: Tokens per side.

    Returns:
        The table.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    half = hidden_size // 2
    return torch.cat([_sincos_1d(half, cols), _sincos_1d(half, rows)], dim=1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens, by a strided convolution (parameter ``proj``)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimestepEmbedder(nn.Module):
    """Unscaled time in [0, 1] → 256 sinusoids [cos, sin] → Linear → SiLU → Linear (parameter ``mlp``)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(_TIME_FEATURES, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        weight = self.mlp[0].weight
        # The sinusoids are computed in at least float32, as the reference does, then cast to the weights.
        features = sinusoidal_embedding(t.to(torch.promote_types(weight.dtype, torch.float32)), _TIME_FEATURES)
        return self.mlp(features.to(weight.dtype))


class _LabelEmbedder(nn.Module):
    """Class labels → vectors (parameter ``embedding_table``); no dropout inside, the caller drops labels."""

    def __init__(self, rows: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(rows, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class _Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, through ``scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, n, width = x.shape
        # Channel layout (3, heads, head_dim), as timm's Attention, so reference weights line up.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, width))


class _Mlp(nn.Module):
    """fc1 → GELU (tanh approximation) → fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (shift, scale, gate) by c: adaLN-Zero."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_LAYER_NORM_EPS)
        self.attn = _Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_LAYER_NORM_EPS)
        self.mlp = _Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None, :] * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None, :] * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class _FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map from tokens to p·p·C patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=_LAYER_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(AbstractBackbone):
    r"""F_θ(x, t, s, cond): a Diffusion Transformer with adaLN-Zero on images of shape (b, C, H, W).

    The input is cut into p×p patches, embedded as tokens with a fixed 2-D sin-cos positional
    table, and processed by ``depth`` transformer blocks whose LayerNorms are shifted, scaled
    and gated by the conditioning vector

    $$c = \mathrm{emb}_t(t) + \mathrm{emb}_{t-s}(t - s) + \mathrm{emb}_y(y).$$

    The second time embedder receives t − s, not s, and both times are unscaled in [0, 1].
    The adaLN modulations and the final layer start at zero, so F_θ ≡ 0 at initialisation.

    Labels: with ``num_classes`` the label table has ``num_classes + 1`` rows when
    ``null_class`` is set, the last row (index ``num_classes``) being the null class that
    classifier-free guidance drops labels to; ``cond=None`` selects it. The network drops no
    labels itself. ``num_classes=None`` (or 0) builds an unconditional DiT without a label table.
    ``forward`` checks the labels by the objective's rule (integers in [0, ``num_classes``), the
    null class only with its row), so no label reaches the table as an ``IndexError``; the value
    check is skipped where a caller already made it and under ``torch.compile``
    (see [Conventions](../conventions.md#class-labels)).

    Named sizes come from [`DIT_SIZES`][soflow_core.nets.dit.DIT_SIZES] through
    [`from_name`][soflow_core.nets.dit.DiT.from_name]. ``save_pretrained`` and
    ``from_pretrained`` write and read shareable folders (see
    [`AbstractBackbone`][soflow_core.nets.checkpoints.AbstractBackbone]).

    Args:
        input_size: Side of the (square) input images; a multiple of ``patch_size``.
        in_channels: Channels of the input, and of the output.
        patch_size: Side of the patches.
        hidden_size: Token width H, a multiple of ``num_heads`` and of 4.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: Width of the MLP hidden layer relative to H.
        num_classes: Number of classes, or None / 0 for an unconditional model.
        null_class: Whether the label table has a null row (reference: ``cfg_drop_rate > 0``).
        gradient_checkpointing: Recompute each block's activations in the backward pass
            (saves memory on large models; torch.utils.checkpoint, non-reentrant).

    Examples:
        >>> import torch
        >>> net = DiT(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
        >>> x, t, s = torch.randn(3, 4, 8, 8), torch.ones(3), torch.zeros(3)
        >>> net(x, t, s, torch.tensor([0, 9, 10])).shape  # label 10 is the null class
        torch.Size([3, 4, 8, 8])
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        in_channels: int = 4,
        patch_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int | None = 1000,
        null_class: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.input_size = check_int("input_size", input_size, low=1)
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.patch_size = check_int("patch_size", patch_size, low=1)
        self.hidden_size = check_int("hidden_size", hidden_size, low=4)
        self.depth = check_int("depth", depth, low=1)
        self.num_heads = check_int("num_heads", num_heads, low=1)
        self.mlp_ratio = check_real("mlp_ratio", mlp_ratio, low=0.0, low_open=True)
        if input_size % patch_size:
            raise ValueError(f"input_size must be a multiple of patch_size; got {input_size} and {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size must be a multiple of num_heads; got {hidden_size} and {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 (2-D sin-cos positions); got {hidden_size}")
        self.num_classes = None if not num_classes else check_int("num_classes", num_classes, low=1)
        self.null_class = check_bool("null_class", null_class) and self.num_classes is not None
        self.out_channels = in_channels
        self.gradient_checkpointing = check_bool("gradient_checkpointing", gradient_checkpointing)
        grid = input_size // patch_size

        self.x_embedder = _PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = _TimestepEmbedder(hidden_size)
        self.s_embedder = _TimestepEmbedder(hidden_size)
        self.y_embedder = (
            None if self.num_classes is None else _LabelEmbedder(self.num_classes + int(self.null_class), hidden_size)
        )
        # A frozen parameter, as in the reference checkpoints (key "pos_embed", shape (1, T, H)).
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(_DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = _FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_name(cls, name: str, **kwargs: object) -> "DiT":
        """Build a DiT of a named size (``"DiT-S/2"``, ``"DiT-B/4"``, ``"DiT-B/2"``, ... ``"DiT-XL/2"``).

        Args:
            name: The size, a key of [`DIT_SIZES`][soflow_core.nets.dit.DIT_SIZES].
            **kwargs: The other constructor arguments (``input_size``, ``in_channels``,
                ``num_classes``, ``null_class``, ``gradient_checkpointing``).

        Returns:
            The model.

        Raises:
            ValueError: If the name is unknown or ``kwargs`` repeats a size argument.

        Examples:
            >>> with torch.device("meta"):
            ...     net = DiT.from_name("DiT-B/4", input_size=32, in_channels=4, num_classes=1000)
            >>> net.patch_size, net.hidden_size, net.depth
            (4, 768, 12)
        """
        if name not in DIT_SIZES:
            raise ValueError(f"unknown DiT size {name!r}; choose one of {', '.join(map(repr, DIT_SIZES))}")
        size = DIT_SIZES[name]
        clash = sorted({"patch_size", "hidden_size", "depth", "num_heads"} & kwargs.keys())
        if clash:
            raise ValueError(f"{name!r} fixes {', '.join(clash)}; build DiT(...) directly for a custom size")
        return cls(
            patch_size=size.patch_size,
            hidden_size=size.hidden_size,
            depth=size.depth,
            num_heads=size.num_heads,
            **kwargs,  # type: ignore[arg-type]
        )

    signature_keys = frozenset({"x_embedder.proj.weight", "t_embedder.mlp.0.weight"})

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input sample (the objective and the samplers check data against it)."""
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this DiT (``gradient_checkpointing``, a runtime switch, left out)."""
        return {
            "input_size": self.input_size,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": self.num_classes,
            "null_class": self.null_class,
        }

    @classmethod
    def config_from_state(
        cls,
        state: Mapping[str, Tensor],
        *,
        num_classes: int | None = None,
        num_heads: int | None = None,
        **hints: Any,
    ) -> dict[str, Any]:
        """The DiT a state dict belongs to: its size from the shapes, its label table from ``num_classes``.

        The patch size, width, input size, channels and MLP ratio are read from the shapes, the
        depth from the block count. The number of heads leaves no trace in the weights: it
        comes from ``num_heads`` or, for a size in [`DIT_SIZES`][soflow_core.nets.dit.DIT_SIZES],
        from there. A label table of R rows is ``num_classes`` classes plus the null row when
        R = num_classes + 1 (a model trained with label dropout, the official
        ``cfg_drop_rate > 0``) and without one when R = num_classes, so ``num_classes`` is
        needed whenever there is a table.

        Args:
            state: The state dict (prefixes stripped).
            num_classes: The number of classes (required when the state has a label table).
            num_heads: Attention heads (required for a size not in ``DIT_SIZES``).
            **hints: Other constructor arguments, which must agree with the shapes.

        Returns:
            Keyword arguments for ``DiT``.

        Raises:
            ValueError: If the shapes are not a SoFlow DiT's, or ``num_classes``/``num_heads``
                are needed or do not fit (naming the values that would).

        Examples:
            >>> net = DiT(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
            ...           num_classes=10)
            >>> config = DiT.config_from_state(net.state_dict(), num_classes=10, num_heads=2)
            >>> config["null_class"], config["input_size"]
            (True, 8)
        """
        hidden, in_channels, patch, patch_w = state_shape(state, "x_embedder.proj.weight", 4)
        if patch != patch_w:
            raise ValueError(f"x_embedder.proj.weight must have square patches; got {patch}x{patch_w}")
        depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        if depth == 0:
            raise ValueError("the state dict has no blocks.<i>.* keys")
        tokens = state_shape(state, "pos_embed", 3)[1]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
        fc1 = state_shape(state, "blocks.0.mlp.fc1.weight", 2)[0]
        mlp_ratio = fc1 / hidden if int(hidden * (fc1 / hidden)) == fc1 else (fc1 + 0.5) / hidden
        out_features = state_shape(state, "final_layer.linear.weight", 2)[0]
        if out_features != patch * patch * in_channels:
            raise ValueError(
                f"final_layer.linear.weight has {out_features} outputs, {out_features / (patch * patch):g} channels "
                f"per pixel for {in_channels} input channels (a learned-sigma DiT?); SoFlow's DiT returns as many "
                "channels as it receives"
            )
        if "s_embedder.mlp.0.weight" not in state:
            raise ValueError("the state dict has no s_embedder: a DiT without SoFlow's second time embedder (t − s)")
        table = state.get("y_embedder.embedding_table.weight")
        if table is None:
            if num_classes:
                raise ValueError(f"num_classes={num_classes} was given, but the state dict has no label table")
            classes, null = None, False
        else:
            rows = int(table.shape[0])
            fitting = f"num_classes={rows - 1} if the last row is the null class, num_classes={rows} if there is none"
            if num_classes is None:
                raise ValueError(f"y_embedder.embedding_table.weight has {rows} rows: pass {fitting}")
            if rows not in (num_classes, num_classes + 1):
                raise ValueError(
                    f"num_classes={num_classes} needs {num_classes} or {num_classes + 1} label rows, but "
                    f"y_embedder.embedding_table.weight has {rows}: pass {fitting}"
                )
            classes, null = num_classes, rows == num_classes + 1
        if num_heads is None:
            named = [z for z in DIT_SIZES.values() if (z.patch_size, z.hidden_size, z.depth) == (patch, hidden, depth)]
            if not named:
                raise ValueError(
                    f"num_heads is not stored in the weights of this unregistered size (patch_size={patch}, "
                    f"hidden_size={hidden}, depth={depth}): pass it"
                )
            num_heads = named[0].num_heads
        inferred = {
            "input_size": grid * patch,
            "in_channels": in_channels,
            "patch_size": patch,
            "hidden_size": hidden,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "num_classes": classes,
            "null_class": null,
        }
        return resolve_config(cls, inferred, hints)

    @classmethod
    def describe_state(cls, state: Mapping[str, Tensor]) -> str:
        """The DiT a state dict would fit (size name, input size, channels, label rows), for error messages."""
        proj = state.get("x_embedder.proj.weight")
        if proj is None or proj.ndim != 4:
            return "a DiT state dict without a usable x_embedder.proj.weight"
        hidden, in_channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
        depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        name = next(
            (n for n, z in DIT_SIZES.items() if (z.patch_size, z.hidden_size, z.depth) == (patch, hidden, depth)),
            None,
        )
        parts = [
            name or "a DiT of an unregistered size",
            f"patch_size={patch}",
            f"hidden_size={hidden}",
            f"depth={depth}",
        ]
        pos = state.get("pos_embed")
        if pos is not None and pos.ndim == 3:
            parts.append(f"input_size={math.isqrt(int(pos.shape[1])) * patch}")
        parts.append(f"in_channels={in_channels}")
        final = state.get("final_layer.linear.weight")
        if final is not None and final.ndim == 2 and final.shape[0] % (patch * patch) == 0:
            out_channels = int(final.shape[0]) // (patch * patch)
            note = " (a learned-sigma checkpoint)" if out_channels == 2 * in_channels else ""
            parts.append(f"out_channels={out_channels}{note}")
        table = state.get("y_embedder.embedding_table.weight")
        if table is None:
            parts.append("no label table")
        else:
            rows = int(table.shape[0])
            parts.append(f"{rows} label rows (num_classes={rows - 1} with a null row, or {rows} without)")
        if "s_embedder.mlp.0.weight" not in state:
            parts.append("no s_embedder (not a SoFlow checkpoint)")
        return ", ".join(parts)

    def initialize_weights(self) -> None:
        """(Re)initialise every parameter as DiT does, with the s-embedder left at xavier_uniform.

        Linear layers: xavier_uniform weights, zero biases. Patch embedding: xavier_uniform on
        the flattened kernel, zero bias. t-embedder weights and the label table: N(0, 0.02²).
        adaLN modulations and the final linear layer: zero. ``pos_embed``: the 2-D sin-cos table.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in [*(block.adaLN_modulation[-1] for block in self.blocks), self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        table = sincos_pos_embed_2d(self.hidden_size, self.input_size // self.patch_size)
        with torch.no_grad():
            self.pos_embed.copy_(table[None].to(device=self.pos_embed.device, dtype=self.pos_embed.dtype))

    def _unpatchify(self, tokens: Tensor) -> Tensor:
        """(b, T, p·p·C) → (b, C, H, W); each token holds its patch as (row, column, channel)."""
        b, p, c = tokens.shape[0], self.patch_size, self.out_channels
        grid = self.input_size // p
        x = tokens.reshape(b, grid, grid, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, grid * p, grid * p)

    def forward(self, x: Data, t: Time, s: Time, cond: Cond | None = None) -> Data:
        """Evaluate F_θ(x, t, s, cond).

        Args:
            x: Images of shape (b, in_channels, input_size, input_size).
            t: Current times.
            s: Target times (the network embeds t − s).
            cond: Class labels in [0, num_classes] (``num_classes`` is the null class), or None
                for the null class (None for an unconditional model).

        Returns:
            The network output, shaped like ``x``.

        Raises:
            ValueError: On a wrong input shape or device, labels given to an unconditional model,
                labels outside [0, num_classes] (num_classes only with the null row), or
                ``cond=None`` for a model without a null class.
            TypeError: On labels that are not integers, times that are not floating point, or
                ``x`` in another dtype than the parameters outside autocast.
        """
        check_image_inputs(x, t, s, channels=self.in_channels, resolution=self.input_size, model=self)
        c = self.t_embedder(t) + self.s_embedder(t - s)
        if self.y_embedder is not None:
            labels = class_labels(cond, x, num_classes=self.num_classes, null_class=self.null_class, model="DiT")
            c = c + self.y_embedder(labels)
        elif cond is not None:
            raise ValueError("cond was given to an unconditional DiT (num_classes=None)")
        h = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return self._unpatchify(self.final_layer(h, c))
