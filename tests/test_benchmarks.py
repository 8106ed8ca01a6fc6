"""The benchmark scripts keep working: each runs end to end in its tiny mode (seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_loss_kernels_tiny(tmp_path):
    pytest.importorskip("triton")
    # The interpreter only where there is no GPU; on a CUDA machine the compiled kernels run.
    env = os.environ | ({} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"})
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_loss_kernels.py",
            "--config",
            "tiny",
            "--out-dir",
            str(tmp_path),
            "--out",
            "t",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "t.json").read_text())
    ops = {row["op"] for row in rows}
    assert ops == {"path_build", "teacher_state", "guided_target", "flow_matching", "consistency"}
    assert {row["provider"] for row in rows} == {"eager", "triton", "kernel"}
    for row in rows:
        assert row["median_ms"] > 0 and row["bytes"] > 0 and row["device"] and row["commit"] and row["torch"]
        # Device time from a CUDA-graph replay exists exactly where there is a GPU.
        assert (row["graph_ms"] is not None) == torch.cuda.is_available()
    table = (tmp_path / "t.md").read_text()
    assert "| consistency | full |" in table


def test_bench_loss_kernels_rejects_bad_arguments():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_loss_kernels.py", "--config", "tiny", "--ops", "softmax"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "--ops: unknown ['softmax']" in result.stderr


def test_jvp_vs_soflow_tiny(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/jvp_vs_soflow.py", "--config", "tiny", "--out-dir", str(tmp_path), "--out", "t"],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "t.json").read_text())
    names = [row["variant"] for row in rows]
    assert names == [
        "soflow",
        "soflow_reference_style",
        "ref+attn_math",
        "ref+attn_default",
        "ref+joint",
        "ref+fused",
        "meanflow_shared_primal",
        "meanflow_separate",
    ]
    by_name = {row["variant"]: row for row in rows}
    for row in rows:
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["images_per_s"] > 0
        assert row["device"] and row["torch"] and row["commit"] and row["config"]["model"] == "DiT-tiny"
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        for mf in ("shared_primal", "separate"):
            expected = row["median_ms"] / by_name[f"meanflow_{mf}"]["median_ms"]
            assert abs(row[f"time_vs_meanflow_{mf}"] - expected) < 1e-9
        assert row["peak_memory_mb"] is None and row["memory_vs_meanflow_shared_primal"] is None  # CPU, not isolated
    assert by_name["meanflow_shared_primal"]["time_vs_meanflow_shared_primal"] == 1.0
    assert by_name["ref+attn_math"]["attention"] == "math"
    assert by_name["meanflow_separate"]["attention"].startswith("math for the JVP")
    assert (by_name["soflow"]["forward_batching"], by_name["soflow_reference_style"]["forward_batching"]) == (
        "joint",
        "split",
    )
    table = (tmp_path / "t.md").read_text()
    assert "| meanflow_separate |" in table and "math attention" in table
    png = tmp_path / "t.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jvp_vs_soflow_rejects_bad_arguments():
    result = subprocess.run(
        [sys.executable, "benchmarks/jvp_vs_soflow.py", "--config", "tiny", "--variants", "soflow,jvp"],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "--variants: unknown ['jvp']" in result.stderr
