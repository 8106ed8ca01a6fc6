"""Loop glue shared by the training examples: CLI, distributed setup, checkpoints, logging, sample grids.

Not library code: what a user would reuse in their own loop (EMA, checkpoints, the batch
order) lives in ``soflow_core``; this module wires it into the two reference trainers.

Randomness is counter-based: micro-batch m of optimizer step k draws everything (latent noise,
augmentation, times, noise, label drops, dropout) from seeds derived from (seed, k, m), and
micro-batch m always holds the same samples whatever the number of ranks. A run is therefore
reproducible bit for bit, resumes exactly from a checkpoint, and gives the same update on
N ranks as on one rank with N accumulation steps (up to the order of floating-point sums).
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from soflow_core import SoFlowObjective
from soflow_core.nets import DIT_SIZES, DiT, SongUNet
from soflow_core.nets.dit import DiTSize
from soflow_core.seeding import derive_seed, micro_batch_index, seeded_generator
from soflow_core.train import EpochStream
from soflow_core.train.checkpoint import (
    capture_rng_state,
    latest_valid_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from soflow_core.train.ema import EMA
from soflow_core.train.step import make_training_step

# Sizes beyond soflow_core's DIT_SIZES (which has S/4 and S/2 for small CIFAR-10 transformers), for smoke runs.
EXTRA_DIT_SIZES: dict[str, DiTSize] = {
    "DiT-tiny/4": DiTSize(patch_size=4, hidden_size=64, depth=2, num_heads=2),
    "DiT-tiny/2": DiTSize(patch_size=2, hidden_size=32, depth=2, num_heads=2),
}
ALL_DIT_SIZES: dict[str, DiTSize] = {**DIT_SIZES, **EXTRA_DIT_SIZES}

# Baked-in guidance scale ω per size (spec §11.2: B/4 from imagenet.yaml; the others are
# reported by the paper text and not confirmed against the released per-model configs).
GUIDANCE_SCALE = {"DiT-B/4": 3.0, "DiT-B/2": 2.5, "DiT-M/2": 2.25, "DiT-L/2": 2.0, "DiT-XL/2": 2.0}
# Planned run length K per size: 80 epochs for B/4, 240 epochs (1.2 M steps at batch 256) for the rest.
TOTAL_STEPS = {"DiT-B/4": 400_000, "DiT-B/2": 1_200_000, "DiT-M/2": 1_200_000, "DiT-L/2": 1_200_000}
TOTAL_STEPS["DiT-XL/2"] = 1_200_000


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Fields shared by both trainers (each trainer adds its own)."""

    out: str = "runs/run"  # run folder: config.json, metrics.jsonl, checkpoints/, samples/
    data: str | None = None  # dataset path (see the trainer's docstring)
    synthetic: bool = False  # generated data of the right shape instead of --data
    synthetic_size: int = 4096  # samples in the synthetic dataset
    total_steps: int = 400_000  # K, the planned number of optimizer steps (drives r(k, K))
    max_steps: int = 0  # stop this invocation after this many steps (0: run to total_steps)
    batch_size: int = 256  # global batch = per-rank batch × world size × grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4
    seed: int = 42
    ema_decay: float = 0.9999
    ema_every: int = 1  # EMA period n (1: every step; 16: the CIFAR-10 rule)
    ema_float64: bool = False  # keep the EMA in float64
    ckpt_every: int = 25_000  # checkpoint period in steps (and at the end)
    keep: int = 3  # checkpoints kept
    log_every: int = 100  # metrics.jsonl / progress-bar period in steps
    sample_every: int = 25_000  # sample-grid period in steps (0: only at the end)
    sample_grid: int = 64  # images in the sample grid
    precision: str = "fp32"  # "fp32" or "bf16" (autocast of the network)
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA (the reference setting)
    compile: bool = False  # torch.compile the whole step: loss + backward in one graph, the optimizer in another
    compile_mode: str = ""  # torch.compile mode ("" default, "reduce-overhead" for CUDA graphs, "max-autotune")
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" checks tracing without codegen)
    fsdp: bool = False  # FSDP2 (fully_shard per block) instead of DDP
    tensorboard: bool = False  # also write TensorBoard scalars to <out>/tb
    device: str = "auto"  # "auto", "cpu" or "cuda"
    progress: bool = True  # tqdm progress bar on rank 0


# ----------------------------------------------------------------------------- command line


