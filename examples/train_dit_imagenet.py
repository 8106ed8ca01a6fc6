"""Train a class-conditional SoFlow DiT on ImageNet-256 VAE latents (the official recipe).

    # 1 GPU / 8 GPUs / several nodes (global batch 256 is split over ranks and --grad-accum)
    python examples/train_dit_imagenet.py --data data/imagenet256_latents --out runs/dit_b4
    torchrun --nproc_per_node 8 examples/train_dit_imagenet.py --data data/imagenet256_latents --out runs/dit_b4
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/train_dit_imagenet.py --model DiT-XL/2 --fsdp --data ... --out runs/dit_xl2
    python examples/train_dit_imagenet.py --preset tiny --synthetic --out /tmp/tiny   # seconds, on a CPU

The data are posterior means and standard deviations of the SD-VAE-ft-MSE encoder (``mean``,
``std`` of shape (N, 4, 32, 32), ``label`` of shape (N,)) in one .h5 file or a folder of .h5
shards, made by ``examples/extract_imagenet_latents.py``. Every step draws a fresh latent
z = (mean + std·ε)·0.18215. ``--synthetic`` trains on generated latents of the same shape.

The run folder ``--out`` holds config.json, metrics.jsonl, checkpoints/step-*.pt (with
manifests) and samples/step-*.png (1-NFE samples of the EMA weights). Starting again with the
same ``--out`` resumes from the newest valid checkpoint, skipping (and reporting) damaged ones.
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

import _training as T
from _images import latent_preview
from _run_folder import RunFolder, run_folder
from _runtime import Runtime, distributed_runtime

from soflow_core import SoFlowObjective, sample_one_step
from soflow_core.train.latents import sample_latents

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


@dataclass(frozen=True, kw_only=True)
class ImageNetConfig(T.TrainConfig):
    """The ImageNet-256 run; defaults are the reference DiT-B/4 recipe (the official code's imagenet.yaml)."""

    out: str = "runs/dit_imagenet"
    model: str = "DiT-B/4"  # any of DIT_SIZES (B/4, B/2, M/2, L/2, XL/2) or a small extra size
    num_classes: int = 1000  # classes of the label table; the null (unconditional) class is num_classes
    cfg_scale: float | None = None  # ω; None takes the per-size value (B/4 3.0, B/2 2.5, M/2 2.25, L/2 2.0, XL/2 2.0)
    vae: str | None = None  # local SD-VAE-ft-MSE folder to decode the sample grids
    gradient_checkpointing: bool = False  # recompute each DiT block in the backward pass (less memory)
    beta2: float = 0.99  # AdamW betas (0.9, beta2), weight decay 0
    backend: Literal["auto", "torch", "triton"] = "auto"  # loss-path kernels ("auto": Triton on CUDA)


PRESETS = {
    "paper": ImageNetConfig(),
    "tiny": ImageNetConfig(
        model="DiT-tiny/4",
        num_classes=10,
        synthetic_size=256,
        total_steps=6,
        batch_size=8,
        ckpt_every=2,
        log_every=1,
        sample_every=0,
        sample_grid=4,
        ema_warmup=True,
        out="runs/dit_imagenet_tiny",
    ),
}


PRESETS_HELP = {
    "paper": "the paper's DiT-B/4 run: 400 000 steps at global batch 256 (a multi-GPU job)",
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


def resolve(config: ImageNetConfig) -> dict:
    scale = config.cfg_scale if config.cfg_scale is not None else T.GUIDANCE_SCALE.get(config.model, 3.0)
    return {**dataclasses.asdict(config), "task": "imagenet", "cfg_scale": scale}


def build_objective(config: ImageNetConfig, scale: float) -> SoFlowObjective:
    objective = SoFlowObjective.from_preset("imagenet", backend=config.backend)
    guidance = dataclasses.replace(objective.guidance, scale=scale, null_cond=config.num_classes)
    return dataclasses.replace(objective, guidance=guidance)


def main(argv: list[str] | None = None) -> dict:
    config, parser = T.parse_config(ImageNetConfig, PRESETS, argv, __doc__, "paper", PRESETS_HELP)
    if config.model not in T.ALL_DIT_SIZES:
        parser.error(f"--model must be one of {', '.join(T.ALL_DIT_SIZES)}; got {config.model!r}")
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
    config_dict = resolve(config)
    if config.synthetic:
        dataset = SyntheticLatents(config.synthetic_size, config.num_classes)
    else:
        from _data import LatentShards

        dataset = LatentShards(config.data)
    device = runtime.device
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    net = T.build_net(config_dict).to(device)
    objective = build_objective(config, config_dict["cfg_scale"])

    def load_batch(raw, generator: torch.Generator, dev: torch.device) -> tuple[Tensor, Tensor]:
        mean, std, labels = raw
        z = sample_latents(mean.to(dev, non_blocking=True), std.to(dev, non_blocking=True), generator=generator)
        return z, labels.to(dev)

    vae = None
    if config.vae is not None and runtime.is_main:
        from _vae import load_vae

        vae = load_vae(config.vae, device=device, dtype=torch.float32)

    @torch.no_grad()
    def sample_images(eval_net: nn.Module, count: int, generator: torch.Generator) -> Tensor:
        noise = torch.randn(count, 4, 32, 32, generator=generator).to(device)
        labels = torch.randint(0, config.num_classes, (count,), generator=generator).to(device)
        z = sample_one_step(eval_net, noise, param=objective.param, cond=labels)
        if vae is None:
            return latent_preview(z)
        from _vae import decode_latents

        from soflow_core.train.latents import to_uint8_images

        return to_uint8_images(decode_latents(vae, z))

    return T.Task(
        config=config,
        config_dict=config_dict,
        net=net,
        objective=objective,
        make_optimizer=lambda params: torch.optim.AdamW(
            params, lr=config.lr, betas=(0.9, config.beta2), weight_decay=0.0
        ),
        num_samples=len(dataset),
        load_batch=load_batch,
        sample_images=sample_images,
        read_indices=dataset.read,
    )


if __name__ == "__main__":
    main()
