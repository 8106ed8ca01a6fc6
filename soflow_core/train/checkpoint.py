"""Atomic, verifiable training checkpoints and the random state needed to resume a run exactly.

A checkpoint of step k is two files in one folder:

* ``step-00000000k.pt``: the payload, written by ``torch.save`` (a plain dict, loadable with
  ``torch.load(..., weights_only=True)``), and
* ``step-00000000k.json``: its manifest (format, step, file name, size in bytes, SHA-256).

Each file is written to a temporary name in the same folder (``.step-….pt.<random>.tmp``),
flushed and fsynced, renamed over its final name with ``os.replace`` and the folder is fsynced,
so a crash never leaves a half-written file under a final name. Before the rename the payload
is loaded back with ``torch.load(weights_only=True, mmap=True)`` (which reads its structure, not
its tensor data), so a payload that could not be loaded is never written. The manifest is
written after the payload, so a payload without a manifest that matches it byte for byte is
incomplete or corrupt, and never loaded:
[`load_checkpoint`][soflow_core.train.checkpoint.load_checkpoint] raises
[`CheckpointError`][soflow_core.train.checkpoint.CheckpointError] and
[`latest_valid_checkpoint`][soflow_core.train.checkpoint.latest_valid_checkpoint] reports it and
falls back to the previous one. Files are created with the ordinary mode (0o666 less the umask).

Pruning (``save_checkpoint(..., keep=k)``) counts valid checkpoints only: it keeps the one just
written, and the newest valid ones up to k in all; every other checkpoint, valid or not, is
removed. The newest valid checkpoint is never removed, even when it has a higher step than
the one just written. ``keep_every=n`` also keeps every checkpoint whose step is a multiple of
n, whatever k says (for curves of a score against steps, built after the run).

A process killed mid-write leaves its temporary file behind;
[`remove_stale_temporaries`][soflow_core.train.checkpoint.remove_stale_temporaries] removes
them, and must only run while no other process writes into the folder (the example trainers
call it when they start, holding their run folder's lock).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soflow_core._files import atomic_save, atomic_write, sha256_file, temporary_names
from soflow_core._validation import check_bool, check_int

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_path",
    "latest_loadable_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "non_finite_entries",
    "remove_stale_temporaries",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

_FORMAT = "soflow-checkpoint-v1"
_NAME = re.compile(r"^step-(\d{9,})\.pt$")
# The temporary files of atomic_save for a payload or a manifest: .step-XXXXXXXXX.pt.<random>.tmp
_TEMPORARY = temporary_names(r"step-\d{9,}\.(?:pt|json)")


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

    Only files count: a folder (or anything else that is not a file) with a checkpoint's name is
    no checkpoint, and [`save_checkpoint`][soflow_core.train.checkpoint.save_checkpoint] refuses to
    write over it.

    Args:
        directory: The checkpoint folder (may not exist).

    Returns:
        (step, path) pairs sorted by decreasing step.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found, reverse=True)


def remove_stale_temporaries(directory: str | os.PathLike, names: Sequence[str] = ()) -> list[Path]:
    """Remove the temporary files that interrupted writes left in ``directory``.

    These are the temporaries of checkpoint payloads and manifests, and of the files whose
    names match one of the regular expressions ``names`` (for instance ``(r"config\\.json",)``).
    Only run it while no other process writes into ``directory``: a write in progress has a
    temporary file of the same form.

    Args:
        directory: The folder (may not exist).
        names: Regular expressions of other file names whose temporaries are removed too.

    Returns:
        The files removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    others = temporary_names("|".join(names)) if names else None
    removed = []
    for path in sorted(directory.iterdir()):
        stale = _TEMPORARY.match(path.name) or (others is not None and others.match(path.name))
        if stale and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


_PLAIN = (torch.Tensor, str, bytes, int, float, complex, torch.Size, torch.dtype, torch.device)


def _unloadable_entries(value: object, where: str = "payload") -> Iterator[str]:
    """Entries of a payload that ``weights_only`` loading is likely to refuse (a hint for the error message)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _unloadable_entries(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        for i, item in enumerate(value):
            yield from _unloadable_entries(item, f"{where}[{i}]")
    elif value is not None and not isinstance(value, _PLAIN):
        yield f"{where} ({type(value).__module__}.{type(value).__qualname__})"


def _save_loadable(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` the payload to ``path``, then load its structure back as a reader would."""
    torch.save(payload, path)
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        found = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(?: |$)", str(err))
        reason = found.group(1) if found else f"{type(err).__name__}: {err}"
        suspects = list(_unloadable_entries(payload))[:5]
        hint = f"; check {', '.join(suspects)}" if suspects else ""
        raise ValueError(
            f"payload cannot be loaded back with torch.load(weights_only=True) ({reason}){hint}. Store tensors, "
            "containers and plain Python values only"
        ) from err


