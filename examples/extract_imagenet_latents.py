"""Encode ImageNet into SD-VAE posteriors (mean and std) stored as HDF5 latent shards.

    python examples/extract_imagenet_latents.py --data /data/imagenet/train \\
        --vae checkpoints/sd-vae-ft-mse --out data/imagenet256_latents
    torchrun --nproc_per_node 8 examples/extract_imagenet_latents.py --data ... --vae ... --out ...
    python examples/extract_imagenet_latents.py --synthetic --preset tiny   # end to end on random JPEGs, no downloads

Each image gets the ADM centre crop to ``--resolution`` (repeated 2× BOX downsampling while the
short side is at least twice the target, a BICUBIC resize of the short side to the target, a
centre crop), is mapped to [−1, 1] and encoded by the VAE; its posterior mean and standard
deviation go into the shards, so training draws a fresh latent z = (mean + std·ε)·0.18215 at
every step. Classes are the sorted WordNet ids (sub-folders of ``--data``); ``--data`` may also be
a text file with one ``path [label]`` per line (paths relative to the file; without labels the
parent folder names are the classes).

Each torchrun rank encodes every WORLD-th image and writes ``latents-RRRRR-of-WWWWW.h5`` in
``--out`` under its final name only when complete, so a rerun skips the finished shards. The
resolved configuration is saved as ``extract_config.json`` beside the shards. Read the shards
with ``_data.LatentShards(out)``.

The VAE is ``stabilityai/sd-vae-ft-mse`` in diffusers format, from a local folder (fetch it once:
``hf download stabilityai/sd-vae-ft-mse --local-dir checkpoints/sd-vae-ft-mse``).
"""

import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import config_parser, optional_import, resolve_config
from _data import LatentShardWriter
from _vae import VAE_NAME, encode_posterior, load_vae, vae_missing_message

from soflow_core.train import SD_VAE_SCALE_FACTOR

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """Everything that defines an extraction; saved beside the shards."""

    data: str = "data/imagenet/train"  # train/<wnid>/*.JPEG folder, or a list file of "path [label]" lines
    vae: str = "checkpoints/sd-vae-ft-mse"  # local diffusers folder of stabilityai/sd-vae-ft-mse
    out: str = "data/imagenet256_latents"  # output folder of the .h5 shards
    resolution: int = 256  # image side after the ADM centre crop (a multiple of 8)
    batch_size: int = 64  # per rank
    num_workers: int = 8  # JPEG-decoding worker processes per rank
    precision: Literal["fp32", "bf16"] = "fp32"  # VAE compute
    storage: Literal["float32", "float16"] = "float32"  # shard dtype of mean/std
    limit: int = 0  # encode only the first N images (0 = all)
    synthetic: bool = False  # random JPEGs and a tiny random VAE in a temporary folder


PRESETS_HELP = {
    "paper": "ImageNet at 256×256, as the paper's latents",
    "tiny": "64×64, 4 images per batch, no workers (with --synthetic: seconds on a CPU)",
}
PRESETS = {
    "paper": ExtractConfig(),
    "tiny": ExtractConfig(resolution=64, batch_size=4, num_workers=0, out="runs/imagenet_latents_tiny"),
}


def parse_config(argv: list[str] | None = None) -> ExtractConfig:
    parser = config_parser(__doc__, ExtractConfig, PRESETS, "paper", presets_help=PRESETS_HELP)
    config = resolve_config(parser.parse_args(argv), ExtractConfig, PRESETS)
    if config.resolution < 8 or config.resolution % 8:
        parser.error(f"--resolution must be a positive multiple of 8; got {config.resolution}")
    if config.batch_size < 1 or config.num_workers < 0 or config.limit < 0:
        parser.error("--batch-size must be >= 1, --num-workers >= 0 and --limit >= 0")
    return config


# ----------------------------------------------------------------------------- images


