r"""From a pretrained velocity network to a SoFlow solution network, exactly: the start of a fine-tune.

A network trained with Flow Matching predicts a velocity v(x, t). SoFlow's Euler
parameterization is f(x, t, s) = x + (s − t)·F(x, t, s), and its Flow Matching term trains
F(x, t, t) toward the velocity. So a solution network whose F ignores s and equals v,

$$F(x, t, s) = v(x, t)\quad\text{for every } s,$$

is one Euler step of the pretrained ODE from t to s: an exact starting point for SoFlow
training. [`from_velocity_model`][soflow_core.nets.convert.from_velocity_model] builds that
network from a checkpoint by rewriting weights, never by wrapping the network:

* **Time direction.** A source whose data sit at t = 1 (SiT: noise at 0, data at 1) is
  evaluated at 1 − t. Each sinusoid of 1 − t is a fixed linear map of the sinusoids of t
  (per frequency ω: cos(ω − ωt) = cos ω·cos ωt + sin ω·sin ωt and sin(ω − ωt) = sin ω·cos ωt −
  cos ω·sin ωt), so the flip is folded into the first linear layer of the time embedding.
* **Velocity sign and channels.** A velocity that points towards the data (SiT: data − noise)
  is negated, and only the velocity's output channels are kept (a learned-variance
  checkpoint's second half is dropped), both in the last linear layer.
* **Independence of s.** The t − s input starts at zero: a DiT's ``s_embedder`` gets a zero
  output layer (its constant value at t − s = 0, for a source that has one, moves into the
  bias of the time embedding), and the t − s columns of the MLP's and the SongUNet's first
  time layer are zeroed, their value at t − s = 0 moving into that layer's bias.

For SiT, with τ = 1 − t, the result is F(x, t, s, y) = −v_SiT(x, 1 − t, y) for every s, to
float rounding, for class labels and the null class alike. How a source's time, sign, output
channels, label table and path relate to soflow_core's is data: a
[`VelocityConvention`][soflow_core.nets.convert.VelocityConvention]; the named ones are in
[`VELOCITY_CONVENTIONS`][soflow_core.nets.convert.VELOCITY_CONVENTIONS].
"""

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from soflow_core._validation import check_choice
from soflow_core.nets.checkpoints import (
    AbstractBackbone,
    CheckpointContents,
    CheckpointOrigin,
    _torch_load,
    load_backbone,
    read_state_dict,
)
from soflow_core.nets.dit import DiT
from soflow_core.nets.mlp import MLPBackbone
from soflow_core.nets.unet import SongUNet
from soflow_core.parameterizations import AbstractParam, make_param, param_name
from soflow_core.paths import AbstractPath, make_path

__all__ = [
    "SIT_NUM_HEADS",
    "VELOCITY_CONVENTIONS",
    "ConvertedBackbone",
    "VelocityConvention",
    "from_velocity_model",
    "sinusoid_time_flip",
]

DataTime = Literal[0, 1]
VelocityTowards = Literal["noise", "data"]
VelocityChannels = Literal["all", "leading"]
NullLabel = Literal["last", "first"]

_TIME_FEATURES_DIT = 256  # the DiT/SiT time embedder's sinusoids [cos, sin], max_period 1e4

SIT_NUM_HEADS = {"S": 6, "B": 12, "L": 16, "XL": 16}
"""Attention heads of SiT's model sizes (``SiT-S/2`` ... ``SiT-XL/8``), which the weights do not record."""

# SiT's path_type (its training file's args) → soflow_core's path after the time flip: SiT's Linear
# x_τ = τ·data + (1 − τ)·noise is soflow_core's linear path at t = 1 − τ, its GVP
# x_τ = sin(πτ/2)·data + cos(πτ/2)·noise is the trig path.
_SIT_PATHS = {"linear": "linear", "gvp": "trig"}


