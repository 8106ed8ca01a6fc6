"""Test support for FID: torch-fidelity without torchvision, and Inception-v3 weights made by the tests.

torch-fidelity's package ``__init__`` imports torchvision, for its CLIP, DINOv2 and VGG extractors and its
dataset wrappers; the Inception-v3 that FID uses needs none of it. No torchvision build installs on the CPU
machines this suite runs on (the PyPI wheel is a CUDA build that fails against the CPU torch), so where
torchvision cannot be imported the tests put a placeholder package on the path: it defines the names
torch-fidelity imports, and each of them raises if anything calls it, so a test that reached torchvision
would fail rather than pass on a stand-in. Where torchvision is installed (a user's GPU machine), the real
one is used. The Inception code path is torch-fidelity's own throughout.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

_PLACEHOLDER = '''"""Placeholder torchvision written by the soflow_core tests (tests/_fidelity.py).

torch-fidelity imports torchvision when it is imported, for extractors FID does not use; no torchvision
build installs on the CPU machines the tests run on. Every name here raises when used.
"""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is a placeholder in these tests; FID must not need it")

    def __call__(self, *args, **kwargs):
        raise RuntimeError("torchvision is a placeholder in these tests; FID must not need it")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unavailable
'''
_MODULES = ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional")
_MODULES += ("torchvision.models",)


def torchvision_placeholder(root: Path) -> Path:
    """Write the placeholder torchvision package under ``root`` (put ``root`` on the path to use it).

    Args:
        root: A folder for it.

    Returns:
        ``root``.
    """
    for name in _MODULES:
        parts = name.split(".")
        folder = root.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        children = [child for child in _MODULES if "." in child and child.rsplit(".", 1)[0] == name]
        header = "".join(f"from . import {child.rsplit('.', 1)[1]}\n" for child in children)
        (folder / "__init__.py").write_text(_PLACEHOLDER + header)  # the docstring first
    return root


def torchvision_importable() -> bool:
    """Whether a real torchvision imports here."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except Exception:  # a CUDA wheel against a CPU torch fails at import with various errors
        return False
    return True


def import_torch_fidelity(placeholder_root: Path):
    """Import torch-fidelity, with the placeholder torchvision where no real one imports; skip without it.

    Args:
        placeholder_root: Where to write the placeholder package.

    Returns:
        The ``torch_fidelity`` module.
    """
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip('torch-fidelity is not installed (pip install --no-deps "torch-fidelity==0.4.0")')
    if not torchvision_importable():
        for name in _MODULES:
            sys.modules.pop(name, None)
        sys.path.insert(0, str(torchvision_placeholder(placeholder_root)))
    return importlib.import_module("torch_fidelity")


def placeholder_root() -> Path | None:
    """The folder to put on a subprocess's path for the placeholder torchvision this process uses, or None.

    Returns:
        The folder holding the placeholder package, or None where the real torchvision is in use (or none yet).
    """
    module = sys.modules.get("torchvision")
    if module is None or not (module.__doc__ or "").startswith("Placeholder torchvision written by"):
        return None
    return Path(module.__file__).resolve().parents[1]


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of torch-fidelity's Inception-v3 (its own class and layout) with random weights.

    Convolutions get He-normal weights and the batch norms random affine maps and running statistics, so
    the features are of order one and differ between images, as trained weights' do.

    Args:
        seed: Seed of the weights.

    Returns:
        The state dict, with exactly the keys and shapes of the released weights file.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as module

    extractor = module.FeatureExtractorInceptionV3
    # The constructor loads weights (a download when no file is given): build the bare network instead.
    with (
        mock.patch.object(module, "load_state_dict_from_url", lambda *args, **kwargs: {}),
        mock.patch.object(extractor, "load_state_dict", lambda self, *args, **kwargs: None),
    ):
        net = extractor("random", ["2048"])
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in net.state_dict().items():
        value = value.clone()
        if name.endswith("conv.weight"):
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif name.endswith("bn.weight"):
            value = 1.0 + 0.1 * torch.randn(value.shape, generator=generator)
        elif name.endswith(("bn.bias", "running_mean")):
            value = 0.1 * torch.randn(value.shape, generator=generator)
        elif name.endswith("running_var"):
            value = 0.5 + torch.rand(value.shape, generator=generator)
        elif name.startswith("fc."):
            value = 0.05 * torch.randn(value.shape, generator=generator)
        state[name] = value
    return state


def write_random_inception(path: Path, seed: int = 0) -> Path:
    """Save random Inception-v3 weights in the layout of torch-fidelity's weights file.

    Args:
        path: The file to write.
        seed: Seed of the weights.

    Returns:
        ``path``.
    """
    torch.save(random_inception_state(seed), path)
    return path
