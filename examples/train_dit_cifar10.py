"""Train an unconditional one-step SoFlow generator on CIFAR-10 (the official recipe).

By default the network is the paper's SongUNet (``--net unet``); ``--net DiT-S/2`` (or any DiT
size) trains a DiT instead, despite the file's name.

    python examples/train_dit_cifar10.py --data data/cifar-10-batches-py --out runs/cifar_unet
    torchrun --nproc_per_node 8 examples/train_dit_cifar10.py --data data/cifar-10-batches-py --out runs/cifar_unet
    python examples/train_dit_cifar10.py --net DiT-S/2 --data data/cifar-10-batches-py --out runs/cifar_dit
    python examples/train_dit_cifar10.py --preset tiny --synthetic --out /tmp/cifar_tiny   # seconds, on a CPU

``--data`` is the folder of the CIFAR-10 "python version" batches (data_batch_1..5,
test_batch), unpacked from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.

Recipe: objective preset "cifar10" (λ = 0, p = 0.75, ε = 1e-3, no guidance), RAdam lr 1e-4
betas (0.9, 0.999), global batch 1024, 800k steps, EMA 0.9999 in float64 every 16 steps, EDM
augmentation (p = 0.12) whose 6 labels condition the SongUNet (dropout 0.3) in the Flow
Matching, student and teacher passes alike. The labels travel as the objective's ``cond`` (so
they are split with the batch) and the objective runs separate grad calls when dropout is
active, so student and teacher draw the same dropout masks. ``--net DiT-S/2`` (or any DiT
size) trains an unconditional DiT on 32×32×3 with patch 2 instead; a DiT has no input for
augmentation labels, so augmentation is off for it (``--augment`` would leak augmentations).
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

from soflow_core import SoFlowObjective, sample_one_step
from soflow_core.train.augment import EDMAugment
from soflow_core.train.latents import to_uint8_images

NEEDS_DATA = """CIFAR-10 is needed: pass --data FOLDER (or --synthetic for a smoke run).

FOLDER holds the "CIFAR-10 python version" batches: data_batch_1 ... data_batch_5 and test_batch.
Fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack it, e.g.
  mkdir -p data && tar -xzf cifar-10-python.tar.gz -C data
then pass --data data/cifar-10-batches-py."""


@dataclass(frozen=True, kw_only=True)
class CifarConfig(T.TrainConfig):
    """The CIFAR-10 run; defaults are the reference SongUNet recipe (the official code's CIFAR-10 config)."""

    out: str = "runs/cifar10"
    net: str = "unet"  # "unet" (SongUNet) or a DiT size such as "DiT-S/2" (patch 2, unconditional)
    total_steps: int = 800_000
    batch_size: int = 1024
    ema_every: int = 16
    ema_float64: bool = True
    dropout: float = 0.3  # SongUNet dropout
    model_channels: int = 128  # SongUNet base channels
    channel_mult: str = "2,2,2"  # SongUNet channel multiplier per resolution, comma-separated
    num_blocks: int = 4  # SongUNet residual blocks per resolution
    augment: bool | None = None  # EDM augmentation; None: on for the UNet, off for a DiT
    augment_p: float = 0.12  # EDM augmentation probability
    backend: Literal["auto", "torch", "triton"] = "auto"  # loss-path kernels ("auto": Triton on CUDA)


PRESETS = {
    "paper": CifarConfig(),
    "tiny": CifarConfig(
        model_channels=16,
        channel_mult="1,2",
        num_blocks=1,
        synthetic_size=256,
        total_steps=4,
        batch_size=8,
        ckpt_every=2,
        log_every=1,
        sample_every=0,
        sample_grid=4,
        ema_warmup=True,
        out="runs/cifar10_tiny",
    ),
}


PRESETS_HELP = {
    "paper": "the paper's CIFAR-10 run: 800 000 steps at global batch 1024 (a multi-GPU job)",
    "tiny": "a 4-step smoke run of a small SongUNet (seconds on a CPU; EMA with warm-up)",
}


def synthetic_cifar(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic uint8 images (N, 3, 32, 32): colored bars whose angle and color depend on the index."""
    index = np.arange(count)
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    angle = (index % 8)[:, None, None] * (np.pi / 8)
    wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / 8))
    colors = np.stack([(index * 37) % 256, (index * 91) % 256, (index * 53) % 256], axis=1)[:, :, None, None]
    images = (127.5 + 127.5 * wave[:, None] * (colors / 255.0 * 2 - 1)).clip(0, 255).astype(np.uint8)
    return images, (index % 10).astype(np.int64)


def resolve(config: CifarConfig) -> dict:
    augment = config.augment if config.augment is not None else config.net == "unet"
    return {**dataclasses.asdict(config), "task": "cifar10", "augment": augment}


def main(argv: list[str] | None = None) -> dict:
    config, parser = T.parse_config(CifarConfig, PRESETS, argv, __doc__, "paper", PRESETS_HELP)
    if config.net != "unet" and config.net not in T.ALL_DIT_SIZES:
        parser.error(f"--net must be unet or one of {', '.join(T.ALL_DIT_SIZES)}; got {config.net!r}")
    if config.net != "unet" and config.augment:
        parser.error("--augment needs --net unet: a DiT has no input for augmentation labels")
    if not config.synthetic and (config.data is None or not Path(config.data).is_dir()):
        where = "" if config.data is None else f"\n(--data {config.data} is not a folder)"
        T.missing_data(NEEDS_DATA + where)
    with T.distributed_runtime(config.device) as runtime, T.run_folder(runtime, Path(config.out)) as folder:
        return run(config, runtime, folder)


def run(config: CifarConfig, runtime: T.Runtime, folder: T.RunFolder) -> dict:
    config_dict = resolve(config)
    if config.synthetic:
        images, _ = synthetic_cifar(config.synthetic_size)
    else:
        from _data import read_cifar10

        images, _ = read_cifar10(config.data, split="train")
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    device = runtime.device
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    net = T.build_net(config_dict).to(device)
    objective = SoFlowObjective.from_preset("cifar10", backend=config.backend)
    augment = EDMAugment(p=config.augment_p) if config_dict["augment"] else None

    def load_batch(indices: np.ndarray, generator: torch.Generator, dev: torch.device) -> tuple[Tensor, Tensor | None]:
        x = pixels[torch.from_numpy(indices)].to(dev, non_blocking=True).float() / 127.5 - 1.0
        if augment is None:
            return x, None
        out = augment(x, generator=generator)
        return out.images, out.labels

    @torch.no_grad()
    def sample_images(eval_net: nn.Module, count: int, generator: torch.Generator) -> Tensor:
        noise = torch.randn(count, 3, 32, 32, generator=generator).to(device)
        return to_uint8_images(sample_one_step(eval_net, noise, param=objective.param))

    task = T.Task(
        config=config,
        config_dict=config_dict,
        net=net,
        objective=objective,
        make_optimizer=lambda params: torch.optim.RAdam(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0),
        num_samples=len(pixels),
        load_batch=load_batch,
        sample_images=sample_images,
        augment_labels=augment is not None,
    )
    summary = T.train(task, runtime, folder)
    if runtime.is_main:
        print(f"done: {summary['steps_done']} steps; last metrics {summary['last']}; run folder {config.out}")
    return summary


if __name__ == "__main__":
    main()