@dataclass(frozen=True, kw_only=True)
class VelocityConvention:
    r"""How a velocity network's time, output and labels relate to soflow_core's.

    soflow_core's own convention: data at t = 0, noise at t = 1, and the velocity
    v = dx_t/dt points towards the noise (noise − data on the linear path). A source
    network u(x, τ, y) in another convention gives soflow_core's velocity as

    $$v(x, t, y) = \sigma\, u(x, \tau(t), y)_{[:C]},\qquad
    \tau(t) = \begin{cases} t & \text{data at } 0\\ 1 - t & \text{data at } 1\end{cases},\qquad
    \sigma = \begin{cases} +1 & \text{towards noise}\\ -1 & \text{towards data}\end{cases}$$

    where ``[:C]`` keeps the velocity's output channels. The time must be fed to the network
    unscaled in [0, 1] (a network embedding 1000·t is another architecture).

    Attributes:
        name: A label, recorded in the converted model's metadata.
        data_time: The time at which the source's path is at the data: 0 (soflow_core) or 1
            (SiT, facebookresearch/flow_matching).
        velocity_towards: Where the source's output points along the path: ``"noise"``
            (soflow_core: noise − data on the linear path) or ``"data"`` (SiT: data − noise).
        velocity_channels: ``"all"``: every output channel is the velocity (the output must be
            shaped like the input); ``"leading"``: the first C output channels are the velocity,
            C being the input channels, and the rest (a learned variance: SiT's
            ``learn_sigma=True``) are dropped.
        null_label: Where a label table's null class (the row classifier-free guidance drops
            labels to) sits: ``"last"`` (index ``num_classes``: SiT, DiT, soflow_core) or
            ``"first"`` (index 0, the classes after it); converted to soflow_core's ``"last"``.
        path: The noising path the source was trained on, named in soflow_core's time
            (``"linear"``, ``"trig"``); recorded for sampling and fine-tuning.

    Examples:
        >>> VELOCITY_CONVENTIONS["sit"].data_time, VELOCITY_CONVENTIONS["sit"].velocity_towards
        (1, 'data')
        >>> mine = VelocityConvention(name="noise-at-0", data_time=1, velocity_towards="data",
        ...                           velocity_channels="all", null_label="first")
    """

    name: str
    data_time: DataTime = 0
    velocity_towards: VelocityTowards = "noise"
    velocity_channels: VelocityChannels = "all"
    null_label: NullLabel = "last"
    path: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string; got {self.name!r}")
        if self.data_time not in (0, 1) or isinstance(self.data_time, bool):
            raise ValueError(
                f"data_time must be 0 or 1 (the time at which the path is at the data); got {self.data_time!r}"
            )
        check_choice("velocity_towards", self.velocity_towards, ("noise", "data"))
        check_choice("velocity_channels", self.velocity_channels, ("all", "leading"))
        check_choice("null_label", self.null_label, ("last", "first"))
        make_path(self.path)

    @property
    def time_flip(self) -> bool:
        """Whether the source is evaluated at 1 − t."""
        return self.data_time == 1

    @property
    def sign(self) -> float:
        """σ: +1 when the source's velocity points towards the noise, as soflow_core's, else −1."""
        return 1.0 if self.velocity_towards == "noise" else -1.0


VELOCITY_CONVENTIONS: dict[str, VelocityConvention] = {
    "soflow": VelocityConvention(name="soflow"),
    "sit": VelocityConvention(
        name="sit", data_time=1, velocity_towards="data", velocity_channels="leading", null_label="last"
    ),
    "sit_gvp": VelocityConvention(
        name="sit_gvp",
        data_time=1,
        velocity_towards="data",
        velocity_channels="leading",
        null_label="last",
        path="trig",
    ),
}
"""The named conventions.

* ``"soflow"``: this library's own (a model trained with its Flow Matching loss): data at t = 0,
  velocity towards the noise, output shaped like the input, null class last, linear path.
* ``"sit"``: SiT (github.com/willisma/SiT, ``path_type="Linear"``, ``prediction="velocity"``, the
  released SiT-XL/2): x_τ = τ·data + (1 − τ)·noise, so data at τ = 1, and the network predicts
  data − noise; with ``learn_sigma=True`` the first C of its 2C output channels; label table of
  ``num_classes + 1`` rows with the null class last.
* ``"sit_gvp"``: SiT trained with ``path_type="GVP"`` (x_τ = sin(πτ/2)·data + cos(πτ/2)·noise),
  soflow_core's trig path after the time flip.
"""


