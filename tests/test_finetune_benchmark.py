"""benchmarks/finetune_from_flow_matching.py runs end to end in its tiny mode, and its parts merge into one table."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "benchmarks/finetune_from_flow_matching.py", *args],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_finetune_benchmark_tiny_and_merge(tmp_path):
    result = run("--preset", "tiny", "--out-dir", str(tmp_path), "--out", "t")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "t.json").read_text())
    config = json.loads((tmp_path / "t-config.json").read_text())
    assert config["datasets"] == ["checkerboard", "digits_dit"] and config["finetune_preset"] == "finetune"
    samples = [r for r in rows if r["kind"] == "sample" and r["seed"] == 0]
    methods = {(r["dataset"], r["method"]) for r in samples}
    expected = {"flow_matching_B", "finetune", "soflow_B", "soflow_2B"}
    assert {m for d, m in methods if d == "digits_dit"} == expected  # SiT file → from_velocity_model → fine-tune
    assert {m for d, m in methods if d == "checkerboard"} == expected | {"flow_matching_2B", "finetune_long"}
    for row in samples:
        assert row["device"] and row["commit"] and row["torch"] and row["steps"] > 0
        # each stage trains for its CPU budget (B = 1 s; 2B and the long run 2 s; fine-tuning counts its pretraining)
        stages = 2 if row["method"] in ("finetune", "soflow_2B", "flow_matching_2B") else 1
        stages = 3 if row["method"] == "finetune_long" else stages
        assert stages <= row["train_seconds"] < stages + 5.0
    sampler_names = {r["sampler"] for r in samples if r["method"] == "finetune"}
    assert sampler_names == {"1", "2 re-noised at 0.3", "2 chained through 0.4"}
    assert {r["sampler"] for r in samples if r["method"] == "flow_matching_B"} == {"1 Euler", "4 Euler"}
    # the curve: the fine-tune's EMA scored at the start and at curve_points shares of its budget
    curve = [r for r in rows if r["kind"] == "curve" and r["dataset"] == "checkerboard" and r["method"] == "finetune"]
    assert [r["cpu_seconds"] for r in curve] == [0.0, 0.5, 1.0] and all(r["one_step"] > 0 for r in curve)
    assert all(0 <= r["one_step_on_squares"] <= 1 for r in curve)
    table = (tmp_path / "t.md").read_text()
    assert "fine-tuned 1 step vs SoFlow from scratch for B" in table and "real vs real (floor)" in table
    assert (tmp_path / "t-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    merged = run("--merge", str(tmp_path / "t.json"), "--out-dir", str(tmp_path), "--out", "m")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (tmp_path / "m.md").read_text().split("\n", 2)[2] == table.split("\n", 2)[2]  # the same tables
