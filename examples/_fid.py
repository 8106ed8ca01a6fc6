"""FID glue shared by ``fid.py``, ``fid_reference.py`` and the trainers: the Inception flags and how they resolve.

Imported by the scripts in ``examples/`` as ``import _fid``; nothing here is part of the library API (that is
``soflow_core.metrics.fid``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from soflow_core.metrics import fid

WEIGHTS_HELP = (
    f"torch-fidelity's Inception-v3 weights file ({fid.INCEPTION_WEIGHTS_FILE}); without it: "
    f"${fid.INCEPTION_WEIGHTS_ENV}, then torch.hub's checkpoint folder, then a download unless --no-download"
)


def add_inception_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the Inception weights and where it runs."""
    parser.add_argument("--inception-weights", default=None, metavar="PATH", help=WEIGHTS_HELP)
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"download the weights from {fid.INCEPTION_WEIGHTS_URL} when no local copy is found",
    )
    parser.add_argument(
        "--allow-other-weights",
        action="store_true",
        help="accept a weights file whose SHA-256 does not start with 6726825d (scores not comparable with papers)",
    )
    parser.add_argument("--batch-size", type=int, default=200, help="images per Inception batch")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the Inception runs")


def check_inception_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values of those flags before any work (``parser.error`` exits with status 2)."""
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here; use --device cpu")


def device_of(choice: str) -> torch.device:
    """``auto`` means CUDA when visible."""
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def weights_path(args: argparse.Namespace) -> Path:
    """The Inception weights file the flags name or find (raises FileNotFoundError saying what to get)."""
    return fid.find_inception_weights(args.inception_weights, download=args.download)


def open_inception(args: argparse.Namespace, device: torch.device) -> fid.InceptionV3:
    """The checked Inception on ``device``."""
    path = weights_path(args)
    return fid.InceptionV3(path, verify_sha256=not args.allow_other_weights).to(device)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress(batches: Iterable[np.ndarray], total: int, label: str) -> Iterator[np.ndarray]:
    """Pass batches through, logging the images done about every 30 s."""
    done, last = 0, time.monotonic()
    for batch in batches:
        yield batch
        done += len(batch)
        if time.monotonic() - last > 30:
            log(f"{label}: {done}/{total} images")
            last = time.monotonic()


def npz_inputs(paths: Iterable[str]) -> list[Path]:
    """Sample files from files and folders (a folder's ``*.npz``, sorted by name), each checked by its header.

    Raises:
        FileNotFoundError: If a path does not exist or a folder holds no ``.npz``.
        ValueError: If a file is not an ``.npz`` of (n, h, w, 3) uint8 images in ``arr_0``.
    """
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.npz") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"folder {text!r} holds no .npz sample files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"sample path {text!r} is neither a file nor a folder")
    for path in files:
        fid.npz_image_shape(path)
    return files
