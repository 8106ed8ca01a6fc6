"""The ImageNet/CIFAR-10 trainers and the sampler, end to end on tiny models and synthetic data (CPU)."""

import json
import math
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import write_with_manifest

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


def rows(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (a writer killed mid-line) is left out."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"line {i + 1} of {len(lines)} is not JSON: {line!r}"
    return parsed


def events(run_dir: Path) -> list[dict]:
    return [row for row in rows(run_dir) if "event" in row]


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """(fm_loss, consistency_loss) per logged step; each step is logged once."""
    out: dict[int, tuple[float, float]] = {}
    for row in rows(run_dir):
        if "event" in row:
            continue
        assert row["step"] not in out, f"step {row['step']} logged twice"
        out[row["step"]] = (row.get("fm_loss", 0.0), row["consistency_loss"])
    return out


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

    from soflow_core.nets import load_weights

    net = _training.build_net(config)
    report = load_weights(net, checkpoint_path(imagenet_run / "checkpoints", 4))
    assert (report.origin.entry, report.missing) == ("ema", ())
    assert all(torch.equal(v, payload["ema"][k].to(v.dtype)) for k, v in net.state_dict().items())
    assert (imagenet_run / "samples" / "step-000000004.png").read_bytes()[:4] == b"\x89PNG"


def test_print_config_prints_what_config_json_holds_and_touches_nothing(imagenet_run):
    files = {path: path.stat().st_mtime_ns for path in imagenet_run.rglob("*")}
    args = [*TINY, "--total-steps", "4", "--out", str(imagenet_run), "--print-config"]
    assert ok(run("train_dit_imagenet.py", *args)).stdout == (imagenet_run / "config.json").read_text()
    assert {path: path.stat().st_mtime_ns for path in imagenet_run.rglob("*")} == files


def test_keep_every_keeps_its_multiples_besides_the_newest(tmp_path):
    out = tmp_path / "run"
    ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "7", "--ckpt-every", "1", "--keep", "2",
           "--keep-every", "3", "--out", str(out)))  # fmt: skip
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [7, 6, 3]
    assert json.loads((out / "config.json").read_text())["keep_every"] == 3


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
    from soflow_core.train import ema_coefficient, ema_warmup_coefficient

    keep = ema_coefficient(0.9999, 16)
    assert config["ema_warmup"]  # the tiny preset warms the EMA up: kept weight min(d¹⁶, 1/10) at the first update
    keep = ema_warmup_coefficient(keep, 0)
    assert keep == 0.1
    for name, p in after_one["model"].items():
        if name not in initial:  # buffers are copied, not averaged
            assert torch.equal(last["ema"][name], last["model"][name]), name
            continue
        ema = last["ema"][name]
        assert ema.dtype == torch.float64, name
        # Only step 0 is due (k mod 16 = 0): ema = keep·θ_init + (1 − keep)·θ_1, and no update after it.
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
        # --standalone: the rendezvous store binds port 0 itself and holds it, where a port picked
        # beforehand as free could be taken by another process before torchrun binds it
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "examples/train_dit_imagenet.py", *common, "--out", str(out)]  # fmt: skip
        if mode == "fsdp":
            command.append("--fsdp")
        ok(subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240))
        got = load_checkpoint(checkpoint_path(out / "checkpoints", 3))
        for key in ("model", "ema"):
            for name, value in reference[key].items():
                assert torch.equal(got[key][name], value), (mode, key, name)
        assert losses(out) == losses(single)
    # One process resumes the DDP run: another micro-batch layout, printed and recorded in the resume event.
    resumed = ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "4", "--out", str(tmp_path / "ddp")))
    assert "world size 2 -> 1: the metrics.jsonl averaging window restarts at step 3" in resumed.stdout
    assert "micro-batches per step (world size × --grad-accum) 2 -> 1: from step 3 on" in resumed.stdout
    [event] = events(tmp_path / "ddp")
    assert (event["world_size"], event["micro_batches"]) == ([2, 1], [2, 1])


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

    resumed = losses(out)  # also asserts that no step is logged twice
    assert sorted(resumed) == list(range(1, 41))
    assert resumed == expected  # re-run steps repeat their losses bit for bit
    assert [e["event"] for e in events(out)] == ["resume"] and events(out)[0]["step"] == saved[0] - 4


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


