"""Train an unconditional one-step SoFlow generator on CIFAR-10: the released UNet run is the default preset.

By default the network is the paper's SongUNet (``--net unet``); ``--net DiT-S/2`` (or any DiT
size) trains a DiT instead, despite the file's name.

    torchrun --nproc_per_node 8 examples/train_dit_cifar10.py --data data/cifar-10-batches-py   # UNet-uncond
    python examples/train_dit_cifar10.py --print-config                     # what that run would be
    python examples/train_dit_cifar10.py --net DiT-S/2 --data data/cifar-10-batches-py --out runs/cifar_dit
    python examples/train_dit_cifar10.py --preset tiny --synthetic --out /tmp/cifar_tiny   # seconds, on a CPU

``--data`` is the folder of the CIFAR-10 "python version" batches (data_batch_1..5,
test_batch), unpacked from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.

Recipe (preset UNet-uncond, the official cifar.yaml): λ = 0, p = 0.75, ε = 1e-3, times
logit-normal μ = (−0.9, −4.0, −0.9), σ = 1.6, r Exponent 1.0 → 0.0003125, no guidance; RAdam lr
1e-4 betas (0.9, 0.999), global batch 1024, 800k steps, EMA 0.9999 in float64 every 16 steps, EDM
augmentation (p = 0.12) whose 6 labels condition the SongUNet (dropout 0.3) in the Flow
Matching, student and teacher passes alike. The labels travel as the objective's ``cond`` (so
they are split with the batch) and the objective runs separate grad calls when dropout is
active, so student and teacher draw the same dropout masks. ``--net DiT-S/2`` (or any DiT
size) trains an unconditional DiT on 32×32×3 with patch 2 instead; a DiT has no input for
augmentation labels, so augmentation is off for it (``--augment`` would leak augmentations).

In-loop FID: with ``--fid-reference`` (the training set's statistics from
``examples/fid_reference.py --cifar10``), every ``--fid-every`` steps the EMA weights draw
``--fid-samples`` (50 000) samples at 1 and 2 NFE, scored with the ADM evaluator's Inception (the
"fid" extra); ``fid_1nfe`` and ``fid_2nfe`` are logged in metrics.jsonl of the run folder and
plotted in its fid.png. The FID page of the docs has the details.
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
from _run_folder import RunFolder, run_folder
from _runtime import Runtime, distributed_runtime
from _sampling import draw_samples

from soflow_core import sample_one_step
from soflow_core.train.augment import EDMAugment
from soflow_core.train.latents import to_uint8_images

NEEDS_DATA = """CIFAR-10 is needed: pass --data FOLDER (or --synthetic for a smoke run).

FOLDER holds the "CIFAR-10 python version" batches: data_batch_1 ... data_batch_5 and test_batch.
Fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack it, e.g.
  mkdir -p data && tar -xzf cifar-10-python.tar.gz -C data
