"""Train a class-conditional SoFlow DiT on ImageNet-256 VAE latents: each released SoFlow run is one preset.

    # the released runs, one command each (global batch 256 is split over ranks and --grad-accum)
    torchrun --nproc_per_node 8 examples/train_dit_imagenet.py --preset B-4-cond --data data/imagenet256_latents
    torchrun --nproc_per_node 8 examples/train_dit_imagenet.py --preset XL-2-cond --data data/imagenet256_latents
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/train_dit_imagenet.py --preset XL-2-cond --fsdp --data data/imagenet256_latents
    python examples/train_dit_imagenet.py --preset XL-2-cond --print-config   # what the run would be
    python examples/train_dit_imagenet.py --preset tiny --synthetic --out /tmp/tiny   # seconds, on a CPU

Presets B-4-cond, B-4-uncond, B-2-cond, M-2-cond, L-2-cond and XL-2-cond are the released runs
of the official repository (zlab-princeton/SoFlow): model, steps, K, batch, optimizer, EMA, ω,
label drop and null row. The run length K (``--total-steps``) and ω (``--cfg-scale``) follow
``--model`` unless given: ``--model DiT-B/2`` alone is the released B/2 run, 1.2 M steps, so the
model size and the schedule r(k, K) cannot disagree by omission. The label-drop rate follows ω
(0.1 with guidance, 0 without, as in the released runs), and the label table has the null row
exactly when labels are dropped.

The data are posterior means and standard deviations of the SD-VAE-ft-MSE encoder (``mean``,
``std`` of shape (N, 4, 32, 32), ``label`` of shape (N,)) in one .h5 file or a folder of .h5
shards, made by ``examples/extract_imagenet_latents.py``. Every step draws a fresh latent
z = (mean + std·ε)·0.18215. ``--synthetic`` trains on generated latents of the same shape.

The run folder ``--out`` holds config.json, metrics.jsonl, checkpoints/step-*.pt (with
manifests) and samples/step-*.png (1-NFE samples of the EMA weights). Starting again with the
same ``--out`` resumes from the newest valid checkpoint, skipping (and reporting) damaged ones.

In-loop FID: with ``--fid-reference`` (statistics of examples/fid_reference.py or ADM's
VIRTUAL_imagenet256_labeled.npz) and ``--vae``, every ``--fid-every`` steps the EMA weights draw
``--fid-samples`` samples at 1 and 2 NFE, decoded and scored with the ADM evaluator's Inception
(the "fid" extra; weights from ``--inception-weights``); ``fid_1nfe`` and ``fid_2nfe`` are logged
in metrics.jsonl of the run folder and plotted in its fid.png. The FID page of the docs has the
details.
"""

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fid
import _training as T
from _images import latent_preview
from _run_folder import RunFolder, run_folder
from _runtime import Runtime, distributed_runtime
from _sampling import draw_samples

from soflow_core import sample_one_step
from soflow_core.train.latents import sample_latents, to_uint8_images

NEEDS_DATA = """ImageNet-256 latents are needed: pass --data PATH (or --synthetic for a smoke run).

PATH is one .h5 file or a folder of .h5 shards with datasets
  mean  float (N, 4, 32, 32)   SD-VAE-ft-MSE posterior means of ADM-center-cropped 256x256 images
  std   float (N, 4, 32, 32)   posterior standard deviations
  label int64 (N,)             class indices 0..999
Make them from the ImageNet-1k training set (ILSVRC2012 train/, one sub-folder per class) and a
local copy of stabilityai/sd-vae-ft-mse
  (hf download stabilityai/sd-vae-ft-mse --local-dir checkpoints/sd-vae-ft-mse):
  python examples/extract_imagenet_latents.py --data /data/imagenet/train \\
      --vae checkpoints/sd-vae-ft-mse --out data/imagenet256_latents
  (or torchrun --nproc_per_node 8 examples/extract_imagenet_latents.py ... on 8 GPUs)
then pass --data data/imagenet256_latents."""


