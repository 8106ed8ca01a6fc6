"""Benchmark the fused loss-path kernels against the PyTorch reference, eager and compiled.

    python benchmarks/bench_loss_kernels.py                  # the full grid on the default device
    python benchmarks/bench_loss_kernels.py --batches 256    # one batch size
    python benchmarks/bench_loss_kernels.py --preset tiny    # seconds; CI runs this

For each op (path build, guided teacher state, guided target, Flow Matching rows, consistency
rows), mode (fwd, bwd, full = fwd + bwd), batch (32 … 1024), sample shape (4×32×32 latents,
3×32×32 images) and dtype (float32, bfloat16) it times three providers: the eager PyTorch
reference (``backend="torch"``), ``torch.compile`` of that reference, and the Triton kernels
(``backend="triton"``). Every provider runs the same soflow_core function, so the timings
include building the per-sample coefficients. On a GPU a fourth provider, ``kernel``, calls the
fused custom ops alone on the coefficient tables that the Triton provider built, and every
provider is also timed as a CUDA graph replay (``graph_ms``: device time without Python and
launch overhead). Bandwidth and the fraction of copy bandwidth use ``graph_ms`` where there is
one: at these sizes a kernel moves its bytes in tens of microseconds, less than the host takes
to launch the ops, so wall time measures the host.

Bandwidth counts the bytes each fused kernel must move (every tensor it has to read or write
once, per-sample scalars ignored) and compares them with the measured device-to-device copy
bandwidth. Rows (with device, versions, commit and the resolved config) go to
``<out-dir>/loss_kernels-<device>.json`` (``--out-dir``, default ``runs/benchmarks``; ``--out-dir
benchmarks/results`` writes the committed results) and a markdown table beside it.

On a CPU the Triton provider is Triton's interpreter, a correctness tool, so it is only timed
with ``--providers`` naming it explicitly and ``TRITON_INTERPRET=1`` set.
"""

import dataclasses
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bench,
    bench_graph,
    config_parser,
    copy_bandwidth_gbps,
    device_slug,
    environment,
    peak_memory_mb,
    resolve_config,
    write_rows,
)

import soflow_core.ops.fused as fused_module
from soflow_core import AdaptiveWeighting, ClassifierFreeGuidance, EulerParam, LinearPath
from soflow_core.losses import (
    flow_matching_loss_from_output,
    guided_target_from_outputs,
    guided_teacher_state,
    solution_consistency_loss_from_teacher,
)

