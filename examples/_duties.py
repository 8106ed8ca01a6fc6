"""The periodic duties of the training loop, each with its inputs explicit.

After every optimizer step the loop in ``_training.train`` hands the finished step ``done`` to
each duty in turn; a duty says whether it is due and, if so, does its work:

==================  =====================================================================
``MetricLog``       the averaging window of ``metrics.jsonl``: the objective's metrics summed
                    over the steps since the last row, averaged over steps and ranks at a row
                    (every ``--log-every`` steps and at ``--total-steps``, whatever the chunks)
``NonFiniteGuard``  "was every step finite", folded into a device-side flag each step (no host
                    sync) and read at log rows and before every save; stops the run
``Checkpointer``    a checkpoint every ``--ckpt-every`` steps and at the end, checked finite
``SampleGrid``      a PNG of 1-NFE samples of the EMA weights every ``--sample-every`` steps
                    and at ``--total-steps``
``Evaluator``       the task's ``Evaluation`` every ``Evaluation.every`` steps (see below)
``StopAgreement``   SIGTERM/SIGINT agreed by every rank at a step boundary: save, then exit
==================  =====================================================================

**The evaluation seam.** A trainer's ``Task`` may carry an ``Evaluation``: an interval and a
callable ``evaluate(network, step, runtime) -> {name: float}``. At every step ``k`` with
``k % every == 0``, and at the run's last planned step (``--total-steps``; never at the end of
a ``--max-steps`` chunk, so a chunked run evaluates where an uninterrupted one does), the loop
calls it on **every rank**, under ``torch.no_grad()``, with

* ``network``: a plain copy of the network (no DDP/FSDP2/compile wrapper, eval mode,
  ``requires_grad`` off) holding the EMA weights of step ``k``, on ``runtime.device``;
* ``step``: ``k``, the optimizer steps done;
* ``runtime``: rank, world size and device, so the work (drawing samples, say) can be spread
  over the ranks and gathered with ``torch.distributed`` collectives.

The dict that rank 0 returns goes into ``metrics.jsonl`` (and TensorBoard) as ordinary metric
keys of the row of step ``k``: merged into the training-metrics row when one is due at ``k``,
else a row of its own. The loop adds ``evaluation_seconds`` (the wall time of the call, which
is left out of the window's ``images_per_s``). The values need not be finite (a failed score
is logged, never stops the run). The evaluation runs before the checkpoint of step ``k``, so a
run resumed from that checkpoint has its row, and one resumed from an earlier checkpoint
drops the row with the rest of the log after it and evaluates step ``k`` again. The callable
must not touch the training state; its random draws should come from its own generators
(e.g. ``seeded_generator(seed, k)``), never from the global stream. ``Evaluation.finish``, if
given, is called on rank 0 with the run folder after the run's last planned step (for a plot
of the scores against steps). In-loop FID plugs in here.
"""

import json
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _cli import optional_import
from _images import save_grid
from _runtime import Runtime, barrier, broadcast_object
from torch import Tensor, nn

from soflow_core._files import atomic_write
from soflow_core.seeding import seeded_generator
from soflow_core.train.checkpoint import checkpoint_path, list_checkpoints, non_finite_entries, save_checkpoint
from soflow_core.train.ema import EMA

# ----------------------------------------------------------------------------- logging


class MetricLog:
    """This rank's averaging window of ``metrics.jsonl``: the objective's metrics summed since the last row.

    A row is due every ``every`` steps and at the run's last planned step (``--total-steps``),
    never at the end of a ``--max-steps`` chunk or a stop: rows fall where an uninterrupted run
    writes them. Its values are the window's sums over its steps, averaged over the ranks (a
    collective every rank enters), plus the images per second this process trained since the
    window opened. The window is part of every checkpoint (``state``), so a resumed run goes on
    with the window where it stopped, and its rows equal the uninterrupted run's.

    Args:
        runtime: This process.
        every: ``--log-every``.
        window: A window restored from a checkpoint (what ``state`` returned on this rank), or None.
    """

    def __init__(self, runtime: Runtime, every: int, window: Mapping[str, Any] | None = None) -> None:
        self.runtime, self.every = runtime, every
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        if window is not None:
            self.sums = {key: value.to(runtime.device) for key, value in window["sums"].items()}
            self.steps = int(window["steps"])
        self._tic, self._images = time.perf_counter(), 0

    def add(self, shares: list[dict[str, Tensor]], images: int) -> None:
        """Add one optimizer step: each micro-batch's share of its metrics (already divided by their count)."""
        for share in shares:
            for key, value in share.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self._images += images

    def due(self, done: int, total_steps: int) -> bool:
        return done % self.every == 0 or done == total_steps

    def averages(self) -> dict[str, float]:
        """The objective's metrics averaged over the window's steps and over the ranks (a collective)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        stacked = torch.stack([self.sums[k] for k in keys]) / max(self.steps, 1)
        if self.runtime.distributed:
            dist.all_reduce(stacked)
            stacked /= self.runtime.world_size
        return dict(zip(keys, stacked.cpu().tolist()))

    def images_per_s(self) -> float:
        """Images this process trained per second since the window opened (time spent evaluating left out)."""
        return self._images / max(time.perf_counter() - self._tic, 1e-9)

    def leave_out(self, seconds: float) -> None:
        """Leave ``seconds`` (spent on a duty such as an evaluation) out of the window's throughput."""
        self._tic += seconds

    def restart(self) -> None:
        """Open a new window (after a row)."""
        self.sums, self.steps = {}, 0
        self._tic, self._images = time.perf_counter(), 0

    def state(self) -> dict[str, Any]:
        """This rank's window as a checkpoint stores it."""
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "steps": self.steps}