def sinusoid_time_flip(frequencies: Tensor, *, cos_first: bool) -> Tensor:
    r"""The matrix M with φ(1 − t) = M·φ(t) for sinusoidal features φ of the time.

    With n frequencies ω_i and features laid out [cos(tω), sin(tω)] (``cos_first``: the DiT and
    MLP time embeddings) or [sin(tω), cos(tω)] (the SongUNet's),

    $$\cos(\omega - \omega t) = \cos\omega\,\cos\omega t + \sin\omega\,\sin\omega t,\qquad
    \sin(\omega - \omega t) = \sin\omega\,\cos\omega t - \cos\omega\,\sin\omega t.$$

    Each frequency's 2×2 block is a reflection, so M is symmetric and its own inverse. A
    linear layer W applied to φ(1 − t) equals W·M applied to φ(t).

    Args:
        frequencies: The n frequencies ω_i.
        cos_first: Whether the cosines come first.

    Returns:
        M, of shape (2n, 2n), in the dtype of ``frequencies``.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 0.1], dtype=torch.float64)
        >>> features = lambda t: torch.cat([torch.cos(t * w), torch.sin(t * w)])
        >>> M = sinusoid_time_flip(w, cos_first=True)
        >>> torch.allclose(M @ features(torch.tensor(0.3, dtype=torch.float64)), features(torch.tensor(0.7)))
        True
    """
    n = frequencies.shape[0]
    cos, sin = torch.cos(frequencies), torch.sin(frequencies)
    index = torch.arange(n)
    c_rows, s_rows = (index, index + n) if cos_first else (index + n, index)
    flip = torch.zeros(2 * n, 2 * n, dtype=frequencies.dtype)
    flip[c_rows, c_rows] = cos
    flip[c_rows, s_rows] = sin
    flip[s_rows, c_rows] = sin
    flip[s_rows, s_rows] = -cos
    return flip


def _dit_frequencies(n: int) -> Tensor:
    """The DiT/SiT/MLP time frequencies exp(−ln(1e4)·i/n), i < n, in float64."""
    return torch.exp(-math.log(10_000.0) * torch.arange(n, dtype=torch.float64) / n)


def _unet_frequencies(n: int, max_positions: float) -> Tensor:
    """The SongUNet's frequencies max_positions^(−i/(n − 1)), i < n, in float64 (EDM's endpoint=True)."""
    return (1.0 / max_positions) ** (torch.arange(n, dtype=torch.float64) / (n - 1))