OPS = ("path_build", "teacher_state", "guided_target", "flow_matching", "consistency")
MODES = ("fwd", "bwd", "full")
PROVIDERS = ("eager", "compile", "triton", "kernel")
GRAD_OPS = ("flow_matching", "consistency")  # the combination ops run without gradient in training


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to measure; saved in every row."""

    batches: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)  # batch sizes measured
    shapes: tuple[str, ...] = ("4x32x32", "3x32x32")  # per-sample shapes measured, CxHxW
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # tensor dtypes measured
    ops: tuple[str, ...] = OPS  # fused loss-path ops measured
    modes: tuple[str, ...] = MODES  # forward only, or forward and backward
    providers: tuple[str, ...] = PROVIDERS  # eager PyTorch, the Triton kernel, the registered custom op
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # "cuda" (the figures that matter) or "cpu"
    cpu_repeats: int = 10  # timed repeats per case on a CPU
    out: str = ""  # results file stem ("": loss_kernels-<device>)
    out_dir: str = ""  # results folder ("": runs/benchmarks; benchmarks/results holds the committed ones)


PRESETS_HELP = {"paper": "every op, batch and dtype (a GPU run)", "tiny": "one tiny case per op (seconds; CI)"}
PRESETS = {
    "paper": BenchConfig(),
    "tiny": BenchConfig(
        batches=(3,),
        shapes=("2x3x5",),
        dtypes=("float32",),
        providers=(
            ("eager", "triton", "kernel")
            if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
            else ("eager",)
        ),
        cpu_repeats=2,
    ),
}


@dataclass
class Case:
    """One op at one size: a callable per backend and the bytes the fused kernel must move."""

    run: Callable[[str], object]  # backend -> result (a loss output or a tensor)
    grad_input: torch.Tensor | None  # the tensor the backward differentiates, for grad ops
    bytes_by_mode: dict[str, int]


def _tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(x.numel() * x.element_size() for x in tensors)


def make_case(op: str, batch: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Case:
    """Random inputs shaped like one training step's sub-batch, and the op to run on them."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn() -> torch.Tensor:
        return torch.randn((batch, *shape), generator=generator, device=device, dtype=dtype)

    t = torch.rand(batch, generator=generator, device=device) * 0.9 + 0.05
    s = t * torch.rand(batch, generator=generator, device=device) * 0.9
    ell = s + (t - s) * 0.99
    mask = torch.rand(batch, generator=generator, device=device) < 0.1
    path, param, weighting = LinearPath(), EulerParam(), AdaptiveWeighting(p=1.0, eps=0.01)
    guidance = ClassifierFreeGuidance(scale=3.0, mix=0.25, drop_rate=0.1, decay_time=0.8, null_cond=1000)
    if op == "path_build":
        data, noise = randn(), randn()
        return Case(
            lambda backend: path.interpolate(data, noise, t, backend=backend),
            None,
            {"fwd": 2 * _tensor_bytes(data, noise)},
        )
    if op == "teacher_state":
        x_t, v_t, f_u, f_m = randn(), randn(), randn(), randn()

        def run(backend: str) -> torch.Tensor:
            return guided_teacher_state(
                x_t, v_t, f_u, f_m, mask, t, ell, param=param, guidance=guidance, backend=backend
            )

        return Case(run, None, {"fwd": _tensor_bytes(x_t, v_t, f_u, f_m, x_t)})
    if op == "guided_target":
        x_t, v_t, f_u, f_m = randn(), randn(), randn(), randn()

        def run(backend: str) -> torch.Tensor:
            return guided_target_from_outputs(
                v_t, x_t, f_u, f_m, mask, t, param=param, guidance=guidance, backend=backend
            )

        return Case(run, None, {"fwd": _tensor_bytes(v_t, f_u, f_m, v_t)})
    if op == "flow_matching":
        output, x_t, target = randn().requires_grad_(), randn(), randn()

        def run(backend: str):
            return flow_matching_loss_from_output(
                output, x_t, target, t, param=param, weighting=weighting, backend=backend
            ).backprop

        fwd, bwd = _tensor_bytes(output, target), _tensor_bytes(output, target, output)
        return Case(run, output, {"fwd": fwd, "bwd": bwd, "full": fwd + bwd})
    if op == "consistency":
        output, x_t, teacher_output, x_ell = randn().requires_grad_(), randn(), randn(), randn()

        def run(backend: str):
            return solution_consistency_loss_from_teacher(
                output, x_t, teacher_output, x_ell, t, s, ell, param=param, weighting=weighting, backend=backend
            ).backprop

        fwd = _tensor_bytes(output, x_t, teacher_output, x_ell)
        return Case(
            run, output, {"fwd": fwd, "bwd": fwd + _tensor_bytes(output), "full": 2 * fwd + _tensor_bytes(output)}
        )
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def recorded_kernel_calls(case: Case) -> list[tuple[str, tuple]]:
    """The custom-op calls (name, arguments) that one run of the Triton provider makes."""
    calls: list[tuple[str, tuple]] = []
    original = fused_module.kernel_op

    def recording(name: str):
        op = original(name)

        def call(*args):
            calls.append((name, args))
            return op(*args)

        return call

    fused_module.kernel_op = recording
    try:
        case.run("triton")
    finally:
        fused_module.kernel_op = original
    return calls


def kernel_only(case: Case) -> Callable[[str], object]:
    """A stand-in for ``case.run`` that calls the fused ops alone, coefficients precomputed."""
    calls = recorded_kernel_calls(case)

    def run(_backend: str):
        outputs = [fused_module.kernel_op(name)(*args) for name, args in calls]
        differentiable = [
            x for out in outputs for x in (out if isinstance(out, (list, tuple)) else [out]) if x.requires_grad
        ]
        return sum(x.sum() for x in differentiable) if differentiable else outputs

    return run


def provider_call(case: Case, provider: str, mode: str) -> Callable[[], object]:
    """The timed closure of one provider and mode."""
    backend = "torch" if provider in ("eager", "compile") else "triton"
    forward = kernel_only(case) if provider == "kernel" else case.run
    if provider == "compile":
        compiled = torch.compile(lambda: case.run("torch"), dynamic=False)
        forward = lambda _backend: compiled()  # noqa: E731
    if mode == "fwd":
        if case.grad_input is None:
            return lambda: forward(backend)

        def no_grad_forward():
            with torch.no_grad():
                return forward(backend)

        return no_grad_forward
    if mode == "bwd":
        loss = forward(backend)
        return lambda: torch.autograd.grad(loss, case.grad_input, retain_graph=True)
    return lambda: torch.autograd.grad(forward(backend), case.grad_input)


