"""Loop glue shared by the training examples: CLI, distributed setup, checkpoints, logging, sample grids.

Not library code: what a user would reuse in their own loop (EMA, checkpoints, the batch
order) lives in ``soflow_core``; this module wires it into the two reference trainers.

Randomness is counter-based: micro-batch m of optimizer step k draws everything (latent noise,
augmentation, times, noise, label drops, dropout) from seeds derived from (seed, k, m), and
micro-batch m always holds the same samples whatever the number of ranks. A run is therefore
reproducible bit for bit, resumes exactly from a checkpoint, and gives the same update on
N ranks as on one rank with N accumulation steps (up to the order of floating-point sums).

What a run guarantees, whatever happens to it (see docs/examples.md, "What a run guarantees"):

* the run folder is locked by the process that trains in it (``RunFolder``); a second trainer
  refuses, naming the holder; the lock dies with its process;
* nothing non-finite is saved: every step folds "was this step finite" into a device-side flag
  (no host sync), read at log steps and before every save together with a check of the whole
  state; a non-finite step stops the run with a ``non_finite`` event in metrics.jsonl and the
  last finite checkpoint untouched;
* SIGTERM and SIGINT write a checkpoint at the next step boundary and exit with 128 + signal;
* a resume applies changed settings consistently or refuses them (``APPLIED_ON_RESUME``,
  ``IGNORED_ON_RESUME``), before anything is written.
"""

import contextlib
import copy
import datetime
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from _cli import config_parser, optional_import, resolve_config
from torch import Tensor, nn

from soflow_core import SoFlowObjective, step_generator
from soflow_core._files import atomic_save, atomic_write
from soflow_core.nets import DIT_SIZES, DiT, SongUNet, load_weights, read_state_dict
from soflow_core.nets.dit import DiTSize
from soflow_core.parameterizations import param_name
from soflow_core.paths import path_name
from soflow_core.seeding import seeded_generator
from soflow_core.train import EpochStream, destroy_process_group
from soflow_core.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    latest_loadable_checkpoint,
    list_checkpoints,
    load_checkpoint,
    non_finite_entries,
    remove_stale_temporaries,
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

