"""In-loop FID in the trainers: rows in metrics.jsonl, the same value as scoring the same samples offline.

The Inception is torch-fidelity's with random weights (``_fidelity.py``); the trainers and scripts run as
subprocesses, with the placeholder torchvision on their path where no real one imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _fidelity import import_torch_fidelity, placeholder_root, write_random_inception

from soflow_core.metrics import fid

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--synthetic", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(environment for the subprocesses, random Inception weights) shared by the tests of this module."""
    import_torch_fidelity(tmp_path_factory.mktemp("placeholder"))
    placeholder = placeholder_root()  # None where the real torchvision is in use
    paths = [str(ROOT)] + ([] if placeholder is None else [str(placeholder)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    weights = write_random_inception(tmp_path_factory.mktemp("weights") / "random-inception.pth")
    return env, weights


def _run(env: dict, *command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _reference(path: Path, image_size: list[int] | None, seed: int = 0) -> Path:
    """Reference statistics of random pool features (only their mean and covariance matter here)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(64, fid.POOL_DIM, generator=generator)
    stats = fid.FeatureSums.from_features(features).statistics()
    metadata = {} if image_size is None else {"image_size": image_size}
    return fid.save_reference(path, fid.FIDReference(pool=stats, metadata=metadata))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_in_loop_fid_over_two_gloo_ranks_equals_offline_scoring_of_the_same_samples(setup, tmp_path):
    env, weights = setup
    reference = _reference(tmp_path / "ref.npz", [32, 32])
    out = tmp_path / "run"
    fid_flags = ["--fid-every", "4", "--fid-samples", "6", "--fid-batch-size", "2", "--fid-reference", str(reference),
                 "--inception-weights", str(weights), "--allow-other-inception-weights"]  # fmt: skip
    _run(env, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "examples/train_dit_cifar10.py", *TINY, "--total-steps", "4", "--ckpt-every", "4", *fid_flags,
         "--out", str(out))  # fmt: skip
    [row] = [row for row in _rows(out) if "fid_1nfe" in row]
    assert row["step"] == 4 and row["evaluation_seconds"] > 0 and "fid_2nfe" in row
    assert (out / "fid.png").read_bytes()[:4] == b"\x89PNG"

    # the same samples, drawn by sample.py from the step-4 checkpoint (3 batches of 2, the run's seed 42), scored
    # by fid.py in the same Inception batches
    samples = []
    for nfe in (1, 2):
        samples.append(tmp_path / f"nfe{nfe}.npz")
        _run(env, sys.executable, "examples/sample.py", "--ckpt", str(out), "--num-samples", "6", "--batch-size", "2",
             "--seed", "42", "--nfe", str(nfe), "--device", "cpu", "--out", str(samples[-1]))  # fmt: skip
    _run(env, sys.executable, "examples/fid.py", *map(str, samples), "--reference", str(reference),
         "--batch-size", "2", "--no-precision-recall", "--inception-weights", str(weights), "--allow-other-weights",
         "--no-download", "--device", "cpu", "--out", str(tmp_path / "scores.json"))  # fmt: skip
    offline = json.loads((tmp_path / "scores.json").read_text())["rows"]
    assert [r["images"] for r in offline] == [6, 6]
    assert row["fid_1nfe"] == pytest.approx(offline[0]["fid"], rel=1e-6)
    assert row["fid_2nfe"] == pytest.approx(offline[1]["fid"], rel=1e-6)
    assert row["fid_1nfe"] != pytest.approx(row["fid_2nfe"], rel=1e-3)  # two sample sets, two values


def test_in_loop_fid_of_a_latent_model_decodes_with_the_vae_and_checks_the_image_size(setup, tmp_path):
    env, weights = setup
    sys.path.insert(0, str(ROOT / "examples"))
    from extract_imagenet_latents import make_synthetic

    _, vae = make_synthetic(tmp_path / "fake", num_classes=2, per_class=1)  # a tiny AutoencoderKL: 32 -> 64 px
    flags = [*TINY, "--total-steps", "2", "--fid-every", "2", "--fid-samples", "2", "--fid-batch-size", "2",
             "--fid-nfe", "1", "--vae", str(vae), "--inception-weights", str(weights),
             "--allow-other-inception-weights"]  # fmt: skip
    wrong = _reference(tmp_path / "ref32.npz", [32, 32])
    done = subprocess.run(
        [sys.executable, "examples/train_dit_imagenet.py", *flags, "--fid-reference", str(wrong), "--out",
         str(tmp_path / "refused")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0 and "holds 32x32 images, this run's samples are 64x64" in done.stderr
    assert not (tmp_path / "refused" / "checkpoints").exists()
    out = tmp_path / "run"
    reference = _reference(tmp_path / "ref64.npz", [64, 64])
    result = _run(env, sys.executable, "examples/train_dit_imagenet.py", *flags, "--fid-reference", str(reference),
                  "--out", str(out))  # fmt: skip
    assert "in-loop FID: 2 samples at NFE 1 every 2 steps" in result.stdout
    [row] = [row for row in _rows(out) if "fid_1nfe" in row]
    assert row["step"] == 2 and np.isfinite(row["fid_1nfe"]) and "fid_2nfe" not in row
    assert json.loads((out / "config.json").read_text())["fid_nfe"] == [1]


def _trainer(name: str):
    spec = importlib.util.spec_from_file_location(f"fid_trainer_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_in_loop_fid_settings_are_checked_before_anything_starts(setup, tmp_path, monkeypatch, capsys):
    _, weights = setup
    sys.path.insert(0, str(ROOT / "examples"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(fid.INCEPTION_WEIGHTS_ENV, raising=False)
    reference = _reference(tmp_path / "ref.npz", [32, 32])
    cifar, imagenet = _trainer("train_dit_cifar10"), _trainer("train_dit_imagenet")
    out = tmp_path / "run"
    base = [*TINY, "--out", str(out)]
    given = ["--fid-reference", str(reference), "--inception-weights", str(weights)]
    cases = [
        (cifar, [*base, *given], "--fid-reference needs --fid-every N > 0"),
        (cifar, [*base, "--fid-every", "2", "--fid-reference", str(tmp_path / "none.npz")], "is not a file"),
        (cifar, [*base, "--fid-every", "2", *given, "--inception-weights", str(tmp_path / "w.pth")], "w.pth"),
        (cifar, [*base, "--fid-every", "2", "--fid-reference", str(reference)], fid.INCEPTION_WEIGHTS_URL),
        (cifar, [*base, "--fid-every", "2", *given, "--fid-nfe", "1,1"], "--fid-nfe must be distinct"),
        (cifar, [*base, "--fid-every", "2", *given, "--fid-samples", "1"], "--fid-samples must be >= 2"),
        (imagenet, [*base, "--fid-every", "2", *given], "pass --vae to decode the latent samples"),
    ]
    for trainer, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            trainer.main(argv)
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, (argv, message)
    assert not out.exists()  # nothing was created
    # the released presets carry the period and are on exactly when a reference is given
    with pytest.raises(SystemExit):
        cifar.main(["--print-config"])
    config = json.loads(capsys.readouterr().out)
    assert (config["fid_every"], config["fid_samples"], config["fid_reference"]) == (25_000, 50_000, None)
    with pytest.raises(SystemExit):
        imagenet.main(["--preset", "XL-2-cond", "--print-config"])
    config = json.loads(capsys.readouterr().out)
    assert (config["fid_every"], config["fid_samples"], config["fid_nfe"]) == (25_000, 10_000, [1, 2])