def _field_type(annotation: Any) -> type:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def parse_config(
    config_cls: type, presets: dict[str, Any], argv: list[str] | None, description: str, default_preset: str
) -> Any:
    """Build a frozen config from a preset plus ``--field value`` overrides for every field."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset, help="base configuration")
    for f in dataclasses.fields(config_cls):
        kind = _field_type(f.type)
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=kind, default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    config = dataclasses.replace(presets[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    problems = check_common(config)
    if problems:
        parser.error("; ".join(problems))
    return config, parser


def check_common(config: TrainConfig) -> list[str]:
    problems = []
    for name in ("total_steps", "batch_size", "grad_accum", "ckpt_every", "keep", "log_every", "sample_grid"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}")
    if config.precision not in ("fp32", "bf16"):
        problems.append(f"--precision must be fp32 or bf16; got {config.precision!r}")
    if config.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device must be auto, cpu or cuda; got {config.device!r}")
    if not 0.0 <= config.ema_decay < 1.0:
        problems.append(f"--ema-decay must lie in [0, 1); got {config.ema_decay}")
    return problems


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world size, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


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
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


# ----------------------------------------------------------------------------- networks


def build_dit(name: str, *, in_channels: int, input_size: int, num_classes: int | None, **kwargs: Any) -> DiT:
    if name not in ALL_DIT_SIZES:
        raise ValueError(f"unknown DiT size {name!r}; choose one of {', '.join(ALL_DIT_SIZES)}")
    size = ALL_DIT_SIZES[name]
    return DiT(
        input_size=input_size,
        in_channels=in_channels,
        patch_size=size.patch_size,
        hidden_size=size.hidden_size,
        depth=size.depth,
        num_heads=size.num_heads,
        num_classes=num_classes,
        null_class=bool(num_classes),
        **kwargs,
    )


def build_net(config: dict[str, Any]) -> nn.Module:
    """The network a run's config describes (``config["task"]`` is "imagenet" or "cifar10")."""
    if config["task"] == "imagenet":
        return build_dit(
            config["model"],
            in_channels=4,
            input_size=32,
            num_classes=config["num_classes"],
            gradient_checkpointing=config.get("gradient_checkpointing", False),
        )
    if config["net"] == "unet":
        return SongUNet(
            img_resolution=32,
            in_channels=3,
            augment_dim=6 if config["augment"] else 0,
            model_channels=config["model_channels"],
            channel_mult=[int(c) for c in config["channel_mult"].split(",")],
            num_blocks=config["num_blocks"],
            attn_resolutions=[16],
            dropout=config["dropout"],
        )
    return build_dit(config["net"], in_channels=3, input_size=32, num_classes=None)


def shard_targets(net: nn.Module) -> list[nn.Module]:
    """The submodules FSDP2 shards one by one (transformer blocks / UNet blocks), before the root."""
    if isinstance(net, DiT):
        return list(net.blocks)
    if isinstance(net, SongUNet):
        return [m for m in net.modules() if type(m).__name__ == "_UNetBlock"]
    return []