# Baked-in guidance scale ω per size (B/4 from the official imagenet.yaml; the others are
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
    init: str | None = None  # fine-tune from: a pretrained folder, an official SoFlow file, a state dict, a run
    synthetic: bool = False  # generated data of the right shape instead of --data
    synthetic_size: int = 4096  # samples in the synthetic dataset
    total_steps: int = 400_000  # K, the planned number of optimizer steps (drives r(k, K))
    max_steps: int = 0  # stop this invocation after this many steps (0: run to total_steps)
    batch_size: int = 256  # global batch = per-rank batch × world size × grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4  # learning rate (constant, no warm-up or decay)
    seed: int = 42  # seed of the initial weights and of every per-step draw
    ema_decay: float = 0.9999  # EMA decay per EMA update (the paper's rule: constant)
    ema_every: int = 1  # EMA period n (1: every step; 16: the CIFAR-10 rule)
    ema_float64: bool = False  # keep the EMA in float64
    # cap the EMA's kept weight by (1 + u)/(10 + u) at update u (diffusers' EMAModel rule), so the sample grids of a
    # short run show what it learned; the paper's rule has no warm-up
    ema_warmup: bool = False
    ckpt_every: int = 25_000  # checkpoint period in steps (and at the end)
    keep: int = 3  # checkpoints kept
    log_every: int = 100  # metrics.jsonl / progress-bar period in steps
    sample_every: int = 25_000  # sample-grid period in steps (0: only at the end)
    sample_grid: int = 64  # images in the sample grid
    precision: Literal["fp32", "bf16"] = "fp32"  # autocast of the network
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA (the reference setting)
    compile: bool = False  # torch.compile the whole step: loss + backward in one graph, the optimizer in another
    # torch.compile mode ("": torch's default; "reduce-overhead": CUDA graphs)
    compile_mode: Literal["", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = ""
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" checks tracing without codegen)
    fsdp: bool = False  # FSDP2 (fully_shard per block) instead of DDP
    tensorboard: bool = False  # also write TensorBoard scalars to <out>/tb
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where to train ("auto": CUDA when visible)
    progress: bool = True  # tqdm progress bar on rank 0


# ----------------------------------------------------------------------------- command line


def parse_config(
    config_cls: type,
    presets: dict[str, Any],
    argv: list[str] | None,
    description: str,
    default_preset: str,
    presets_help: dict[str, str] | None = None,
) -> Any:
    """Build a frozen config from a preset plus ``--field value`` overrides for every field (see ``_cli``)."""
    parser = config_parser(description, config_cls, presets, default_preset, presets_help=presets_help)
    config = resolve_config(parser.parse_args(argv), config_cls, presets)
    # the optional packages this run will need, checked before anything starts
    optional_import("PIL.Image", "writing the sample grids")
    if config.progress:
        optional_import("tqdm", "the progress bar (or pass --no-progress)")
    if config.tensorboard:
        optional_import("torch.utils.tensorboard", "--tensorboard")
    problems = check_common(config)
    if problems:
        parser.error("; ".join(problems))
    return config, parser


def check_common(config: TrainConfig) -> list[str]:
    """Every problem with the shared fields, found before anything is created or loaded."""
    problems = []
    for name in ("total_steps", "batch_size", "grad_accum", "ckpt_every", "keep", "log_every", "sample_grid"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}")
    for name in ("ema_every", "synthetic_size"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}")
    for name in ("max_steps", "sample_every", "seed"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0; got {getattr(config, name)}")
    if not (math.isfinite(config.lr) and config.lr >= 0):
        problems.append(f"--lr must be a finite number >= 0; got {config.lr}")
    if config.precision not in ("fp32", "bf16"):
        problems.append(f"--precision must be fp32 or bf16; got {config.precision!r}")
    if config.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device must be auto, cpu or cuda; got {config.device!r}")
    elif config.device == "cuda" and not torch.cuda.is_available():
        problems.append(cuda_missing())
    if not 0.0 <= config.ema_decay < 1.0:
        problems.append(f"--ema-decay must lie in [0, 1); got {config.ema_decay}")
    if config.init is not None and not Path(config.init).exists():
        problems.append(f"--init {config.init} does not exist")
    problems += run_folder_problems(Path(config.out))
    return problems


def cuda_missing() -> str:
    """Why --device cuda cannot run here."""
    if not torch.backends.cuda.is_built():
        return f"--device cuda: this PyTorch ({torch.__version__}) is built without CUDA; use --device cpu"
    return "--device cuda: no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver); use --device cpu"


# ----------------------------------------------------------------------------- distributed


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

    @property
    def num_classes(self) -> int | None:
        """The network's class count, so that the objective checks labels against it before any call."""
        return None if self.augment_labels else getattr(self.net, "num_classes", None)

    @property
    def null_class(self) -> bool:
        """Whether the network has the null class (index ``num_classes``)."""
        return bool(getattr(self.net, "null_class", True))


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
    Image = optional_import("PIL.Image", "writing the sample grids")

    array = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    n, h, w, c = array.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = array[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))


def latent_preview(z: Tensor) -> Tensor:
    """The first three latent channels as uint8 NHWC pixels (a look at latents without a VAE)."""
    from soflow_core.train.latents import to_uint8_images

    return to_uint8_images((z[:, :3].float() / 2.0).clamp(-1, 1))


# ----------------------------------------------------------------------------- run checkpoints

RUN_ENTRIES = ("step", "model", "ema", "optimizer", "config", "rng", "data")
# The files a run writes whole through temporary files (see remove_stale_temporaries), by folder.
WHOLE_FILES = {".": (r"config\.json", r"metrics\.jsonl"), "samples": (r"step-\d{9,}\.png",)}


def check_run_payload(path: Path, payload: dict[str, Any]) -> None:
    """Raise CheckpointError unless ``payload`` is a complete checkpoint of these trainers with finite state.

    A checkpoint that fails here is reported and skipped like a damaged one: its manifest may
    match, but it cannot resume a run (another writer's file, a truncated dict, or non-finite
    weights written by an older version of these trainers).
    """
    missing = [key for key in RUN_ENTRIES if key not in payload]
    if missing:
        raise CheckpointError(path, f"not a checkpoint of these trainers: no {', '.join(map(repr, missing))} entry")
    kinds = {"model": Mapping, "ema": Mapping, "optimizer": Mapping, "config": Mapping, "data": Mapping, "rng": list}
    wrong = [f"{k!r} is a {type(payload[k]).__name__}" for k, kind in kinds.items() if not isinstance(payload[k], kind)]
    if not isinstance(payload["step"], int) or payload["step"] < 0:
        wrong.append(f"'step' is {payload['step']!r}")
    if isinstance(payload["data"], Mapping) and not isinstance(payload["data"].get("position"), int):
        wrong.append("'data' has no integer 'position'")
    if isinstance(payload["rng"], list) and not payload["rng"]:
        wrong.append("'rng' is empty")
    if wrong:
        raise CheckpointError(path, f"malformed checkpoint of these trainers: {'; '.join(wrong)}")
    bad = non_finite_entries({key: payload[key] for key in ("model", "ema", "optimizer")})
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(path, f"non-finite values in {', '.join(bad[:3])}{more}")


def load_run_checkpoint(source: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest usable checkpoint of the run that ``source`` names, with its payload; None if it names no run.

    A run folder gives its newest checkpoint (in ``checkpoints/`` or the folder itself) that
    verifies against its manifest, loads with ``weights_only`` and passes ``check_run_payload``;
    every one skipped is reported. A ``step-*.pt`` file with its manifest is loaded and checked
    as it is. Raises SystemExit when nothing usable is found.
    """
    if source.is_file():
        if not (source.name.startswith("step-") and source.with_suffix(".json").is_file()):
            return None
        try:
            payload = load_checkpoint(source)
            check_run_payload(source, payload)
        except CheckpointError as error:
            raise SystemExit(str(error)) from error
        return source, payload
    if not source.is_dir() or not ((source / "checkpoints").is_dir() or list_checkpoints(source)):
        return None
    for folder in (source / "checkpoints", source):
        found = latest_loadable_checkpoint(folder, check=check_run_payload)
        if found is not None:
            return found
    raise SystemExit(f"no usable checkpoint in {source} (looked in {source / 'checkpoints'} and {source})")


def initialize_from(net: nn.Module, source: str, objective: SoFlowObjective) -> str:
    """Load ``--init`` weights into ``net`` (EMA weights when the source has them); returns what was loaded.

    ``source`` is a run of these trainers (its newest usable checkpoint, verified), a pretrained
    folder, an official SoFlow training file, a state dict or a .safetensors file. Every key and
    shape is checked first; a mismatch names the network the weights would fit.
    """
    run = load_run_checkpoint(Path(source))
    try:
        if run is not None:
            report = load_weights(net, run[1])
            return f"run checkpoint {run[0]}, entry {report.origin.entry!r}"
        contents = read_state_dict(source)
        saved = (contents.pretrained or {}).get("sampling", {})
        ours = {"path": path_name(objective.path), "param": param_name(objective.param)}
        if any(k in ours and v != ours[k] for k, v in saved.items()):
            warnings.warn(f"{source} was saved for sampling with {saved}; this objective trains {ours}", stacklevel=1)
        return str(load_weights(net, contents).origin)
    except ValueError as error:
        raise SystemExit(f"--init {source} cannot start this run: {error}") from error


# ----------------------------------------------------------------------------- resuming with other settings

# What a resumed run does with a setting that differs from the checkpoint's. APPLIED: the new
# value holds from the resumed step on, is written to config.json and to later checkpoints, and
# reaches the restored state (optimizer hyperparameters such as --lr and --beta2 are written into
# the restored optimizer). IGNORED: only meaningful for a fresh run; the run keeps its recorded
# value. Every other setting (the network, the objective, the data, the seed, the global batch,
# the EMA rule) must match: a resume with another value is refused before anything is written.
APPLIED_ON_RESUME = frozenset(
    {
        "out", "data", "max_steps", "total_steps", "grad_accum", "lr", "beta2", "ckpt_every", "keep", "log_every",
        "sample_every", "sample_grid", "precision", "tf32", "compile", "tensorboard", "device", "progress", "vae",
        "gradient_checkpointing", "backend",
    }
)  # fmt: skip
IGNORED_ON_RESUME = frozenset({"init"})


@dataclass(frozen=True)
class ResumePlan:
    """What rank 0 decided about the start: the checkpoint to resume (or None), the config to record, why not."""

    checkpoint: str | None
    config: dict[str, Any]  # what config.json and later checkpoints record
    applied: dict[str, tuple[Any, Any]]  # setting: (the checkpoint's value, the value now used)
    refusal: str | None = None


def plan_resume(task: "Task", saved: Mapping[str, Any], path: Path, payload: Mapping[str, Any]) -> ResumePlan:
    """Compare the checkpoint's settings with the command line's, per ``APPLIED_ON_RESUME``/``IGNORED_ON_RESUME``."""
    now = task.config_dict
    applied, ignored, refused = {}, {}, {}
    for key in sorted(set(saved) & set(now)):  # a key only one side knows comes from another version
        if saved[key] == now[key]:
            continue
        kind = applied if key in APPLIED_ON_RESUME else ignored if key in IGNORED_ON_RESUME else refused
        kind[key] = (saved[key], now[key])
    problems = [f"--{key.replace('_', '-')} {new!r} (the run has {old!r})" for key, (old, new) in refused.items()]
    data = payload["data"]
    if data.get("num_samples") not in (None, task.num_samples):
        problems.append(f"a data set of {task.num_samples} samples (the run has {data.get('num_samples')})")
    parallel = "fsdp" if task.config.fsdp else "ddp"
    if payload.get("parallel", "ddp") != parallel:
        problems.append(f"--{'no-' if parallel == 'ddp' else ''}fsdp (the run was written with {payload['parallel']})")
    record = {**now, **{key: old for key, (old, _) in ignored.items()}}
    if ignored:
        warnings.warn(f"{', '.join(ignored)} only apply to a fresh run; resuming {path} ignores them", stacklevel=2)
    refusal = None
    if problems:
        refusal = (
            f"cannot resume {path} with {'; '.join(problems)}: these settings must match the run's. Pass the run's "
            "values, or start a new run in another --out (with --init to start from this run's weights)"
        )
    return ResumePlan(checkpoint=str(path), config=record, applied=applied, refusal=refusal)


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, wanted: list[dict[str, Any]]) -> None:
    """Write the command line's hyperparameters (lr, betas, ...) into the param groups of a restored optimizer."""
    for group, settings in zip(optimizer.param_groups, wanted):
        group.update(settings)


# ----------------------------------------------------------------------------- the run folder


class RunFolder:
    """The run folder: checked, created and locked (an exclusive ``flock`` on ``<out>/.lock``) for one trainer.

    The lock is held for the whole run by rank 0 and released by the kernel when the process
    dies, so a lock left by a killed trainer is stale by construction: the next trainer takes it
    over (and says whose it was). ``.lock`` holds the holder's pid, host, start time and command
    while it runs. A start that fails before training begins removes the folders it created.
    """

    LOCK = ".lock"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created: Path | None = None  # the topmost folder this start created
        self.started = False
        self._fd: int | None = None

    def open(self) -> None:
        """Create the folder if needed and lock it; SystemExit naming the holder if another trainer has it."""
        problems = run_folder_problems(self.path)
        if problems:
            raise SystemExit("; ".join(problems))
        top = self.path
        while not top.parent.exists():
            top = top.parent
        if not self.path.exists():
            self.created = top
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            warnings.warn(f"cannot lock {self.path} on this platform: make sure no other trainer uses it", stacklevel=2)
            return
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1 << 16).decode(errors="replace").strip() or "a process that has not written its name"
            os.close(fd)
            raise SystemExit(
                f"{self.path} is in use by another trainer: {holder}. Wait for it to finish or stop it, or pass "
                "another --out"
            ) from None
        except OSError as error:  # a file system without locks (some network mounts)
            os.close(fd)
            warnings.warn(f"cannot lock {self.path} ({error}): make sure no other trainer uses it", stacklevel=2)
            return
        previous = os.read(fd, 1 << 16).decode(errors="replace").strip()
        if previous:
            print(f"taking over the stale lock of {self.path} (its holder is gone): {previous}", flush=True)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty ``.lock`` (a clean exit leaves no holder behind) and release it."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove what a failed start created (nothing when the folder existed before)."""
        if self.created is not None and not self.started:
            shutil.rmtree(self.created, ignore_errors=True)


def run_folder_problems(out: Path) -> list[str]:
    """What keeps ``out`` from holding a run, found before anything is created or loaded."""
    if out.exists() and not out.is_dir():
        return [f"--out {out} exists and is not a folder"]
    problems = []
    for name, folder in (("checkpoints", True), ("samples", True), ("tb", True), ("metrics.jsonl", False)):
        path = out / name
        if path.exists() and path.is_dir() != folder:
            wanted = "folder" if folder else "file"
            problems.append(f"{path} exists and is {'not ' if folder else ''}a folder; the run needs a {wanted} there")
    existing = out
    while not existing.exists():
        existing = existing.parent
    for path in (existing, out / "checkpoints"):
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"--out {out}: {path} is not writable")
    return problems


