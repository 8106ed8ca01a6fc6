"""The package's layers and the direction of its imports (docs/architecture.md).

foundations ← ops ← method ← {train, nets, metrics, data}; the kernels import nothing from
soflow_core, and ``import soflow_core`` pulls in no optional dependency.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "soflow_core"

FOUNDATIONS = {
    "soflow_core.typing",
    "soflow_core._validation",
    "soflow_core._tensor",
    "soflow_core._rng",
    "soflow_core._files",
}
METHOD = {
    "soflow_core",
    "soflow_core.paths",
    "soflow_core.parameterizations",
    "soflow_core.time_samplers",
    "soflow_core.weighting",
    "soflow_core.guidance",
    "soflow_core.losses",
    "soflow_core.objective",
    "soflow_core.samplers",
    "soflow_core.seeding",
}
SUBPACKAGES = ("soflow_core.ops", "soflow_core.train", "soflow_core.nets", "soflow_core.metrics", "soflow_core.data")


def layer(module: str) -> str:
    """The layer a soflow_core module belongs to."""
    if module in FOUNDATIONS:
        return "foundations"
    if module in METHOD:
        return "method"
    for package in SUBPACKAGES:
        if module == package or module.startswith(package + "."):
            return package.split(".")[1]
    raise AssertionError(f"{module} belongs to no layer: add it to docs/architecture.md and to this test")


# What each layer may import from soflow_core. ops may also import `soflow_core.weighting`: the loss
# rows evaluate its adaptive weight, and weighting itself imports only the foundations.
ALLOWED = {
    "foundations": {"foundations"},
    "ops": {"foundations", "ops"},
    "method": {"foundations", "ops", "method"},
    "train": {"foundations", "ops", "method", "train"},
    "nets": {"foundations", "ops", "method", "nets"},
    "metrics": {"foundations", "method", "metrics"},
    "data": {"foundations", "method", "data"},
}
EXCEPTIONS = {("ops", "soflow_core.weighting")}
WEIGHTING_MAY_IMPORT = {"foundations"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str) -> set[str]:
    """Every soflow_core module that ``source`` imports (absolute and relative imports alike)."""
    package = module if module in PACKAGES else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from soflow_core import train` imports the sub-package `train`
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in KNOWN)
    return {name for name in found if name == "soflow_core" or name.startswith("soflow_core.")}


KNOWN = {module_name(p) for p in PACKAGE.rglob("*.py")}
PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")} | {"soflow_kernels"}


def violations(sources: dict[str, str]) -> list[str]:
    """The imports of ``sources`` (module name → code) that go against the layer rules."""
    found = []
    for module, source in sorted(sources.items()):
        own = layer(module)
        for target in sorted(imported_modules(source, module)):
            if target not in KNOWN:
                continue
            allowed = WEIGHTING_MAY_IMPORT if module == "soflow_core.weighting" else ALLOWED[own]
            if layer(target) not in allowed and (own, target) not in EXCEPTIONS:
                found.append(f"{module} ({own}) imports {target} ({layer(target)})")
    return found


def package_sources() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    for module in KNOWN:
        layer(module)


def test_imports_run_one_way():
    assert violations(package_sources()) == []


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("soflow_core.losses", "from soflow_core.train import EMA"),
        ("soflow_core.objective", "import soflow_core.nets.dit"),
        ("soflow_core.samplers", "from soflow_core import metrics"),
        ("soflow_core.ops.fused", "from soflow_core.losses import teacher_state"),
        ("soflow_core.weighting", "from soflow_core.ops import fused"),
        ("soflow_core.nets.dit", "from soflow_core.train.checkpoint import load_checkpoint"),
        ("soflow_core._tensor", "from .paths import LinearPath"),
        ("soflow_core.train.ema", "from ..nets import DiT"),
    ],
)
def test_a_wrong_way_import_is_caught(module, line):
    sources = package_sources()
    sources[module] = line + "\n" + sources[module]
    assert violations(sources) != []


def test_kernels_import_nothing_from_soflow_core():
    for path in (ROOT / "kernels" / "soflow_kernels").rglob("*.py"):
        names = imported_modules(path.read_text(), "soflow_kernels")
        assert names == set(), f"{path.name} imports {names}"


def test_top_level_is_small():
    import soflow_core

    assert len(soflow_core.__all__) <= 30


def test_import_pulls_in_no_optional_dependency_or_sub_package():
    forbidden = ["triton", "h5py", "matplotlib", "sklearn", "safetensors", "diffusers", "soflow_kernels"]
    forbidden += ["torch_fidelity", "torchvision", "scipy"]
    forbidden += ["soflow_core.train", "soflow_core.nets", "soflow_core.metrics", "soflow_core.data"]
    code = f"import sys, soflow_core\nbad = [m for m in {forbidden!r} if m in sys.modules]\nassert not bad, bad\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("package", [*SUBPACKAGES, "soflow_core.metrics.fid"])
def test_sub_packages_import_without_optional_dependencies(package):
    # torch-fidelity (the FID Inception) is imported only when an InceptionV3 is built
    optional = ("triton", "h5py", "matplotlib", "safetensors", "torch_fidelity", "torchvision", "scipy")
    code = f"import sys, {package}\nbad = [m for m in {optional!r} if m in sys.modules]\nassert not bad, bad\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