def _is_valid(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


def _prune(directory: Path, written: Path, keep: int, keep_every: int | None) -> None:
    """Keep ``written``, the newest valid ones (``keep`` in all) and multiples of ``keep_every``; remove the rest."""
    kept = 0
    for step, path in list_checkpoints(directory):
        # The newest valid checkpoint is met while kept < keep (only valid ones and `written` count),
        # so it is always verified and kept; older ones are removed without reading them.
        if path == written or (kept < keep and _is_valid(path)):
            kept += 1
            continue
        if keep_every is not None and step % keep_every == 0:
            continue  # kept for a curve, not counted among the newest
        logger.info("pruning checkpoint %s", path)
        _manifest_path(path).unlink(missing_ok=True)  # manifest first: a half-pruned pair is invalid
        path.unlink(missing_ok=True)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    payload: Mapping[str, Any],
    *,
    keep: int | None = None,
    keep_every: int | None = None,
) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` atomically, then its manifest, then prune.

    Before its rename into place, the payload file is loaded back with
    ``torch.load(weights_only=True, mmap=True)`` (its structure only, not the tensor data), so a
    payload that readers would refuse is never written.

    Pruning counts valid checkpoints only (each counted one is verified against its manifest,
    at most ``keep`` files hashed per save). The checkpoint just written and the newest valid
    one are never removed; damaged checkpoints are removed whatever their step.

    Args:
        directory: The checkpoint folder (created if missing).
        step: Optimizer steps done, k ≥ 0; names the files.
        payload: A dict for ``torch.save`` (tensors, containers and plain Python values only,
            so that ``weights_only`` loading accepts it).
        keep: Keep only the newest ``keep`` valid checkpoints (after this one is complete), or
            None to keep all.
        keep_every: With ``keep``, also keep every checkpoint whose step is a multiple of
            ``keep_every`` (never pruned, and not counted among the newest ``keep``), or None.

    Returns:
        The path of the payload file.

    Raises:
        ValueError: If ``keep`` or ``keep_every`` < 1, ``payload`` is not a mapping or could not be
            loaded back with ``weights_only=True``, or the checkpoint's file or manifest name is
            taken by something that is not a file, such as a folder (nothing is written then).
    """
    check_int("step", step, low=0)
    if keep is not None:
        check_int("keep", keep, low=1)
    if keep_every is not None:
        check_int("keep_every", keep_every, low=1)
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a mapping; got {type(payload).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    for taken in (path, _manifest_path(path)):
        if taken.exists() and not taken.is_file():
            raise ValueError(
                f"{taken} exists and is not a file: the checkpoint of step {step} is written there; remove it"
            )
    _manifest_path(path).unlink(missing_ok=True)  # an old manifest must never vouch for a new payload
    atomic_save(path, lambda tmp: _save_loadable(tmp, dict(payload)))
    manifest = {
        "format": _FORMAT,
        "step": step,
        "file": path.name,
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    atomic_write(_manifest_path(path), lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))
    if keep is not None:
        _prune(directory, path, keep, keep_every)
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
    if check_bool("verify", verify):
        verify_checkpoint(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # an unpicklable file is a bad checkpoint whatever the cause
        raise CheckpointError(path, f"torch.load failed ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict):
        raise CheckpointError(path, f"the payload is a {type(payload).__name__}, not a dict")
    return payload


def _report_skipped(err: CheckpointError) -> None:
    message = f"skipping {err}"
    logger.warning(message)
    warnings.warn(message, stacklevel=3)


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
            _report_skipped(err)
            continue
        return path
    return None


def latest_loadable_checkpoint(
    directory: str | os.PathLike,
    *,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
    map_location: str | torch.device | None = "cpu",
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``directory`` that verifies, loads and passes ``check``, with its payload.

    Like [`latest_valid_checkpoint`][soflow_core.train.checkpoint.latest_valid_checkpoint], but a
    checkpoint whose manifest matches and whose payload still cannot be used (``weights_only``
    refuses it, it is not a dict, or ``check`` raises
    [`CheckpointError`][soflow_core.train.checkpoint.CheckpointError]) is reported and skipped
    the same way as a damaged one.

    Args:
        directory: The checkpoint folder (may not exist).
        check: Called as ``check(path, payload)``; raises ``CheckpointError`` for a payload the
            caller cannot use (missing entries, non-finite weights, ...).
        map_location: Where tensors are loaded.

    Returns:
        (path, payload) of the newest usable checkpoint, or None if there is none.
    """
    for _, path in list_checkpoints(directory):
        try:
            payload = load_checkpoint(path, map_location=map_location)
            if check is not None:
                check(path, payload)
        except CheckpointError as err:
            _report_skipped(err)
            continue
        return path, payload
    return None


def non_finite_entries(payload: object, where: str = "payload") -> list[str]:
    """The floating-point tensors of a nested payload that hold NaN or Inf, by where they sit.

    Reads every floating-point tensor once (a device synchronisation per tensor that is not on
    the CPU): meant for save and load time, not for every step.

    Args:
        payload: Tensors in (nested) mappings, lists and tuples; other values are ignored.
        where: The name of the root in the result.

    Returns:
        Entries such as ``"payload['model']['w'] (3 of 64 values)"``, empty when all are finite.

    Examples:
        >>> non_finite_entries({"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 3})
        ["payload['model']['w'] (1 of 2 values)"]
    """
    found: list[str] = []
    if isinstance(payload, Mapping):
        for key, value in payload.items():
            found += non_finite_entries(value, f"{where}[{key!r}]")
    elif isinstance(payload, (list, tuple)):
        for i, value in enumerate(payload):
            found += non_finite_entries(value, f"{where}[{i}]")
    elif isinstance(payload, torch.Tensor) and (payload.is_floating_point() or payload.is_complex()):
        bad = int((~torch.isfinite(payload.detach())).sum())
        if bad:
            found.append(f"{where} ({bad} of {payload.numel()} values)")
    return found


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