def measure(config: BenchConfig) -> list[dict]:
    """Run the grid and return one row per (op, mode, shape, dtype, batch, provider)."""
    device = torch.device(config.device)
    env = environment(device)
    copy_gbps = copy_bandwidth_gbps(device, megabytes=512 if device.type == "cuda" else 64)
    print(f"# {env['device']}: measured copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = []
    for op in config.ops:
        modes = [m for m in config.modes if op in GRAD_OPS or m == "fwd"]
        for shape_name in config.shapes:
            shape = tuple(int(v) for v in shape_name.split("x"))
            for dtype_name in config.dtypes:
                dtype = getattr(torch, dtype_name)
                for batch in config.batches:
                    case = make_case(op, batch, shape, dtype, device)
                    for mode in modes:
                        for provider in config.providers:
                            fn = provider_call(case, provider, mode)
                            median, p20, p80 = bench(fn, device, repeats=config.cpu_repeats)
                            graph = bench_graph(fn, device)
                            moved = case.bytes_by_mode[mode]
                            gbps = moved / ((graph if graph is not None else median) * 1e-3) / 1e9
                            rows.append(
                                {
                                    "op": op,
                                    "mode": mode,
                                    "provider": provider,
                                    "batch": batch,
                                    "shape": shape_name,
                                    "dtype": dtype_name,
                                    "median_ms": median,
                                    "p20_ms": p20,
                                    "p80_ms": p80,
                                    "graph_ms": graph,
                                    "bytes": moved,
                                    "gbps": gbps,
                                    "copy_gbps": copy_gbps,
                                    "fraction_of_copy": gbps / copy_gbps,
                                    "peak_memory_mb": peak_memory_mb(fn, device),
                                    **env,
                                    "config": dataclasses.asdict(config),
                                }
                            )
                            print(
                                f"{op:14s} {mode:4s} {shape_name:8s} {dtype_name:8s} b={batch:<5d} {provider:8s} "
                                f"{median:9.4f} ms  graph {graph if graph is not None else float('nan'):9.4f} ms  "
                                f"{gbps:8.1f} GB/s ({100 * gbps / copy_gbps:5.1f}% of copy)",
                                flush=True,
                            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per (op, mode, shape, dtype, batch) with the providers side by side.

    Wall time includes the host (Python, dispatch, launches); device time is the CUDA-graph
    replay. Speed-ups and bandwidth use device time where there is one.
    """
    if not rows:
        return "no rows\n"
    env = rows[0]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; "
        f"measured copy bandwidth {env['copy_gbps']:.0f} GB/s.",
        "",
        "| op | mode | shape | dtype | batch | wall ms eager / compiled / triton "
        "| device ms eager / compiled / triton / kernel | kernel GB/s | % of copy "
        "| triton × eager | triton × compiled | peak MiB eager / triton |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["op"], row["mode"], row["shape"], row["dtype"], row["batch"])
        groups.setdefault(key, {})[row["provider"]] = row

    def cell(row: dict | None, field: str, fmt: str) -> str:
        if row is None or row.get(field) is None:
            return "–"
        return format(row[field], fmt)

    def time_of(row: dict | None) -> float | None:
        if row is None:
            return None
        return row["graph_ms"] if row.get("graph_ms") is not None else row["median_ms"]

    for (op, mode, shape, dtype, batch), by in groups.items():
        eager, compiled, triton, kernel = (by.get(p) for p in ("eager", "compile", "triton", "kernel"))

        def ratio(base: dict | None, fast: dict | None = triton) -> str:
            base_ms, fast_ms = time_of(base), time_of(fast)
            return "–" if base_ms is None or fast_ms is None else f"{base_ms / fast_ms:.2f}"

        best = kernel or triton
        wall = " / ".join(cell(r, "median_ms", ".4f") for r in (eager, compiled, triton))
        device = " / ".join(cell(r, "graph_ms", ".4f") for r in (eager, compiled, triton, kernel))
        memory = f"{cell(eager, 'peak_memory_mb', '.1f')} / {cell(triton, 'peak_memory_mb', '.1f')}"
        percent = "–" if best is None else f"{100 * best['fraction_of_copy']:.0f}"
        lines.append(
            f"| {op} | {mode} | {shape} | {dtype} | {batch} | {wall} | {device} | {cell(best, 'gbps', '.0f')} "
            f"| {percent} | {ratio(eager)} | {ratio(compiled)} | {memory} |"
        )
    return "\n".join(lines) + "\n"


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
        "paper",
        presets_help=PRESETS_HELP,
        choices={"ops": OPS, "modes": MODES, "providers": PROVIDERS, "dtypes": ("float32", "bfloat16", "float16")},
    )
    config = resolve_config(parser.parse_args(argv), BenchConfig, PRESETS)
    for dtype in config.dtypes:
        if dtype not in ("float32", "bfloat16", "float16"):
            parser.error(f"--dtypes: unknown {dtype!r}; choose from float32, bfloat16, float16")
    for shape in config.shapes:
        parts = shape.split("x")
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.error(f"--shapes: {shape!r} is not a shape like 4x32x32")
    if min(config.batches, default=0) < 1:
        parser.error(f"--batches must be positive integers; got {config.batches}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {config.device}: no CUDA device is available")
    if (
        {"triton", "kernel"} & set(config.providers)
        and not config.device.startswith("cuda")
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        parser.error(
            "the triton and kernel providers on a CPU need TRITON_INTERPRET=1 (the interpreter; not a speed figure)"
        )
    return config


def main(argv: list[str] | None = None) -> int:
    """Measure, print, and write the JSON rows and markdown table."""
    config = parse_config(argv)
    rows = measure(config)
    stem = config.out or f"loss_kernels-{device_slug(rows[0]['device']) if rows else config.device}"
    table = markdown_table(rows)
    json_path, md_path = write_rows(stem, rows, table, directory=config.out_dir or None)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return 0 if math.isfinite(sum(r["median_ms"] for r in rows)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
