"""Shared test utilities: small deterministic networks with non-trivial outputs."""

import contextlib
import hashlib
import json

import jaxtyping
import torch
from torch import nn

from soflow_core.nets import MLPBackbone
from soflow_core.train.checkpoint import checkpoint_path


def random_mlp(
    dim: int = 3,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float64,
    width: int = 32,
    depth: int = 2,
) -> MLPBackbone:
    """An MLP whose zero-initialised output layer is randomised, so F_θ is not identically 0."""
    torch.manual_seed(seed)
    net = MLPBackbone(dim=dim, width=width, depth=depth, time_features=16, num_classes=num_classes, dropout=dropout)
    nn.init.normal_(net.output.weight, std=0.5)
    nn.init.normal_(net.output.bias, std=0.5)
    return net.to(dtype)


class ConvNet(nn.Module):
    """A tiny image backbone (b, c, h, w) -> same shape, conditioned on t and t - s."""

    def __init__(self, channels: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels + 2, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x, t, s, cond=None):
        b, _, h, w = x.shape
        tt = t.view(b, 1, 1, 1).expand(b, 1, h, w).to(x.dtype)
        gap = (t - s).view(b, 1, 1, 1).expand(b, 1, h, w).to(x.dtype)
        return self.conv2(torch.tanh(self.conv1(torch.cat([x, tt, gap], dim=1))))


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


@contextlib.contextmanager
def shape_checks_off():
    """Turn the test-time jaxtyping/beartype checks off for long loops (they already ran on earlier calls)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


class MaskRecorder(nn.Module):
    """A dropout backbone that records the mask each call draws."""

    def __init__(self, dim=3, p=0.5):
        super().__init__()
        self.net = random_mlp(dim)
        self.dropout = nn.Dropout(p)
        self.masks = []

    def forward(self, x, t, s, cond=None):
        keep = self.dropout(torch.ones_like(x)) != 0
        self.masks.append((torch.is_grad_enabled(), keep))
        return self.net(x, t, s, cond) * keep


def write_with_manifest(directory, step: int, obj: object) -> None:
    """A checkpoint whose manifest matches its bytes, whatever the bytes hold (what another writer could leave)."""
    path = checkpoint_path(directory, step)
    torch.save(obj, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {"format": "soflow-checkpoint-v1", "step": step, "file": path.name, "size": path.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps({**manifest, "sha256": digest}))
