"""The shared training loop of the example trainers: what a trainer plugs in (``Task``) and the loop itself.

Not library code: what a user would reuse in their own loop (EMA, checkpoints, the batch
order, the training step) lives in ``soflow_core``; this module wires it into the two
reference trainers. ``train`` reads top to bottom like DiT's or SiT's ``train.py``: plan the
start, wrap the network, restore the state, then loop over optimizer steps and hand each
finished step to the periodic duties. Each duty has its own home, with its inputs explicit:

* ``_runtime``: where the process runs (rank, world size, device) and its collectives;
* ``_run_folder``: the run folder, checked, created and locked;
* ``_resume``: which checkpoint a start resumes and whether this command line may resume it
  (``APPLIED_ON_RESUME``, ``IGNORED_ON_RESUME``), and ``--init``;
* ``TrainedModel`` here: FSDP2/DDP/compile wrapping, the optimizer, the EMA; ``MicroBatches``
  here: the data and the seeds of every micro-batch;
* ``_duties``: logging with its averaging window, the non-finite guard, saving, sample grids,
  evaluation (the seam for in-loop scores such as FID: see ``_duties.Evaluation``) and the stop
  on SIGTERM/SIGINT.

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
  last finite checkpoint untouched (``NonFiniteGuard``);
* SIGTERM and SIGINT write a checkpoint at the next step boundary and exit with 128 + signal;
* a resume applies changed settings consistently or refuses them (``APPLIED_ON_RESUME``,
  ``IGNORED_ON_RESUME``), before anything is written.
"""

import contextlib
import copy
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import _fid
import numpy as np
import torch
from _cli import config_parser, optional_import, resolve_config
from _duties import (
    Checkpointer,
    EmaNetwork,
    Evaluation,
    Evaluator,
    MetricLog,
    MetricsWriter,
    NonFiniteGuard,
    ProgressBar,
    SampleGrid,
    StopAgreement,
    StopRequest,
    stop_on_signal,
    truncate_metrics,
)
from _resume import (
    VELOCITY_MODEL,
    Resumed,
    ResumePlan,
    apply_optimizer_settings,
    initialize_from,
    plan_start,
    pretrained_velocity,
)
from _run_folder import RunFolder, run_folder_problems
from _runtime import Runtime, all_gather_object, barrier, cuda_missing
from torch import Tensor, nn

from soflow_core import ClassifierFreeGuidance, SoFlowObjective, step_generator
from soflow_core._files import atomic_write
from soflow_core.guidance import GuidanceScaleDistribution
from soflow_core.nets import DIT_SIZES, DiT, SongUNet
from soflow_core.nets.dit import DiTSize
from soflow_core.objective import with_pretrained_velocity
from soflow_core.time_samplers import ConsistencyTimeSampler, LogitNormal, make_schedule
from soflow_core.train import EpochStream
from soflow_core.train.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state
from soflow_core.train.ema import EMA
from soflow_core.train.step import TrainingStep, make_training_step
from soflow_core.weighting import AdaptiveWeighting

