"""Shared benchmark plumbing: environment record, timing, peak memory, copy bandwidth, output files.

Rules every benchmark here follows:

* no number without its device: every row carries the device name, dtype, library versions and
  the git commit;
* GPU times are medians from ``triton.testing.do_bench`` (warm-up, cache flush, CUDA events);
  CPU times are medians of ``time.perf_counter`` repeats after warm-up;
* on a GPU, ``graph_ms`` is the same call captured once in a CUDA graph and timed by replaying
  it: device time alone, without the Python and launch overhead that ``median_ms`` includes
  (the figure to hold against memory bandwidth);
* peak memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
"""

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Where results go by default: outside the tracked tree (runs/ is git-ignored), so a run never marks later
# results "-dirty". Pass ``--out-dir benchmarks/results`` to write the committed results.
RESULTS = ROOT / "runs" / "benchmarks"
PUBLISHED_RESULTS = Path(__file__).resolve().parent / "results"

sys.path.insert(0, str(ROOT / "examples"))
from _cli import config_parser, resolve_config, show_value  # noqa: E402  (the shared --help mechanism)

__all__ = ["config_parser", "resolve_config"]


def git_commit() -> str:
    """The checkout's commit (with ``-dirty`` when there are uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty.strip() else "")


def environment(device: torch.device) -> dict[str, str]:
    """Device name and versions, attached to every row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "commit": git_commit(),
    }


def bench(fn: Callable[[], object], device: torch.device, *, repeats: int = 20) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile time of ``fn`` in milliseconds.

    Args:
        fn: The call to time (it must synchronise nothing itself).
        device: Where it runs.
        repeats: CPU repeats (the GPU uses do_bench's own time budget).

    Returns:
        (median, p20, p80) in ms.
    """
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return float(median), float(p20), float(p80)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(times, n=10)
    return statistics.median(times), quantiles[1], quantiles[7]


def bench_graph(fn: Callable[[], object], device: torch.device) -> float | None:
    """Median device time of ``fn`` in ms, captured in a CUDA graph and timed by replay.

    Args:
        fn: The call to capture; it must not synchronise with the host.
        device: Where it runs.

    Returns:
        The median replay time in ms, or None on a CPU or when ``fn`` cannot be captured.
    """
    if device.type != "cuda":
        return None
    import triton.testing

    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up on a side stream, as capture requires
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize(device)
        return None
    median = triton.testing.do_bench(graph.replay, return_mode="median")
    del graph
    return float(median)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated memory of one call above the memory held before it, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbps(device: torch.device, *, megabytes: int = 512) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes over time), in GB/s."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    median, _, _ = bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (median * 1e-3) / 1e9


def write_rows(stem: str, rows: list[dict], table: str, *, directory: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``<directory>/<stem>.json`` (a list of rows) and ``<stem>.md`` (the table); default ``RESULTS``."""
    folder = Path(directory) if directory else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    md_path.write_text(table)
    return json_path, md_path


def comma_list(kind: Callable[[str], object] = str) -> Callable[[str], tuple]:
    """An argparse ``type`` that reads ``"a,b,c"`` as a tuple, each item converted by ``kind``."""
    return lambda text: tuple(kind(v) for v in text.split(",") if v)


class _PresetParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``--help`` shows, after each flag's help, its value in the default preset."""

    def __init__(self, *args: object, preset: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.preset = preset

    def format_help(self) -> str:
        for action in self._actions:
            if action.help in (None, argparse.SUPPRESS) or "default:" in action.help:
                continue
            if dataclasses.is_dataclass(self.preset) and hasattr(self.preset, action.dest):
                action.help += f" (default: {show_value(getattr(self.preset, action.dest))})".replace("%", "%%")
            elif action.nargs == 0 and action.default is False:  # a store_true switch
                action.help += " (default: off)"
            elif action.default is None:
                action.help += " (default: none)"
        return super().format_help()


def preset_parser(doc: str | None, presets: dict, default: str) -> argparse.ArgumentParser:
    """A parser with ``--preset`` naming one of ``presets``, for scripts that add their flags by hand.

    ``--help`` shows each flag's value in the ``default`` preset. ``config_parser`` (from
    ``examples/_cli.py``) builds the whole parser from the config dataclass instead.
    """
    parser = _PresetParser(description=(doc or "").split("\n\n")[0], preset=presets[default])
    names = ", ".join(sorted(presets))
    parser.add_argument(
        "--preset",
        choices=sorted(presets),
        default=default,
        help=f"base configuration, one of {names} (default: {default})",
    )
    parser.add_argument("--config", dest="preset", choices=sorted(presets), help=argparse.SUPPRESS)  # old name
    return parser


def resolve_preset(args: argparse.Namespace, presets: dict, *, ignore: tuple[str, ...] = ()) -> object:
    """The preset named by ``args.preset`` with every other argument that was given replacing its field."""
    skipped = {"preset", *ignore}
    overrides = {k: v for k, v in vars(args).items() if k not in skipped and v is not None}
    return dataclasses.replace(presets[args.preset], **overrides)


def device_slug(name: str) -> str:
    """A file-name-safe short form of a device name."""
    keep = "".join(ch.lower() if ch.isalnum() else "-" for ch in name)
    return "-".join(part for part in keep.split("-") if part)[:40]