then pass --data data/cifar-10-batches-py."""


@dataclass(frozen=True, kw_only=True)
class CifarConfig(T.TrainConfig):
    """The CIFAR-10 run; defaults are the released SongUNet recipe (the official code's cifar.yaml).

    CIFAR-10 is trained unconditionally (the official trainer asserts ω = 1), so this trainer has
    no guidance flags; its recipe flags are the shared ones, with cifar.yaml's values.
    """

    out: str | None = None  # run folder; None: runs/UNet-uncond for the UNet, runs/cifar10-<size> for a DiT
    net: str = "unet"  # "unet" (SongUNet) or a DiT size such as "DiT-S/2" (patch 2, unconditional)
    total_steps: int = 800_000
    batch_size: int = 1024
    ema_every: int = 16
    ema_float64: bool = True
    fm_fraction: float = 0.0
    fm_time_mean: float = -0.9
    fm_time_std: float = 1.6
    s_time_mean: float = -4.0
    s_time_std: float = 1.6
    t_time_mean: float = -0.9
    t_time_std: float = 1.6
    r_init: float = 1.0
    r_end: float = 0.0003125
    p: float = 0.75
    eps: float = 1e-3
    dropout: float = 0.3  # SongUNet dropout
    model_channels: int = 128  # SongUNet base channels
    channel_mult: str = "2,2,2"  # SongUNet channel multiplier per resolution, comma-separated
    num_blocks: int = 4  # SongUNet residual blocks per resolution
    augment: bool | None = None  # EDM augmentation; None: on for the UNet, off for a DiT
    augment_p: float = 0.12  # EDM augmentation probability
    backend: Literal["auto", "torch", "triton"] = "auto"  # loss-path kernels ("auto": Triton on CUDA)
    fid_samples: int = 50_000  # samples per in-loop FID and NFE, spread over the ranks (FID-50K, as reported)


PRESETS = {
    "UNet-uncond": CifarConfig(),
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
        fid_every=0,
        fid_samples=16,
        fid_batch_size=8,
        out="runs/cifar10_tiny",
    ),
}


PRESETS_HELP = {
    "UNet-uncond": "the released CIFAR-10 UNet (uncond): SongUNet, 800 000 steps at global batch 1024 (a multi-GPU "
    "job)",
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


def resolve(config: CifarConfig) -> CifarConfig:
    """``config`` with --augment (on for the UNet, off for a DiT) and --out filled in.

    Raises:
        ValueError: An unknown --net, or --augment with a DiT.
    """
    if config.net != "unet" and config.net not in T.ALL_DIT_SIZES:
        raise ValueError(f"--net must be unet or one of {', '.join(T.ALL_DIT_SIZES)}; got {config.net!r}")
    if config.net != "unet" and config.augment:
        raise ValueError("--augment needs --net unet: a DiT has no input for augmentation labels")
    augment = config.augment if config.augment is not None else config.net == "unet"
    name = "UNet-uncond" if config.net == "unet" else "cifar10-" + config.net.removeprefix("DiT-").replace("/", "-")
    out = config.out if config.out is not None else f"runs/{name}"
    return dataclasses.replace(config, augment=augment, out=out)


def record(config: CifarConfig) -> dict:
    """What config.json holds for the resolved ``config``: its fields and the task."""
    return {**dataclasses.asdict(config), "task": "cifar10"}


def make_optimizer(config: CifarConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """RAdam, lr --lr, betas (0.9, 0.999), no weight decay (cifar.yaml)."""
    return torch.optim.RAdam(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)


def main(argv: list[str] | None = None) -> dict:
    config = T.parse_config(CifarConfig, PRESETS, argv, __doc__, "UNet-uncond", PRESETS_HELP, resolve, record)
    if not config.synthetic and (config.data is None or not Path(config.data).is_dir()):
        where = "" if config.data is None else f"\n(--data {config.data} is not a folder)"
        T.missing_data(NEEDS_DATA + where)
    with distributed_runtime(config.device) as runtime, run_folder(runtime, Path(config.out)) as folder:
        return run(config, runtime, folder)


def run(config: CifarConfig, runtime: Runtime, folder: RunFolder) -> dict:
    """Train in ``folder`` (locked) and print a summary on rank 0."""
    summary = T.train(build_task(config, runtime), runtime, folder)
    if runtime.is_main:
        print(f"done: {summary['steps_done']} steps; last metrics {summary['last']}; run folder {config.out}")
    return summary


def build_task(config: CifarConfig, runtime: Runtime) -> T.Task:
    """What this trainer plugs into the shared loop: the network (on the device), objective, data and sampling."""
    config = resolve(config)
    config_dict = record(config)
    if config.synthetic:
        images, _ = synthetic_cifar(config.synthetic_size)
    else:
        from _data import read_cifar10

        images, _ = read_cifar10(config.data, split="train")
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    device = runtime.device
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    net = T.build_net(config_dict).to(device)
    objective = T.build_objective(config_dict)
    augment = EDMAugment(p=config.augment_p) if config.augment else None

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

    def draw(eval_net: nn.Module, first: int, count: int, nfe: int) -> Tensor:  # in-loop FID's samples
        return draw_samples(
            eval_net,
            first=first,
            count=count,
            nfe=nfe,
            seed=config.seed,
            shape=(3, 32, 32),
            num_classes=None,
            param=objective.param,
            path=objective.path,
            device=device,
            to_images=to_uint8_images,
        )

    return T.Task(
        config=config,
        config_dict=config_dict,
        net=net,
        objective=objective,
        make_optimizer=lambda params: make_optimizer(config, params),
        num_samples=len(pixels),
        load_batch=load_batch,
        sample_images=sample_images,
        augment_labels=augment is not None,
        evaluation=_fid.in_loop_evaluation(config, runtime, net, draw),
    )


if __name__ == "__main__":
    main()
