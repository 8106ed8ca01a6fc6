import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["toy", "imagenet", "cifar10"])
def test_toy_example_runs_end_to_end(tmp_path, preset):
    out = tmp_path / "toy"
    result = subprocess.run(
        [sys.executable, "examples/train_toy_2d.py", "--config", "tiny", "--preset", preset, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("energy_distance_1_step", "energy_distance_2_step", "energy_distance_real_vs_real_floor"):
        assert metrics[key] >= 0
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 30 and config["toy"] == "checkerboard" and config["preset"] == preset
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "one-step energy distance" in result.stdout


def test_toy_example_rejects_bad_arguments(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/train_toy_2d.py", "--toy", "spiral", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--toy must be one of" in result.stderr
