r"""EDM's SongUNet (DDPM++), as the SoFlow CIFAR-10 backbone: F_θ(x, t, s) for unconditional images.

The architecture is the "standard" encoder/decoder UNet of Karras et al. (EDM), with the time
embedding changed for SoFlow: positional features of t and of t − s (each with its sin half
first) are concatenated and mapped by two SiLU layers,

$$e = \mathrm{SiLU}(W_1\,\mathrm{SiLU}(W_0\,[\phi(t), \phi(t - s)] + A\,a)),$$

where ``a`` are the optional augmentation labels of EDM's augmentation pipeline. Module names
follow EDM's (``map_layer0``, ``enc["32x32_block0"]``, ...).
"""

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soflow_core._validation import check_bool, check_int, check_real, check_sequence
from soflow_core.nets._inputs import check_image_inputs
from soflow_core.nets.checkpoints import AbstractBackbone, resolve_config, state_shape
from soflow_core.typing import Cond, Data, Time

__all__ = ["SongUNet", "positional_embedding"]


def positional_embedding(x: Tensor, num_channels: int, *, max_positions: float = 10_000.0) -> Tensor:
    r"""EDM's positional features with ``endpoint=True``, sin half first (the order SongUNet uses).

    $$\phi(x) = [\sin(x f_i), \cos(x f_i)]_{i < n},\quad f_i = \text{max\_positions}^{-i/(n - 1)},\quad
    n = \text{num\_channels}/2.$$

    Args:
        x: One value per sample, shape (b,).
        num_channels: Even number of features (at least 4).
        max_positions: Inverse of the lowest frequency.

    Returns:
        The features, shape (b, num_channels), in at least float32.
    """
    half = num_channels // 2
    dtype = torch.promote_types(x.dtype, torch.float32)
    freqs = (1.0 / max_positions) ** (torch.arange(half, device=x.device, dtype=dtype) / (half - 1))
    angles = x.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _edm_init(shape: Sequence[int], fan_in: int, fan_out: int, gain: float) -> Tensor:
    """xavier_uniform scaled by ``gain``: U(−a, a) with a = gain·√(6 / (fan_in + fan_out))."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(*shape) * 2.0 - 1.0) * bound


class _Linear(nn.Module):
    """A linear layer with EDM's init (xavier_uniform times ``init_weight``; zero bias)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, init_weight: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(_edm_init((out_features, in_features), in_features, out_features, init_weight))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _Conv2d(nn.Module):
    """A 'same' convolution with optional 2× up- or down-sampling by a separable FIR filter.

    The resampling runs first (depthwise, the filter normalised to unit sum, ×4 for
    upsampling), then the k×k convolution. ``kernel=0`` gives a pure resampling layer without
    weights. Init as EDM: xavier_uniform times ``init_weight``, zero bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        *,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[int] = (1, 1),
        init_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a convolution cannot resample both up and down")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down = up, down
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = (
            nn.Parameter(_edm_init((out_channels, in_channels, kernel, kernel), fan_in, fan_out, init_weight))
            if kernel
            else None
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        fir = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", fir if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        fir = self.resample_filter
        if fir is not None:
            fir = fir.to(x.dtype).tile(self.in_channels, 1, 1, 1)
            pad = (fir.shape[-1] - 1) // 2
            if self.up:
                x = F.conv_transpose2d(x, fir * 4, groups=self.in_channels, stride=2, padding=pad)
            else:
                x = F.conv2d(x, fir, groups=self.in_channels, stride=2, padding=pad)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x


class _GroupNorm(nn.Module):
    """GroupNorm with min(32, C/4) groups, as EDM."""

    def __init__(self, num_channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_groups = max(1, min(32, num_channels // 4))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class _UNetBlock(nn.Module):
    """EDM's residual block with optional one-head self-attention.

    GroupNorm → SiLU → conv (with resampling) → embedding → GroupNorm → SiLU → dropout → conv,
    plus a 1×1-projected skip when the shape changes; the sum is scaled by ``skip_scale``, and so
    is the attention residual. With ``adaptive_scale`` the embedding gives a scale and shift
    (norm(x)·(1 + scale) + shift); otherwise (SongUNet's choice) it is added before the norm.
    The last convolutions start at ``init_zero`` × xavier, the qkv projection at ``init_attn`` ×.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-6,
        resample_filter: Sequence[int] = (1, 1),
        adaptive_scale: bool = False,
        init_zero: float = 1e-5,
        init_attn: float = math.sqrt(0.2),
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.attention = attention  # one head, as SongUNet
        self.drop = nn.Dropout(dropout)  # a module, so has_active_dropout() and the RNG replay see it
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.norm0 = _GroupNorm(in_channels, eps=eps)
        self.conv0 = _Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = _Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = _GroupNorm(out_channels, eps=eps)
        self.conv1 = _Conv2d(out_channels, out_channels, 3, init_weight=init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = _Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        if attention:
            self.norm2 = _GroupNorm(out_channels, eps=eps)
            self.qkv = _Conv2d(out_channels, out_channels * 3, 1, init_weight=init_attn)
            self.proj = _Conv2d(out_channels, out_channels, 1, init_weight=init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        residual = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(self.norm1(x) * (scale + 1) + shift)
        else:
            x = F.silu(self.norm1(x + params))
        # Dropout draws its mask in memory order; a contiguous (NCHW) input gives the reference network's masks.
        x = self.conv1(self.drop(x.contiguous()))
        x = (x + (self.skip(residual) if self.skip is not None else residual)) * self.skip_scale
        if self.attention:
            b, c, h, w = x.shape
            # qkv channels are interleaved (channel, 3) as EDM's, so EDM weights line up.
            qkv = self.qkv(self.norm2(x)).reshape(b, 1, c, 3, h * w)
            q, k, v = (qkv[:, :, :, i].transpose(-1, -2) for i in range(3))  # (b, 1, h·w, c)
            # The reshape of the transposed output would be a channels-last view; keep NCHW as the reference does.
            out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w).contiguous()
            x = (self.proj(out) + x) * self.skip_scale
        return x


def _checked_tap(name: str, value: object) -> object:
    check_real(name, value)
    return value


class SongUNet(AbstractBackbone):
    r"""F_θ(x, t, s): EDM's SongUNet (DDPM++ "standard" encoder/decoder) for unconditional images.

    Defaults are the SoFlow CIFAR-10 network: 32×32×3, 128 channels × [2, 2, 2], 4 blocks per
    resolution, attention at 16×16, dropout 0.3, FIR filter [1, 3, 3, 1], 6 augmentation labels.
    Times are embedded by
    [`positional_embedding`][soflow_core.nets.unet.positional_embedding] of t and of t − s
    (``model_channels · channel_mult_noise`` features each, sin half first, max_positions 10⁴),
    concatenated, plus a bias-free linear map of the augmentation labels when given, then
    ``map_layer0`` → SiLU → ``map_layer1`` → SiLU. The last layer of every block starts at
    1e-5 × xavier (EDM's init), so F_θ is small but not zero at initialisation.

    The dropout layers are ``nn.Dropout`` modules, so
    [`has_active_dropout`][soflow_core.objective.has_active_dropout] sees them and the objective replays
    the student's masks in the teacher pass. They act on contiguous (NCHW) tensors, so with the
    same seed a train-mode forward draws the same masks, in the same order, as the official network.
    ``SoFlowObjective`` calls ``model(x, t, s, cond)``; to train with augmentation labels, pass
    them as ``cond`` (they are split with the batch) through an adapter such as
    ``lambda x, t, s, cond: net(x, t, s, augment_labels=cond)``.
    ``save_pretrained`` and ``from_pretrained`` write and read shareable folders (see
    [`AbstractBackbone`][soflow_core.nets.checkpoints.AbstractBackbone]).

    Args:
        img_resolution: Side of the square images.
        in_channels: Input channels.
        out_channels: Output channels (None: as ``in_channels``).
        augment_dim: Size of the augmentation labels (0 to drop ``map_augment``).
        model_channels: Base channel count.
        channel_mult: Channel multiplier per resolution; each level after the first halves
            the resolution.
        channel_mult_emb: Embedding width relative to ``model_channels``.
        channel_mult_noise: Features per time input relative to ``model_channels``.
        num_blocks: Residual blocks per resolution.
        attn_resolutions: Resolutions with self-attention.
        dropout: Dropout probability inside the residual blocks.
        resample_filter: FIR taps of the up/down-sampling filter.
        max_positions: Inverse lowest frequency of the time features.
        adaptive_scale: Let the embedding scale and shift the normalised features (EDM's
            DhariwalUNet) instead of adding to them (SongUNet, the reference).

    Examples:
        >>> import torch
        >>> net = SongUNet(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
        >>> x, t, s = torch.randn(2, 3, 8, 8), torch.ones(2), torch.zeros(2)
        >>> net(x, t, s, augment_labels=torch.zeros(2, 6)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(
        self,
        *,
        img_resolution: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        augment_dim: int = 6,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        channel_mult_noise: int = 2,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.30,
        resample_filter: Sequence[int] = (1, 3, 3, 1),
        max_positions: float = 10_000.0,
        adaptive_scale: bool = False,
    ) -> None:
        super().__init__()
        self.img_resolution = check_int("img_resolution", img_resolution, low=1)
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.out_channels = in_channels if out_channels is None else check_int("out_channels", out_channels, low=1)
        self.augment_dim = check_int("augment_dim", augment_dim, low=0)
        self.model_channels = check_int("model_channels", model_channels, low=1)
        self.num_blocks = check_int("num_blocks", num_blocks, low=1)
        self.dropout = check_real("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.max_positions = check_real("max_positions", max_positions, low=1.0, low_open=True)
        channel_mult = check_sequence("channel_mult", channel_mult, lambda n, v: check_int(n, v, low=1), min_length=1)
        attn_resolutions = check_sequence("attn_resolutions", attn_resolutions, lambda n, v: check_int(n, v, low=1))
        # Taps are kept as given (integers stay integers in the saved config).
        resample_filter = check_sequence("resample_filter", resample_filter, _checked_tap, min_length=1)
        if not any(resample_filter):
            raise ValueError(f"resample_filter must have a non-zero tap; got {resample_filter}")
        adaptive_scale = check_bool("adaptive_scale", adaptive_scale)
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(
                f"img_resolution must be divisible by 2^(len(channel_mult) - 1) = {1 << (len(channel_mult) - 1)}; "
                f"got {img_resolution}"
            )
        self.channel_mult = channel_mult
        self.attn_resolutions = attn_resolutions
        self.resample_filter = list(resample_filter)
        self.adaptive_scale = adaptive_scale
        self.channel_mult_emb = check_int("channel_mult_emb", channel_mult_emb, low=1)
        self.channel_mult_noise = check_int("channel_mult_noise", channel_mult_noise, low=1)
        emb_channels = model_channels * self.channel_mult_emb
        self.noise_channels = model_channels * self.channel_mult_noise
        if self.noise_channels % 2 or self.noise_channels < 4:
            raise ValueError(f"model_channels * channel_mult_noise must be even and >= 4; got {self.noise_channels}")
        block = {
            "emb_channels": emb_channels,
            "dropout": self.dropout,
            "skip_scale": math.sqrt(0.5),
            "resample_filter": tuple(resample_filter),
            "adaptive_scale": bool(adaptive_scale),
        }

        # Mapping: [φ(t), φ(t − s)] (+ augmentation labels) → emb_channels.
        self.map_augment = _Linear(augment_dim, 2 * self.noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = _Linear(2 * self.noise_channels, emb_channels)
        self.map_layer1 = _Linear(emb_channels, emb_channels)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = _Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = _UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = _UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [layer.out_channels for layer in self.enc.values()]

        # Decoder: every "_block" layer takes one encoder output, concatenated on the channels.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = _UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = _UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = _UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = _UNetBlock(cin, cout, attention=attention, **block)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = _GroupNorm(cout)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = _Conv2d(cout, self.out_channels, 3, init_weight=1e-5)

    signature_keys = frozenset({"map_layer0.weight", "map_layer1.weight"})
    num_classes = None  # unconditional: the objective and the samplers refuse a cond before calling it

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input sample (the objective and the samplers check data against it)."""
        return (self.in_channels, self.img_resolution, self.img_resolution)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this SongUNet."""
        return {
            "img_resolution": self.img_resolution,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "augment_dim": self.augment_dim,
            "model_channels": self.model_channels,
            "channel_mult": list(self.channel_mult),
            "channel_mult_emb": self.channel_mult_emb,
            "channel_mult_noise": self.channel_mult_noise,
            "num_blocks": self.num_blocks,
            "attn_resolutions": list(self.attn_resolutions),
            "dropout": self.dropout,
            "resample_filter": list(self.resample_filter),
            "max_positions": self.max_positions,
            "adaptive_scale": self.adaptive_scale,
        }

    @classmethod
    def config_from_state(cls, state: Mapping[str, Tensor], **hints: Any) -> dict[str, Any]:
        """The SongUNet a state dict belongs to, read from its keys and shapes.

        Resolution and channels come from ``enc.<R>x<R>_conv``, the multipliers from the first
        block of each level, the block count and attention resolutions from the encoder keys,
        the embedding widths from ``map_layer0``, the augmentation size from ``map_augment``
        and the FIR taps from a resampling buffer (normalised to a first tap of 1). ``dropout``
        and ``max_positions`` leave no trace in the weights: they keep the reference values
        (0.3 and 10⁴) unless given.

        Args:
            state: The state dict (prefixes stripped).
            **hints: Constructor arguments; ``dropout`` and ``max_positions`` are taken as given,
                the others must agree with the shapes.

        Returns:
            Keyword arguments for ``SongUNet``.

        Raises:
            ValueError: If the keys or shapes are not a SongUNet's, or a hint contradicts them.
        """
        convs = [m for k in state if (m := re.fullmatch(r"enc\.(\d+)x(\d+)_conv\.weight", k))]
        if len(convs) != 1 or convs[0].group(1) != convs[0].group(2):
            raise ValueError(
                "a SongUNet state dict has one enc.<R>x<R>_conv.weight; found " + str([m.group(0) for m in convs])
            )
        resolution = int(convs[0].group(1))
        model_channels, in_channels = state_shape(state, convs[0].group(0), 4)[:2]
        levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"enc\.(\d+)x\1_", k))}, reverse=True)
        if levels != [resolution >> i for i in range(len(levels))]:
            raise ValueError(f"the encoder resolutions {levels} do not halve from {resolution}")

        def multiple(key: str, width: int) -> int:
            if width % model_channels:
                raise ValueError(f"{key} has {width} channels, not a multiple of model_channels={model_channels}")
            return width // model_channels

        channel_mult = []
        for r in levels:
            key = f"enc.{r}x{r}_block0.conv0.weight"
            channel_mult.append(multiple(key, state_shape(state, key, 4)[0]))
        blocks = {m.group(1) for k in state if (m := re.match(rf"enc\.{resolution}x{resolution}_block(\d+)\.", k))}
        attention = [r for r in levels if f"enc.{r}x{r}_block0.qkv.weight" in state]
        emb_channels, noise_features = state_shape(state, "map_layer0.weight", 2)
        augment = state.get("map_augment.weight")
        affine = state_shape(state, f"enc.{resolution}x{resolution}_block0.affine.weight", 2)[0]
        inferred = {
            "img_resolution": resolution,
            "in_channels": in_channels,
            "out_channels": state_shape(state, f"dec.{resolution}x{resolution}_aux_conv.weight", 4)[0],
            "augment_dim": 0 if augment is None else int(augment.shape[1]),
            "model_channels": model_channels,
            "channel_mult": channel_mult,
            "channel_mult_emb": multiple("map_layer0.weight", emb_channels),
            "channel_mult_noise": multiple("map_layer0.weight (input, per time)", noise_features // 2),
            "num_blocks": len(blocks),
            "attn_resolutions": attention,
            "adaptive_scale": affine == 2 * channel_mult[0] * model_channels,
        }
        if len(levels) > 1:
            fir = state.get(f"enc.{levels[1]}x{levels[1]}_down.conv0.resample_filter")
            if fir is not None and fir.ndim == 4 and not fir.is_meta and float(fir[0, 0, 0, 0]) != 0.0:
                taps = (fir[0, 0, 0] / fir[0, 0, 0, 0]).tolist()
                rounded = [round(v) for v in taps]
                inferred["resample_filter"] = rounded if all(abs(v - r) < 1e-4 for v, r in zip(taps, rounded)) else taps
        return resolve_config(cls, inferred, hints)

    def forward(
        self,
        x: Data,
        t: Time,
        s: Time,
        cond: Cond | None = None,
        augment_labels: Tensor | None = None,
    ) -> Data:
        """Evaluate F_θ(x, t, s).

        Args:
            x: Images of shape (b, in_channels, img_resolution, img_resolution).
            t: Current times.
            s: Target times (the network embeds t − s).
            cond: Must be None: the network is unconditional.
            augment_labels: EDM augmentation labels of shape (b, augment_dim), or None (as at
                sampling time).

        Returns:
            The network output, shape (b, out_channels, img_resolution, img_resolution).

        Raises:
            ValueError: If ``cond`` is given, or on wrong input shapes or devices.
            TypeError: On times that are not floating point, or ``x`` in another dtype than the
                parameters outside autocast.
        """
        if cond is not None:
            raise ValueError("SongUNet is unconditional: cond must be None (use augment_labels for augmentation)")
        batch = check_image_inputs(x, t, s, channels=self.in_channels, resolution=self.img_resolution, model=self)

        # Mapping.
        weight = self.map_layer0.weight
        emb = torch.cat(
            [
                positional_embedding(t, self.noise_channels, max_positions=self.max_positions),
                positional_embedding(t - s, self.noise_channels, max_positions=self.max_positions),
            ],
            dim=1,
        ).to(weight.dtype)
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError("augment_labels were given to a SongUNet built with augment_dim=0")
            if augment_labels.shape != (batch, self.augment_dim):
                raise ValueError(
                    f"augment_labels must have shape ({batch}, {self.augment_dim}); got {tuple(augment_labels.shape)}"
                )
            emb = emb + self.map_augment(augment_labels.to(weight.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        # Encoder.
        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, _UNetBlock) else layer(x)
            skips.append(x)

        # Decoder.
        out = x
        for name, layer in self.dec.items():
            if name.endswith("_aux_norm"):
                out = layer(x)
            elif name.endswith("_aux_conv"):
                out = layer(F.silu(out))
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return out