@dataclass(frozen=True)
class ReleasedSize:
    """The settings of a released run that depend on its DiT size."""

    total_steps: int  # K, the run length
    cfg_scale: float  # ω, the guidance scale baked in


# The released runs per size (zlab-princeton/SoFlow). B/4: imagenet.yaml (400k steps, ω = 3.0). B/2, M/2, L/2 and
# XL/2: 240 epochs at batch 256 = 1.2M steps (the README evaluates XL/2 at step 1 200 000) with K = the run length
# (how the official train.py plans a run); their ω comes from the paper's text and is NOT confirmed against the
# per-model config.yaml files published with the checkpoints, which were not read. Every other setting is the
# imagenet.yaml recipe for all sizes (also unconfirmed for the sizes other than B/4).
RELEASED_SIZES = {
    "DiT-B/4": ReleasedSize(total_steps=400_000, cfg_scale=3.0),
    "DiT-B/2": ReleasedSize(total_steps=1_200_000, cfg_scale=2.5),
    "DiT-M/2": ReleasedSize(total_steps=1_200_000, cfg_scale=2.25),
    "DiT-L/2": ReleasedSize(total_steps=1_200_000, cfg_scale=2.0),
    "DiT-XL/2": ReleasedSize(total_steps=1_200_000, cfg_scale=2.0),
}
LABEL_DROP = 0.1  # the released label-drop rate with guidance (imagenet.yaml cfg_drop_rate); 0 without


@dataclass(frozen=True, kw_only=True)
class ImageNetConfig(T.TrainConfig):
    """The ImageNet-256 run; defaults are the released DiT-B/4 recipe (the official code's imagenet.yaml)."""

    # run folder; None: runs/<size>-<cond|uncond>, as the released runs are named (runs/XL-2-cond)
    out: str | None = None
    model: str = "DiT-B/4"  # any of DIT_SIZES (B/4, B/2, M/2, L/2, XL/2) or a small extra size
    num_classes: int = 1000  # classes of the label table; the null (unconditional) class is num_classes
    # K, the planned number of optimizer steps (drives r(k, K)); None: the released run's for --model (B/4 400 000;
    # B/2, M/2, L/2, XL/2 1 200 000), and a size without a released run needs it
    total_steps: int | None = None
    # ω, the guidance scale baked in (1: no guidance); None: the released run's for --model (B/4 3.0, B/2 2.5, M/2
    # 2.25, L/2 2.0, XL/2 2.0), and a size without a released run needs it
    cfg_scale: float | None = None
    # m, the share of the guided velocity in the target, the rest the model's own velocity (official mix_ratio)
    cfg_mix: float = 0.25
    cfg_decay_time: float = 0.8  # t_d: guidance fades out for t above it, >= 1: never (official cfg_decay_time)
    # probability that a label is dropped to the null class (official cfg_drop_rate); None: 0.1 with guidance
    # (ω > 1), 0 without, as the released runs; the label table has the null row exactly when labels are dropped
    cfg_drop_rate: float | None = None
    vae: str | None = None  # local SD-VAE-ft-MSE folder to decode the sample grids
    gradient_checkpointing: bool = False  # recompute each DiT block in the backward pass (less memory)
    beta2: float = 0.99  # AdamW betas (0.9, beta2), weight decay 0
    backend: Literal["auto", "torch", "triton"] = "auto"  # loss-path kernels ("auto": Triton on CUDA)


# The released runs: the size (and ω = 1 for the unconditional one); K, ω, the label drop and the null row follow.
PRESETS = {
    "B-4-cond": ImageNetConfig(model="DiT-B/4"),
    "B-4-uncond": ImageNetConfig(model="DiT-B/4", cfg_scale=1.0),
    "B-2-cond": ImageNetConfig(model="DiT-B/2"),
    "M-2-cond": ImageNetConfig(model="DiT-M/2"),
    "L-2-cond": ImageNetConfig(model="DiT-L/2"),
    "XL-2-cond": ImageNetConfig(model="DiT-XL/2"),
    "tiny": ImageNetConfig(
        model="DiT-tiny/4",
        num_classes=10,
        cfg_scale=3.0,
        synthetic_size=256,
        total_steps=6,
        batch_size=8,
        ckpt_every=2,
        log_every=1,
        sample_every=0,
        sample_grid=4,
        ema_warmup=True,
        fid_every=0,
        fid_samples=16,
        fid_batch_size=8,
        out="runs/dit_imagenet_tiny",
    ),
}


