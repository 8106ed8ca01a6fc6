"""FID glue shared by ``fid.py``, ``fid_reference.py`` and the trainers: the Inception flags, and in-loop FID.

Imported by the scripts in ``examples/`` as ``import _fid``; nothing here is part of the library API (that is
``soflow_core.metrics.fid``).

**In-loop FID** (``in_loop_evaluation``) plugs into the trainers' evaluation seam (``_duties.Evaluation``):
every ``--fid-every`` steps and at the run's last planned step, every rank draws its share of the
``--fid-samples`` samples of the EMA weights at each NFE of ``--fid-nfe`` (samples i of ``_sampling``'s
stream with the run's ``--seed``, in batches of ``--fid-batch-size``: batch b on rank b mod world), runs the
Inception on them, and sums their pool features (``FeatureSums``); the sums are all-reduced and rank 0 logs
``fid_<n>nfe`` against ``--fid-reference``. These are exactly the samples ``sample.py --seed <seed>
--batch-size <fid batch size>`` draws from the checkpoint of that step, and the sums those that ``fid.py``
computes from them, so the offline and in-loop values agree to rounding. At the end of the run rank 0 plots
FID against steps into ``<out>/fid.png``. Everything an evaluation needs (the reference, the weights,
torch-fidelity, the VAE of a latent model) is checked before the first step, and one sample is drawn, decoded
and scored at start, so a run cannot fail at its first evaluation because a file is missing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _cli import optional_import
from torch import Tensor, nn

from soflow_core._files import atomic_save
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


# ----------------------------------------------------------------------------- in-loop FID


def fid_active(config: Any) -> bool:
    """Whether a trainer's config asks for in-loop FID: a period and a reference."""
    return config.fid_every > 0 and config.fid_reference is not None


def config_problems(config: Any) -> list[str]:
    """Every problem with a trainer's in-loop FID settings, found before anything starts (files included)."""
    problems = []
    for name, low in (("fid_every", 0), ("fid_samples", 2), ("fid_batch_size", 1)):
        if getattr(config, name) < low:
            problems.append(f"--{name.replace('_', '-')} must be >= {low}; got {getattr(config, name)}")
    nfes = config.fid_nfe
    if not nfes or any(n < 1 for n in nfes) or len(set(nfes)) != len(nfes):
        problems.append(f"--fid-nfe must be distinct network evaluation counts >= 1, e.g. 1,2; got {nfes}")
    if config.fid_reference is not None and config.fid_every == 0:
        problems.append("--fid-reference needs --fid-every N > 0 (in-loop FID is off in this preset)")
    if problems or not fid_active(config):
        return problems
    try:
        fid.load_reference(config.fid_reference)
    except (FileNotFoundError, ValueError) as error:
        problems.append(f"--fid-reference: {error}")
    try:
        fid.find_inception_weights(config.inception_weights)
    except FileNotFoundError as error:
        problems.append(f"--inception-weights: {error}")
    try:
        importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except ModuleNotFoundError as error:
        hint = 'pip install -e ".[fid]"' if error.name == "torch_fidelity" else "install torchvision for your torch"
        problems.append(f"in-loop FID needs torch-fidelity and the torchvision it imports ({error}; {hint})")
    try:
        optional_import("matplotlib", "the plot of FID against steps")
    except ModuleNotFoundError as error:
        problems.append(str(error))
    return problems


# (network, first sample, count, nfe) -> uint8 NHWC images of those samples, on the runtime's device
DrawImages = Callable[[nn.Module, int, int, int], Tensor]


