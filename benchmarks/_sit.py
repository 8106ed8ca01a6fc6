"""SiT, written from its published description, to make the source networks of a SiT → SoFlow conversion.

SiT (Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable
Interpolant Transformers"; github.com/willisma/SiT, ``models.py``, ``transport/``) is DiT's
transformer trained as a velocity model. What is reproduced here, independently of
``soflow_core.nets`` (the converter's tests and ``finetune_from_flow_matching.py`` build their
sources with it, so a mistake shared with the converter cannot hide):

* the network: parameter names and layouts of SiT's released weights (``x_embedder.proj``,
  ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table`` with the null class last,
  ``pos_embed``, ``blocks.<i>.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}``,
  ``final_layer.{linear, adaLN_modulation.1}``); time fed unscaled in [0, 1] to 256 sinusoids
  [cos, sin]; per-token outputs laid out (row, column, channel); with ``learn_sigma`` twice the
  channels, of which ``forward`` returns the first half;
* its convention: the linear path x_τ = τ·data + (1 − τ)·noise (data at τ = 1) with the velocity
  target data − noise, τ uniform on [0, 1];
* its training file ``{"model", "ema", "opt", "args"}`` with ``args`` an ``argparse.Namespace``.
"""

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["SiT", "save_sit_training_file", "sit_flow_matching_loss", "sit_time_features"]


def sit_time_features(t: Tensor, dim: int = 256) -> Tensor:
    """[cos(t·ω_i), sin(t·ω_i)] with ω_i = 10000^(−i/(dim/2)): SiT's ``timestep_embedding``."""
    half = dim // 2
    omega = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=t.dtype) / half)
    angles = t[:, None] * omega[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1.0 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Embedder(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sit_time_features(t.to(self.mlp[0].weight.dtype)))


class _Labels(nn.Module):
    def __init__(self, rows: int, hidden: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(rows, hidden)


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width // self.heads), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, width))


class _Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class _Final(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """SiT's network: v_SiT(x, τ, y), class-conditional, DiT's adaLN-Zero transformer.

    Args:
        input_size: Image side.
        patch_size: Patch side.
        in_channels: Image channels.
        hidden_size: Token width.
        depth: Blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP width over token width.
        class_dropout_prob: SiT's label dropout; > 0 adds the null row (index ``num_classes``).
        num_classes: Classes.
        learn_sigma: Twice the output channels, the first half returned (SiT's default).
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.class_dropout_prob = class_dropout_prob
        grid = input_size // patch_size
        self.x_embedder = _PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = _Embedder(hidden_size)
        self.y_embedder = _Labels(num_classes + int(class_dropout_prob > 0), hidden_size)
        self.pos_embed = nn.Parameter(self._positions(hidden_size, grid), requires_grad=False)
        self.blocks = nn.ModuleList(_Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = _Final(hidden_size, patch_size, self.out_channels)
        # SiT's initialisation: xavier linears, N(0, 0.02) time MLP and labels, adaLN and output at zero.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @staticmethod
    def _positions(hidden: int, grid: int) -> Tensor:
        """MAE's 2-D sin-cos table: half the channels for the column, half for the row; each [sin, cos]."""
        quarter = hidden // 4
        omega = 1.0 / 10_000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
        rows, cols = torch.meshgrid(
            torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
        )
        parts = []
        for coordinate in (cols.reshape(-1), rows.reshape(-1)):
            angles = coordinate[:, None] * omega[None, :]
            parts += [torch.sin(angles), torch.cos(angles)]
        return torch.cat(parts, dim=1)[None].float()

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """v_SiT(x, τ, y): ``y`` holds class labels, ``num_classes`` being the null class."""
        b, _, side, _ = x.shape
        p, grid = self.patch_size, side // self.patch_size
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c).reshape(b, grid, grid, p, p, self.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", h).reshape(b, self.out_channels, side, side)
        return out[:, : self.in_channels] if self.learn_sigma else out


def sit_flow_matching_loss(
    model: nn.Module, data: Tensor, labels: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """SiT's velocity loss on the linear path: mean ‖v_SiT(x_τ, τ, y) − (data − noise)‖², τ ~ U[0, 1].

    Labels are dropped to the null class with the model's ``class_dropout_prob`` (drawn from
    ``generator``), as SiT's label embedder does in training.
    """
    b = data.shape[0]
    tau = torch.rand(b, generator=generator, dtype=data.dtype)
    noise = torch.randn(data.shape, generator=generator, dtype=data.dtype)
    drop = torch.rand(b, generator=generator) < model.class_dropout_prob
    labels = torch.where(drop, torch.full_like(labels, model.num_classes), labels)
    shape = (b,) + (1,) * (data.ndim - 1)
    x_tau = tau.view(shape) * data + (1.0 - tau.view(shape)) * noise
    return ((model(x_tau, tau, labels) - (data - noise)) ** 2).mean()


def save_sit_training_file(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    model_name: str,
    num_classes: int,
    image_size: int,
    path_type: str = "Linear",
    prediction: str = "velocity",
) -> Path:
    """Write ``{"model", "ema", "opt", "args"}`` as SiT's ``train.py`` does (``args`` an argparse.Namespace)."""
    args = argparse.Namespace(
        model=model_name,
        image_size=image_size,
        num_classes=num_classes,
        path_type=path_type,
        prediction=prediction,
        loss_weight=None,
        sample_eps=None,
        train_eps=None,
        global_batch_size=256,
        epochs=1400,
        cfg_scale=4.0,
    )
    payload = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(), "args": args}
    torch.save(payload, path)
    return Path(path)