class TrainingBackbone(nn.Module):
    """F_θ(x, t, s, cond) as the objective calls it: autocast inside, float32 out; cond → augment labels."""

    def __init__(self, net: nn.Module, *, precision: str, device_type: str, augment_labels: bool) -> None:
        super().__init__()
        self.net = net
        self.precision = precision
        self.device_type = device_type
        self.augment_labels = augment_labels

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None) -> Tensor:
        context = (
            torch.autocast(self.device_type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        with context:
            out = self.net(x, t, s, augment_labels=cond) if self.augment_labels else self.net(x, t, s, cond)
        return out.to(x.dtype)


# ----------------------------------------------------------------------------- state dicts


def _state_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(net: nn.Module, fsdp: bool) -> dict[str, Tensor]:
    """The full, unwrapped model state dict on CPU (a collective under FSDP; empty off rank 0)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(net, options=_state_options(cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(net, optimizer, options=_state_options(cpu_offload=True))
    return optimizer.state_dict()


def load_states(
    net: nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any], fsdp: bool, device: torch.device
) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(net, payload["model"], options=_state_options())
        set_optimizer_state_dict(net, optimizer, optim_state_dict=payload["optimizer"], options=_state_options())
    else:
        net.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])


# ----------------------------------------------------------------------------- images


def save_grid(images: Tensor | np.ndarray, path: Path, columns: int | None = None) -> None:
    """Tile uint8 NHWC images into one PNG."""
    from PIL import Image

    array = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    n, h, w, c = array.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = array[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def latent_preview(z: Tensor) -> Tensor:
    """The first three latent channels as uint8 NHWC pixels (a look at latents without a VAE)."""
    from soflow_core.train.latents import to_uint8_images

    return to_uint8_images((z[:, :3].float() / 2.0).clamp(-1, 1))


# ----------------------------------------------------------------------------- the loop


@dataclass
class Task:
    """What a trainer plugs into the shared loop."""

    config: TrainConfig
    config_dict: dict[str, Any]  # the resolved config, with "task" and derived fields
    net: nn.Module  # the unwrapped network (on the device)
    objective: SoFlowObjective
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    num_samples: int
    # (indices, generator, device) -> (data, cond) for one micro-batch
    load_batch: Callable[[np.ndarray, torch.Generator, torch.device], tuple[Tensor, Tensor | None]]
    # (eval network, count, generator) -> uint8 NHWC images for the sample grid
    sample_images: Callable[[nn.Module, int, torch.Generator], Tensor]
    read_indices: Callable[[np.ndarray], Any] | None = None  # host-side read, prefetched on a thread
    augment_labels: bool = False


def run_dir_setup(runtime: Runtime, config_dict: dict[str, Any], out: Path) -> None:
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    barrier(runtime)


class MetricsWriter:
    """metrics.jsonl (and TensorBoard) on rank 0."""

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.file = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _prefetching(read: Callable[[np.ndarray], Any], index_lists: Iterator[np.ndarray]) -> Iterator[Any]:
    """Read the next micro-batch on a thread while the current one trains."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for indices in index_lists:
            future = pool.submit(read, indices)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def train(task: Task, runtime: Runtime) -> dict[str, Any]:
    """Run (or resume) the loop; returns a summary on rank 0."""
    config = task.config
    out = Path(config.out)
    ckpt_dir = out / "checkpoints"
    device = runtime.device
    world, accum = runtime.world_size, config.grad_accum
    if config.batch_size % (world * accum):
        raise SystemExit(
            f"--batch-size {config.batch_size} must be divisible by world size × --grad-accum = {world} × {accum}"
        )
    micro = config.batch_size // (world * accum)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32

    net = task.net
    if config.fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in shard_targets(net):
            fully_shard(module)
        fully_shard(net)
    backbone: nn.Module = TrainingBackbone(
        net, precision=config.precision, device_type=device.type, augment_labels=task.augment_labels
    )
    ddp = None
    if runtime.distributed and not config.fsdp:
        ddp = torch.nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None
        )
        backbone = ddp
    optimizer = task.make_optimizer(list(net.parameters()))
    # Under DDP/FSDP2 the step compiles with graph breaks around the wrapper's calls (dynamo traces
    # neither) and a backward through autograd, where their gradient hooks run.
    step_fn = make_training_step(
        task.objective,
        backbone,
        optimizer,
        accumulation_steps=accum,
        compile=config.compile,
        mode=config.compile_mode or None,
        backend=config.compile_backend,
    )
    ema = EMA(net, decay=config.ema_decay, every=config.ema_every, dtype=torch.float64 if config.ema_float64 else None)
    stream = EpochStream(num_samples=task.num_samples, seed=config.seed)

    # Resume from the newest valid checkpoint (rank 0 verifies and picks; every rank loads it).
    start_step, position = 0, 0
    chosen = latest_valid_checkpoint(ckpt_dir) if runtime.is_main else None
    chosen = broadcast_object(runtime, str(chosen) if chosen else None)
    if chosen is not None:
        payload = load_checkpoint(chosen, map_location="cpu", verify=False)
        if payload.get("parallel", "ddp") != ("fsdp" if config.fsdp else "ddp"):
            raise SystemExit(f"{chosen} was written with parallel={payload.get('parallel')}; pass the same --fsdp")
        load_states(net, optimizer, payload, config.fsdp, device)
        ema.load_state_dict(payload["ema"])
        start_step, position = int(payload["step"]), int(payload["data"]["position"])
        rng = payload["rng"]
        restore_rng_state(rng[runtime.rank] if len(rng) == world else rng[0])
        changed = {
            k: (v, task.config_dict.get(k))
            for k, v in payload["config"].items()
            if task.config_dict.get(k) != v and k not in ("max_steps", "out", "progress")
        }
        if runtime.is_main:
            print(f"resuming from {chosen} at step {start_step}", flush=True)
            if changed:
                warnings.warn(f"config differs from the checkpoint's (saved, now): {changed}", stacklevel=1)
        del payload

    eval_net = None
    if runtime.is_main:
        eval_net = build_net(task.config_dict).to(device) if config.fsdp else copy.deepcopy(net)
        eval_net.eval().requires_grad_(False)

    writer = MetricsWriter(out, config.tensorboard) if runtime.is_main else None
    end_step = config.total_steps if not config.max_steps else min(config.total_steps, start_step + config.max_steps)
    bar = None
    if runtime.is_main and config.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.total_steps, initial=start_step, dynamic_ncols=True, file=sys.stdout)

    def save(step: int) -> None:
        state = {
            "step": step,
            "model": model_state(net, config.fsdp),
            "ema": ema.state_dict(full=True),
            "optimizer": optimizer_state(net, optimizer, config.fsdp),
            "config": task.config_dict,
            "rng": all_gather_object(runtime, capture_rng_state()),
            "data": {"position": position, "seed": config.seed, "num_samples": task.num_samples},
            "parallel": "fsdp" if config.fsdp else "ddp",
            "world_size": world,
            "torch": str(torch.__version__),
        }
        if runtime.is_main:
            save_checkpoint(ckpt_dir, step, state, keep=config.keep)
        barrier(runtime)

    def grid(step: int) -> None:
        if config.fsdp:
            full = ema.state_dict(full=True)
            if eval_net is not None:
                eval_net.load_state_dict(full)
        elif eval_net is not None:
            ema.copy_to(eval_net)
        if eval_net is not None:
            images = task.sample_images(eval_net, config.sample_grid, seeded_generator(config.seed, 1, 0))
            save_grid(images, out / "samples" / f"step-{step:09d}.png")

    def index_lists(first: int) -> Iterator[np.ndarray]:
        for k in range(end_step - start_step):
            for j in range(accum):
                yield stream.micro_batch(
                    position=first + k * config.batch_size,
                    micro_batch_size=micro,
                    micro_step=j,
                    rank=runtime.rank,
                    world_size=world,
                )

    reads = _prefetching(task.read_indices, index_lists(position)) if task.read_indices else None

    tic, images_seen, last, logged_steps = time.perf_counter(), 0, {}, 0
    sums: dict[str, Tensor] = {}
    for step in range(start_step, end_step):
        for j in range(accum):
            m = micro_batch_index(j, runtime.rank, world)
            indices = stream.micro_batch(
                position=position, micro_batch_size=micro, micro_step=j, rank=runtime.rank, world_size=world
            )
            generator = seeded_generator(config.seed, step, m, 0, device=device)
            torch.manual_seed(derive_seed(config.seed, step, m, 1))  # dropout masks
            raw = next(reads) if reads is not None else indices
            data, cond = task.load_batch(raw, generator, device)
            final = j == accum - 1
            if ddp is not None and not final:
                sync = ddp.no_sync()
            else:
                sync = contextlib.nullcontext()
                if config.fsdp:
                    net.set_requires_gradient_sync(final)
            # The draws run eagerly from the explicit generator; the step itself may be compiled.
            batch = task.objective.sample_batch(
                data, cond, step=step, total_steps=config.total_steps, generator=generator
            )
            with sync:
                metrics = step_fn.accumulate(batch)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
        step_fn.update()
        ema.update(net, step=step)
        position += config.batch_size
        done = step + 1
        images_seen += config.batch_size
        logged_steps += 1

        if done % config.log_every == 0 or done == end_step:
            keys = sorted(sums)
            stacked = torch.stack([sums[k] for k in keys]) / logged_steps
            if runtime.distributed:
                dist.all_reduce(stacked)
                stacked /= world
            values = {k: float(v) for k, v in zip(keys, stacked.cpu().tolist())}
            if not values.get("finite", 1.0) == 1.0:
                raise FloatingPointError(f"non-finite loss at step {done}: {values}")
            elapsed = time.perf_counter() - tic
            values["images_per_s"] = images_seen / max(elapsed, 1e-9)
            values["lr"] = optimizer.param_groups[0]["lr"]
            if device.type == "cuda":
                values["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if writer is not None:
                writer.write(done, values)
            if bar is not None:
                bar.set_postfix(
                    {k: f"{values[k]:.4g}" for k in ("fm_loss", "consistency_loss", "images_per_s") if k in values}
                )
            last = values
            tic, images_seen, logged_steps, sums = time.perf_counter(), 0, 0, {}
        if bar is not None:
            bar.update(1)
        if done % config.ckpt_every == 0 or done == end_step:
            save(done)
        if (config.sample_every and done % config.sample_every == 0) or done == end_step:
            grid(done)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    return {"steps_done": end_step, "last": last}


def missing_data(message: str) -> None:
    """Say what data is needed and where, then exit non-zero."""
    print(message, file=sys.stderr)
    raise SystemExit(2)
