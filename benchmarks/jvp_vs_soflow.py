"""SoFlow against JVP-based MeanFlow: training-step time and peak memory on the same DiT.

    python benchmarks/jvp_vs_soflow.py                        # where CUDA is visible the paper preset (DiT-B/2,
                                                              # batch 256, bf16, CFG); elsewhere the tiny one
    python benchmarks/jvp_vs_soflow.py --preset tiny          # seconds on a CPU; CI runs this
    python benchmarks/jvp_vs_soflow.py --model DiT-S/4 --batch-size 16 --dtype fp32 --device cpu \
        --compile --interleave --isolate                      # the committed CPU run

Every row is one full training step (draws, objective forward, backward, AdamW step) of the same
DiT, batch, dtype and guidance setting, run through ``soflow_core.train.make_training_step``;
only the objective and its execution options differ:

* ``soflow``: SoFlow as soflow_core runs it, every optimisation on (PyTorch's default fused
  attention, one joint grad forward, fused loss-path kernels ``backend="auto"``);
  ``soflow+compile`` compiles the whole step (``--compile``): the draws eager, loss + backward
  in one graph, the optimizer step in another;
* ``soflow_reference_style``: as the paper's code runs it (separate forwards, fp32,
  memory-efficient attention, PyTorch loss path);
* ``ref+...``: the reference style with one optimisation switched on (attention backend,
  joint forward, fused kernels, whole-step compile, bf16);
* ``meanflow_shared_primal`` / ``meanflow_separate`` / ``meanflow_subset``: MeanFlow
  (benchmarks/meanflow.py), one ``torch.func.jvp`` whose primal output is the loss's u, a
  no-grad JVP plus a separate forward with gradient, or that with the JVP only on the samples
  with r ≠ t (its target term is multiplied by t − r = 0 elsewhere). Flash and
  memory-efficient attention have no forward-mode AD, so the JVP always runs with the math
  attention backend. ``meanflow_*+compile`` compile their whole step like ``soflow+compile``
  where torch can; where it cannot, the row says why (status ``unsupported``).

The ratios that matter are against the **fastest** MeanFlow row measured (time) and the
**leanest** one (memory), whichever variant and compile setting that is.

Timing: ``warmup`` untimed steps, then ``iters`` timed steps; on CUDA each step is bracketed by
CUDA events (the median is reported, plus wall time per step over the whole timed loop with
one final synchronisation); on a CPU, ``time.perf_counter`` per step. With ``--interleave``
every row is built first and the timed steps go round-robin over the rows, so that a shared
machine's load falls on all rows alike. Memory: on CUDA the peak of
``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients, AdamW state and
activations; not with ``--interleave``, where every row's weights are resident); on a CPU, with
``--isolate`` (each row also run in its own process), the growth of the peak resident set size
above the RSS before the model was built; otherwise n/a.

Rows (with device, versions, commit and the resolved config) go to
``<out-dir>/jvp_vs_soflow-<model>-<device>.json`` (``--out-dir``, default ``runs/benchmarks``,
outside the tracked tree; ``--out-dir benchmarks/results`` writes the committed results), with a
markdown table and a bar chart (PNG) beside them. A variant that runs out of memory becomes a row with status ``oom``.
"""

import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_parser, device_slug, environment, resolve_config, write_rows
from meanflow import MeanFlowObjective

from soflow_core import SoFlowObjective
from soflow_core.nets import DIT_SIZES, DiT
from soflow_core.ops._dispatch import resolve_backend
from soflow_core.train import make_training_step

ATTENTIONS = ("default", "efficient", "math", "flash")
DTYPES = ("fp32", "bf16")
TINY_DIT = {"patch_size": 2, "hidden_size": 64, "depth": 2, "num_heads": 2}


