"""Precompute FID reference statistics once: from the ADM reference batch or the CIFAR-10 training set.

    # ImageNet 256: the ADM reference batch (its stored statistics are kept, as the ADM evaluator uses
    # them; its 10k images give the pool features for precision and recall and a check of this Inception)
    python examples/fid_reference.py --images VIRTUAL_imagenet256_labeled.npz --out refs/imagenet256.npz
    # CIFAR-10: the 50k training images (cifar-10-batches-py, read without unpickling code)
    python examples/fid_reference.py --cifar10 data/cifar10 --out refs/cifar10_train.npz

Writes an .npz with the ADM evaluator's keys (``mu``, ``sigma``, ``mu_s``, ``sigma_s``), the reference's
pool features (``pool_features``, 8 KB per image; --no-features leaves them out, and with them
precision and recall), ``count`` and ``metadata``, so examples/fid.py and the trainers' in-loop FID read
statistics instead of recomputing them every time.

Where the --images file already holds statistics (an ADM reference batch), they are kept and the
statistics this Inception computes from its images are compared with them: the FID and sFID between
the two are printed and recorded in the metadata (``check_fid``, ``check_sfid``). With the real
weights they measure how closely torch-fidelity's port reproduces the TensorFlow graph on this machine
(near 0); with other weights they are meaningless. --recompute keeps this Inception's statistics
instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fid
from _cli import HelpFormatter

from soflow_core.metrics import fid


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", default=None, help=".npz with uint8 images n×h×w×3 in arr_0 (e.g. ADM's batch)")
    source.add_argument("--cifar10", default=None, help="folder with (or of) cifar-10-batches-py: the 50k train images")
    parser.add_argument("--out", required=True, help="the reference .npz to write (atomically)")
    parser.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store the reference's pool features (needed for precision and recall)",
    )
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="keep the statistics computed here, not those stored in the --images file",
    )
    _fid.add_inception_arguments(parser)
    args = parser.parse_args(argv)
    _fid.check_inception_arguments(parser, args)
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out!r} is a folder; name the .npz file to write")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    try:
        if args.images is not None:
            source = Path(args.images)
            count, height, width = fid.npz_image_shape(source)
            stored = _stored_statistics(source)
        else:
            import _data  # the CIFAR-10 reader, only where it is needed

            source = Path(args.cifar10)
            images = np.ascontiguousarray(_data.read_cifar10(source, "train")[0].transpose(0, 2, 3, 1))
            (count, height, width), stored = images.shape[:3], None
        if count < 2:
            raise ValueError(f"{source} holds {count} image(s); statistics need at least 2")
        device = _fid.device_of(args.device)
        inception = _fid.open_inception(args, device)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as error:  # missing files, bad files, no torch-fidelity
        raise SystemExit(f"error: {error}") from error
    if args.images is not None:
        batches = fid.read_npz_images(source, args.batch_size)
    else:
        batches = (images[i : i + args.batch_size] for i in range(0, count, args.batch_size))
    _fid.log(f"computing Inception features of {count} images ({height}x{width}) from {source} on {device}")
    features = fid.compute_image_features(inception, _fid.progress(batches, count, str(source)))
    metadata = {
        "source": str(source),
        "images": count,
        "image_size": [height, width],
        "inception_weights_sha256": inception.sha256,
    }
    computed = fid.FIDReference.from_features(features, **metadata)
    reference = computed
    if stored is not None:
        check = {"check_fid": stored.pool.frechet_distance(computed.pool)}
        if stored.spatial is not None:
            check["check_sfid"] = stored.spatial.frechet_distance(computed.spatial)
        print(
            "stored statistics vs this Inception's: "
            + ", ".join(f"{key.removeprefix('check_')} {value:.6g}" for key, value in check.items())
        )
        if not args.recompute:
            metadata["statistics"] = "stored in the source file"
            reference = fid.FIDReference(
                pool=fid.FeatureStatistics(stored.pool.mean, stored.pool.covariance, count),
                spatial=stored.spatial and fid.FeatureStatistics(stored.spatial.mean, stored.spatial.covariance, count),
                pool_features=features.pool_features,
                metadata={**metadata, **check},
            )
        else:
            reference = fid.FIDReference.from_features(features, **metadata, **check)
    if not args.features:
        reference = fid.FIDReference(pool=reference.pool, spatial=reference.spatial, metadata=reference.metadata)
    out = fid.save_reference(args.out, reference)
    print(f"wrote {out} ({count} images{', with pool features' if args.features else ''})")
    return out


def _stored_statistics(path: Path) -> fid.FIDReference | None:
    """The statistics an image file already holds (an ADM reference batch), or None."""
    with np.load(path, allow_pickle=False) as arrays:
        if "mu" not in arrays.files:
            return None
    return fid.load_reference(path)


if __name__ == "__main__":
    main()