# Sizes beyond soflow_core's DIT_SIZES (which has S/4 and S/2 for small CIFAR-10 transformers), for smoke runs.
EXTRA_DIT_SIZES: dict[str, DiTSize] = {
    "DiT-tiny/4": DiTSize(patch_size=4, hidden_size=64, depth=2, num_heads=2),
    "DiT-tiny/2": DiTSize(patch_size=2, hidden_size=32, depth=2, num_heads=2),
}
ALL_DIT_SIZES: dict[str, DiTSize] = {**DIT_SIZES, **EXTRA_DIT_SIZES}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Fields shared by both trainers (each trainer adds its own)."""

    out: str = "runs/run"  # run folder: config.json, metrics.jsonl, checkpoints/, samples/
    data: str | None = None  # dataset path (see the trainer's docstring)
    init: str | None = None  # fine-tune from: a pretrained folder, an official SoFlow file, a state dict, a run
    # how --init's network relates to this trainer's: "" loads SoFlow weights as they are; a convention converts a
    # velocity model so that F(x, t, s) starts as its velocity (soflow_core.nets.from_velocity_model): "soflow" a
    # Flow Matching model of this library, "sit"/"sit_gvp" SiT (a SiT training file is recognised without the flag)
    init_convention: Literal["", "soflow", "sit", "sit_gvp"] = ""
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
    keep: int = 3  # newest checkpoints kept
    # also keep every checkpoint whose step is a multiple of this, for curves of a score against steps (0: none;
    # a multiple of --ckpt-every; --keep-every equal to --ckpt-every keeps all)
    keep_every: int = 0
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
    # In-loop FID (docs/fid.md): samples of the EMA weights scored against --fid-reference with the ADM evaluator's
    # Inception; on only when a reference is given
    fid_every: int = 25_000  # in-loop FID period in steps, and at the run's last planned step (0: off)
    fid_samples: int = 10_000  # samples per in-loop FID and NFE, spread over the ranks
    fid_nfe: tuple[int, ...] = (1, 2)  # network evaluations per sample scored: fid_1nfe, fid_2nfe in metrics.jsonl
    fid_batch_size: int = 125  # samples per batch and rank of in-loop FID (sampling and Inception)
    # reference statistics: a file of examples/fid_reference.py or the ADM reference batch (None: no in-loop FID)
    fid_reference: str | None = None
    # torch-fidelity's Inception weights file (weights-inception-2015-12-05-6726825d.pth); None:
    # $SOFLOW_INCEPTION_WEIGHTS, then torch.hub's checkpoint folder (a run never downloads)
    inception_weights: str | None = None
    # accept Inception weights whose SHA-256 does not start with 6726825d (their FIDs are not comparable with papers)
    allow_other_inception_weights: bool = False
    # The objective (SoFlowObjective), one flag per setting; the defaults are the trainer's released recipe.
    path: Literal["linear", "trig"] = "linear"  # noising path x_t = α(t)·data + β(t)·noise (official noising_type)
    # solution parameterization f(x_t, t, s) = a(t, s)·x_t + b(t, s)·F (official coefficient_type)
    param: Literal["euler", "trig"] = "euler"
    # λ, the share of each micro-batch trained with Flow Matching; the rest trains solution consistency (official
    # velocity_loss_ratio)
    fm_fraction: float = 0.75
    fm_time_mean: float = -0.2  # μ of the logit-normal Flow Matching time t (official time_mean[0])
    fm_time_std: float = 1.0  # σ of the logit-normal Flow Matching time t (official time_std[0])
    s_time_mean: float = -1.0  # μ of the logit-normal consistency target time s (official time_mean[1])
    s_time_std: float = 0.8  # σ of the logit-normal consistency target time s (official time_std[1])
    t_time_mean: float = 0.2  # μ of the logit-normal consistency start time t (official time_mean[2])
    t_time_std: float = 0.8  # σ of the logit-normal consistency start time t (official time_std[2])
    # the schedule r(k, K) that places the teacher time ℓ = t + (s − t)·r, k the step, K --total-steps (official
    # l_schedule)
    schedule: Literal["const", "linear", "cosine", "exponent"] = "exponent"
    r_init: float = 0.1  # r at step 0 (official l_init_ratio)
    r_end: float = 0.002  # r at step K (official l_end_ratio)
    p: float = 1.0  # power p of both adaptive loss weights 1/(mse + ε)^p (official p)
    eps: float = 0.01  # ε of both adaptive loss weights 1/(mse + ε)^p (official eps)
    # the velocity of the step to the teacher time ℓ: "conditional" (the paper's, data and noise of the sample) or
    # "pretrained" (the --init network's velocity, frozen; kept in <out>/velocity_model for resuming; fine-tuning)
    consistency_velocity: Literal["conditional", "pretrained"] = "conditional"


# ----------------------------------------------------------------------------- command line


def parse_config(
    config_cls: type,
    presets: dict[str, Any],
    argv: list[str] | None,
    description: str,
    default_preset: str,
    presets_help: dict[str, str],
    resolve: Callable[[Any], Any],
    record: Callable[[Any], dict[str, Any]],
) -> Any:
    """A preset plus ``--field value`` overrides (see ``_cli``), resolved and checked before anything starts.

    ``resolve`` fills the fields a trainer derives (it raises ValueError naming the flag when it
    cannot), ``record`` gives what config.json holds. The objective is built from the record
    here once, so a recipe that makes no objective is an error of the command line. With
    ``--print-config`` the record is printed as config.json would hold it, and the script exits
    without creating anything.
    """
    parser = config_parser(description, config_cls, presets, default_preset, presets_help=presets_help)
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (what <out>/config.json would hold) and exit without creating "
        "anything; default: off",
    )
    args = parser.parse_args(argv)
    try:
        config = resolve(resolve_config(args, config_cls, presets))
    except ValueError as error:
        parser.error(str(error))
    # the optional packages this run will need, checked before anything starts
    optional_import("PIL.Image", "writing the sample grids")
    if config.progress:
        optional_import("tqdm", "the progress bar (or pass --no-progress)")
    if config.tensorboard:
        optional_import("torch.utils.tensorboard", "--tensorboard")
    problems = check_common(config)
    if problems:
        parser.error("; ".join(problems))
    try:
        build_objective(record(config))
    except ValueError as error:
        parser.error(str(error))
    if args.print_config:
        print(config_text(record(config)), end="")
        raise SystemExit(0)
    return config


def config_text(record: dict[str, Any]) -> str:
    """config.json's text: the resolved configuration as sorted, indented JSON."""
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def check_common(config: TrainConfig) -> list[str]:
    """Every problem with the shared fields, found before anything is created or loaded."""
    problems = []
    for name in ("total_steps", "batch_size", "grad_accum", "ckpt_every", "keep", "log_every", "sample_grid"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}")
    for name in ("ema_every", "synthetic_size"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}")
    for name in ("max_steps", "sample_every", "seed", "keep_every"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0; got {getattr(config, name)}")
    if config.keep_every > 0 and config.ckpt_every >= 1 and config.keep_every % config.ckpt_every:
        problems.append(
            f"--keep-every {config.keep_every} must be a multiple of --ckpt-every {config.ckpt_every} (checkpoints "
            "are written at multiples of --ckpt-every)"
        )
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
    if config.init_convention and config.init is None:
        problems.append(f"--init-convention {config.init_convention} converts the --init network: give --init")
    if (
        config.consistency_velocity == "pretrained"
        and config.init is None
        and not (Path(config.out) / VELOCITY_MODEL).is_dir()
    ):
        problems.append(
            "--consistency-velocity pretrained steps along the --init network's velocity: give --init (a resumed run "
            f"reads it from <out>/{VELOCITY_MODEL})"
        )
    if config.fsdp and not all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        problems.append(
            "--fsdp shards the network over the processes of a torchrun job, and this is no torchrun process: start it "
            "with torchrun (torchrun --nproc_per_node N <script> ... --fsdp), or leave --fsdp out"
        )
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.compile and config.precision == "bf16" and config.compile_backend == "inductor" and on_cpu:
        # gcc rejects the C++ that Inductor generates for the bf16-autocast step ("conflicting declaration
        # 'auto at_BFloat16_tmp_acc0_vec'", torch 2.13, gcc 12) and the run would die in its first step
        problems.append(
            "--compile --precision bf16 cannot run on the CPU: the C++ that Inductor generates for the bf16 step "
            "does not compile. Use --precision fp32, --compile-backend aot_eager, no --compile, or a CUDA device"
        )
    problems += run_folder_problems(Path(config.out))
    problems += _fid.config_problems(config)
    return problems


# ----------------------------------------------------------------------------- networks


def build_dit(
    name: str, *, in_channels: int, input_size: int, num_classes: int | None, null_class: bool = True, **kwargs: Any
) -> DiT:
    """A DiT of size ``name``; a class-conditional one has the null row (index ``num_classes``) if ``null_class``."""
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
        null_class=bool(num_classes) and null_class,
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
            null_class=config.get("null_class", True),  # runs recorded before the key existed had the null row
            gradient_checkpointing=config.get("gradient_checkpointing", False),
            omega_range=config.get("cfg_scale_range"),  # an ω-conditioned run (runs recorded before: None)
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


def build_objective(config: Mapping[str, Any]) -> SoFlowObjective:
    """The objective a run's resolved configuration describes: the one place both trainers build it.

    The recipe fields of ``TrainConfig`` give the path, parameterization, λ, the three logit-normal
    time distributions, the r(k, K) schedule and the adaptive weights; a configuration with
    ``cfg_scale`` (the ImageNet trainer's) adds training-time guidance over its labels, whose
    null class is ``num_classes``, and one with ``cfg_scale_range`` draws ω per sample from that
    range instead (an ω-conditioned run: ``GuidanceScaleDistribution``).

    Args:
        config: A record of a resolved configuration (what config.json holds).

    Returns:
        The objective.

    Raises:
        ValueError: Settings that make no objective, naming their flags.
    """

    def part(flags: str, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except (ValueError, TypeError) as error:
            raise ValueError(f"{flags}: {error}") from None

    guidance = None
    scale, scale_flag = config.get("cfg_scale"), "--cfg-scale"
    if config.get("cfg_scale_range") is not None:
        low, high = config["cfg_scale_range"]
        share = config.get("cfg_unguided_share", 0.0)
        scale_flag = "--cfg-scale-range"
        scale = part(
            "--cfg-scale-range, --cfg-unguided-share",
            lambda: GuidanceScaleDistribution(low=low, high=high, unguided_share=share),
        )
    if scale is not None:
        guidance = part(
            f"{scale_flag}, --cfg-mix, --cfg-drop-rate, --cfg-decay-time",
            lambda: ClassifierFreeGuidance(
                scale=scale,
                mix=config["cfg_mix"],
                drop_rate=config["cfg_drop_rate"],
                decay_time=config["cfg_decay_time"],
                null_cond=config["num_classes"],
            ),
        )
    times = ConsistencyTimeSampler(
        t_distribution=part(
            "--t-time-mean, --t-time-std", lambda: LogitNormal(mean=config["t_time_mean"], std=config["t_time_std"])
        ),
        s_distribution=part(
            "--s-time-mean, --s-time-std", lambda: LogitNormal(mean=config["s_time_mean"], std=config["s_time_std"])
        ),
        schedule=part(
            "--schedule, --r-init, --r-end",
            lambda: make_schedule(config["schedule"], r_init=config["r_init"], r_end=config["r_end"]),
        ),
    )
    fm_time = part(
        "--fm-time-mean, --fm-time-std", lambda: LogitNormal(mean=config["fm_time_mean"], std=config["fm_time_std"])
    )
    weighting = part("--p, --eps", lambda: AdaptiveWeighting(p=config["p"], eps=config["eps"]))
    return part(
        "--path, --param, --fm-fraction",
        lambda: SoFlowObjective(
            path=config["path"],
            param=config["param"],
            fm_fraction=config["fm_fraction"],
            fm_time=fm_time,
            consistency_times=times,
            weighting=weighting,
            guidance=guidance,
            backend=config["backend"],
            consistency_velocity=config.get("consistency_velocity", "conditional"),
        ),
    )


def shard_targets(net: nn.Module) -> list[nn.Module]:
    """The submodules FSDP2 shards one by one (transformer blocks / UNet blocks), before the root."""
    if isinstance(net, DiT):
        return list(net.blocks)
    if isinstance(net, SongUNet):
        return [m for m in net.modules() if type(m).__name__ == "_UNetBlock"]
    return []


class TrainingBackbone(nn.Module):
    """F_θ(x, t, s, cond) as the objective calls it: autocast inside, float32 out; cond → augment labels.

    The keyword ``omega`` of an ω-conditioned network passes through, and ``omega_range`` declares it.
    """

    def __init__(self, net: nn.Module, *, precision: str, device_type: str, augment_labels: bool) -> None:
        super().__init__()
        self.net = net
        self.precision = precision
        self.device_type = device_type
        self.augment_labels = augment_labels

    def forward(
        self, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None = None, *, omega: Tensor | None = None
    ) -> Tensor:
        context = (
            torch.autocast(self.device_type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        extra = {} if omega is None else {"omega": omega}  # only an ω-conditioned network takes it
        with context:
            if self.augment_labels:
                out = self.net(x, t, s, augment_labels=cond, **extra)
            else:
                out = self.net(x, t, s, cond, **extra)
        return out.to(x.dtype)

    @property
    def omega_range(self) -> tuple[float, float] | None:
        """The network's guidance-scale range when it is ω-conditioned, so that the objective passes ``omega``."""
        return getattr(self.net, "omega_range", None)

    @property
    def num_classes(self) -> int | None:
        """The network's class count, so that the objective checks labels against it before any call.

        Absent (AttributeError) when the condition is augmentation labels: they are no class labels,
        and ``num_classes = None`` would declare an unconditional network, which refuses any condition.
        """
        if self.augment_labels:
            raise AttributeError("num_classes: the condition is augmentation labels, not class labels")
        return getattr(self.net, "num_classes", None)

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


# ----------------------------------------------------------------------------- what a trainer plugs in


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
    evaluation: Evaluation | None = None  # a periodic evaluation of the EMA weights (see _duties.Evaluation)


# ----------------------------------------------------------------------------- the data of every micro-batch


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


class MicroBatches:
    """The data of every micro-batch this rank trains, and the seeds of its draws.

    The global batch is ``--batch-size`` = micro-batch × world size × ``--grad-accum``. Micro-batch
    j of optimizer step k holds the samples that ``EpochStream.micro_batch`` gives for the data
    position (counted in samples), j, the rank and the world size, and draws everything (the
    task's latent noise or augmentation, then the objective's times, noise and label drops, and
    dropout) from seeds of (seed, k, m) with m = j·world + rank. Host-side reads run one
    micro-batch ahead on a thread, for the steps [start, end).

    Args:
        task: The trainer's task.
        runtime: This process.
        start: The resumed step and data position.
        end_step: The step this invocation stops after.

    Raises:
        SystemExit: The global batch does not divide into world size × ``--grad-accum``.
    """

    def __init__(self, task: Task, runtime: Runtime, start: Resumed, end_step: int) -> None:
        config = task.config
        world, accum = runtime.world_size, config.grad_accum
        if config.batch_size % (world * accum):
            raise SystemExit(
                f"--batch-size {config.batch_size} must be divisible by world size × --grad-accum = {world} × {accum}"
            )
        self.task, self.runtime, self.accumulation = task, runtime, accum
        self.micro = config.batch_size // (world * accum)
        self.stream = EpochStream(num_samples=task.num_samples, seed=config.seed)
        self.reads = None
        if task.read_indices is not None:
            steps = range(end_step - start.step)
            lists = (self.indices(start.position + k * config.batch_size, j) for k in steps for j in range(accum))
            self.reads = _prefetching(task.read_indices, lists)

    def indices(self, position: int, micro_step: int) -> np.ndarray:
        """The sample indices of micro-batch ``micro_step`` of the step that starts at data position ``position``."""
        rank, world = self.runtime.rank, self.runtime.world_size
        return self.stream.micro_batch(
            position=position, micro_batch_size=self.micro, micro_step=micro_step, rank=rank, world_size=world
        )

    def load(self, step: int, position: int, micro_step: int) -> tuple[Tensor, Tensor | None, torch.Generator]:
        """(data, cond, generator) of micro-batch ``micro_step`` of ``step``; seeds the dropout masks too."""
        seed, device = self.task.config.seed, self.runtime.device
        indices = self.indices(position, micro_step)
        # distinct per rank and micro-batch, exact after a resume: keyed on m = j·world + rank
        layout = {"rank": self.runtime.rank, "world_size": self.runtime.world_size}
        generator = step_generator(seed, step, micro_step, **layout, device=device)
        torch.manual_seed(step_generator(seed, step, micro_step, **layout, stream=1).initial_seed())  # dropout masks
        raw = next(self.reads) if self.reads is not None else indices
        data, cond = self.task.load_batch(raw, generator, device)
        return data, cond, generator


# ----------------------------------------------------------------------------- the network as it trains


@dataclass
class TrainedModel:
    """The network as it trains: unwrapped, wrapped for the objective, its optimizer, its step and its EMA.

    Attributes:
        net: The unwrapped network: what checkpoints and the EMA hold.
        backbone: What the objective calls: autocast around ``net``, inside DDP when distributed.
        ddp: The DDP wrapper, or None (one process, or FSDP2).
        fsdp: Whether ``net`` is sharded with FSDP2 (``fully_shard`` per block, then the root).
        optimizer: Over ``net``'s parameters.
        step_fn: Loss, backward and accumulation (one graph when compiled), and the optimizer update.
        ema: The EMA of ``net``.
        settings: The command line's optimizer hyperparameters (lr, betas, ...) per param group,
            written over those of a restored optimizer.
        velocity_model: The frozen pretrained network whose velocity steps the consistency samples
            to x_ℓ (``--consistency-velocity pretrained``, autocast like ``backbone``), or None.
    """

    net: nn.Module
    backbone: nn.Module
    ddp: nn.parallel.DistributedDataParallel | None
    fsdp: bool
    optimizer: torch.optim.Optimizer
    step_fn: TrainingStep
    ema: EMA
    settings: list[dict[str, Any]]
    velocity_model: nn.Module | None = None

    def train_step(
        self, batches: MicroBatches, step: int, position: int, objective: SoFlowObjective, total_steps: int
    ) -> tuple[list[dict[str, Tensor]], Tensor]:
        """One optimizer step over every micro-batch; returns each micro-batch's share of the metrics and finiteness.

        Each micro-batch's metrics come back divided by the number of micro-batches (detached
        copies, so a compiled step may reuse its output buffers), and "was every micro-batch
        finite" as a device-side boolean (no host sync).
        """
        accum = batches.accumulation
        finite = torch.ones((), dtype=torch.bool, device=batches.runtime.device)
        shares = []
        for j in range(accum):
            data, cond, generator = batches.load(step, position, j)
            # gradients are synchronised on the last micro-step only
            if self.ddp is not None and j < accum - 1:
                sync = self.ddp.no_sync()
            else:
                sync = contextlib.nullcontext()
                if self.fsdp:
                    self.net.set_requires_gradient_sync(j == accum - 1)
            # The draws run eagerly from the explicit generator; the step itself may be compiled.
            batch = objective.sample_batch(data, cond, step=step, total_steps=total_steps, generator=generator)
            if self.velocity_model is not None:
                batch = with_pretrained_velocity(batch, self.velocity_model, param=objective.param)
            with sync:
                metrics = self.step_fn.accumulate(batch)
            shares.append({key: value.detach().float() / accum for key, value in metrics.items()})
            finite = finite & (metrics["finite"] > 0)
        self.step_fn.update()
        return shares, finite

    def state(self) -> dict[str, Any]:
        """The full model, EMA and optimizer state on CPU (collectives under FSDP2)."""
        return {
            "model": model_state(self.net, self.fsdp),
            "ema": self.ema.state_dict(full=True),
            "optimizer": optimizer_state(self.net, self.optimizer, self.fsdp),
        }


def wrap(task: Task, runtime: Runtime, velocity_model: nn.Module | None = None) -> TrainedModel:
    """Shard (FSDP2) or wrap (DDP) ``task.net``, build its optimizer, (compiled) step and EMA.

    ``velocity_model`` (frozen, unsharded, a full copy on every rank) is autocast like the network.
    """
    config, net, device = task.config, task.net, runtime.device
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
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(backbone, device_ids=device_ids)
        backbone = ddp
    optimizer = task.make_optimizer(list(net.parameters()))
    # Under DDP/FSDP2 the step compiles with graph breaks around the wrapper's calls (dynamo traces
    # neither) and a backward through autograd, where their gradient hooks run.
    step_fn = make_training_step(
        task.objective,
        backbone,
        optimizer,
        accumulation_steps=config.grad_accum,
        compile=config.compile,
        mode=config.compile_mode or None,
        backend=config.compile_backend,
    )
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    ema = EMA(
        net,
        decay=config.ema_decay,
        every=config.ema_every,
        dtype=torch.float64 if config.ema_float64 else None,
        warmup=config.ema_warmup,
    )
    if velocity_model is not None:
        velocity_model = TrainingBackbone(
            velocity_model.to(device), precision=config.precision, device_type=device.type,
            augment_labels=task.augment_labels,
        )  # fmt: skip
    return TrainedModel(net, backbone, ddp, config.fsdp, optimizer, step_fn, ema, settings, velocity_model)


def restore(model: TrainedModel, plan: ResumePlan, payload: dict[str, Any] | None, runtime: Runtime) -> Resumed:
    """Load the planned checkpoint into ``model`` on every rank; where the loop starts (step 0 for a fresh run)."""
    if plan.checkpoint is None:
        return Resumed()
    if payload is None:  # every rank loads it (rank 0 already has)
        payload = load_checkpoint(plan.checkpoint, map_location="cpu", verify=False)
    try:
        load_states(model.net, model.optimizer, payload, model.fsdp, runtime.device)
        model.ema.load_state_dict(payload["ema"])
    except (RuntimeError, ValueError, KeyError) as error:
        message = f"{plan.checkpoint} does not fit the network this run's settings build: {error}"
        raise SystemExit(message) from error
    apply_optimizer_settings(model.optimizer, model.settings)  # --lr, --beta2, ... of this command line, as recorded
    step, position = int(payload["step"]), int(payload["data"]["position"])
    rng = payload["rng"]
    restore_rng_state(rng[runtime.rank] if len(rng) == runtime.world_size else rng[0])
    window = None
    windows = payload.get("log_window")
    if isinstance(windows, list) and len(windows) == runtime.world_size:  # the window goes on where it stopped
        window = windows[runtime.rank]
    if runtime.is_main:
        print(f"resuming from {plan.checkpoint} at step {step}", flush=True)
        for key, (old, new) in plan.applied.items():
            flag = f"--{key.replace('_', '-')}"
            print(f"  {flag}: {old!r} -> {new!r} (applied from step {step} on)", flush=True)
        for line in plan.layout_lines():
            print(f"  {line}", flush=True)
    return Resumed(step=step, position=position, window=window)


def sampling_copy(task: Task, runtime: Runtime) -> nn.Module | None:
    """The network copy this rank samples with (grids on rank 0; evaluations on every rank), or None."""
    if not (runtime.is_main or task.evaluation is not None):
        return None
    return build_net(task.config_dict).to(runtime.device) if task.config.fsdp else copy.deepcopy(task.net)


def checkpoint_state(
    step: int, model: TrainedModel, plan: ResumePlan, position: int, task: Task, log: MetricLog, runtime: Runtime
) -> dict[str, Any]:
    """What a checkpoint of ``step`` holds (every rank builds it: the random states and windows are gathered)."""
    config = task.config
    return {
        "step": step,
        **model.state(),
        "config": plan.config,
        "rng": all_gather_object(runtime, capture_rng_state()),
        "data": {"position": position, "seed": config.seed, "num_samples": task.num_samples},
        "log_window": all_gather_object(runtime, log.state()),
        "parallel": "fsdp" if config.fsdp else "ddp",
        "world_size": runtime.world_size,
        "torch": str(torch.__version__),
    }


def record_start(out: Path, plan: ResumePlan, start: Resumed, tensorboard: bool) -> MetricsWriter:
    """On rank 0: write config.json, drop the log rows past the resumed step, open the log, note a resume."""
    text = config_text(plan.config)
    atomic_write(out / "config.json", lambda f: f.write(text.encode()))
    dropped = truncate_metrics(out / "metrics.jsonl", start.step)
    writer = MetricsWriter(out, tensorboard)
    if plan.checkpoint is not None:
        applied = {key: list(values) for key, values in plan.applied.items()}
        details = {"applied": applied, "dropped": dropped, **plan.layout}  # world_size, micro_batches: [old, new]
        writer.event(start.step, "resume", checkpoint=Path(plan.checkpoint).name, **details)
    return writer


# ----------------------------------------------------------------------------- the loop


def train(task: Task, runtime: Runtime, folder: RunFolder) -> dict[str, Any]:
    """Run (or resume) the loop in a locked run folder; returns a summary on rank 0.

    Raises SystemExit when a resume is refused (before anything is written), when a step is
    non-finite (after a ``non_finite`` event row; the last finite checkpoint is untouched), and
    with status 128 + signal after SIGTERM or SIGINT (after saving a checkpoint).
    """
    config, out, device = task.config, folder.path, runtime.device
    checkpoints = out / "checkpoints"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32

    # The start: resume planning (rank 0 decides, every rank learns), --init, wrapping, the restored state.
    plan, payload = plan_start(runtime, out, task.config_dict, task.num_samples)
    if plan.checkpoint is not None and plan.step >= config.total_steps:  # finished: nothing to train or write
        if runtime.is_main:
            print(
                f"{plan.checkpoint} is step {plan.step} of --total-steps {config.total_steps}: nothing to do",
                flush=True,
            )
        return {"steps_done": plan.step, "last": {}}
    if plan.checkpoint is None and config.init:
        loaded = initialize_from(task.net, config.init, task.objective, config.init_convention)
        if runtime.is_main:
            print(f"initialised from {loaded}", flush=True)
    velocity = None
    if task.objective.consistency_velocity == "pretrained":
        fresh = plan.checkpoint is None
        velocity = pretrained_velocity(task.net, out, fresh=fresh, init=config.init, is_main=runtime.is_main)
    model = wrap(task, runtime, velocity)
    start = restore(model, plan, payload, runtime)
    del payload
    ema_net = EmaNetwork(model.ema, sampling_copy(task, runtime), sharded=config.fsdp)
    writer = record_start(out, plan, start, config.tensorboard) if runtime.is_main else None
    folder.started = True
    barrier(runtime)

    # The periodic duties, in the order they run after each step.
    end_step = config.total_steps if not config.max_steps else min(config.total_steps, start.step + config.max_steps)
    batches = MicroBatches(task, runtime, start, end_step)
    log = MetricLog(runtime, config.log_every, start.window)
    guard = NonFiniteGuard(runtime, checkpoints, writer)
    evaluator = Evaluator(task.evaluation, config.total_steps, runtime)
    saver = Checkpointer(checkpoints, config.ckpt_every, config.keep, config.keep_every, runtime, guard)
    grid = SampleGrid(out / "samples", config.sample_every, config.sample_grid, config.seed, task.sample_images)
    bar = ProgressBar(runtime.is_main and config.progress, config.total_steps, start.step)

    position, last = start.position, {}
    with StopRequest() as request, StopAgreement(runtime, request) as stops, contextlib.ExitStack() as closing:
        closing.callback(bar.close)
        if writer is not None:
            closing.callback(writer.close)
        for step in range(start.step, end_step):
            shares, finite = model.train_step(batches, step, position, task.objective, config.total_steps)
            model.ema.update(model.net, step=step)
            position += config.batch_size
            done = step + 1
            guard.record(done, finite)
            log.add(shares, images=config.batch_size)

            row: dict[str, float] = {}
            if log.due(done, config.total_steps):  # the window's means over steps and ranks; non-finite stops
                values = log.averages()
                guard.check_window(done, values)
                row = last = {**values, **throughput(log, model.optimizer, device)}
                bar.show(row)
                log.restart()
            if evaluator.due(done):
                scores = evaluator.run(done, ema_net.at(done))
                log.leave_out(scores["evaluation_seconds"])
                row.update(scores)
            if row and writer is not None:
                writer.write(done, row)
            bar.update()
            saved = saver.due(done, end_step)
            if saved:
                saver.save(done, checkpoint_state(done, model, plan, position, task, log, runtime), log)
            if grid.due(done, config.total_steps):
                grid.write(done, ema_net.at(done))
            signum = stops.poll()
            if signum:
                if not saved:
                    saver.save(done, checkpoint_state(done, model, plan, position, task, log, runtime), log)
                stop_on_signal(signum, done, writer, checkpoints, runtime)
        evaluator.finish(end_step, out)
    return {"steps_done": end_step, "last": last}


def throughput(log: MetricLog, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, float]:
    """The rest of a log row: images/s of the window, the learning rate, peak CUDA memory."""
    values = {"images_per_s": log.images_per_s(), "lr": optimizer.param_groups[0]["lr"]}
    if device.type == "cuda":
        values["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return values


def missing_data(message: str) -> None:
    """Say what data is needed and where, then exit non-zero."""
    print(message, file=sys.stderr)
    raise SystemExit(2)
