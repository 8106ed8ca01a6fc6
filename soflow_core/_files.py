"""Crash-safe file writes and content hashes, shared by training checkpoints and pretrained folders."""

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 22
TEMPORARY_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_names(name_pattern: str) -> "re.Pattern[str]":
    """The names ``atomic_save`` gives the temporary files of files whose names match ``name_pattern`` (a regex)."""
    return re.compile(rf"^\.(?:{name_pattern})\.[A-Za-z0-9_]+{re.escape(TEMPORARY_SUFFIX)}$")


def default_file_mode() -> int:
    """The mode ``open`` gives a new file: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save(path: Path, save: Callable[[Path], None]) -> None:
    """Let ``save(tmp)`` write a temporary file beside ``path``; fsync it, rename it over ``path``, fsync the folder.

    A crash leaves either the old file or the new one under ``path``, never a partial one. The
    temporary file is named ``.<name>.<random>.tmp`` (``random`` of letters, digits and ``_``) and
    gets the mode an ordinary new file would (0o666 less the umask), not ``mkstemp``'s private 0o600.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    os.close(fd)
    try:
        save(Path(tmp))
        # after ``save``: a writer may replace the file it is given (safetensors writes a new one, mode 0o600)
        os.chmod(tmp, default_file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """``atomic_save`` through ``write(file)`` on the open temporary file."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_save(path, save)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
