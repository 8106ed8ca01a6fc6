"""Score .npz sample files against a reference: FID, sFID, Inception Score, precision and recall, as ADM does.

    # every .npz in a folder (e.g. one per checkpoint) against the ADM ImageNet 256 reference batch
    python examples/fid.py samples/ --reference VIRTUAL_imagenet256_labeled.npz --out scores.json
    # against precomputed reference statistics (examples/fid_reference.py), weights from a local file
    python examples/fid.py samples/xl2_nfe1.npz samples/xl2_nfe2.npz --reference refs/imagenet256.npz \\
        --inception-weights weights/weights-inception-2015-12-05-6726825d.pth

The job of the ADM evaluator (evaluations/evaluator.py of the guided-diffusion repository) in
PyTorch. Every sample file holds uint8 images (n, h, w, 3) in ``arr_0``, as examples/sample.py
makes them; they are read in batches, run through torch-fidelity's port of the TensorFlow
Inception-v3 (2015-12-05), and scored against the reference. One row per file is printed, and the
rows are written as JSON to --out (by default runs/fid/<first sample name>.json, outside the
tracked tree).

The reference is an ADM reference batch (its stored ``mu``/``sigma``/``mu_s``/``sigma_s`` are used,
as ADM does; its images ``arr_0`` only for precision and recall), a file of examples/fid_reference.py
(statistics and the reference's pool features, no images needed), or an .npz of images alone (its
statistics are computed first). Precision and recall need the reference's pool features: a file
without them but with images gets them computed once per run; precompute them with
examples/fid_reference.py.

The Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth) come from
--inception-weights, else the file $SOFLOW_INCEPTION_WEIGHTS names, else torch.hub's checkpoint
folder, else a download (unless --no-download). Needs the "fid" extra (torch-fidelity; see
docs/fid.md for CPU-only machines).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fid
from _cli import HelpFormatter

from soflow_core._files import atomic_write
from soflow_core.metrics import fid

DEFAULT_OUT = "runs/fid/<first sample name>.json"  # filled in from the first sample path
_COLUMNS = (
    ("fid", "FID"),
    ("sfid", "sFID"),
    ("inception_score", "IS"),
    ("precision", "precision"),
    ("recall", "recall"),
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("samples", nargs="+", help="sample .npz files and folders of them (arr_0: n×h×w×3 uint8)")
    parser.add_argument(
        "--reference", required=True, help="reference .npz: ADM reference batch, fid_reference.py output, or images"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="the JSON file of the rows (written atomically)")
    parser.add_argument(
        "--precision-recall",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute k-NN precision and recall (k = 3; needs the reference's pool features or images)",
    )
    _fid.add_inception_arguments(parser)
    args = parser.parse_args(argv)
    _fid.check_inception_arguments(parser, args)
    if args.out == DEFAULT_OUT:
        args.out = f"runs/fid/{Path(args.samples[0].rstrip('/')).stem or 'samples'}.json"
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out!r} is a folder; name the JSON file to write")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    try:
        samples = _fid.npz_inputs(args.samples)
        reference_file = Path(args.reference)
        reference = _reference_or_none(reference_file)
        device = _fid.device_of(args.device)
        inception = _fid.open_inception(args, device)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as error:  # missing files, bad files, no torch-fidelity
        raise SystemExit(f"error: {error}") from error
    reference = _complete_reference(reference, reference_file, inception, args)
    ref_shape = reference.metadata.get("image_size")
    rows = []
    print(_header(), flush=True)
    for path in samples:
        started = time.perf_counter()
        count, height, width = fid.npz_image_shape(path)
        if count < 2:
            raise SystemExit(f"error: {path} holds {count} image(s); FID needs at least 2")
        batches = _fid.progress(fid.read_npz_images(path, args.batch_size), count, str(path))
        features = fid.compute_image_features(inception, batches, keep_features=True)
        scores = fid.score_features(features, reference, precision_and_recall=args.precision_recall)
        row = {"file": str(path), **scores.as_dict(), "image_size": [height, width]}
        row["seconds"] = round(time.perf_counter() - started, 3)
        rows.append(row)
        print(_format_row(row), flush=True)
        if ref_shape and list(ref_shape) != [height, width]:
            _fid.log(f"note: {path} holds {height}x{width} images, the reference {ref_shape[0]}x{ref_shape[1]}")
    if args.out:
        report = {
            "reference": str(reference_file),
            "reference_metadata": reference.metadata,
            "inception_weights": str(inception.weights_path),
            "inception_weights_sha256": inception.sha256,
            "device": str(device),
            "torch": torch.__version__,
            "rows": rows,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
        _fid.log(f"wrote {out}")
    return rows


def _reference_or_none(path: Path) -> fid.FIDReference | None:
    """The reference's statistics, or None for a file of images alone (computed once the Inception is open)."""
    if path.is_file() and zipfile.is_zipfile(path):
        with np.load(path, allow_pickle=False) as arrays:
            if "mu" not in arrays.files and "arr_0" in arrays.files:
                fid.npz_image_shape(path)  # images alone: checked now, their statistics computed later
                return None
    return fid.load_reference(path)


def _complete_reference(
    reference: fid.FIDReference | None, path: Path, inception: fid.InceptionV3, args: argparse.Namespace
) -> fid.FIDReference:
    """Compute what the reference file lacks from its images: everything, or the pool features for precision/recall."""
    needs_features = args.precision_recall and (reference is None or reference.pool_features is None)
    has_images = reference is None or "images_in_file" in reference.metadata
    if not needs_features and reference is not None:
        return reference
    if not has_images:
        _fid.log(f"note: {path} has no pool features or images: precision and recall are left out")
        return reference
    count, height, width = fid.npz_image_shape(path)
    what = "statistics and pool features" if reference is None else "pool features (for precision and recall)"
    _fid.log(f"computing the reference's {what} from its {count} images (precompute them with fid_reference.py)")
    batches = _fid.progress(fid.read_npz_images(path, args.batch_size), count, str(path))
    features = fid.compute_image_features(inception, batches, keep_features=True)
    if reference is None:
        return fid.FIDReference.from_features(features, source=str(path), image_size=[height, width])
    return fid.FIDReference(
        pool=reference.pool,
        spatial=reference.spatial,
        pool_features=features.pool_features,
        metadata={**reference.metadata, "image_size": [height, width]},
    )


def _header() -> str:
    return f"{'file':<40} {'images':>7} " + " ".join(f"{title:>9}" for _, title in _COLUMNS)


def _format_row(row: dict) -> str:
    def cell(value: float | None) -> str:
        return f"{'-':>9}" if value is None or not math.isfinite(value) else f"{value:>9.4f}"

    name = row["file"] if len(row["file"]) <= 40 else "…" + row["file"][-39:]
    return f"{name:<40} {row['images']:>7} " + " ".join(cell(row[key]) for key, _ in _COLUMNS)


if __name__ == "__main__":
    main()
