"""The kernels import as `soflow_kernels` from the editable install and from a built wheel."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import soflow_kernels, soflow_core; print(soflow_kernels.__file__); print(soflow_core.__file__)"


def _probe(cwd: Path, **env: str) -> list[str]:
    environment = os.environ | env
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_editable_install_maps_the_kernels_folder(tmp_path):
    kernels_file, core_file = _probe(tmp_path)
    if not Path(core_file).is_relative_to(ROOT):
        pytest.skip("soflow_core is not installed in editable mode from this checkout")
    assert Path(kernels_file) == ROOT / "kernels" / "soflow_kernels" / "__init__.py"


@pytest.mark.slow
def test_built_wheel_ships_soflow_kernels(tmp_path):
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (the dev extra)")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("soflow_core-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    assert not (target / "kernels").exists(), "the wheel must not ship a top-level 'kernels' package"
    kernels_file, core_file = _probe(tmp_path, PYTHONPATH=str(target))
    assert Path(kernels_file) == target / "soflow_kernels" / "__init__.py"
    assert Path(core_file) == target / "soflow_core" / "__init__.py"