@dataclass(frozen=True, kw_only=True)
class Variant:
    """How one row runs the training step.

    Attributes:
        name: Row name.
        method: ``"soflow"`` or ``"meanflow"``.
        attention: SDPA backends allowed for the step (MeanFlow's JVP is math in any case).
        forward_batching: SoFlow's grad-call grouping.
        backend: SoFlow's loss-path backend.
        compile: Compile the whole step (``make_training_step(compile=True)``).
        dtype: ``None`` for the run's dtype, or a fixed one.
        jvp_variant: MeanFlow's JVP variant.
        note: One line for the table.
    """

    name: str
    method: str = "soflow"
    attention: str = "default"
    forward_batching: str = "joint"
    backend: str = "auto"
    compile: bool = False
    dtype: str | None = None
    jvp_variant: str = "shared_primal"
    note: str = ""


_REFERENCE = Variant(
    name="soflow_reference_style",
    attention="efficient",
    forward_batching="split",
    backend="torch",
    dtype="fp32",
    note="as the paper's code: separate forwards, fp32, memory-efficient attention",
)
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(name="soflow", note="default attention, joint forward, fused kernels"),
        Variant(name="soflow+compile", compile=True, note="soflow, whole step compiled"),
        _REFERENCE,
        dataclasses.replace(_REFERENCE, name="ref+attn_math", attention="math", note="reference, math attention"),
        dataclasses.replace(
            _REFERENCE, name="ref+attn_default", attention="default", note="reference, default (flash) attention"
        ),
        dataclasses.replace(_REFERENCE, name="ref+joint", forward_batching="joint", note="reference, joint forward"),
        dataclasses.replace(_REFERENCE, name="ref+fused", backend="auto", note="reference, backend auto"),
        dataclasses.replace(_REFERENCE, name="ref+compile", compile=True, note="reference, whole step compiled"),
        dataclasses.replace(_REFERENCE, name="ref+bf16", dtype="bf16", note="reference, bf16 autocast"),
        *(
            Variant(name=f"meanflow_{jvp}{suffix}", method="meanflow", jvp_variant=jvp, compile=bool(suffix), note=note)
            for suffix in ("", "+compile")
            for jvp, note in (
                ("shared_primal", "one JVP"),
                ("separate", "no-grad JVP + grad forward"),
                ("subset", "no-grad JVP on the r != t samples + grad forward"),
            )
        ),
    )
}
COMPILE_VARIANTS = tuple(name for name, variant in VARIANTS.items() if variant.compile)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to measure; saved in every row.

    Attributes:
        model: A DiT size name (``"DiT-S/4"`` … ``"DiT-XL/2"``) or ``"DiT-tiny"`` (CI).
        input_size: Latent side.
        in_channels: Latent channels.
        num_classes: Classes (the null class is ``num_classes``).
        batch_size: Images per step.
        dtype: ``"fp32"`` (TF32 matmuls on CUDA) or ``"bf16"`` (autocast; weights stay fp32).
        cfg: Training-time guidance on: SoFlow's ImageNet recipe (ω = 3, m = 0.25) and MeanFlow
            with ω = ``meanflow_scale``, κ = ``meanflow_mix``; off: SoFlow without guidance and
            MeanFlow with ω = 1, κ = 0 (labels still dropped).
        meanflow_scale: MeanFlow's ω with CFG.
        meanflow_mix: MeanFlow's κ with CFG (κ ≠ 0 costs a second no-grad forward).
        variants: Row names, a subset of ``VARIANTS``; empty: every row but the compiled and
            (for fp32 runs) ``ref+bf16`` ones, plus the compiled ones with ``compile``.
        compile: Add the whole-step-compiled rows.
        compile_backend: ``torch.compile`` backend of those rows (``"aot_eager"`` traces without
            generating code: a quick check that they compile).
        interleave: Build every row first and time their steps round-robin.
        warmup: Untimed steps first.
        iters: Timed steps.
        device: ``"cuda"`` or ``"cpu"``.
        threads: CPU threads of torch (0: torch's default).
        isolate: Run each row in its own process (needed for CPU memory figures).
        seed: Seed of weights, data and draws.
        out: Results file stem (default ``jvp_vs_soflow-<model>-<device>``).
        out_dir: Results folder (default ``runs/benchmarks``; ``benchmarks/results`` holds the committed ones).
    """

    model: str = "DiT-B/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    batch_size: int = 256
    dtype: Literal["fp32", "bf16"] = "bf16"
    cfg: bool = True
    meanflow_scale: float = 1.0
    meanflow_mix: float = 0.5
    variants: tuple[str, ...] = ()
    compile: bool = False
    compile_backend: str = "inductor"
    interleave: bool = False
    warmup: int = 5
    iters: int = 20
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int = 0
    isolate: bool = False
    seed: int = 0
    out: str = ""
    out_dir: str = ""

    def resolved_variants(self) -> tuple[str, ...]:
        """The rows to run, in table order."""
        if self.variants:
            return self.variants
        skip = set() if self.compile else set(COMPILE_VARIANTS)
        if self.dtype == "fp32":
            skip.add("ref+bf16")
        return tuple(name for name in VARIANTS if name not in skip)


PRESETS_HELP = {
    "paper": "the GPU setting: DiT-B/2, batch 256, bf16, CFG (minutes per row on a GPU)",
    "tiny": "a tiny DiT on a CPU (seconds; CI)",
}


def default_preset() -> str:
    """``paper`` where a CUDA device is visible; on a CPU the tiny run (the paper setting would take hours)."""
    return "paper" if torch.cuda.is_available() else "tiny"


PRESETS = {
    "paper": BenchConfig(),
    "tiny": BenchConfig(
        model="DiT-tiny",
        input_size=8,
        num_classes=10,
        batch_size=4,
        dtype="fp32",
        warmup=1,
        iters=2,
        device="cpu",
    ),
}


# ---------------------------------------------------------------------------------------- a step


def build_model(config: BenchConfig) -> DiT:
    """The DiT of ``config.model`` (fp32 weights)."""
    common = {"input_size": config.input_size, "in_channels": config.in_channels, "num_classes": config.num_classes}
    if config.model == "DiT-tiny":
        return DiT(**TINY_DIT, **common)
    return DiT.from_name(config.model, **common)


def attention_backends(attention: str, device: torch.device) -> tuple[list[SDPBackend] | None, str]:
    """The SDPA backends a row allows, and what it ends up using, in words.

    Args:
        attention: One of ``ATTENTIONS``.
        device: Where the step runs.

    Returns:
        (backends for ``sdpa_kernel`` or None for PyTorch's default choice, description).
    """
    if attention == "math":
        return [SDPBackend.MATH], "math"
    if attention == "flash":
        return [SDPBackend.FLASH_ATTENTION], "flash"
    if attention == "efficient":
        if device.type != "cuda":
            return None, "default (no mem-efficient on CPU)"
        return [SDPBackend.EFFICIENT_ATTENTION], "memory-efficient"
    return None, "default"


def make_objective(variant: Variant, config: BenchConfig):
    """The SoFlow or MeanFlow objective of a row."""
    if variant.method == "meanflow":
        cfg = {"guidance_scale": config.meanflow_scale, "guidance_mix": config.meanflow_mix} if config.cfg else {}
        return MeanFlowObjective(
            jvp_variant=variant.jvp_variant, null_cond=config.num_classes, check_inputs=False, **cfg
        )
    base = SoFlowObjective.from_preset("imagenet")
    guidance = dataclasses.replace(base.guidance, null_cond=config.num_classes) if config.cfg else None
    return dataclasses.replace(
        base,
        guidance=guidance,
        forward_batching=variant.forward_batching,
        backend=variant.backend,
        check_inputs=False,  # a device sync per step; the MeanFlow rows check nothing either
    )


@dataclass
class Step:
    """One row's training step and what it runs on."""

    run: Callable[[], None]
    model: torch.nn.Module
    attention: str
    backend: str
    dtype: str


def make_step(variant: Variant, config: BenchConfig) -> Step:
    """Build the model, optimizer, data and the closure of one training step."""
    device = torch.device(config.device)
    dtype = variant.dtype or config.dtype
    torch.manual_seed(config.seed)
    model = build_model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    data_gen = torch.Generator(device=device).manual_seed(config.seed)
    shape = (config.batch_size, config.in_channels, config.input_size, config.input_size)
    data = torch.randn(shape, device=device, generator=data_gen)
    cond = torch.randint(0, config.num_classes, (config.batch_size,), device=device, generator=data_gen)
    draws = torch.Generator(device=device).manual_seed(config.seed + 1)
    objective = make_objective(variant, config)
    step_fn = make_training_step(objective, model, optimizer, compile=variant.compile, backend=config.compile_backend)
    backends, attention = attention_backends(variant.attention, device)
    if variant.method == "meanflow":
        attention = f"math for the JVP, else {attention}"
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    )
    attention_context = (lambda: sdpa_kernel(backends)) if backends else contextlib.nullcontext
    step_index = [0]

    def draw():
        if variant.method == "meanflow":
            return objective.sample_batch(data, cond, generator=draws)
        return objective.sample_batch(data, cond, step=step_index[0], total_steps=400_000, generator=draws)

    def run() -> None:
        with attention_context(), autocast():
            step_fn(draw())
        step_index[0] += 1

    backend = "–" if variant.method == "meanflow" else resolve_backend(variant.backend, data)
    return Step(run=run, model=model, attention=attention, backend=backend, dtype=dtype)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    """The peak RSS of this process image (``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that across ``fork`` + ``exec``, so a worker
    started by a large parent would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM line in /proc/self/status")


def _row_header(name: str) -> dict:
    variant = VARIANTS[name]
    row = {"variant": name, "method": variant.method, "note": variant.note, "compile": variant.compile}
    row |= {"forward_batching": variant.forward_batching if variant.method == "soflow" else "–"}
    row |= {"jvp_variant": variant.jvp_variant if variant.method == "meanflow" else "–"}
    return row


def _failure(name: str, error: BaseException) -> dict:
    """The status and message of a row whose step could not run.

    ``oom`` for out of memory; ``unsupported`` when ``torch.compile`` cannot compile the step (a
    limitation of torch, recorded with its message); ``error`` otherwise (the exit status reports it).
    """
    message = f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
    if isinstance(error, torch.OutOfMemoryError):
        return {"status": "oom", "error": message}
    if VARIANTS[name].compile and isinstance(error, torch._dynamo.exc.TorchDynamoException):
        return {"status": "unsupported", "error": message}
    traceback.print_exc()
    return {"status": "error", "error": message}


def count_flops(step: Step) -> int:
    """FLOPs of one training step of an eager row, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Every matrix product, convolution and attention call of the step (forward passes with and
    without gradient, the JVP's tangent pass, the backward) at 2 FLOPs per multiply-add;
    elementwise work is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step.run()
    return counter.get_total_flops()


def _time_one(step: Step, device: torch.device) -> float:
    """Milliseconds of one step: CUDA events on a GPU, ``time.perf_counter`` on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step.run()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    step.run()
    return (time.perf_counter() - start_s) * 1e3


def _time_stats(times: list[float], wall: float | None, config: BenchConfig) -> dict:
    median = statistics.median(times)
    return {
        "status": "ok",
        "median_ms": median,
        "p20_ms": _quantile(times, 0.2),
        "p80_ms": _quantile(times, 0.8),
        "wall_ms_per_step": wall,
        "images_per_s": config.batch_size / (median * 1e-3),
    }


def measure_variant(name: str, config: BenchConfig) -> dict:
    """Time one row and record its peak memory; a failing row gets status ``oom``, ``unsupported`` or ``error``."""
    device = torch.device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    row = _row_header(name)
    # A compiled row's peak RSS on a CPU is the compiler's (dynamo, AOTAutograd, Inductor), not the step's.
    cpu_memory = device.type == "cpu" and config.isolate and not VARIANTS[name].compile
    rss_before = _rss_mb() if cpu_memory else None
    step = None
    try:
        step = make_step(VARIANTS[name], config)
        row |= {"attention": step.attention, "backend": step.backend, "dtype": step.dtype}
        for _ in range(config.warmup):
            step.run()
        row["flops_per_step"] = None if VARIANTS[name].compile else count_flops(step)
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(config.iters)
            ]
            wall = time.perf_counter()
            for start, end in events:
                start.record()
                step.run()
                end.record()
            torch.cuda.synchronize(device)
            wall = (time.perf_counter() - wall) * 1e3 / config.iters
            times = [start.elapsed_time(end) for start, end in events]
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            step_peak = peak - resident / 2**20
        else:
            resident = _rss_mb() if cpu_memory else None
            wall = time.perf_counter()
            times = [_time_one(step, device) for _ in range(config.iters)]
            wall = (time.perf_counter() - wall) * 1e3 / config.iters
            peak = step_peak = None
            if cpu_memory:
                peak = _max_rss_mb() - rss_before
                step_peak = _max_rss_mb() - resident
        row |= _time_stats(times, wall, config) | {"peak_memory_mb": peak, "step_peak_memory_mb": step_peak}
    except Exception as error:  # recorded, so the other rows still run
        row |= _failure(name, error)
    finally:
        del step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return row


def measure_interleaved(names: tuple[str, ...], config: BenchConfig) -> list[dict]:
    """Build and warm up every row, then time their steps round-robin (memory is not measured here).

    Every compiled row's step is the same code object, so the recompile limit is raised to hold
    one cache entry per row.
    """
    device = torch.device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(names))
    rows = {name: _row_header(name) for name in names}
    steps: dict[str, Step] = {}
    for name in names:
        try:
            step = make_step(VARIANTS[name], config)
            rows[name] |= {"attention": step.attention, "backend": step.backend, "dtype": step.dtype}
            for _ in range(config.warmup):
                step.run()
            rows[name]["flops_per_step"] = None if VARIANTS[name].compile else count_flops(step)
            steps[name] = step
        except Exception as error:
            rows[name] |= _failure(name, error)
        print(f"built {name}: {rows[name].get('status', 'ready')}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(config.iters):
        for name in list(steps):
            try:
                times[name].append(_time_one(steps[name], device))
            except Exception as error:
                rows[name] |= _failure(name, error)
                del steps[name]
    for name in steps:
        rows[name] |= _time_stats(times[name], None, config) | {"peak_memory_mb": None, "step_peak_memory_mb": None}
    return [rows[name] for name in names]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _run_isolated(name: str, config: BenchConfig) -> dict:
    """``measure_variant`` in a fresh process, so its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as folder:
        config_path, row_path = Path(folder) / "config.json", Path(folder) / "row.json"
        config_path.write_text(json.dumps(dataclasses.asdict(config)))
        command = [sys.executable, __file__, "--worker", str(config_path), name, str(row_path)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not row_path.exists():
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            status = "oom" if result.returncode in (-9, 137) else "error"
            return {"variant": name, "method": VARIANTS[name].method, "status": status, "error": tail[0][:300]}
        return json.loads(row_path.read_text())


# ---------------------------------------------------------------------------------------- output


def add_ratios(rows: list[dict]) -> None:
    """Each row's step time and peak memory over those of every MeanFlow row, and of the best MeanFlow row.

    ``time_vs_fastest_meanflow`` divides by the lowest median step time of the MeanFlow rows
    measured (whichever JVP variant and compile setting), ``memory_vs_leanest_meanflow`` by
    their lowest peak memory; the names are in ``fastest_meanflow`` and ``leanest_meanflow``.
    """
    by_name = {row["variant"]: row for row in rows}
    for row in rows:  # compiling changes no FLOP: a compiled row counts as its eager twin
        twin = by_name.get(row["variant"].removesuffix("+compile"), {})
        if row.get("compile") and row.get("flops_per_step") is None:
            row["flops_per_step"] = twin.get("flops_per_step")
    meanflow = [row for row in rows if row["method"] == "meanflow" and row.get("status") == "ok"]
    best = {}
    for key, field in (("fastest", "median_ms"), ("leanest", "peak_memory_mb")):
        measured = [row for row in meanflow if row.get(field) is not None]
        best[key] = min(measured, key=lambda row: row[field]) if measured else None
    for row in rows:
        ok = row.get("status") == "ok"
        for base in meanflow:
            suffix = base["variant"].removeprefix("meanflow_")
            for key, field in (("time", "median_ms"), ("memory", "peak_memory_mb")):
                row[f"{key}_vs_meanflow_{suffix}"] = _ratio(row, base, field) if ok else None
        for key, field, ratio_name in (
            ("fastest", "median_ms", "time_vs_fastest_meanflow"),
            ("leanest", "peak_memory_mb", "memory_vs_leanest_meanflow"),
        ):
            base = best[key]
            row[f"{key}_meanflow"] = base["variant"] if base else None
            row[ratio_name] = _ratio(row, base, field) if ok and base else None
        base = best["fastest"]
        row["flops_vs_fastest_meanflow"] = _ratio(row, base, "flops_per_step") if base else None


def _ratio(row: dict, base: dict, field: str) -> float | None:
    value, denominator = row.get(field), base.get(field)
    return value / denominator if value is not None and denominator else None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: list[dict], config: BenchConfig) -> str:
    """A header line (device, versions, setting), one table line per row, and the headline ratios."""
    env = rows[0]
    memory = (
        "peak `torch.cuda.max_memory_allocated` over the timed steps"
        if config.device.startswith("cuda") and not config.interleave
        else (
            "peak RSS growth above the RSS before the model was built (one process per row; not for the compiled "
            "rows, whose peak RSS is the compiler's)"
            if config.isolate and not config.device.startswith("cuda")
            else "not measured (CPU without --isolate, or CUDA with --interleave)"
        )
    )
    timing = (
        f"median of {config.iters} steps per row, timed round-robin over the rows after {config.warmup} warm-up "
        "steps each"
        if config.interleave
        else f"median of {config.iters} steps after {config.warmup} warm-up steps"
    )
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; commit {env['commit']}. {config.model}, "
        f"{config.input_size}×{config.input_size}×{config.in_channels} latents, batch {config.batch_size}, "
        f"{config.dtype}, CFG {'on' if config.cfg else 'off'}; {timing} (draws, forward, backward, AdamW). "
        f"Memory: {memory}. MeanFlow's JVP always runs with math attention (no forward-mode AD in the fused "
        "kernels).",
    ]
    # two tables (what each row runs; what it measured) so that neither needs horizontal scrolling
    setup = [
        "| variant | attention | forward | loss backend | dtype | status |",
        "|---|---|---|---|---|---|",
    ]
    measured = [
        "| variant | step ms (p20–p80) | images/s | peak MiB | GFLOP per step | time × fastest MF "
        "| FLOPs × fastest MF | memory × leanest MF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        forward = row.get("forward_batching", "–") if row["method"] == "soflow" else row.get("jvp_variant", "–")
        if row.get("compile"):
            forward += " + compile"
        ok = row.get("status") == "ok"
        step = f"{row['median_ms']:.1f} ({row['p20_ms']:.1f}–{row['p80_ms']:.1f})" if ok else "–"
        setup.append(
            f"| {row['variant']} | {row.get('attention', '–')} | {forward} | {row.get('backend', '–')} | "
            f"{row.get('dtype', '–')} | {row['status']} |"
        )
        measured.append(
            f"| {row['variant']} | {step} | {_fmt(row.get('images_per_s'), '.1f')} | "
            f"{_fmt(row.get('peak_memory_mb'), '.0f')} | {_fmt(_giga(row.get('flops_per_step')), '.1f')} | "
            f"{_fmt(row.get('time_vs_fastest_meanflow'), '.2f')} | "
            f"{_fmt(row.get('flops_vs_fastest_meanflow'), '.2f')} | "
            f"{_fmt(row.get('memory_vs_leanest_meanflow'), '.2f')} |"
        )
    lines += ["", *setup, "", *measured, "", *headline(rows)]
    failed = [row for row in rows if row.get("status") not in ("ok", None)]
    if failed:  # in words; the exception's own text stays in the row's "error" field of the JSON file
        lines += ["", "Rows that did not run:", ""]
        lines += [f"* `{row['variant']}` ({row['status']}): {_STATUS_WORDS.get(row['status'], '')}" for row in failed]
    return "\n".join(lines) + "\n"


_STATUS_WORDS = {
    "oom": "ran out of device memory.",
    "unsupported": "torch.compile cannot compile this step; the error is in the JSON row.",
    "error": "the step raised an error; it is in the JSON row.",
}


def _giga(value: float | None) -> float | None:
    return None if value is None else value / 1e9


def headline(rows: list[dict]) -> list[str]:
    """The library's rows (``soflow``, ``soflow+compile``): time and memory against the best MeanFlow rows."""
    first = rows[0]
    fastest, leanest = first.get("fastest_meanflow"), first.get("leanest_meanflow")
    if fastest is None:
        return ["No MeanFlow row ran, so there is no headline ratio."]
    lines = [f"Fastest MeanFlow row: `{fastest}`; leanest: `{leanest or 'n/a (memory not measured)'}`."]
    for row in rows:
        if row["variant"] in ("soflow", "soflow+compile") and row.get("status") == "ok":
            memory = row.get("memory_vs_leanest_meanflow")
            flops = row.get("flops_vs_fastest_meanflow")
            lines.append(
                f"`{row['variant']}`: step time {row['time_vs_fastest_meanflow']:.2f}× the fastest MeanFlow row"
                + (f" (counted FLOPs {flops:.2f}×)" if flops is not None else "")
                + (f", peak memory {memory:.2f}× the leanest." if memory is not None else ".")
            )
    return [" ".join(lines)]


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    """Step time and (when measured) peak memory per row, MeanFlow rows in a second colour."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["variant"] for row in rows]
    colours = ["tab:red" if row["method"] == "meanflow" else "tab:blue" for row in rows]
    panels = [("median_ms", "step time (ms)")]
    if any(row.get("peak_memory_mb") is not None for row in rows):
        panels.append(("peak_memory_mb", "peak memory (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.45 * len(rows) + 1.5), squeeze=False)
    for ax, (field, label) in zip(axes[0], panels):
        values = [row.get(field) or 0.0 for row in rows]
        ax.barh(names, values, color=colours)
        for i, row in enumerate(rows):
            if row.get("status") != "ok":
                ax.text(0, i, f" {row['status']}", va="center")
        ax.invert_yaxis()
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.set_xlabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI


def parse_config(argv: list[str] | None = None) -> BenchConfig:
    """The preset named by ``--preset`` with command-line overrides.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The resolved configuration.
    """
    parser = config_parser(
        __doc__,
        BenchConfig,
        PRESETS,
        default_preset(),
        presets_help=PRESETS_HELP,
        choices={"variants": tuple(VARIANTS)},
    )
    args = parser.parse_args(argv)
    config = resolve_config(args, BenchConfig, PRESETS)
    print(
        f"jvp_vs_soflow: preset {args.preset} ({PRESETS_HELP[args.preset]}): {config.model}, batch {config.batch_size},"
        f" {config.dtype}, on {config.device}",
        flush=True,
    )
    if config.model != "DiT-tiny" and config.model not in DIT_SIZES:
        parser.error(f"--model: unknown {config.model!r}; choose DiT-tiny or one of {', '.join(DIT_SIZES)}")
    unknown = sorted(set(config.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    for name in ("batch_size", "iters", "input_size"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}")
    if config.warmup < 0:
        parser.error(f"--warmup must be >= 0; got {config.warmup}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {config.device}: no CUDA device is available")
    return config


def _memory_pass(rows: list[dict], config: BenchConfig) -> None:
    """Add each row's peak memory from a run of its own in a fresh process (warm-up steps and two timed steps).

    On a CPU the compiled rows are left out: their peak RSS would be the compiler's own memory
    (dynamo, AOTAutograd and Inductor run inside the process), not the step's.
    """
    short = dataclasses.replace(config, iters=2, interleave=False)
    for row in rows:
        if row.get("compile") and not config.device.startswith("cuda"):
            row["memory_note"] = "not measured: a compiled row's peak RSS on a CPU is the compiler's"
            continue
        isolated = _run_isolated(row["variant"], short)
        row["peak_memory_mb"] = isolated.get("peak_memory_mb")
        row["step_peak_memory_mb"] = isolated.get("step_peak_memory_mb")
        row["isolated_median_ms"] = isolated.get("median_ms")
        if row.get("status") == "ok" and isolated.get("status") != "ok":
            row["memory_error"] = isolated.get("error")


def run(config: BenchConfig) -> list[dict]:
    """Measure every row of ``config`` and attach environment, config and ratios."""
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # "fp32" means TF32 matmuls on CUDA
        torch.backends.cudnn.allow_tf32 = True
    if config.threads:
        torch.set_num_threads(config.threads)
    env = environment(device)
    names = config.resolved_variants()
    if config.interleave:
        measured = measure_interleaved(names, config)
        if config.isolate:
            _memory_pass(measured, config)
    else:
        measured = [_run_isolated(name, config) if config.isolate else measure_variant(name, config) for name in names]
    rows = []
    for row in measured:
        rows.append(
            row | env | {"model": config.model, "batch_size": config.batch_size, "config": dataclasses.asdict(config)}
        )
        name = row["variant"]
        if row["status"] == "ok":
            print(
                f"{name:30s} {row['median_ms']:9.2f} ms  {row['images_per_s']:9.1f} img/s  "
                f"peak {_fmt(row.get('peak_memory_mb'), '.0f')} MiB  [{row['attention']}]",
                flush=True,
            )
        else:
            print(f"{name:30s} {row['status']}: {row.get('error', '')}", flush=True)
    add_ratios(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure, print, and write the JSON rows, the markdown table and the bar chart."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        config_path, name, row_path = argv[1:4]
        config = BenchConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(Path(config_path).read_text()).items()}
        )
        Path(row_path).write_text(json.dumps(measure_variant(name, config)))
        return 0
    config = parse_config(argv)
    rows = run(config)
    slug = device_slug(rows[0]["device"]) if rows else config.device
    stem = config.out or f"jvp_vs_soflow-{device_slug(config.model)}-{slug}"
    table = markdown_table(rows, config)
    json_path, md_path = write_rows(stem, rows, table, directory=config.out_dir or None)
    png_path = md_path.with_suffix(".png")
    title = (
        f"{config.model}, batch {config.batch_size}, {config.dtype}, CFG {'on' if config.cfg else 'off'}; "
        f"{rows[0]['device'] if rows else config.device}, torch {torch.__version__}"
    )
    bar_chart(rows, png_path, title)
    print(table)
    print(f"wrote {json_path}, {md_path} and {png_path}")
    return 0 if all(row["status"] in ("ok", "oom", "unsupported") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