class MetricsWriter:
    """metrics.jsonl (and TensorBoard) on rank 0: metric rows, and event rows that carry an ``event`` key."""

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.file = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        self.tb = None
        if tensorboard:
            tensorboard_writer = optional_import("torch.utils.tensorboard", "--tensorboard").SummaryWriter
            self.tb = tensorboard_writer(str(out / "tb"))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def event(self, step: int, event: str, **details: Any) -> None:
        """An event row (``resume``, ``non_finite``, ``stopped``), flushed and fsynced at once."""
        self.file.write(json.dumps({"step": step, "event": event, **details}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the metric rows after ``step`` (an interrupted run logged them; the resumed run logs them again).

    Event rows stay, and so does nothing unreadable (the torn last line of a killed writer).
    Returns the number of lines dropped.
    """
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and ("event" in row or int(row.get("step", 0)) <= step):
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
    return len(lines) - len(kept)


class ProgressBar:
    """The tqdm bar of rank 0 (nothing on other ranks or with ``--no-progress``)."""

    SHOWN = ("fm_loss", "consistency_loss", "images_per_s")

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            tqdm = optional_import("tqdm", "the progress bar (or pass --no-progress)").tqdm
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stdout)

    def show(self, values: Mapping[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{values[k]:.4g}" for k in self.SHOWN if k in values})

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the non-finite guard


def _finite_or_none(values: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


class NonFiniteGuard:
    """Stops the run at the first non-finite step, before anything non-finite is saved.

    Every step folds "the loss and every metric of every micro-batch were finite" into a flag on
    the device (0 while every step was finite, else the first non-finite step), with no host
    sync. The flag is read, as a collective, at log rows (``check_window``) and before every
    save (``check_state``, which also scans the state about to be written). A non-finite step
    appends a ``non_finite`` event and exits with status 1; the newest checkpoint is untouched.

    Args:
        runtime: This process.
        checkpoints: The run's checkpoint folder (the stop names the last finite checkpoint).
        writer: The metrics writer on rank 0, None elsewhere.
    """

    _NONE = torch.iinfo(torch.int64).max

    def __init__(self, runtime: Runtime, checkpoints: Path, writer: MetricsWriter | None) -> None:
        self.runtime, self.checkpoints, self.writer = runtime, checkpoints, writer
        self.first_bad = torch.zeros((), dtype=torch.int64, device=runtime.device)

    def record(self, done: int, finite: Tensor) -> None:
        """Note whether step ``done`` was finite (a device-side update, no sync)."""
        self.first_bad = torch.where((self.first_bad == 0) & ~finite, done, self.first_bad)

    def first_non_finite_step(self) -> int:
        """The first non-finite step on any rank, 0 if none (a collective)."""
        value = torch.where(self.first_bad == 0, self._NONE, self.first_bad)
        if self.runtime.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        found = int(value)
        return 0 if found == self._NONE else found

    def check_window(self, done: int, values: Mapping[str, float]) -> None:
        """Stop unless every step so far and every averaged metric of the window are finite (a collective)."""
        first = self.first_non_finite_step()
        if first or not all(math.isfinite(v) for v in values.values()):
            self.stop(done, first, [], values)

    def check_state(self, step: int, state: Mapping[str, Any], log: MetricLog) -> None:
        """Stop unless every step so far and the model, EMA and optimizer state of ``state`` are finite."""
        first = self.first_non_finite_step()
        scanned = {k: state[k] for k in ("model", "ema", "optimizer")}
        entries = non_finite_entries(scanned) if self.runtime.is_main else []
        entries = broadcast_object(self.runtime, entries)
        if first or entries:
            self.stop(step, first, entries, log.averages())

    def stop(self, done: int, first: int, entries: list[str], values: Mapping[str, float]) -> typing.NoReturn:
        saved = list_checkpoints(self.checkpoints)
        last = str(saved[0][1]) if saved else None
        if self.writer is not None:
            self.writer.event(
                done,
                "non_finite",
                first_non_finite_step=first or None,
                non_finite_state=entries[:8],
                non_finite_entries=len(entries),
                window=_finite_or_none(values),
                last_checkpoint=None if last is None else Path(last).name,
            )
        what = f"a non-finite loss at step {first}" if first else f"non-finite state after step {done}: {entries[:3]}"
        keep = f"{last} holds the last finite state" if last else "no checkpoint was written"
        raise SystemExit(
            f"{what}; stopped at step {done} without saving ({keep}). Run again to resume it with other settings "
            "(a lower --lr is applied on resume)"
        )


# ----------------------------------------------------------------------------- saving


class Checkpointer:
    """Checkpoints every ``every`` steps and at the end of the invocation; the newest ``keep`` kept, and multiples of
    ``keep_every``.

    A save first lets the guard check the steps and the state (it stops the run instead of
    saving anything non-finite), then rank 0 writes the file atomically with its manifest
    (``soflow_core.train.checkpoint.save_checkpoint``) and prunes; every rank waits for it.

    Args:
        folder: The run's checkpoint folder.
        every: ``--ckpt-every``.
        keep: ``--keep``.
        keep_every: ``--keep-every`` (0: none).
        runtime: This process.
        guard: The run's non-finite guard.
    """

    def __init__(
        self, folder: Path, every: int, keep: int, keep_every: int, runtime: Runtime, guard: NonFiniteGuard
    ) -> None:
        self.folder, self.every, self.keep, self.keep_every = folder, every, keep, keep_every or None
        self.runtime, self.guard = runtime, guard

    def due(self, done: int, end_step: int) -> bool:
        return done % self.every == 0 or done == end_step

    def save(self, step: int, state: dict[str, Any], log: MetricLog) -> None:
        """Check, then write ``state`` as the checkpoint of ``step`` (every rank calls it with its state)."""
        self.guard.check_state(step, state, log)
        if self.runtime.is_main:
            try:
                save_checkpoint(self.folder, step, state, keep=self.keep, keep_every=self.keep_every)
            except ValueError as error:  # e.g. a folder made at the checkpoint's name while the run trained
                raise SystemExit(f"cannot write the checkpoint of step {step}: {error}") from error
        barrier(self.runtime)


# ----------------------------------------------------------------------------- sampling: grids and evaluation


class EmaNetwork:
    """A plain copy of the network that receives the EMA weights before it samples (grids, evaluation).

    Args:
        ema: The run's EMA.
        copy: The network copy on this rank (rank 0 always; every rank when an evaluation spreads its
            work over the ranks), or None on a rank that samples nothing.
        sharded: Whether the EMA is sharded (FSDP2): gathering it is then a collective every rank enters.
    """

    def __init__(self, ema: EMA, copy: nn.Module | None, sharded: bool) -> None:
        self.ema, self.net, self.sharded = ema, copy, sharded
        if copy is not None:
            copy.eval().requires_grad_(False)
        self._step: int | None = None

    def at(self, step: int) -> nn.Module | None:
        """The copy holding the EMA weights after step ``step`` (every rank must call it)."""
        if self._step != step:
            if self.sharded:
                full = self.ema.state_dict(full=True)
                if self.net is not None:
                    self.net.load_state_dict(full)
            elif self.net is not None:
                self.ema.copy_to(self.net)
            self._step = step
        return self.net


class SampleGrid:
    """A PNG grid of samples of the EMA weights, every ``every`` steps and at the run's last planned step.

    As the log's rows, grids fall where an uninterrupted run draws them (never at the end of a chunk).

    Args:
        folder: Where the grids go (``<out>/samples``).
        every: ``--sample-every`` (0: only at the last planned step).
        count: ``--sample-grid``, the number of images.
        seed: The run's seed; every grid draws from the same generator, so grids of different steps compare.
        sample_images: The task's ``(network, count, generator) -> uint8 NHWC images``.
    """

    def __init__(
        self,
        folder: Path,
        every: int,
        count: int,
        seed: int,
        sample_images: Callable[[nn.Module, int, torch.Generator], Tensor],
    ) -> None:
        self.folder, self.every, self.count, self.seed = folder, every, count, seed
        self.sample_images = sample_images

    def due(self, done: int, total_steps: int) -> bool:
        return bool(self.every and done % self.every == 0) or done == total_steps

    def write(self, step: int, network: nn.Module | None) -> None:
        """Sample and write the grid of ``step`` (on the rank that holds a network)."""
        if network is not None:
            images = self.sample_images(network, self.count, seeded_generator(self.seed, 1, 0))
            save_grid(images, self.folder / f"step-{step:09d}.png")


@dataclass(frozen=True)
class Evaluation:
    """A periodic evaluation a trainer's task may carry (see the module docstring for the contract).

    Attributes:
        every: Steps between evaluations (≥ 1); the run's last planned step is always evaluated.
        evaluate: ``(network, step, runtime) -> {name: float}``, called on every rank; rank 0's
            result is logged at ``step``.
        finish: Called on rank 0 with the run folder after the run's last planned step, or None.
    """

    every: int
    evaluate: Callable[[nn.Module, int, Runtime], Mapping[str, float]]
    finish: Callable[[Path], None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"Evaluation.every must be an int >= 1; got {self.every!r}")


class Evaluator:
    """Runs a task's ``Evaluation`` (if any) on its schedule: every ``every`` steps and at ``total_steps``.

    Args:
        evaluation: The task's evaluation, or None.
        total_steps: ``--total-steps``, the run's last planned step.
        runtime: This process.
    """

    def __init__(self, evaluation: Evaluation | None, total_steps: int, runtime: Runtime) -> None:
        self.evaluation, self.total_steps, self.runtime = evaluation, total_steps, runtime

    def due(self, done: int) -> bool:
        every = self.evaluation.every if self.evaluation is not None else 0
        return bool(every) and (done % every == 0 or done == self.total_steps)

    def run(self, step: int, network: nn.Module) -> dict[str, float]:
        """Evaluate ``network`` (every rank); the scores as floats plus ``evaluation_seconds``."""
        assert self.evaluation is not None
        tic = time.perf_counter()
        with torch.no_grad():
            scores = self.evaluation.evaluate(network, step, self.runtime)
        values = {str(key): float(value) for key, value in scores.items()}
        values["evaluation_seconds"] = time.perf_counter() - tic
        return values

    def finish(self, done: int, out: Path) -> None:
        """Call ``Evaluation.finish`` on rank 0 once the run's last planned step is done."""
        finish = self.evaluation.finish if self.evaluation is not None else None
        if finish is not None and done == self.total_steps and self.runtime.is_main:
            finish(out)


# ----------------------------------------------------------------------------- stop on signal


class StopRequest:
    """SIGTERM/SIGINT handlers that ask the loop to stop at the next step boundary.

    The first signal is recorded (``signum``); a second one stops at once, without saving
    (KeyboardInterrupt for SIGINT, exit status 128 + signal for SIGTERM). Handlers are only
    installed from the main thread and are restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"{name}: saving a checkpoint at the next step boundary, then exiting (send {name} again to stop "
            "at once, without saving)",
            file=sys.stderr,
            flush=True,
        )


class StopAgreement:
    """The signal every rank stops on at a step boundary, agreed over a gloo group without a device sync.

    A rank's request made at boundary k is all-reduced (MAX) asynchronously and read at boundary
    k + 1, so every rank sees the same value at the same boundary. With one process the request
    is read directly.
    """

    def __init__(self, runtime: Runtime, request: StopRequest) -> None:
        self.runtime, self.request = runtime, request
        self._pending: Any = None
        self._value = torch.zeros(1, dtype=torch.int64)

    def poll(self) -> int:
        if not self.runtime.distributed:
            return self.request.signum
        agreed = 0
        if self._pending is not None:
            self._pending.wait()
            agreed = int(self._value.item())
        self._value = torch.tensor([self.request.signum], dtype=torch.int64)
        self._pending = dist.all_reduce(self._value, op=dist.ReduceOp.MAX, group=self.runtime.control, async_op=True)
        return agreed

    def close(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def __enter__(self) -> "StopAgreement":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_on_signal(
    signum: int, done: int, writer: MetricsWriter | None, checkpoints: Path, runtime: Runtime
) -> typing.NoReturn:
    """After the checkpoint of ``done`` is written: a ``stopped`` event, a message, exit status 128 + signal."""
    name = signal.Signals(signum).name
    if writer is not None:
        writer.event(done, "stopped", signal=name, checkpoint=checkpoint_path(checkpoints, done).name)
    if runtime.is_main:
        print(f"{name}: stopped at step {done}; run the same command again to resume", flush=True)
    raise SystemExit(128 + signum)
