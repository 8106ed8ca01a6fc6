"""Where a trainer's process runs: one process, or a rank of a torchrun job (NCCL on GPU, gloo on CPU).

``distributed_runtime`` joins the process group for the duration of a script and leaves it at
the end; ``Runtime`` says who this process is. The helpers (``barrier``, ``broadcast_object``,
``all_gather_object``) do nothing with one process, so the loop reads the same either way.
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from soflow_core.train import destroy_process_group


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world size, device; ``control`` is a gloo group for host-side agreement."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: Any = None  # a gloo process group (CPU tensors, no device sync) when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def cuda_missing() -> str:
    """Why --device cuda cannot run here."""
    if not torch.backends.cuda.is_built():
        return f"--device cuda: this PyTorch ({torch.__version__}) is built without CUDA; use --device cpu"
    return "--device cuda: no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver); use --device cpu"


@contextlib.contextmanager
def distributed_runtime(device: str) -> Iterator[Runtime]:
    """The process's runtime for the duration of a script; the process group is left at the end."""
    runtime = init_runtime(device)
    try:
        yield runtime
    finally:
        shutdown(runtime)


def init_runtime(device: str) -> Runtime:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU) or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(cuda_missing())
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    control = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        control = dist.new_group(backend="gloo")
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=dev, control=control)


def shutdown(runtime: Runtime) -> None:
    """Leave the process group; the script's model and optimizer are already released (``run`` returned)."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        destroy_process_group()  # ends gloo's worker threads before Python shuts down


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def broadcast_object(runtime: Runtime, value: Any) -> Any:
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(runtime: Runtime, value: Any) -> list[Any]:
    if not runtime.distributed:
        return [value]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, value)
    return out