def adm_center_crop(image, size: int):
    """ADM's centre crop (guided-diffusion): BOX-halve while the short side is ≥ 2·size, BICUBIC to size, crop.

    Args:
        image: A PIL image.
        size: Side of the square result.

    Returns:
        A size × size PIL image.
    """
    from PIL import Image

    # Halving with a box filter first keeps the final bicubic step from aliasing on large images.
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def list_images(data: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of an ImageNet-style folder or a list file."""
    if data.is_file():
        entries = []
        for number, line in enumerate(data.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip("-").isdigit()):
                raise ValueError(f"{data}:{number}: expected 'path [label]'; got {line!r}")
            path = Path(parts[0]) if Path(parts[0]).is_absolute() else data.parent / parts[0]
            entries.append((path, int(parts[1]) if len(parts) == 2 else None))
        if any(label is None for _, label in entries):
            classes = sorted({path.parent.name for path, _ in entries})
            index = {name: i for i, name in enumerate(classes)}
            return [p for p, _ in entries], [index[p.parent.name] for p, _ in entries], classes
        labels = [label for _, label in entries]
        return [p for p, _ in entries], labels, [str(i) for i in sorted(set(labels))]
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((data / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    return files, labels, classes


class ImageFiles(torch.utils.data.Dataset):
    """Decoded, centre-cropped images in [−1, 1] with their label and index."""

    def __init__(self, files: list[Path], labels: list[int], indices: list[int], resolution: int) -> None:
        self.files, self.labels, self.indices, self.resolution = files, labels, indices, resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from PIL import Image

        index = self.indices[i]
        with Image.open(self.files[index]) as image:
            array = np.asarray(adm_center_crop(image.convert("RGB"), self.resolution))
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        return x, self.labels[index], index


# ----------------------------------------------------------------------------- synthetic mode


def make_synthetic(root: Path, *, num_classes: int = 2, per_class: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """Random JPEGs of odd sizes in root/train/<wnid>/ and a tiny random AutoencoderKL in root/vae."""
    from diffusers import AutoencoderKL
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            width, height = (int(v) for v in rng.integers(40, 160, 2) | 1)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"n{c:08d}_{k}.JPEG", quality=90)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    vae.save_pretrained(root / "vae")
    return root / "train", root / "vae"


# ----------------------------------------------------------------------------- extraction


def shard_name(rank: int, world: int) -> str:
    return f"latents-{rank:05d}-of-{world:05d}.h5"


def extract(config: ExtractConfig) -> list[Path]:
    """Run this rank's part of the extraction; returns the shard paths of this rank (written or skipped)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    data, vae_folder, out = Path(config.data), Path(config.vae), Path(config.out)
    if not data.exists():
        raise FileNotFoundError(
            f"ImageNet folder {data} does not exist. Pass the ImageNet-1k train folder (train/<wnid>/*.JPEG, "
            f"1000 sub-folders, from https://image-net.org) with --data, or a list file of 'path [label]' lines; "
            f"or try the pipeline with --synthetic."
        )
    if not vae_folder.is_dir():
        raise FileNotFoundError(vae_missing_message(vae_folder, f"VAE folder {vae_folder} does not exist"))
    files, labels, classes = list_images(data)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {data}")
    count = min(len(files), config.limit) if config.limit else len(files)
    indices = list(range(rank, count, world))
    path = out / shard_name(rank, world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {**dataclasses.asdict(config), "world_size": world, "num_images": count, "num_classes": len(classes)}
        (out / "extract_config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    if path.exists():
        print(f"[rank {rank}] {path} is complete; skipping", flush=True)
        return [path]

    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    vae = load_vae(vae_folder, device=device, dtype=dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, config.resolution // factor, config.resolution // factor)
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, labels, indices, config.resolution),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        shuffle=False,
    )
    attrs = {
        "scale_factor": SD_VAE_SCALE_FACTOR,
        "vae": VAE_NAME if not config.synthetic else "tiny random AutoencoderKL (synthetic)",
        "vae_folder": str(vae_folder),
        "resolution": config.resolution,
        "source": str(data),
        "crop": "ADM center crop",
        "rank": rank,
        "world_size": world,
        "precision": config.precision,
    }
    tqdm = optional_import("tqdm", "the progress bar").tqdm

    start, row = time.perf_counter(), 0
    with LatentShardWriter(path, len(indices), latent_shape, dtype=config.storage, **attrs) as writer:
        for images, batch_labels, batch_indices in tqdm(
            loader, desc=f"rank {rank}/{world}", disable=rank != 0, unit="batch"
        ):
            mean, std = encode_posterior(vae, images.to(device, non_blocking=True))
            writer.write(row, mean.cpu(), std.cpu(), batch_labels.numpy(), index=batch_indices.numpy())
            row += len(images)
    seconds = time.perf_counter() - start
    print(f"[rank {rank}] wrote {row} latents of shape {latent_shape} to {path} in {seconds:.1f}s", flush=True)
    return [path]


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        if not config.synthetic:
            extract(config)
            return 0
        with tempfile.TemporaryDirectory(prefix="soflow-synthetic-imagenet-") as tmp:
            data, vae = make_synthetic(Path(tmp))
            extract(dataclasses.replace(config, data=str(data), vae=str(vae)))
        return 0
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
