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
