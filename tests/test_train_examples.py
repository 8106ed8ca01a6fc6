"""The ImageNet/CIFAR-10 trainers and the sampler, end to end on tiny models and synthetic data (CPU)."""

import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from soflow_core.train.checkpoint import checkpoint_path, latest_valid_checkpoint, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TINY = ["--preset", "tiny", "--synthetic", "--no-progress"]


def run(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"examples/{script}", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """(fm_loss, consistency_loss) per step; a step logged twice (before a kill and after resume) must agree."""
    out: dict[int, tuple[float, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        value = (row.get("fm_loss", 0.0), row["consistency_loss"])
        assert out.setdefault(row["step"], value) == value, f"step {row['step']} logged twice with different losses"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imagenet") / "run"
    ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "4", "--out", str(out)))
    return out


def test_imagenet_example_trains_checkpoints_and_logs(imagenet_run):
    config = json.loads((imagenet_run / "config.json").read_text())
    assert config["model"] == "DiT-tiny/4" and config["total_steps"] == 4 and config["cfg_scale"] == 3.0
    assert sorted(losses(imagenet_run)) == [1, 2, 3, 4]
    assert [s for s, _ in list_checkpoints(imagenet_run / "checkpoints")] == [4, 2]
    payload = load_checkpoint(latest_valid_checkpoint(imagenet_run / "checkpoints"))
    assert payload["step"] == 4 and payload["data"]["position"] == 4 * 8
    assert {"model", "ema", "optimizer", "config", "rng"} <= payload.keys()
    # The plain .pt loads into a DiT by its EMA entry.
    sys.path.insert(0, str(ROOT / "examples"))
    import _training

    from soflow_core.nets import load_dit_checkpoint

    net = _training.build_net(config)
    assert load_dit_checkpoint(net, checkpoint_path(imagenet_run / "checkpoints", 4), entry="ema") == []
    assert (imagenet_run / "samples" / "step-000000004.png").read_bytes()[:4] == b"\x89PNG"


def test_sample_writes_evaluator_npz_and_grid(imagenet_run, tmp_path):
    out = tmp_path / "samples.npz"
    ok(run("sample.py", "--ckpt", str(imagenet_run), "--num-samples", "5", "--batch-size", "2", "--nfe", "2",
           "--out", str(out), "--device", "cpu"))  # fmt: skip
    arr = np.load(out)["arr_0"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8 and arr.std() > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # Through a (tiny, random, local) AutoencoderKL the latents decode to RGB images.
    sys.path.insert(0, str(ROOT / "examples"))
    from extract_imagenet_latents import make_synthetic

    _, vae = make_synthetic(tmp_path / "fake", num_classes=2, per_class=1)
    ok(run("sample.py", "--ckpt", str(imagenet_run), "--num-samples", "3", "--vae", str(vae),
           "--out", str(tmp_path / "decoded.npz"), "--device", "cpu"))  # fmt: skip
    decoded = np.load(tmp_path / "decoded.npz")["arr_0"]
    assert decoded.shape[0] == 3 and decoded.shape[3] == 3 and decoded.dtype == np.uint8


def test_compiled_imagenet_step_matches_the_eager_one(imagenet_run, tmp_path):
    """--compile runs the whole step compiled (aot_eager: traced, no code generation) and changes no result."""
    out = tmp_path / "run"
    ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "4", "--max-steps", "2", "--out", str(out),
           "--compile", "--compile-backend", "aot_eager"))  # fmt: skip
    compiled, eager = losses(out), losses(imagenet_run)
    assert sorted(compiled) == [1, 2]
    for step in (1, 2):
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step


def test_compiled_cifar10_step_runs_the_songunet_with_dropout(tmp_path):
    """The CIFAR-10 recipe's SongUNet (dropout 0.3, split forward) compiles as a whole step."""
    out = tmp_path / "run"
    ok(run("train_dit_cifar10.py", *TINY, "--net", "unet", "--total-steps", "2", "--out", str(out),
           "--compile", "--compile-backend", "aot_eager"))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["compile"] and config["dropout"] > 0
    assert sorted(losses(out)) == [1, 2] and all(math.isfinite(v) for pair in losses(out).values() for v in pair)