PRESETS_HELP = {
    "B-4-cond": "the released SoFlow-B/4 (cond): DiT-B/4, ω = 3, 400 000 steps at global batch 256 (80 epochs)",
    "B-4-uncond": "the released SoFlow-B/4 (uncond): DiT-B/4 with ω = 1, no label drop and no null row (labels are "
    "still fed), 400 000 steps at global batch 256",
    "B-2-cond": "the released SoFlow-B/2: ω = 2.5, 1 200 000 steps at global batch 256 (240 epochs)",
    "M-2-cond": "the released SoFlow-M/2: ω = 2.25, 1 200 000 steps at global batch 256 (240 epochs)",
    "L-2-cond": "the released SoFlow-L/2: ω = 2.0, 1 200 000 steps at global batch 256 (240 epochs)",
    "XL-2-cond": "the released SoFlow-XL/2: ω = 2.0, 1 200 000 steps at global batch 256 (240 epochs); the released "
    "runs are multi-GPU jobs",
    "tiny": "a 6-step smoke run of a tiny DiT on 10 classes (seconds on a CPU; EMA with warm-up)",
}


class SyntheticLatents:
    """Generated posterior means and stds of the right shape, one deterministic pattern per class."""

    def __init__(self, num_samples: int, num_classes: int) -> None:
        self.num_samples, self.num_classes = num_samples, num_classes

    def __len__(self) -> int:
        return self.num_samples

    def read(self, indices: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        labels = torch.as_tensor(indices, dtype=torch.int64) % self.num_classes
        grid = torch.arange(32, dtype=torch.float32) * (2 * torch.pi / 32)
        a = (labels % 7 + 1).float().view(-1, 1, 1, 1)
        b = (labels // 7 % 5 + 1).float().view(-1, 1, 1, 1)
        channel = torch.arange(4, dtype=torch.float32).view(1, 4, 1, 1)
        mean = 4.0 * torch.sin(a * grid.view(1, 1, 32, 1) + channel) * torch.cos(b * grid.view(1, 1, 1, 32))
        return mean, torch.full_like(mean, 0.5), labels


def resolve(config: ImageNetConfig) -> ImageNetConfig:
    """``config`` with what it derives filled in: K and ω of --model's released run, the label drop of ω, --out.

    Raises:
        ValueError: An unknown --model, or a size without a released run and no --total-steps or --cfg-scale.
    """
    if config.model not in T.ALL_DIT_SIZES:
        raise ValueError(f"--model must be one of {', '.join(T.ALL_DIT_SIZES)}; got {config.model!r}")
    size = RELEASED_SIZES.get(config.model)
    missing = [name for name in ("total_steps", "cfg_scale") if getattr(config, name) is None and size is None]
    if missing:
        flags = " and ".join(f"--{name.replace('_', '-')}" for name in missing)
        raise ValueError(f"--model {config.model} has no released run to take {flags} from: pass {flags}")
    total_steps = config.total_steps if config.total_steps is not None else size.total_steps
    scale = config.cfg_scale if config.cfg_scale is not None else size.cfg_scale
    drop = config.cfg_drop_rate if config.cfg_drop_rate is not None else (LABEL_DROP if scale > 1 else 0.0)
    if _fid.fid_active(config) and config.vae is None:
        raise ValueError("in-loop FID (--fid-reference) scores images: pass --vae to decode the latent samples")
    name = config.model.removeprefix("DiT-").replace("/", "-") + ("-cond" if scale > 1 else "-uncond")
    out = config.out if config.out is not None else f"runs/{name}"
    return dataclasses.replace(config, out=out, total_steps=total_steps, cfg_scale=scale, cfg_drop_rate=drop)


def record(config: ImageNetConfig) -> dict:
    """What config.json holds for the resolved ``config``: its fields, the task, whether the labels have a null row."""
    return {**dataclasses.asdict(config), "task": "imagenet", "null_class": config.cfg_drop_rate > 0}


def make_optimizer(config: ImageNetConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, lr --lr, betas (0.9, --beta2), no weight decay (imagenet.yaml)."""
    return torch.optim.AdamW(params, lr=config.lr, betas=(0.9, config.beta2), weight_decay=0.0)


def main(argv: list[str] | None = None) -> dict:
    config = T.parse_config(ImageNetConfig, PRESETS, argv, __doc__, "B-4-cond", PRESETS_HELP, resolve, record)
    if not config.synthetic and (config.data is None or not Path(config.data).exists()):
        where = "" if config.data is None else f"\n(--data {config.data} does not exist)"
        T.missing_data(NEEDS_DATA + where)
    with distributed_runtime(config.device) as runtime, run_folder(runtime, Path(config.out)) as folder:
        return run(config, runtime, folder)


def run(config: ImageNetConfig, runtime: Runtime, folder: RunFolder) -> dict:
    """Train in ``folder`` (locked) and print a summary on rank 0."""
    summary = T.train(build_task(config, runtime), runtime, folder)
    if runtime.is_main:
        print(f"done: {summary['steps_done']} steps; last metrics {summary['last']}; run folder {config.out}")
    return summary


def build_task(config: ImageNetConfig, runtime: Runtime) -> T.Task:
    """What this trainer plugs into the shared loop: the network (on the device), objective, data and sampling."""
    config = resolve(config)
    config_dict = record(config)
    if config.synthetic:
        dataset = SyntheticLatents(config.synthetic_size, config.num_classes)
    else:
        from _data import LatentShards

        dataset = LatentShards(config.data)
    device = runtime.device
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    net = T.build_net(config_dict).to(device)
    objective = T.build_objective(config_dict)

    def load_batch(raw, generator: torch.Generator, dev: torch.device) -> tuple[Tensor, Tensor]:
        mean, std, labels = raw
        z = sample_latents(mean.to(dev, non_blocking=True), std.to(dev, non_blocking=True), generator=generator)
        return z, labels.to(dev)

    vae = None
    if config.vae is not None and (runtime.is_main or _fid.fid_active(config)):  # grids on rank 0; FID everywhere
        from _vae import load_vae

        vae = load_vae(config.vae, device=device, dtype=torch.float32)

    def to_images(z: Tensor) -> Tensor:
        if vae is None:
            return latent_preview(z)
        from _vae import decode_latents

        return to_uint8_images(decode_latents(vae, z))

    @torch.no_grad()
    def sample_images(eval_net: nn.Module, count: int, generator: torch.Generator) -> Tensor:
        noise = torch.randn(count, 4, 32, 32, generator=generator).to(device)
        labels = torch.randint(0, config.num_classes, (count,), generator=generator).to(device)
        return to_images(sample_one_step(eval_net, noise, param=objective.param, cond=labels))

    def draw(eval_net: nn.Module, first: int, count: int, nfe: int) -> Tensor:  # in-loop FID's samples
        return draw_samples(
            eval_net,
            first=first,
            count=count,
            nfe=nfe,
            seed=config.seed,
            shape=(4, 32, 32),
            num_classes=config.num_classes,
            param=objective.param,
            path=objective.path,
            device=device,
            to_images=to_images,
        )

    return T.Task(
        config=config,
        config_dict=config_dict,
        net=net,
        objective=objective,
        make_optimizer=lambda params: make_optimizer(config, params),
        num_samples=len(dataset),
        load_batch=load_batch,
        sample_images=sample_images,
        read_indices=dataset.read,
        evaluation=_fid.in_loop_evaluation(config, runtime, net, draw),
    )


if __name__ == "__main__":
    main()
