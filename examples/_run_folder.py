"""The run folder: checked before anything is created, then created and locked for one trainer.

A start that fails before training begins removes the folders it created (``RunFolder.discard``);
the lock is an exclusive ``flock`` that dies with its process, so a killed trainer's lock is
stale by construction and the next trainer takes it over.
"""

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from _runtime import Runtime, broadcast_object


class RunFolder:
    """The run folder: checked, created and locked (an exclusive ``flock`` on ``<out>/.lock``) for one trainer.

    The lock is held for the whole run by rank 0 and released by the kernel when the process
    dies, so a lock left by a killed trainer is stale by construction: the next trainer takes it
    over (and says whose it was). ``.lock`` holds the holder's pid, host, start time and command
    while it runs. A start that fails before training begins removes the folders it created.
    """

    LOCK = ".lock"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created: Path | None = None  # the topmost folder this start created
        self.started = False
        self._fd: int | None = None

    def open(self) -> None:
        """Create the folder if needed and lock it; SystemExit naming the holder if another trainer has it."""
        problems = run_folder_problems(self.path)
        if problems:
            raise SystemExit("; ".join(problems))
        top = self.path
        while not top.parent.exists():
            top = top.parent
        if not self.path.exists():
            self.created = top
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            warnings.warn(f"cannot lock {self.path} on this platform: make sure no other trainer uses it", stacklevel=2)
            return
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1 << 16).decode(errors="replace").strip() or "a process that has not written its name"
            os.close(fd)
            raise SystemExit(
                f"{self.path} is in use by another trainer: {holder}. Wait for it to finish or stop it, or pass "
                "another --out"
            ) from None
        except OSError as error:  # a file system without locks (some network mounts)
            os.close(fd)
            warnings.warn(f"cannot lock {self.path} ({error}): make sure no other trainer uses it", stacklevel=2)
            return
        previous = os.read(fd, 1 << 16).decode(errors="replace").strip()
        if previous:
            print(f"taking over the stale lock of {self.path} (its holder is gone): {previous}", flush=True)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty ``.lock`` (a clean exit leaves no holder behind) and release it."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove what a failed start created (nothing when the folder existed before)."""
        if self.created is not None and not self.started:
            shutil.rmtree(self.created, ignore_errors=True)


# The files a run writes, by folder (regular expressions of their names). Anything else at one of these names (a
# folder made by hand, say) would stop the run when it reaches that write, at every resume, so a start refuses it.
RUN_FILES = {
    ".": (r"config\.json", r"metrics\.jsonl", r"\.lock"),
    "checkpoints": (r"step-\d{9,}\.pt", r"step-\d{9,}\.json"),
    "samples": (r"step-\d{9,}\.png",),
}


def run_folder_problems(out: Path) -> list[str]:
    """What keeps ``out`` from holding a run, found before anything is created or loaded."""
    if out.exists() and not out.is_dir():
        return [f"--out {out} exists and is not a folder"]
    problems = []
    for name, folder in (("checkpoints", True), ("samples", True), ("tb", True), ("metrics.jsonl", False)):
        path = out / name
        if path.exists() and path.is_dir() != folder:
            wanted = "folder" if folder else "file"
            problems.append(f"{path} exists and is {'not ' if folder else ''}a folder; the run needs a {wanted} there")
    if not problems:
        for where, names in RUN_FILES.items():
            folder = out / where
            pattern = re.compile("|".join(f"(?:{name})" for name in names))
            if folder.is_dir():
                taken = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name) and not p.is_file())
                problems += [f"{p} exists and is not a file; the run writes a file there: remove it" for p in taken]
    existing = out
    while not existing.exists():
        existing = existing.parent
    for path in (existing, out / "checkpoints"):
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"--out {out}: {path} is not writable")
    return problems


@contextlib.contextmanager
def run_folder(runtime: Runtime, out: Path) -> Iterator[RunFolder]:
    """The locked run folder for the duration of a run (rank 0 locks; every rank learns whether it may go on)."""
    folder = RunFolder(out)
    refusal = None
    if runtime.is_main:
        try:
            folder.open()
        except SystemExit as error:
            refusal = str(error.code)
    refusal = broadcast_object(runtime, refusal)
    if refusal is not None:
        raise SystemExit(refusal)
    try:
        yield folder
    except BaseException:
        if runtime.is_main:
            folder.release()
            folder.discard()
        raise
    if runtime.is_main:
        folder.release()