@dataclass(frozen=True, kw_only=True)
class ConvertedBackbone:
    """A SoFlow backbone made from a velocity network by
    [`from_velocity_model`][soflow_core.nets.convert.from_velocity_model].

    Attributes:
        model: The network, in eval mode: F(x, t, s) equals the source's velocity in
            soflow_core's convention for every s.
        convention: The source's convention.
        path: The noising path to fine-tune and sample with (the source's).
        param: The parameterization F was scaled for (``EulerParam`` unless asked otherwise).
        origin: Where the weights came from (file, entry, prefix).
        metadata: What was converted, JSON-serialisable; written by ``save_pretrained``.
    """

    model: AbstractBackbone
    convention: VelocityConvention
    path: AbstractPath
    param: AbstractParam
    origin: CheckpointOrigin
    metadata: dict[str, Any]

    def save_pretrained(self, directory: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the converted network as a pretrained folder, ready for ``--init`` or ``from_pretrained``.

        The folder records the path and parameterization, and the conversion under the
        metadata key ``"converted_from"`` (next to ``metadata``).

        Args:
            directory: The folder (created if needed).
            metadata: More JSON-serialisable extras.

        Returns:
            The folder.
        """
        return self.model.save_pretrained(
            directory, path=self.path, param=self.param, metadata={**self.metadata, **dict(metadata or {})}
        )


# ---------------------------------------------------------------------------------------- reading


def _read_source(
    source: "nn.Module | CheckpointContents | Mapping[str, object] | str | os.PathLike", entry: str | None
) -> tuple[CheckpointContents, argparse.Namespace | None]:
    """The state dict and, for a SiT training file, its ``args``."""
    if isinstance(source, nn.Module):
        if entry is not None:
            raise ValueError(f"entry={entry!r} was given for a module")
        contents = read_state_dict({k: v.detach() for k, v in source.state_dict().items()})  # DDP/compile prefixes go
        location = f"<{type(source).__name__} module>"
        return dataclasses.replace(contents, origin=dataclasses.replace(contents.origin, location=location)), None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file() and path.suffix != ".safetensors":
            loaded = _torch_load(path)
            if not isinstance(loaded, Mapping):
                raise TypeError(f"{path} holds a {type(loaded).__name__}, not a state dict or a training checkpoint")
            contents = read_state_dict(loaded, entry=entry)
            contents = dataclasses.replace(contents, origin=dataclasses.replace(contents.origin, location=str(path)))
            return contents, _sit_args(loaded)
    contents = read_state_dict(source, entry=entry)  # type: ignore[arg-type]
    return contents, _sit_args(source) if isinstance(source, Mapping) else None


def _sit_args(checkpoint: Mapping[str, object]) -> argparse.Namespace | None:
    """The ``args`` of a SiT training file (``{"model", "ema", "opt", "args"}``), or None."""
    args = checkpoint.get("args")
    return args if isinstance(args, argparse.Namespace) and hasattr(args, "path_type") else None


def _convention_from_sit_args(args: argparse.Namespace) -> VelocityConvention:
    """The convention a SiT training file was trained in; refuse what cannot be converted."""
    prediction = str(getattr(args, "prediction", "velocity")).lower()
    if prediction != "velocity":
        raise ValueError(
            f"the SiT training file was trained with prediction={prediction!r}; only velocity-predicting SiT "
            "models (prediction='velocity', SiT's default) convert exactly"
        )
    path_type = str(getattr(args, "path_type", "Linear")).lower()
    if path_type not in _SIT_PATHS:
        raise ValueError(
            f"the SiT training file was trained with path_type={getattr(args, 'path_type', None)!r}; "
            "soflow_core has the paths of SiT's 'Linear' and 'GVP' only"
        )
    return VELOCITY_CONVENTIONS["sit" if path_type == "linear" else "sit_gvp"]


def _sit_hints(args: argparse.Namespace | None, hints: dict[str, Any]) -> dict[str, Any]:
    """``num_classes`` and ``num_heads`` from a SiT training file's args, unless given."""
    out = dict(hints)
    if args is None:
        return out
    if "num_classes" not in out and isinstance(getattr(args, "num_classes", None), int):
        out["num_classes"] = args.num_classes
    match = re.fullmatch(r"SiT-(S|B|L|XL)/\d+", str(getattr(args, "model", "")))
    if "num_heads" not in out and match:
        out["num_heads"] = SIT_NUM_HEADS[match.group(1)]
    return out


# ------------------------------------------------------------------------------- state rewriting


def _f64(state: Mapping[str, Tensor], key: str) -> Tensor:
    """A float64 copy (never a view: the source's tensors stay untouched)."""
    return state[key].detach().to(torch.float64, copy=True)


def _put(state: dict[str, Tensor], key: str, value: Tensor, like: Tensor) -> None:
    state[key] = value.to(dtype=like.dtype)


def _output_rows(state: dict[str, Tensor], key: str, keep: Tensor, factor: float) -> None:
    """Keep the output rows (or channels) ``keep`` of a weight and its bias, times ``factor``."""
    for name in (f"{key}.weight", f"{key}.bias"):
        if name in state:
            original = state[name]
            _put(state, name, factor * original.detach().to(torch.float64)[keep], original)


def _velocity_rows(out_features: int, in_channels: int, per_position: int, convention: VelocityConvention) -> Tensor:
    """Indices of the velocity among ``out_features`` = per_position · C_out outputs laid out (position, channel)."""
    if out_features % per_position:
        raise ValueError(f"the output layer has {out_features} outputs, not a multiple of {per_position}")
    out_channels = out_features // per_position
    if out_channels == in_channels:
        return torch.arange(out_features)
    if convention.velocity_channels == "all" or out_channels < in_channels:
        raise ValueError(
            f"the network returns {out_channels} channels for {in_channels} input channels; convention "
            f"{convention.name!r} (velocity_channels={convention.velocity_channels!r}) cannot say which are the "
            "velocity" + ("" if out_channels < in_channels else " (velocity_channels='leading' keeps the first ones)")
        )
    return torch.tensor(
        [p * out_channels + c for p in range(per_position) for c in range(in_channels)], dtype=torch.long
    )


def _label_rows(state: dict[str, Tensor], key: str, convention: VelocityConvention, num_classes: int | None) -> None:
    """Move a null row that comes first to the end (soflow_core's layout)."""
    table = state.get(key)
    if table is None or convention.null_label == "last":
        return
    if num_classes is None:
        raise ValueError(
            f"convention {convention.name!r} puts the null class first: pass num_classes to tell whether the "
            f"{table.shape[0]}-row label table has one"
        )
    if table.shape[0] == num_classes + 1:
        state[key] = torch.cat([table[1:], table[:1]])


def _time_mlp_output_constant(state: Mapping[str, Tensor], prefix: str, features: Tensor) -> Tensor:
    """Linear → SiLU → Linear of ``features`` (float64): an embedder's value at one input."""
    hidden = nn.functional.silu(_f64(state, f"{prefix}.0.weight") @ features + _f64(state, f"{prefix}.0.bias"))
    return _f64(state, f"{prefix}.2.weight") @ hidden + _f64(state, f"{prefix}.2.bias")


def _convert_dit(
    state: dict[str, Tensor], convention: VelocityConvention, factor: float, num_classes: int | None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A DiT with or without SoFlow's s_embedder (SiT, DiT layout) → a SoFlow DiT with F independent of s."""
    notes: dict[str, Any] = {}
    proj = state["x_embedder.proj.weight"]
    in_channels, patch = int(proj.shape[1]), int(proj.shape[2])
    final = state.get("final_layer.linear.weight")
    if final is None:
        raise ValueError("the state dict has no final_layer.linear.weight")
    keep = _velocity_rows(int(final.shape[0]), in_channels, patch * patch, convention)
    notes["output_channels"] = int(final.shape[0]) // (patch * patch)
    _output_rows(state, "final_layer.linear", keep, factor)
    _label_rows(state, "y_embedder.embedding_table.weight", convention, num_classes)

    t_first = state["t_embedder.mlp.0.weight"]
    if t_first.ndim != 2 or t_first.shape[1] != _TIME_FEATURES_DIT:
        raise ValueError(
            f"t_embedder.mlp.0.weight must take {_TIME_FEATURES_DIT} sinusoids of the time; got shape "
            f"{tuple(t_first.shape)}"
        )
    if "s_embedder.mlp.0.weight" in state:
        # A SoFlow DiT trained with Flow Matching saw t − s = 0 only: its s-embedding is a constant.
        half = _TIME_FEATURES_DIT // 2
        at_zero = torch.cat([torch.ones(half, dtype=torch.float64), torch.zeros(half, dtype=torch.float64)])
        constant = _time_mlp_output_constant(state, "s_embedder.mlp", at_zero)
        bias = state["t_embedder.mlp.2.bias"]
        _put(state, "t_embedder.mlp.2.bias", _f64(state, "t_embedder.mlp.2.bias") + constant, bias)
        notes["s_embedder"] = "its value at t − s = 0 moved into t_embedder.mlp.2.bias"
    else:
        # SiT/DiT layout: the s-embedder's first layer starts as the time embedder's (deterministic, and
        # on the scale the pretrained network uses); its output layer is zeroed below.
        state["s_embedder.mlp.0.weight"] = t_first.detach().clone()
        state["s_embedder.mlp.0.bias"] = state["t_embedder.mlp.0.bias"].detach().clone()
        notes["s_embedder"] = "added: first layer copied from t_embedder.mlp.0, output layer zero"
    state["s_embedder.mlp.2.weight"] = torch.zeros_like(state["t_embedder.mlp.2.weight"])
    state["s_embedder.mlp.2.bias"] = torch.zeros_like(state["t_embedder.mlp.2.bias"])
    if convention.time_flip:
        flip = sinusoid_time_flip(_dit_frequencies(_TIME_FEATURES_DIT // 2), cos_first=True)
        _put(state, "t_embedder.mlp.0.weight", _f64(state, "t_embedder.mlp.0.weight") @ flip, t_first)
    return state, notes


def _convert_mlp(
    state: dict[str, Tensor], convention: VelocityConvention, factor: float, num_classes: int | None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An MLPBackbone → the same with its t − s columns zeroed (their value at 0 in the bias)."""
    first = state["time_mlp.0.weight"]
    n = int(first.shape[1]) // 4  # [cos, sin] of t, then of t − s; n frequencies each
    weight = _f64(state, "time_mlp.0.weight")
    bias = _f64(state, "time_mlp.0.bias") + weight[:, 2 * n : 3 * n].sum(dim=1)  # φ(0) = [1…1, 0…0]
    weight[:, 2 * n :] = 0.0
    if convention.time_flip:
        weight[:, : 2 * n] = weight[:, : 2 * n] @ sinusoid_time_flip(_dit_frequencies(n), cos_first=True)
    _put(state, "time_mlp.0.weight", weight, first)
    _put(state, "time_mlp.0.bias", bias, state["time_mlp.0.bias"])
    dim = int(state["output.weight"].shape[0])
    _output_rows(state, "output", torch.arange(dim), factor)
    if convention.null_label == "first" and "label_embedding.weight" in state:
        # The MLP's table always has the null row: num_classes + 1 rows.
        rows = int(state["label_embedding.weight"].shape[0])
        _label_rows(state, "label_embedding.weight", convention, rows - 1 if num_classes is None else num_classes)
    return state, {"t_minus_s_columns": "zeroed; their value at t − s = 0 moved into time_mlp.0.bias"}


def _convert_unet(
    state: dict[str, Tensor], convention: VelocityConvention, factor: float, max_positions: float
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A SongUNet → the same with its t − s columns of map_layer0 zeroed (their value at 0 in the bias)."""
    first = state["map_layer0.weight"]
    n = int(first.shape[1]) // 4  # [sin, cos] of t, then of t − s
    weight = _f64(state, "map_layer0.weight")
    bias = _f64(state, "map_layer0.bias") + weight[:, 3 * n :].sum(dim=1)  # φ(0) = [0…0, 1…1]
    weight[:, 2 * n :] = 0.0
    notes: dict[str, Any] = {"t_minus_s_columns": "zeroed; their value at t − s = 0 moved into map_layer0.bias"}
    if convention.time_flip:
        flip = sinusoid_time_flip(_unet_frequencies(n, max_positions), cos_first=False)
        weight[:, : 2 * n] = weight[:, : 2 * n] @ flip
        augment = state.get("map_augment.weight")
        if augment is not None:  # the augmentation labels add to φ(t): keep W·(φ + A·a) exact under the flip
            rows = _f64(state, "map_augment.weight")
            rows[: 2 * n] = flip @ rows[: 2 * n]
            _put(state, "map_augment.weight", rows, augment)
    if "map_augment.weight" in state:
        notes["augment_labels"] = (
            "exact without augmentation labels (sampling); with them, their part through the t − s features is dropped"
        )
    _put(state, "map_layer0.weight", weight, first)
    _put(state, "map_layer0.bias", bias, state["map_layer0.bias"])
    resolution = int(SongUNet.config_from_state(state)["img_resolution"])
    conv = f"dec.{resolution}x{resolution}_aux_conv"
    out_channels = int(state[f"{conv}.weight"].shape[0])
    in_channels = int(state[f"enc.{resolution}x{resolution}_conv.weight"].shape[1])
    keep = _velocity_rows(out_channels, in_channels, 1, convention)
    _output_rows(state, conv, keep, factor)
    notes["output_channels"] = out_channels
    return state, notes


def _param_factor(param: AbstractParam) -> float:
    """1/∂ₛb(t, t): F = v/∂ₛb makes the parameterization's velocity ∂ₛa·x + ∂ₛb·F equal v (∂ₛa(t, t) = 0)."""
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    d_a, d_b = torch.as_tensor(param.d_s_a(t, t)), torch.as_tensor(param.d_s_b(t, t))
    if not (torch.allclose(d_a, torch.zeros_like(d_a)) and torch.allclose(d_b, d_b[0].expand_as(d_b))):
        raise ValueError(
            f"param {type(param).__name__}: a velocity network converts only where ∂ₛa(t, t) = 0 and ∂ₛb(t, t) is "
            "constant (Euler, Trig)"
        )
    return 1.0 / float(d_b[0])


# ---------------------------------------------------------------------------------------- entry point


def from_velocity_model(
    source: "nn.Module | CheckpointContents | Mapping[str, object] | str | os.PathLike",
    *,
    convention: VelocityConvention | str | None = None,
    param: AbstractParam | str = "euler",
    entry: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **hints: Any,
) -> ConvertedBackbone:
    r"""Turn a pretrained velocity network into a SoFlow backbone ready to fine-tune.

    At the result, F(x, t, s, y) = v(x, t, y) for every s, where v is the source's velocity in
    soflow_core's convention (data at t = 0, velocity towards the noise): for SiT,
    v(x, t, y) = −v_SiT(x, 1 − t, y). The solution map f(x, t, s) = x + (s − t)·F is then one
    Euler step of the pretrained ODE, and F(x, t, t) is the velocity SoFlow's Flow Matching
    term trains.

    Sources (sizes are read from the shapes, as
    [`load_backbone`][soflow_core.nets.checkpoints.load_backbone] does):

    * **SiT** (and any DiT-layout velocity model without SoFlow's ``s_embedder``): the bare
      EMA state dict SiT's release ships (``SiT-XL-2-256x256.pt``; pass ``convention="sit"``
      and ``num_classes``), or SiT's own training file ``{"model", "ema", "opt", "args"}``,
      read with ``torch.load(weights_only=True)`` allowing only ``argparse.Namespace``; the EMA
      weights win, and the convention, class count and heads come from its ``args``
      (``path_type``, ``prediction``, ``num_classes``, ``model``). ``learn_sigma`` checkpoints
      (2C output channels) keep the first C.
    * **This library's backbones** (``DiT``, ``SongUNet``, ``MLPBackbone``) trained with its Flow
      Matching loss: a pretrained folder, a trainer run's checkpoint file, a state dict, a
      ``.safetensors`` file or the module itself; convention ``"soflow"`` unless declared.

    The source is used as a velocity model: only F(x, t, t) is kept, so an already-trained
    SoFlow model loses its solution map (load it with ``load_backbone`` to continue training
    it instead). A SongUNet with augmentation labels is exact without them (as at sampling);
    with them, their part that passed through the t − s features is dropped.

    Args:
        source: A checkpoint path or folder, a mapping, contents already read, or a module.
        convention: How the source relates to soflow_core: a
            [`VelocityConvention`][soflow_core.nets.convert.VelocityConvention] or a name in
            [`VELOCITY_CONVENTIONS`][soflow_core.nets.convert.VELOCITY_CONVENTIONS]. None:
            from a SiT training file's ``args``, ``"soflow"`` for this library's backbones; a
            DiT-layout state dict without ``args`` must name it (DiT's own diffusion checkpoints
            have the same keys but predict noise).
        param: The parameterization to fine-tune with; F is scaled by 1/∂ₛb(t, t) (1 for Euler).
        entry: The entry of a training checkpoint, or None to prefer EMA weights.
        device: Where to put the network (default: the CPU).
        dtype: A floating dtype to cast to (default: the stored one).
        **hints: Constructor arguments the shapes cannot tell: ``num_classes`` (whether a DiT's
            last label row is the null class), ``num_heads`` (a DiT size not in ``DIT_SIZES``);
            see ``load_backbone``.

    Returns:
        The network (eval mode), its convention, path, parameterization, origin and metadata.

    Raises:
        ValueError: If the convention is missing or cannot apply (a SiT file that predicts
            noise, an output whose velocity channels are unknown), or see ``load_backbone``.
        TypeError: If ``source`` is not a module, mapping or path.

    Examples:
        >>> import torch
        >>> from soflow_core.nets import MLPBackbone
        >>> velocity = MLPBackbone(dim=2)  # trained with Flow Matching: F(x, t, t) is its velocity
        >>> converted = from_velocity_model(velocity)
        >>> x, t = torch.randn(4, 2), torch.rand(4)
        >>> torch.allclose(converted.model(x, t, torch.zeros(4)), velocity(x, t, t), atol=1e-6)
        True
    """
    if isinstance(param, str):
        param = make_param(param)
    if not isinstance(param, AbstractParam):
        raise TypeError(f"param must be a parameterization or its name; got {param!r}")
    contents, args = _read_source(source, entry)
    cls = contents.backbone_class
    config = {**(contents.pretrained or {}).get("config", {}), **hints}
    state = dict(contents.state)
    dit_layout = cls is DiT and "s_embedder.mlp.0.weight" not in state
    if convention is None:
        if args is not None:
            convention = _convention_from_sit_args(args)
        elif dit_layout:
            raise ValueError(
                "this DiT-layout state dict has no s_embedder and no training arguments: pass convention='sit' "
                "for a SiT checkpoint (e.g. the released SiT-XL-2-256x256.pt), or a VelocityConvention "
                "(DiT's own diffusion checkpoints have the same keys but predict noise and do not convert)"
            )
        else:
            convention = VELOCITY_CONVENTIONS["soflow"]
    elif isinstance(convention, str):
        convention = VELOCITY_CONVENTIONS[check_choice("convention", convention, tuple(VELOCITY_CONVENTIONS))]
    elif not isinstance(convention, VelocityConvention):
        raise TypeError(f"convention must be a VelocityConvention, a name or None; got {convention!r}")
    if args is not None:
        declared = _convention_from_sit_args(args)
        config = _sit_hints(args, config)
        if (declared.data_time, declared.velocity_towards, declared.path) != (
            convention.data_time,
            convention.velocity_towards,
            convention.path,
        ):
            raise ValueError(
                f"convention {convention.name!r} contradicts the SiT training file's args (path_type="
                f"{getattr(args, 'path_type', None)!r}): it was trained in convention {declared.name!r}"
            )
    factor = convention.sign * _param_factor(param)
    num_classes = config.get("num_classes")
    if cls is DiT:
        state, notes = _convert_dit(state, convention, factor, num_classes)
    elif cls is MLPBackbone:
        state, notes = _convert_mlp(state, convention, factor, num_classes)
    elif cls is SongUNet:
        max_positions = float(config.get("max_positions", 10_000.0))
        state, notes = _convert_unet(state, convention, factor, max_positions)
    else:
        raise ValueError(f"{cls.__name__} has no velocity conversion; convertible: DiT, MLPBackbone, SongUNet")
    if cls is SongUNet:  # the output channels left after the conversion are the input's
        config.pop("out_channels", None)
    loaded = load_backbone(state, device=device, dtype=dtype, **config)
    metadata = {
        "converted_from": {
            "location": contents.origin.location,
            "layout": contents.origin.layout,
            "entry": contents.origin.entry,
            "ema": contents.origin.ema,
            "source": "DiT layout without s_embedder (SiT)" if dit_layout else cls.__name__,
            "convention": dataclasses.asdict(convention),
            "param": param_name(param),
            **notes,
        }
    }
    if args is not None:
        metadata["converted_from"]["sit_args"] = {
            k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None
        }
    model = loaded.model
    return ConvertedBackbone(
        model=model,
        convention=convention,
        path=make_path(convention.path),
        param=param,
        origin=contents.origin,
        metadata=metadata,
    )
