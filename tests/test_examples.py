import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT / "examples"))


@pytest.mark.parametrize("recipe", ["toy", "imagenet", "cifar10"])
def test_toy_example_runs_end_to_end(tmp_path, recipe):
    out = tmp_path / "toy"
    result = subprocess.run(
        [sys.executable, "examples/train_toy_2d.py", "--preset", "tiny", "--recipe", recipe, "--out", str(out)],
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
    assert config["steps"] == 30 and config["toy"] == "checkerboard" and config["recipe"] == recipe
    assert config["threads"] == 1 and metrics["device"] == "cpu (1 threads)"
    assert metrics["train_cpu_seconds"] > 0 and metrics["train_seconds"] > 0
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 10, 20, 29]  # every --metrics-every steps and the last
    assert rows[0]["r"] == (0.1 if recipe == "imagenet" else 1.0) and rows[-1]["lr"] > 0 and rows[-1]["finite"] == 1.0
    assert {"consistency_mse", "consistency_loss"} <= set(rows[0]) and rows[0]["seconds"] >= 0
    assert "one-step energy distance" in result.stdout
    assert "30/30" in result.stdout  # the progress bar or line reached the end


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--preset", "imagenet"],
            "unknown preset 'imagenet'; choose from default, tiny. 'imagenet' is a value of --recipe",
        ),
        (["--recipe", "tiny"], "argument --recipe: unknown 'tiny'; choose from toy, imagenet, cifar10"),
        (["--config", "tiny", "--steps", "0"], "--steps must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1; got 0"),
    ],
)
def test_toy_example_refuses_bad_flags(argv, message, capsys):
    from train_toy_2d import parse_config

    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_toy_example_progress_flags():
    from train_toy_2d import parse_config

    assert parse_config([]).progress and not parse_config(["--no-progress"]).progress
    assert parse_config(["--threads", "2"]).threads == 2


@pytest.mark.parametrize("why", ["tqdm missing", "output not a terminal"])
def test_toy_progress_falls_back_to_plain_lines(monkeypatch, capsys, why):
    from train_toy_2d import Progress

    if why == "tqdm missing":
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress = Progress(4, enabled=True, every_s=0.0)
    progress.write("a metrics line")
    for _ in range(4):
        progress.step()
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a metrics line" and len(lines) == 5
    assert lines[-1].startswith("4/4 steps (100 %), ") and lines[-1].endswith(" 0 s left")
    assert "steps/s" in lines[1]


def test_toy_progress_bar_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    from train_toy_2d import Progress

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress = Progress(2, enabled=True)
    assert progress.bar is not None and progress.bar.total == 2
    progress.bar.disable = True  # nothing drawn into the test's output
    progress.close()


def test_toy_progress_off_prints_only_written_lines(capsys):
    from train_toy_2d import Progress

    progress = Progress(3, enabled=False, every_s=0.0)
    for _ in range(3):
        progress.step()
    progress.write("only this")
    progress.close()
    assert capsys.readouterr().out == "only this\n"


def test_toy_example_rejects_bad_arguments(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/train_toy_2d.py", "--toy", "spiral", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "argument --toy: unknown 'spiral'" in result.stderr
