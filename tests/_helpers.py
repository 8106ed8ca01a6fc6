"""Shared test utilities: small deterministic networks with non-trivial outputs."""

import contextlib
import faulthandler
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import jaxtyping
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from soflow_core.nets import MLPBackbone
from soflow_core.train import destroy_process_group
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


class RowByRow(nn.Module):
    """A batch-invariant backbone: ``net`` evaluated on one sample at a time.

    A batched matmul may round a sample's row differently depending on the batch around it
    (the BLAS picks blocking and threading from the shapes, and may take another path for
    another alignment). Each sample here goes through ``net`` alone, in a freshly allocated
    batch of one, so its output is a function of that sample only: two groupings of the same
    samples give bit-identical outputs.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, t, s, cond=None):
        rows = [
            self.net(*(None if v is None else v[i : i + 1].clone() for v in (x, t, s, cond))) for i in range(x.shape[0])
        ]
        return torch.cat(rows)


def summation_error_bound(terms: torch.Tensor, extra_roundings: int = 0) -> torch.Tensor:
    r"""Elementwise bound on the error of a floating-point sum of ``terms`` over dim 0, in any order.

    Every order of summing n terms (recursive, pairwise, blocked, split across calls and then
    added) has $|\hat S - S| \le \gamma_{n-1} \sum_i |x_i|$ with
    $\gamma_k = k u / (1 - k u)$, u the unit roundoff of the dtype (Higham, *Accuracy and
    Stability of Numerical Algorithms*, 2nd ed., §4.2). ``extra_roundings`` adds roundings that
    each term may carry beyond the additions.
    """
    k = terms.shape[0] - 1 + extra_roundings
    u = torch.finfo(terms.dtype).eps / 2
    return k * u / (1 - k * u) * terms.abs().sum(0)


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


def spawn_gloo_ranks(worker: Callable[..., None], *args: object, world: int, tmp_path: Path) -> None:
    """Run ``worker(rank, world, *args)`` in ``world`` processes, each joined to one gloo group.

    Two ways such a run used to fail at random, with ``mp.spawn`` reporting only the SIGTERM
    it then sends the other rank:

    * Rendezvous: a TCP port picked as free by the test and bound later by rank 0 can be taken
      in between (by another test run, or by gloo's own connections), and rank 0 dies with
      EADDRINUSE. The ranks meet through a file store in ``tmp_path`` instead; gloo still
      connects them over TCP, on ports it binds and holds itself.
    * Teardown: after an FSDP2 model has used the group, PyTorch's DTensor caches keep it alive
      past ``torch.distributed.destroy_process_group``, so gloo's threads were still running at
      interpreter shutdown, where a rank was seen to abort (SIGABRT, "terminate called without
      an active exception"). Each rank leaves through ``soflow_core.train.destroy_process_group``,
      which ends those threads first (``tests/test_process_group.py``).
    """
    store = tmp_path / "gloo_rendezvous"
    if store.exists():
        raise ValueError(f"tmp_path already holds a rendezvous file: {store}")
    mp.spawn(_gloo_rank, args=(world, str(store), worker, args), nprocs=world, join=True)


def _gloo_rank(rank: int, world: int, store: str, worker: Callable[..., None], args: tuple) -> None:
    faulthandler.enable(all_threads=True)  # a fatal signal in a rank prints every thread's Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)  # returns with the worker's models and optimizers released
        dist.barrier()  # every rank is done before any tears gloo down
    finally:
        destroy_process_group()


def write_with_manifest(directory, step: int, obj: object) -> None:
    """A checkpoint whose manifest matches its bytes, whatever the bytes hold (what another writer could leave)."""
    path = checkpoint_path(directory, step)
    torch.save(obj, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {"format": "soflow-checkpoint-v1", "step": step, "file": path.name, "size": path.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps({**manifest, "sha256": digest}))