def in_loop_evaluation(config: Any, runtime: Any, net: nn.Module, draw: DrawImages) -> Any:
    """The trainers' in-loop FID as an ``Evaluation``, or None when it is off (see the module docstring).

    Opens the Inception and the reference on every rank and draws, decodes and scores one sample with
    ``net`` (the initial network, in eval mode for the call) before training starts; a reference whose image
    size differs from the samples' stops the run there.

    Args:
        config: The trainer's resolved config (its ``fid_*``, ``inception_weights``, ``seed`` fields).
        runtime: This process (rank, world size, device).
        net: The network as built, to check the sampling pipeline with.
        draw: Draws samples as images (``_sampling.draw_samples`` with the trainer's decoding).

    Returns:
        The ``_duties.Evaluation``, or None.

    Raises:
        SystemExit: The weights or the reference cannot be used.
    """
    from _duties import Evaluation  # the trainer's loop; imported here so fid.py does not load it

    if not fid_active(config):
        if runtime.is_main and config.fid_every > 0:
            print("in-loop FID: off (no --fid-reference; see docs/fid.md)", flush=True)
        return None
    try:
        weights = fid.find_inception_weights(config.inception_weights)
        inception = fid.InceptionV3(weights, verify_sha256=not config.allow_other_inception_weights)
        reference = fid.load_reference(config.fid_reference)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"in-loop FID: {error}") from error
    inception = inception.to(runtime.device)
    ref_size = _reference_image_size(config.fid_reference, reference)
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            probe = draw(net, 0, 1, max(config.fid_nfe))
            inception(probe)
    finally:
        net.train(training)
    size = [int(probe.shape[1]), int(probe.shape[2])]
    if ref_size is not None and ref_size != size:
        raise SystemExit(
            f"in-loop FID: --fid-reference {config.fid_reference} holds {ref_size[0]}x{ref_size[1]} images, this "
            f"run's samples are {size[0]}x{size[1]}; make a reference of images of the samples' size"
        )
    if runtime.is_main:
        print(
            f"in-loop FID: {config.fid_samples} samples at NFE {', '.join(map(str, config.fid_nfe))} every "
            f"{config.fid_every} steps against {config.fid_reference} ({size[0]}x{size[1]} images; Inception "
            f"weights {weights})",
            flush=True,
        )
    starts = list(range(0, config.fid_samples, config.fid_batch_size))

    def evaluate(network: nn.Module, step: int, rt: Any) -> dict[str, float]:
        scores = {}
        for nfe in config.fid_nfe:
            sums = fid.FeatureSums.zeros(fid.POOL_DIM, rt.device)
            for b in range(rt.rank, len(starts), rt.world_size):  # batch b on rank b mod world
                count = min(config.fid_batch_size, config.fid_samples - starts[b])
                images = draw(network, starts[b], count, nfe)
                sums = sums + fid.FeatureSums.from_features(inception(images).pool)
            sums = sums.all_reduce()  # every rank; rank 0 scores
            if rt.is_main:
                scores[f"fid_{nfe}nfe"] = sums.statistics().frechet_distance(reference.pool)
        return scores

    return Evaluation(every=config.fid_every, evaluate=evaluate, finish=plot_fid)


def _reference_image_size(path: str, reference: fid.FIDReference) -> list[int] | None:
    """The (height, width) of the reference's images, where its file says (metadata, or ADM's arr_0)."""
    if "image_size" in reference.metadata:
        return [int(v) for v in reference.metadata["image_size"]]
    if "images_in_file" in reference.metadata:
        return list(fid.npz_image_shape(path)[1:])
    return None


def plot_fid(out: Path) -> Path | None:
    """Plot the ``fid_*`` values of ``<out>/metrics.jsonl`` against steps into ``<out>/fid.png`` (None: no rows)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "event" in row:
            continue
        for key, value in row.items():
            if key.startswith("fid_") and isinstance(value, (int, float)):
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    if not series:
        return None
    matplotlib = optional_import("matplotlib", "the plot of FID against steps")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for key in sorted(series):
        steps, values = zip(*sorted(series[key]))
        axes.plot(steps, values, marker="o", label=key.removeprefix("fid_").replace("nfe", " NFE"))
    axes.set_xlabel("optimizer steps")
    axes.set_ylabel("FID (EMA weights)")
    axes.set_title(f"in-loop FID, {out.name}")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = out / "fid.png"
    atomic_save(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return path