@contextlib.contextmanager
def run_folder(runtime: Runtime, out: Path) -> Iterator[RunFolder]:
    """The locked run folder for the duration of a run (rank 0 locks; every rank learns whether it may go on)."""
    folder = RunFolder(out)
    refusal = None
    if runtime.is_main:
        try:
            folder.open()
        except SystemExit as error:
            refusal = str(error.code)
    refusal = broadcast_object(runtime, refusal)
    if refusal is not None:
        raise SystemExit(refusal)
    try:
        yield folder
    except BaseException:
        if runtime.is_main:
            folder.release()
            folder.discard()
        raise
    if runtime.is_main:
        folder.release()


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


class MetricsWriter:
    """metrics.jsonl (and TensorBoard) on rank 0: metric rows, and event rows that carry an ``event`` key."""

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.file = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        self.tb = None
        if tensorboard:
            tensorboard_writer = optional_import("torch.utils.tensorboard", "--tensorboard").SummaryWriter
            self.tb = tensorboard_writer(str(out / "tb"))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def event(self, step: int, event: str, **details: Any) -> None:
        """An event row (``resume``, ``non_finite``, ``stopped``), flushed and fsynced at once."""
        self.file.write(json.dumps({"step": step, "event": event, **details}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the metric rows after ``step`` (an interrupted run logged them; the resumed run logs them again).

    Event rows stay, and so does nothing unreadable (the torn last line of a killed writer).
    Returns the number of lines dropped.
    """
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and ("event" in row or int(row.get("step", 0)) <= step):
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
    return len(lines) - len(kept)


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


class StopRequest:
    """SIGTERM/SIGINT handlers that ask the loop to stop at the next step boundary.

    The first signal is recorded (``signum``); a second one stops at once, without saving
    (KeyboardInterrupt for SIGINT, exit status 128 + signal for SIGTERM). Handlers are only
    installed from the main thread and are restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"{name}: saving a checkpoint at the next step boundary, then exiting (send {name} again to stop "
            "at once, without saving)",
            file=sys.stderr,
            flush=True,
        )


class StopAgreement:
    """The signal every rank stops on at a step boundary, agreed over a gloo group without a device sync.

    A rank's request made at boundary k is all-reduced (MAX) asynchronously and read at boundary
    k + 1, so every rank sees the same value at the same boundary. With one process the request
    is read directly.
    """

    def __init__(self, runtime: Runtime, request: StopRequest) -> None:
        self.runtime, self.request = runtime, request
        self._pending: Any = None
        self._value = torch.zeros(1, dtype=torch.int64)

    def poll(self) -> int:
        if not self.runtime.distributed:
            return self.request.signum
        agreed = 0
        if self._pending is not None:
            self._pending.wait()
            agreed = int(self._value.item())
        self._value = torch.tensor([self.request.signum], dtype=torch.int64)
        self._pending = dist.all_reduce(self._value, op=dist.ReduceOp.MAX, group=self.runtime.control, async_op=True)
        return agreed

    def close(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None


def _finite_or_none(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def train(task: Task, runtime: Runtime, folder: RunFolder) -> dict[str, Any]:
    """Run (or resume) the loop in a locked run folder; returns a summary on rank 0.

    Raises SystemExit when a resume is refused (before anything is written), when a step is
    non-finite (after a ``non_finite`` event row; the last finite checkpoint is untouched), and
    with status 128 + signal after SIGTERM or SIGINT (after saving a checkpoint).
    """
    config = task.config
    out = folder.path
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
    # Rank 0 picks the newest usable checkpoint (verified, loadable, complete and finite; the others are
    # reported and skipped) and decides whether this command line may resume it; every rank learns the plan.
    payload: dict[str, Any] | None = None
    plan = None
    if runtime.is_main:
        removed = remove_stale_temporaries(ckpt_dir)
        for where, names in WHOLE_FILES.items():
            removed += remove_stale_temporaries(out / where, names)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of interrupted checkpoint writes", flush=True)
        found = latest_loadable_checkpoint(ckpt_dir, check=check_run_payload)
        if found is None:
            plan = ResumePlan(checkpoint=None, config=task.config_dict, applied={})
        else:
            path, payload = found
            plan = plan_resume(task, payload["config"], path, payload)
    plan = broadcast_object(runtime, plan)
    if plan.refusal is not None:
        raise SystemExit(plan.refusal)
    if plan.checkpoint is None and config.init:
        loaded = initialize_from(net, config.init, task.objective)
        if runtime.is_main:
            print(f"initialised from {loaded}", flush=True)
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
    wanted = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    ema = EMA(
        net,
        decay=config.ema_decay,
        every=config.ema_every,
        dtype=torch.float64 if config.ema_float64 else None,
        warmup=config.ema_warmup,
    )
    stream = EpochStream(num_samples=task.num_samples, seed=config.seed)

    start_step, position, window = 0, 0, None
    if plan.checkpoint is not None:  # every rank loads it (rank 0 already has)
        if payload is None:
            payload = load_checkpoint(plan.checkpoint, map_location="cpu", verify=False)
        try:
            load_states(net, optimizer, payload, config.fsdp, device)
            ema.load_state_dict(payload["ema"])
        except (RuntimeError, ValueError, KeyError) as error:
            message = f"{plan.checkpoint} does not fit the network this run's settings build: {error}"
            raise SystemExit(message) from error
        apply_optimizer_settings(optimizer, wanted)  # --lr, --beta2, ... of this command line, as recorded
        start_step, position = int(payload["step"]), int(payload["data"]["position"])
        rng = payload["rng"]
        restore_rng_state(rng[runtime.rank] if len(rng) == world else rng[0])
        windows = payload.get("log_window")
        if isinstance(windows, list) and len(windows) == world:  # the averaging window goes on where it stopped
            window = windows[runtime.rank]
        if runtime.is_main:
            print(f"resuming from {plan.checkpoint} at step {start_step}", flush=True)
            for key, (old, new) in plan.applied.items():
                flag = f"--{key.replace('_', '-')}"
                print(f"  {flag}: {old!r} -> {new!r} (applied from step {start_step} on)", flush=True)
        del payload

    eval_net = None
    writer = None
    if runtime.is_main:
        eval_net = build_net(task.config_dict).to(device) if config.fsdp else copy.deepcopy(net)
        eval_net.eval().requires_grad_(False)
        text = json.dumps(plan.config, indent=2, sort_keys=True) + "\n"
        atomic_write(out / "config.json", lambda f: f.write(text.encode()))
        dropped = truncate_metrics(out / "metrics.jsonl", start_step)
        writer = MetricsWriter(out, config.tensorboard)
        if plan.checkpoint is not None:
            applied = {key: list(values) for key, values in plan.applied.items()}
            writer.event(start_step, "resume", checkpoint=Path(plan.checkpoint).name, applied=applied, dropped=dropped)
        folder.started = True
    barrier(runtime)

    end_step = config.total_steps if not config.max_steps else min(config.total_steps, start_step + config.max_steps)
    bar = None
    if runtime.is_main and config.progress:
        tqdm = optional_import("tqdm", "the progress bar (or pass --no-progress)").tqdm
        bar = tqdm(total=config.total_steps, initial=start_step, dynamic_ncols=True, file=sys.stdout)

    sums: dict[str, Tensor] = {}
    logged_steps = 0
    if window is not None:
        sums = {key: value.to(device) for key, value in window["sums"].items()}
        logged_steps = int(window["steps"])
    # 0 while every step was finite, else the first non-finite step; updated on the device every step and
    # read only at log steps and before saves.
    first_bad = torch.zeros((), dtype=torch.int64, device=device)
    none = torch.iinfo(torch.int64).max

    def window_values() -> dict[str, float]:
        """The objective's metrics averaged over the steps since the last log row (and over ranks)."""
        keys = sorted(sums)
        if not keys:
            return {}
        stacked = torch.stack([sums[k] for k in keys]) / max(logged_steps, 1)
        if runtime.distributed:
            dist.all_reduce(stacked)
            stacked /= world
        return dict(zip(keys, stacked.cpu().tolist()))

    def first_non_finite_step() -> int:
        value = torch.where(first_bad == 0, none, first_bad)
        if runtime.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        found = int(value)
        return 0 if found == none else found

    def stop_non_finite(done: int, first: int, entries: list[str], values: dict[str, float]) -> typing.NoReturn:
        saved = list_checkpoints(ckpt_dir)
        last = str(saved[0][1]) if saved else None
        if writer is not None:
            writer.event(
                done,
                "non_finite",
                first_non_finite_step=first or None,
                non_finite_state=entries[:8],
                non_finite_entries=len(entries),
                window=_finite_or_none(values),
                last_checkpoint=None if last is None else Path(last).name,
            )
        what = f"a non-finite loss at step {first}" if first else f"non-finite state after step {done}: {entries[:3]}"
        keep = f"{last} holds the last finite state" if last else "no checkpoint was written"
        raise SystemExit(
            f"{what}; stopped at step {done} without saving ({keep}). Run again to resume it with other settings "
            "(a lower --lr is applied on resume)"
        )

    def save(step: int) -> None:
        first = first_non_finite_step()
        state = {
            "step": step,
            "model": model_state(net, config.fsdp),
            "ema": ema.state_dict(full=True),
            "optimizer": optimizer_state(net, optimizer, config.fsdp),
            "config": plan.config,
            "rng": all_gather_object(runtime, capture_rng_state()),
            "data": {"position": position, "seed": config.seed, "num_samples": task.num_samples},
            "log_window": all_gather_object(
                runtime, {"sums": {k: v.detach().cpu() for k, v in sums.items()}, "steps": logged_steps}
            ),
            "parallel": "fsdp" if config.fsdp else "ddp",
            "world_size": world,
            "torch": str(torch.__version__),
        }
        entries = non_finite_entries({k: state[k] for k in ("model", "ema", "optimizer")}) if runtime.is_main else []
        entries = broadcast_object(runtime, entries)
        if first or entries:
            stop_non_finite(step, first, entries, window_values())
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

    tic, images_seen, last = time.perf_counter(), 0, {}
    with StopRequest() as request:
        stops = StopAgreement(runtime, request)
        try:
            for step in range(start_step, end_step):
                finite = torch.ones((), dtype=torch.bool, device=device)
                for j in range(accum):
                    indices = stream.micro_batch(
                        position=position, micro_batch_size=micro, micro_step=j, rank=runtime.rank, world_size=world
                    )
                    # distinct per rank and micro-batch, exact after a resume: keyed on m = j·world + rank
                    layout = {"rank": runtime.rank, "world_size": world}
                    generator = step_generator(config.seed, step, j, **layout, device=device)
                    dropout_seed = step_generator(config.seed, step, j, **layout, stream=1).initial_seed()
                    torch.manual_seed(dropout_seed)  # dropout masks
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
                    finite = finite & (metrics["finite"] > 0)
                step_fn.update()
                ema.update(net, step=step)
                position += config.batch_size
                done = step + 1
                first_bad = torch.where((first_bad == 0) & ~finite, done, first_bad)  # no host sync
                images_seen += config.batch_size
                logged_steps += 1

                if done % config.log_every == 0 or done == end_step:
                    values = window_values()
                    first = first_non_finite_step()
                    if first or not all(math.isfinite(v) for v in values.values()):
                        stop_non_finite(done, first, [], values)
                    elapsed = time.perf_counter() - tic
                    values["images_per_s"] = images_seen / max(elapsed, 1e-9)
                    values["lr"] = optimizer.param_groups[0]["lr"]
                    if device.type == "cuda":
                        values["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if writer is not None:
                        writer.write(done, values)
                    if bar is not None:
                        shown = ("fm_loss", "consistency_loss", "images_per_s")
                        bar.set_postfix({k: f"{values[k]:.4g}" for k in shown if k in values})
                    last = values
                    tic, images_seen, logged_steps, sums = time.perf_counter(), 0, 0, {}
                if bar is not None:
                    bar.update(1)
                saved = done % config.ckpt_every == 0 or done == end_step
                if saved:
                    save(done)
                if (config.sample_every and done % config.sample_every == 0) or done == end_step:
                    grid(done)
                agreed = stops.poll()
                if agreed:
                    if not saved:
                        save(done)
                    name = signal.Signals(agreed).name
                    if writer is not None:
                        writer.event(done, "stopped", signal=name, checkpoint=checkpoint_path(ckpt_dir, done).name)
                    if runtime.is_main:
                        print(f"{name}: stopped at step {done}; run the same command again to resume", flush=True)
                    raise SystemExit(128 + agreed)
        finally:
            stops.close()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
    return {"steps_done": end_step, "last": last}


def missing_data(message: str) -> None:
    """Say what data is needed and where, then exit non-zero."""
    print(message, file=sys.stderr)
    raise SystemExit(2)