# ----------------------------------------------------------------------------- what a run guarantees


def start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, f"examples/{script}", *args],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_rows(process: subprocess.Popen, run_dir: Path, count: int) -> None:
    """Wait until the run has logged ``count`` metric rows (and is still running)."""
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before logging {count} rows: {process.poll()}")


def test_damaged_checkpoints_of_higher_steps_are_never_counted_by_pruning(tmp_path):
    """Junk step-*.pt files with higher steps (left by another run) must not make --keep delete the new ones."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    checkpoint_path(out / "checkpoints", 900).write_bytes(b"torn write, no manifest")
    write_with_manifest(out / "checkpoints", 800, {"model": {"w": torch.zeros(64)}})
    flipped = bytearray(checkpoint_path(out / "checkpoints", 800).read_bytes())
    flipped[-100] ^= 0xFF  # its bytes no longer match its manifest
    checkpoint_path(out / "checkpoints", 800).write_bytes(bytes(flipped))
    result = ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "4", "--keep", "1", "--out", str(out)))
    assert "skipping checkpoint" in result.stderr
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4]
    assert load_checkpoint(checkpoint_path(out / "checkpoints", 4))["step"] == 4
    resumed = ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "6", "--keep", "1", "--out", str(out)))
    assert f"resuming from {checkpoint_path(out / 'checkpoints', 4)} at step 4" in resumed.stdout


def test_a_non_finite_step_stops_the_run_and_is_never_saved(tmp_path):
    """lr = 1e30 makes step 2 non-finite; with a log row only every 5 steps and --keep 1, step 1 must survive."""
    out = tmp_path / "run"
    common = [*TINY, "--total-steps", "6", "--log-every", "5", "--ckpt-every", "1", "--keep", "1", "--out", str(out)]
    for _ in range(2):  # a restart resumes the last finite state (here already doomed) and stops again
        result = run("train_dit_imagenet.py", *common, "--lr", "1e30")
        assert result.returncode == 1, result.stderr
        assert "a non-finite loss at step 2; stopped at step 2 without saving" in result.stderr
        assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1]
        event = events(out)[-1]
        assert event["event"] == "non_finite" and event["step"] == 2 and event["first_non_finite_step"] == 2
        assert event["last_checkpoint"] == "step-000000001.pt" and event["non_finite_entries"] > 0
    assert [e["event"] for e in events(out)] == ["non_finite", "resume", "non_finite"]
    payload = load_checkpoint(checkpoint_path(out / "checkpoints", 1))
    assert all(bool(torch.isfinite(v).all()) for v in payload["model"].values())

    # From a sane checkpoint: a learning rate that blows up (applied on resume) stops the run between log
    # rows, keeps the sane checkpoint, and a resume with a sane learning rate goes on from it.
    out = tmp_path / "recover"
    common = [*TINY, "--total-steps", "6", "--log-every", "5", "--ckpt-every", "2", "--keep", "1", "--out", str(out)]
    ok(run("train_dit_imagenet.py", *common, "--max-steps", "2"))
    result = run("train_dit_imagenet.py", *common, "--lr", "1e30")
    assert result.returncode == 1 and "a non-finite loss at step 4; stopped at step 4" in result.stderr
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]
    resumed = ok(run("train_dit_imagenet.py", *common))  # the checkpoint holds the sane lr: nothing to apply
    assert f"resuming from {checkpoint_path(out / 'checkpoints', 2)} at step 2" in resumed.stdout
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-4
    assert sorted(losses(out)) == [5, 6] and [e["event"] for e in events(out)] == ["resume", "non_finite", "resume"]


def test_a_second_trainer_on_the_same_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = start("train_dit_imagenet.py", *TINY, "--total-steps", "2000", "--ckpt-every", "1000", "--out", str(out))
    try:
        wait_for_rows(first, out, 1)
        second = run("train_dit_imagenet.py", *TINY, "--total-steps", "2", "--out", str(out))
        assert second.returncode != 0 and "is in use by another trainer" in second.stderr
        assert f'"pid": {first.pid}' in second.stderr and "train_dit_imagenet.py" in second.stderr
        rows_before = len(rows(out))
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file keeps the dead holder's name
    first.wait(timeout=30)
    assert rows_before > 0 and not list_checkpoints(out / "checkpoints")
    third = ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "2", "--out", str(out)))
    assert f"taking over the stale lock of {out}" in third.stdout and f'"pid": {first.pid}' in third.stdout
    assert sorted(losses(out)) == [1, 2]  # the killed run's rows were dropped: it left no checkpoint


def test_sigterm_saves_at_the_next_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # log rows every 3 steps and checkpoints every 10: the averaging window straddles the stop
    common = [*TINY, "--total-steps", "30", "--log-every", "3", "--ckpt-every", "10", "--keep", "2"]
    reference = tmp_path / "reference"
    ok(run("train_dit_imagenet.py", *common, "--out", str(reference)))
    out = tmp_path / "stopped"
    process = start("train_dit_imagenet.py", *common, "--out", str(out))
    wait_for_rows(process, out, 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: saving a checkpoint at the next step boundary" in stderr
    [stopped] = events(out)
    assert stopped["event"] == "stopped" and stopped["signal"] == "SIGTERM" and 9 <= stopped["step"] < 30
    assert list_checkpoints(out / "checkpoints")[0][0] == stopped["step"]
    resumed = ok(run("train_dit_imagenet.py", *common, "--out", str(out)))
    assert f"at step {stopped['step']}" in resumed.stdout
    assert losses(out) == losses(reference)  # every logged window, bit for bit, none twice
    final = (load_checkpoint(checkpoint_path(d / "checkpoints", 30)) for d in (out, reference))
    got, expected = final
    assert all(torch.equal(got["model"][k], v) for k, v in expected["model"].items())


def test_resume_applies_lr_and_refuses_what_must_match(tmp_path):
    out = tmp_path / "run"
    ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "2", "--out", str(out)))
    config = (out / "config.json").read_text()
    for _ in range(2):  # a finished run run again: nothing to do, nothing written, no event
        again = ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "2", "--out", str(out)))
        assert "is step 2 of --total-steps 2: nothing to do" in again.stdout
    assert events(out) == [] and (out / "config.json").read_text() == config
    for flags, named in (
        (["--total-steps", "1"], "--total-steps 1, below step 2 where the run resumes"),
        (["--model", "DiT-tiny/2"], "--model 'DiT-tiny/2' (the run has 'DiT-tiny/4')"),
        (["--seed", "7"], "--seed 7 (the run has 42)"),
        (["--batch-size", "16"], "--batch-size 16 (the run has 8)"),
        (["--fm-fraction", "0.5"], "--fm-fraction 0.5 (the run has 0.75)"),  # the recipe defines the model
        (["--schedule", "cosine"], "--schedule 'cosine' (the run has 'exponent')"),
    ):
        refused = run("train_dit_imagenet.py", *TINY, "--total-steps", "4", *flags, "--out", str(out))
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert f"cannot resume {checkpoint_path(out / 'checkpoints', 2)} with {named}" in refused.stderr
        assert (out / "config.json").read_text() == config and len(list_checkpoints(out / "checkpoints")) == 1
    resumed = ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "4", "--lr", "3e-4", "--out", str(out)))
    assert "--lr: 0.0001 -> 0.0003 (applied from step 2 on)" in resumed.stdout
    assert json.loads((out / "config.json").read_text())["lr"] == 3e-4
    payload = load_checkpoint(checkpoint_path(out / "checkpoints", 4))
    assert payload["config"]["lr"] == 3e-4 and {g["lr"] for g in payload["optimizer"]["param_groups"]} == {3e-4}
    assert [row["lr"] for row in rows(out) if row["step"] > 2] == [3e-4, 3e-4]
    assert events(out)[0]["applied"] == {"lr": [1e-4, 3e-4], "total_steps": [2, 4]}
    # The compile options follow --compile's rule, also for a run that never compiled.
    compiled = ["--compile-backend", "aot_eager", "--compile-mode", "max-autotune-no-cudagraphs"]
    resumed = ok(
        run("train_dit_imagenet.py", *TINY, "--total-steps", "5", "--lr", "3e-4", *compiled, "--out", str(out))
    )
    assert "--compile-backend: 'inductor' -> 'aot_eager' (applied from step 4 on)" in resumed.stdout
    assert events(out)[1]["applied"]["compile_mode"] == ["", "max-autotune-no-cudagraphs"]


def test_unusable_checkpoints_with_valid_manifests_are_reported_and_skipped(tmp_path):
    out = tmp_path / "run"
    ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "4", "--out", str(out)))
    folder = out / "checkpoints"
    write_with_manifest(folder, 5, {"model": np.zeros(3)})  # weights_only refuses it
    write_with_manifest(folder, 6, [1, 2, 3])  # not a dict
    write_with_manifest(folder, 7, {"config": {}, "step": 7})  # no model
    sampled = ok(run("sample.py", "--ckpt", str(out), "--num-samples", "2", "--out", str(tmp_path / "s.npz")))
    for step, reason in ((7, "no 'model'"), (6, "not a dict"), (5, "torch.load failed")):
        assert f"skipping checkpoint {checkpoint_path(folder, step)}: " in sampled.stderr and reason in sampled.stderr
    assert f"run checkpoint {checkpoint_path(folder, 4)} (step 4)" in sampled.stderr
    named = run("sample.py", "--ckpt", str(checkpoint_path(folder, 6)), "--out", str(tmp_path / "t.npz"))
    assert named.returncode == 1 and "not a dict" in named.stderr and "Traceback" not in named.stderr
    resumed = ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "8", "--out", str(out)))
    assert f"resuming from {checkpoint_path(folder, 4)} at step 4" in resumed.stdout
    assert list_checkpoints(folder)[0][0] == 8 and load_checkpoint(checkpoint_path(folder, 6))["step"] == 6


def test_start_problems_are_found_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the run wants a folder")
    result = run("train_dit_imagenet.py", *TINY, "--out", str(out))
    assert result.returncode == 2 and "checkpoints exists and is not a folder" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    for flags, message in (
        (["--max-steps", "-1"], "--max-steps must be >= 0; got -1"),
        (["--lr", "nan"], "--lr must be a finite number >= 0"),
        (["--fsdp"], "--fsdp shards the network over the processes of a torchrun job"),  # not a torchrun process
        (["--compile", "--precision", "bf16", "--device", "cpu"], "--compile --precision bf16 cannot run on the CPU"),
    ):
        result = run("train_dit_imagenet.py", *TINY, *flags, "--out", str(tmp_path / "new"))
        assert result.returncode == 2 and message in result.stderr and not (tmp_path / "new").exists()
        assert "Traceback" not in result.stderr
    if not torch.cuda.is_available():
        result = run("train_dit_imagenet.py", *TINY, "--device", "cuda", "--out", str(tmp_path / "new"))
        assert result.returncode == 2 and "--device cuda:" in result.stderr and "Traceback" not in result.stderr
        result = run("sample.py", "--ckpt", str(out), "--device", "cuda", "--out", str(tmp_path / "s.npz"))
        assert "--device cuda:" in result.stderr and "Traceback" not in result.stderr
    # A start that fails after creating its folder (here: --init with a file of another network) removes it.
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    nested = tmp_path / "new" / "deeper" / "run"
    result = run("train_dit_imagenet.py", *TINY, "--init", str(tmp_path / "other.pt"), "--out", str(nested))
    assert result.returncode == 1 and "cannot start this run" in result.stderr
    assert not (tmp_path / "new").exists()


def test_a_folder_at_the_next_checkpoints_name_is_refused_at_start_and_the_run_gets_past_it(tmp_path):
    out = tmp_path / "run"
    ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "2", "--out", str(out)))
    config = (out / "config.json").read_text()
    for blocker in (checkpoint_path(out / "checkpoints", 4), out / "samples" / "step-000000004.png"):
        blocker.mkdir()
        result = run("train_dit_imagenet.py", *TINY, "--total-steps", "4", "--out", str(out))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"{blocker} exists and is not a file; the run writes a file there: remove it" in result.stderr
        assert (out / "config.json").read_text() == config and events(out) == []
        blocker.rmdir()
    ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "4", "--out", str(out)))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4, 2]


def test_a_chunked_run_logs_and_draws_grids_where_an_uninterrupted_one_does(tmp_path):
    """--max-steps chunks that --log-every does not divide: no extra row or grid, no shortened window."""
    common = [*TINY, "--total-steps", "10", "--log-every", "3", "--ckpt-every", "5", "--sample-every", "4"]
    reference = tmp_path / "reference"
    ok(run("train_dit_imagenet.py", *common, "--out", str(reference)))
    out = tmp_path / "chunked"
    for _ in range(3):  # steps 1-4, 5-8, 9-10
        ok(run("train_dit_imagenet.py", *common, "--max-steps", "4", "--out", str(out)))
    assert sorted(losses(reference)) == [3, 6, 9, 10]
    assert losses(out) == losses(reference)  # the window of steps 4-6 spans two chunks, bit for bit
    grids = [sorted(p.name for p in (d / "samples").iterdir()) for d in (out, reference)]
    assert grids[0] == grids[1] == ["step-000000004.png", "step-000000008.png", "step-000000010.png"]


def test_interrupted_writes_leave_nothing_behind_and_files_get_the_ordinary_mode(tmp_path):
    out = tmp_path / "run"
    ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "2", "--out", str(out)))
    stale = [
        out / "checkpoints" / ".step-000000004.pt.x8b_2q.tmp",  # what writes killed before their rename leave
        out / ".config.json.u2jd8k.tmp",
        out / "samples" / ".step-000000004.png.0_a9zz.tmp",
    ]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    (out / "notes.tmp").write_text("not a temporary file of the run")
    result = ok(run("train_dit_imagenet.py", *TINY, "--total-steps", "4", "--out", str(out)))
    assert "removed 3 temporary file(s)" in result.stdout and not any(p.exists() for p in stale)
    assert (out / "notes.tmp").exists()
    umask = os.umask(0)
    os.umask(umask)
    for path in (checkpoint_path(out / "checkpoints", 4), out / "config.json", out / "metrics.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def _children_by_rank(parent: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun ``parent`` started (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [v[5:] for v in environ if v.startswith(b"RANK=")]
        if ppid == parent and ranks:
            found[int(ranks[0])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The ranks agree on the stop over a gloo group; the resumed run ends where one rank with accumulation does."""
    common = [*TINY, "--total-steps", "40", "--log-every", "2", "--ckpt-every", "50"]
    reference = tmp_path / "reference"
    ok(run("train_dit_imagenet.py", *common, "--grad-accum", "2", "--out", str(reference)))
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "examples/train_dit_imagenet.py", *common, "--out", str(out)]  # fmt: skip
    launcher = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(launcher, out, 3)
    workers = _children_by_rank(launcher.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGTERM)  # rank 1 only
    launcher.communicate(timeout=120)
    [stopped] = events(out)
    assert stopped["event"] == "stopped" and stopped["step"] < 40
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [stopped["step"]]
    ok(subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240))
    # Parameters agree bit for bit (see test_two_ranks_match_one_rank_with_accumulation); the logged means
    # only up to the order of their sums.
    got, expected = (load_checkpoint(checkpoint_path(d / "checkpoints", 40)) for d in (out, reference))
    assert all(torch.equal(got["model"][k], v) for k, v in expected["model"].items())
    logged, wanted = losses(out), losses(reference)
    assert sorted(logged) == sorted(wanted) == list(range(2, 41, 2))
    assert all(logged[k] == pytest.approx(wanted[k], rel=1e-5) for k in wanted)
