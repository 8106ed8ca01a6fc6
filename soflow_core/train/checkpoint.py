"""Atomic, verifiable training checkpoints and the random state needed to resume a run exactly.

A checkpoint of step k is two files in one folder:

* ``step-00000000k.pt``: the payload, written by ``torch.save`` (a plain dict, loadable with
  ``torch.load(..., weights_only=True)``), and
* ``step-00000000k.json``: its manifest (format, step, file name, size in bytes, SHA-256).

Each file is written to a temporary name in the same folder, flushed and fsynced, renamed over
its final name with ``os.replace`` and the folder is fsynced, so a crash never leaves a
half-written file under a final name. The manifest is written after the payload, so a payload
without a manifest that matches it byte for byte is incomplete or corrupt, and never loaded:
[`load_checkpoint`][soflow_core.train.checkpoint.load_checkpoint] raises
[`CheckpointError`][soflow_core.train.checkpoint.CheckpointError] and
[`latest_valid_checkpoint`][soflow_core.train.checkpoint.latest_valid_checkpoint] reports it and
falls back to the previous one.

[`capture_rng_state`][soflow_core.train.checkpoint.capture_rng_state] and
[`restore_rng_state`][soflow_core.train.checkpoint.restore_rng_state] cover Python's ``random``,
NumPy's legacy global generator, torch's CPU generator, every CUDA device's generator and any
explicit ``torch.Generator`` of the loop, in a form that ``weights_only`` loading accepts.
"""

import json
import logging
import os
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soflow_core._files import atomic_write, sha256_file
from soflow_core._validation import check_int

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_path",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

_FORMAT = "soflow-checkpoint-v1"
_NAME = re.compile(r"^step-(\d{9,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: missing, truncated, corrupt or without a manifest.

    Args:
        path: The checkpoint file.
        reason: What is wrong with it.

    Attributes:
        path: The checkpoint file.
        reason: What is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path}: {reason}")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """The payload path of step ``step`` in ``directory``: ``step-XXXXXXXXX.pt`` (9+ digits).

    Args:
        directory: The checkpoint folder.
        step: Optimizer steps done, k ≥ 0.

    Returns:
        The path (whether or not it exists).

    Examples:
        >>> checkpoint_path("run", 1200).name
        'step-000001200.pt'
    """
    return Path(directory) / f"step-{check_int('step', step, low=0):09d}.pt"


def _manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``step-*.pt`` files of ``directory`` (valid or not), newest step first.

    Args:
        directory: The checkpoint folder (may not exist).

    Returns:
        (step, path) pairs sorted by decreasing step.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(
    directory: str | os.PathLike, step: int, payload: Mapping[str, Any], *, keep: int | None = None
) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` atomically, then its manifest, then prune.

    Args:
        directory: The checkpoint folder (created if missing).
        step: Optimizer steps done, k ≥ 0; names the files.
        payload: A dict for ``torch.save`` (tensors, containers and plain Python values only,
            so that ``weights_only`` loading accepts it).
        keep: Keep only the newest ``keep`` checkpoints (after this one is complete), or None
            to keep all.

    Returns:
        The path of the payload file.

    Raises:
        ValueError: If ``keep`` < 1 or ``payload`` is not a mapping.
    """
    check_int("step", step, low=0)
    if keep is not None:
        check_int("keep", keep, low=1)
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a mapping; got {type(payload).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    _manifest_path(path).unlink(missing_ok=True)  # an old manifest must never vouch for a new payload
    atomic_write(path, lambda f: torch.save(dict(payload), f))
    manifest = {
        "format": _FORMAT,
        "step": step,
        "file": path.name,
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    atomic_write(_manifest_path(path), lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))
    if keep is not None:
        for _, old in list_checkpoints(directory)[keep:]:
            _manifest_path(old).unlink(missing_ok=True)  # manifest first: a half-pruned pair is invalid
            old.unlink(missing_ok=True)
    return path


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a payload against its manifest (present, well-formed, same name, size and SHA-256).

    Args:
        path: The ``step-*.pt`` file.

    Returns:
        The manifest.

    Raises:
        CheckpointError: Naming the path and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "the file does not exist")
    manifest_file = _manifest_path(path)
    if not manifest_file.is_file():
        raise CheckpointError(path, f"no manifest {manifest_file.name}: the write did not complete")
    try:
        manifest = json.loads(manifest_file.read_text())
        size, sha = int(manifest["size"]), str(manifest["sha256"])
        if manifest.get("format") != _FORMAT or manifest.get("file") != path.name:
            raise ValueError(f"format {manifest.get('format')!r}, file {manifest.get('file')!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(path, f"unreadable manifest {manifest_file.name} ({err})") from err
    actual = path.stat().st_size
    if actual != size:
        raise CheckpointError(path, f"size {actual} bytes, the manifest says {size} (truncated or overwritten)")
    if sha256_file(path) != sha:
        raise CheckpointError(path, "SHA-256 differs from the manifest (corrupt)")
    return manifest


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu", *, verify: bool = True
) -> dict[str, Any]:
    """Verify a checkpoint against its manifest, then load it with ``torch.load(weights_only=True)``.

    Args:
        path: The ``step-*.pt`` file.
        map_location: Where tensors are loaded (``torch.load``'s argument).
        verify: Check size and SHA-256 first (leave True unless the file was just verified).

    Returns:
        The payload dict.

    Raises:
        CheckpointError: If the file is missing, incomplete, corrupt or does not unpickle.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # an unpicklable file is a bad checkpoint whatever the cause
        raise CheckpointError(path, f"torch.load failed ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict):
        raise CheckpointError(path, f"the payload is a {type(payload).__name__}, not a dict")
    return payload


def latest_valid_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint of ``directory`` that passes verification, reporting every one skipped.

    Checkpoints are tried from the highest step down; each one that fails
    [`verify_checkpoint`][soflow_core.train.checkpoint.verify_checkpoint] is reported with a
    ``UserWarning`` and a log record (path and reason) before the next is tried.

    Args:
        directory: The checkpoint folder (may not exist).

    Returns:
        The path of the newest valid checkpoint, or None if there is none.
    """
    for _, path in list_checkpoints(directory):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            message = f"skipping {err}"
            logger.warning(message)
            warnings.warn(message, stacklevel=2)
            continue
        return path
    return None


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a training loop may draw from, as ``weights_only``-loadable values.

    Args:
        generators: The loop's explicit generators by name (their states are saved too).

    Returns:
        A dict with ``python``, ``numpy``, ``torch``, ``cuda`` (one state per visible CUDA
        device, empty without CUDA) and ``generators``.
    """
    np_state: dict[str, Any] = dict(np.random.get_state(legacy=False))  # type: ignore[arg-type]
    numpy_state = {
        "bit_generator": np_state["bit_generator"],
        "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
        "pos": int(np_state["state"]["pos"]),
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    }
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what [`capture_rng_state`][soflow_core.train.checkpoint.capture_rng_state] captured.

    Args:
        state: The captured dict.
        generators: The loop's generators by name; each must have a saved state.

    Raises:
        ValueError: If a generator has no saved state or the CUDA device count changed.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda", []))
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"state holds {len(cuda)} CUDA generator states; this process sees {count} devices")
        torch.cuda.set_rng_state_all(cuda)
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise ValueError(f"generators[{name!r}] has no saved state; saved: {sorted(saved)}")
        generator.set_state(saved[name])