@pytest.mark.parametrize("net", ["unet", "DiT-tiny/2"])
def test_cifar10_example_runs_with_float64_ema_every_16_steps(tmp_path, net):
    out = tmp_path / "run"
    ok(run("train_dit_cifar10.py", *TINY, "--net", net, "--ckpt-every", "1", "--keep", "4", "--out", str(out)))
    config = json.loads((out / "config.json").read_text())
    assert config["augment"] == (net == "unet") and config["ema_every"] == 16
    assert sorted(losses(out)) == [1, 2, 3, 4]
    after_one, last = (load_checkpoint(checkpoint_path(out / "checkpoints", k)) for k in (1, 4))
    # The initial weights, built as the trainer builds them.
    sys.path.insert(0, str(ROOT / "examples"))
    import _training

    torch.manual_seed(config["seed"])
    initial = dict(_training.build_net(config).named_parameters())
    keep = 0.9999**16
    for name, p in after_one["model"].items():
        if name not in initial:  # buffers are copied, not averaged
            assert torch.equal(last["ema"][name], last["model"][name]), name
            continue
        ema = last["ema"][name]
        assert ema.dtype == torch.float64, name
        # Only step 0 is due (k mod 16 = 0): ema = d¹⁶·θ_init + (1 − d¹⁶)·θ_1, and no update after it.
        expected = initial[name].detach().double().mul_(keep).add_(p.double(), alpha=1 - keep)
        assert torch.equal(ema, expected), name
        assert torch.equal(ema, after_one["ema"][name]), name


def test_two_ranks_match_one_rank_with_accumulation(tmp_path):
    """2 gloo ranks (DDP, and FSDP2) against 1 rank with 2 accumulation steps on the same global batch.

    Micro-batch m holds the same samples and draws from the same seeds in both layouts. The
    averaged gradient is (g₀ + g₁)/2 with DDP and FSDP2 and g₀/2 + g₁/2 with accumulation: halving
    is exact in floating point and a sum of two terms does not depend on their order, so the
    parameters must agree bit for bit (zero tolerance). With more than two micro-batches the
    summation order would differ and only an allclose check would hold.
    """
    common = [*TINY, "--total-steps", "3", "--ckpt-every", "3"]
    single = tmp_path / "single"
    ok(run("train_dit_imagenet.py", *common, "--grad-accum", "2", "--out", str(single)))
    reference = load_checkpoint(checkpoint_path(single / "checkpoints", 3))
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), "examples/train_dit_imagenet.py", *common, "--out", str(out)]  # fmt: skip
        if mode == "fsdp":
            command.append("--fsdp")
        ok(subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240))
        got = load_checkpoint(checkpoint_path(out / "checkpoints", 3))
        for key in ("model", "ema"):
            for name, value in reference[key].items():
                assert torch.equal(got[key][name], value), (mode, key, name)
        assert losses(out) == losses(single)


def test_sigkill_and_corrupt_checkpoint_resume_exactly(tmp_path):
    common = [*TINY, "--total-steps", "40", "--ckpt-every", "4", "--keep", "3"]
    reference = tmp_path / "reference"
    ok(run("train_dit_imagenet.py", *common, "--out", str(reference)))
    expected = losses(reference)

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "examples/train_dit_imagenet.py", *common, "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 13:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    logged = losses(out)
    assert 13 <= len(logged) < 40
    saved = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert saved and saved[0] >= 12

    # Damage the newest checkpoint: the restart must report it and resume from the one before.
    newest = checkpoint_path(out / "checkpoints", saved[0])
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0xFF
    newest.write_bytes(bytes(data))
    result = ok(run("train_dit_imagenet.py", *common, "--out", str(out)))
    assert f"skipping checkpoint {newest}" in result.stderr
    assert f"resuming from {checkpoint_path(out / 'checkpoints', saved[0] - 4)}" in result.stdout

    resumed = losses(out)  # also asserts that re-run steps repeat their losses bit for bit
    assert sorted(resumed) == list(range(1, 41))
    assert resumed == expected


@pytest.mark.parametrize("script", ["train_dit_imagenet.py", "train_dit_cifar10.py"])
def test_missing_data_says_what_to_fetch(tmp_path, script):
    result = run(script, "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr or "is not a folder" in result.stderr
    assert ("extract_imagenet_latents.py" if "imagenet" in script else "cifar-10-python.tar.gz") in result.stderr
    assert not (tmp_path / "run").exists()


def test_trainers_read_the_real_data_formats(tmp_path):
    """--data with a latent shard (ImageNet) and with CIFAR-10 python batches, 2 steps each."""
    sys.path.insert(0, str(ROOT / "examples"))
    from _data import write_latent_shard

    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(16, 4, 32, 32, generator=g), torch.rand(16, 4, 32, 32, generator=g)
    write_latent_shard(tmp_path / "latents" / "part-0.h5", mean, std, torch.arange(16) % 10)
    common = ["--preset", "tiny", "--no-progress", "--total-steps", "2"]
    ok(run("train_dit_imagenet.py", *common, "--data", str(tmp_path / "latents"), "--out", str(tmp_path / "a")))
    assert sorted(losses(tmp_path / "a")) == [1, 2]

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        with open(folder / name, "wb") as f:
            data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
            pickle.dump({b"data": data, b"labels": list(range(4)), b"batch_label": name.encode()}, f)
    ok(run("train_dit_cifar10.py", *common, "--data", str(folder), "--out", str(tmp_path / "b")))
    assert sorted(losses(tmp_path / "b")) == [1, 2]
