"""Graphs, graph breaks, recompiles and kernel launches of the whole compiled SoFlow training step.

    python benchmarks/compile_step.py                      # CPU: every case traced, three compiled for 50 steps
    python benchmarks/compile_step.py --preset tiny        # CI: every case traced, the MLP compiled for 50 steps
    python benchmarks/compile_step.py --cases dit-imagenet-cfg --steps 20 --device cuda

The step is [`make_training_step`][soflow_core.train.make_training_step]: the batch is drawn
eagerly by ``objective.sample_batch`` from an explicit generator, then the loss, its backward
and the gradient accumulation run as one compiled graph and ``optimizer.step()`` as another.
Two sections:

* **graphs**, every case: ``torch._dynamo.explain`` of the loss-and-backward function and of
  the optimizer step (dynamo only, nothing is code-generated): graphs and graph breaks, with
  the reasons;
* **steps**, the cases of ``--compiled``: the step compiled with ``--backend`` next to an eager
  copy of the same network, both fed the same draws for ``--steps`` steps of a moving r(k, K)
  schedule (K = ``--steps``). Reported: graphs compiled and recompiles (frames compiled after
  the first step); the largest relative difference of the metrics and of the parameters between
  the two (cases without dropout; with dropout the compiled graph draws its own masks); per step
  the compiled graphs that run, the kernels launched (CPU: leaf ATen ops that compute, plus
  Inductor's generated C++ kernels, through the profiler with
  ``torch._inductor.config.cpp.enable_kernel_profile``; CUDA: device kernels) eager and
  compiled; and the step time eager and compiled, timed alternately in the same loop so that the
  ratio holds under a shared machine's load.

Rows (device, versions, commit, config) go to ``<out-dir>/compile_step-<device>.json`` (``--out-dir``,
default ``runs/benchmarks``; ``--out-dir benchmarks/results`` writes the committed results) with a
markdown table beside them.
"""

import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_parser, device_slug, environment, resolve_config, write_rows

from soflow_core import SoFlowObjective
from soflow_core.nets import DiT, MLPBackbone, SongUNet
from soflow_core.objective import TrainingBatch
from soflow_core.train import make_training_step


@dataclass(frozen=True, kw_only=True)
class Case:
    """One recipe on one backbone.

    Attributes:
        backbone: ``"mlp"``, ``"dit"`` or ``"unet"``.
        recipe: The objective preset, ``"imagenet"`` or ``"cifar10"``.
        cfg: Training-time guidance (the ImageNet recipe's; needs class labels).
        forward_batching: The objective's ``forward_batching``.
        dropout: Dropout of the backbone (the DiT has none).
    """

    backbone: str
    recipe: str
    cfg: bool = False
    forward_batching: str = "auto"
    dropout: float = 0.0


CASES: dict[str, Case] = {
    "mlp-imagenet-cfg": Case(backbone="mlp", recipe="imagenet", cfg=True),
    "mlp-imagenet-cfg-dropout": Case(backbone="mlp", recipe="imagenet", cfg=True, dropout=0.2),
    "mlp-cifar10-dropout": Case(backbone="mlp", recipe="cifar10", dropout=0.2),
    "dit-imagenet-cfg": Case(backbone="dit", recipe="imagenet", cfg=True),
    "dit-imagenet-cfg-split": Case(backbone="dit", recipe="imagenet", cfg=True, forward_batching="split"),
    "dit-imagenet": Case(backbone="dit", recipe="imagenet"),
    "dit-cifar10": Case(backbone="dit", recipe="cifar10"),
    "unet-cifar10-dropout": Case(backbone="unet", recipe="cifar10", dropout=0.3),
    "unet-cifar10": Case(backbone="unet", recipe="cifar10"),
    "unet-imagenet-dropout": Case(backbone="unet", recipe="imagenet", dropout=0.3),
}
NUM_CLASSES = 10
# Compute-free ATen ops: views, metadata and allocations launch no kernel.
_NO_KERNEL = frozenset(
    f"aten::{name}"
    for name in [
        *("view", "alias", "as_strided", "t", "transpose", "permute", "expand", "select", "slice", "unsqueeze"),
        *("squeeze", "reshape", "_unsafe_view", "detach", "resolve_conj", "resolve_neg", "empty", "empty_strided"),
        *("empty_like", "narrow", "split", "split_with_sizes", "unbind", "chunk", "lift_fresh", "_reshape_alias"),
        *("view_as", "expand_as", "unflatten", "flatten"),
    ]
)


@dataclass(frozen=True, kw_only=True)
class StepConfig:
    """What to measure; saved in every row.

    Attributes:
        cases: The cases traced (``CASES`` names).
        compiled: The cases also compiled and run for ``steps`` steps.
        size: ``"tiny"`` (seconds to compile) or ``"small"`` (DiT-S/4 on 32×32×4 latents, a
            32×32 SongUNet with 32 channels, an MLP of width 128).
        batch_size: Samples per step.
        steps: Steps run compiled and eager, and K of the r(k, K) schedule.
        timed: Of those, the last ``timed`` are timed (eager and compiled alternately).
        backend: ``torch.compile`` backend of the compiled runs.
        device: ``"cpu"`` or ``"cuda"``.
        threads: CPU threads of torch (0: torch's default). One thread keeps tiny steps from
            spending their time in thread synchronisation on a loaded machine.
        seed: Seed of weights, data and draws.
        out: Results file stem (default ``compile_step-<device>``).
        out_dir: Results folder (default ``runs/benchmarks``; ``benchmarks/results`` holds the committed ones).
    """

    cases: tuple[str, ...] = tuple(CASES)
    compiled: tuple[str, ...] = ("mlp-imagenet-cfg", "dit-imagenet-cfg", "unet-cifar10-dropout")
    size: Literal["tiny", "small"] = "small"
    batch_size: int = 8
    steps: int = 50
    timed: int = 20
    backend: str = "inductor"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int = 1
    seed: int = 0
    out: str = ""
    out_dir: str = ""


PRESETS_HELP = {"full": "every case at the small size (minutes)", "tiny": "tiny networks, the MLP compiled (CI)"}
PRESETS = {
    "full": StepConfig(),
    "tiny": StepConfig(compiled=("mlp-imagenet-cfg",), size="tiny", steps=50, timed=10, device="cpu"),
}


# ---------------------------------------------------------------------------------------- the step


def build_backbone(case: Case, size: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The network of ``case`` at ``size`` and the shape of one sample."""
    classes = NUM_CLASSES if case.cfg else None
    if case.backbone == "mlp":
        width = 16 if size == "tiny" else 128
        net = MLPBackbone(dim=2, width=width, depth=2, num_classes=classes, dropout=case.dropout)
        torch.nn.init.normal_(net.output.weight, std=0.3)  # F_θ ≢ 0, so the loss terms are not trivial
        return net, (2,)
    if case.backbone == "dit":
        if size == "tiny":
            tiny = {"patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}
            return DiT(input_size=8, in_channels=4, num_classes=classes, **tiny), (4, 8, 8)
        return DiT.from_name("DiT-S/4", input_size=32, in_channels=4, num_classes=classes), (4, 32, 32)
    channels, resolution = (8, 8) if size == "tiny" else (32, 32)
    net = SongUNet(
        img_resolution=resolution,
        in_channels=3,
        augment_dim=0,
        model_channels=channels,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[resolution // 2],
        dropout=case.dropout,
    )
    return net, (3, resolution, resolution)


def build_objective(case: Case) -> SoFlowObjective:
    """The case's preset with its guidance and batching (input checks off: they sync the device)."""
    objective = SoFlowObjective.from_preset(case.recipe, check_inputs=False, forward_batching=case.forward_batching)
    guidance = dataclasses.replace(objective.guidance, null_cond=NUM_CLASSES) if case.cfg else None
    return dataclasses.replace(objective, guidance=guidance)


@dataclass
class Setup:
    """A case ready to run: network, objective, data and a batch source."""

    net: torch.nn.Module
    objective: SoFlowObjective
    draw: Callable[[int], TrainingBatch]


def make_setup(case: Case, config: StepConfig) -> Setup:
    """Build the case's network, objective and a draw function ``step -> batch``."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    net, shape = build_backbone(case, config.size)
    net = net.to(device).train()
    objective = build_objective(case)
    data_gen = torch.Generator(device=device).manual_seed(config.seed)
    data = torch.randn((config.batch_size, *shape), device=device, generator=data_gen)
    cond = None
    if case.cfg:
        cond = torch.randint(0, NUM_CLASSES, (config.batch_size,), device=device, generator=data_gen)
    draws = torch.Generator(device=device).manual_seed(config.seed + 1)

    def draw(step: int) -> TrainingBatch:
        return objective.sample_batch(data, cond, step=step, total_steps=config.steps, generator=draws)

    return Setup(net=net, objective=objective, draw=draw)


# ---------------------------------------------------------------------------------------- graphs


def trace_case(name: str, config: StepConfig) -> dict:
    """``torch._dynamo.explain`` of the loss-and-backward function and of the optimizer step."""
    case = CASES[name]
    setup = make_setup(case, config)
    optimizer = torch.optim.AdamW(setup.net.parameters(), lr=1e-4)
    eager = make_training_step(setup.objective, setup.net, optimizer)
    batch = setup.draw(0)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step_explained = torch._dynamo.explain(eager.accumulate)(batch)
    optimizer_explained = torch._dynamo.explain(optimizer.step)()
    torch._dynamo.reset()
    return {
        "section": "graphs",
        "case": name,
        **dataclasses.asdict(case),
        "joint_forward": setup.objective.use_joint_forward(setup.net),
        "replays_dropout": setup.objective.replays_dropout(setup.net),
        "step_graphs": step_explained.graph_count,
        "step_graph_breaks": step_explained.graph_break_count,
        "step_break_reasons": [str(reason.reason).splitlines()[0] for reason in step_explained.break_reasons],
        "optimizer_graphs": optimizer_explained.graph_count,
        "optimizer_graph_breaks": optimizer_explained.graph_break_count,
    }


# ---------------------------------------------------------------------------------------- steps


def count_launches(run: Callable[[], object], device: torch.device) -> dict[str, int]:
    """Kernels launched and compiled regions entered by one call of ``run``, from the profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    graphs = sum(event.name.startswith("Torch-Compiled Region") for event in events)
    if device.type == "cuda":
        kernels = sum(event.device_type == torch.autograd.DeviceType.CUDA for event in events)
    else:
        kernels = sum(
            not event.cpu_children
            and ("cpp_fused" in event.name or (event.name.startswith("aten::") and event.name not in _NO_KERNEL))
            for event in events
        )
    return {"kernels": int(kernels), "regions": int(graphs)}


def _max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        scale = float(y.detach().abs().max()) or 1.0
        worst = max(worst, float((x.detach() - y.detach()).abs().max()) / scale)
    return worst


def run_case(name: str, config: StepConfig) -> dict:
    """The case compiled next to an eager copy for ``config.steps`` steps."""
    from torch._dynamo.testing import CompileCounterWithBackend

    case = CASES[name]
    device = torch.device(config.device)
    setup = make_setup(case, config)
    twin = copy.deepcopy(setup.net)
    counter = CompileCounterWithBackend(config.backend)
    torch._dynamo.reset()
    compiled = make_training_step(
        setup.objective, setup.net, torch.optim.AdamW(setup.net.parameters(), lr=1e-3), compile=True, backend=counter
    )
    eager = make_training_step(setup.objective, twin, torch.optim.AdamW(twin.parameters(), lr=1e-3))
    comparable = not setup.objective.replays_dropout(setup.net)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    metric_difference, first_difference, times = 0.0, None, {"eager": [], "compiled": []}
    compile_s = frames_after_first = None
    first_timed = config.steps - config.timed
    for step in range(config.steps):
        batch = setup.draw(step)
        if step == first_timed:
            launches = {
                "eager": count_launches(lambda batch=batch: eager(batch), device),
                "compiled": count_launches(lambda batch=batch: compiled(batch), device),
            }
            continue
        sync()
        start = time.perf_counter()
        got = compiled(batch)
        sync()
        compiled_s = time.perf_counter() - start
        start = time.perf_counter()
        want = eager(batch)
        sync()
        eager_s = time.perf_counter() - start
        if step == 0:
            compile_s, frames_after_first = compiled_s, counter.frame_count
        if step > first_timed:
            times["compiled"].append(compiled_s * 1e3)
            times["eager"].append(eager_s * 1e3)
        if comparable:
            difference = _max_relative_difference(list(got.values()), list(want.values()))
            metric_difference = max(metric_difference, difference)
            first_difference = difference if first_difference is None else first_difference
    parameter_difference = _max_relative_difference(list(setup.net.parameters()), list(twin.parameters()))
    eager_ms, compiled_ms = statistics.median(times["eager"]), statistics.median(times["compiled"])
    row = {
        "section": "steps",
        "case": name,
        **dataclasses.asdict(case),
        "backend": config.backend,
        "graphs_compiled": counter.frame_count,
        "recompiles": counter.frame_count - frames_after_first,
        "first_step_s": compile_s,
        "first_step_metric_rel_diff": first_difference,
        "max_metric_rel_diff": metric_difference if comparable else None,
        "max_param_rel_diff": parameter_difference if comparable else None,
        "eager_kernels_per_step": launches["eager"]["kernels"],
        "compiled_kernels_per_step": launches["compiled"]["kernels"],
        "compiled_regions_per_step": launches["compiled"]["regions"],
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "compiled_vs_eager_time": compiled_ms / eager_ms,
    }
    torch._dynamo.reset()
    return row


# ---------------------------------------------------------------------------------------- output


def _fmt(value: object, spec: str = "") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: list[dict], config: StepConfig) -> str:
    """The traced cases, then the compiled runs."""
    env = rows[0]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; commit {env['commit']}. Size {config.size}, batch "
        f"{config.batch_size}, fp32; `make_training_step(..., compile=True)`: loss + backward + gradient "
        "accumulation in one graph, the optimizer step in another.",
        "",
        "| case | backbone | recipe | CFG | forward | dropout | graphs (loss + backward) | breaks "
        "| graphs (optimizer) | breaks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (r for r in rows if r["section"] == "graphs"):
        forward = "joint" if row["joint_forward"] else "split"
        lines.append(
            f"| {row['case']} | {row['backbone']} | {row['recipe']} | {'on' if row['cfg'] else 'off'} | {forward} | "
            f"{row['dropout']} | {row['step_graphs']} | {row['step_graph_breaks']} | {row['optimizer_graphs']} "
            f"| {row['optimizer_graph_breaks']} |"
        )
    steps = [r for r in rows if r["section"] == "steps"]
    if steps:
        lines += [
            "",
            f"Compiled with `{config.backend}` for {config.steps} steps of a moving r(k, K) (K = {config.steps}), "
            f"next to an eager copy fed the same draws; times are medians of {config.timed - 1} steps, eager and "
            "compiled alternately; kernels are per step, from the profiler. A compiled step enters three compiled "
            "regions for its two graphs: the optimizer's frame opens with `torch._dynamo.graph_break()`, so its "
            "graph sits in a second region after an empty one.",
            "",
            "| case | graphs compiled | recompiles | first step s | max rel. diff metrics / params | kernels eager "
            "| kernels compiled | compiled regions entered | eager ms | compiled ms | compiled / eager |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in steps:
            diff = (
                "n/a (own dropout masks)"
                if row["max_metric_rel_diff"] is None
                else f"{row['max_metric_rel_diff']:.1e} / {row['max_param_rel_diff']:.1e}"
            )
            lines.append(
                f"| {row['case']} | {row['graphs_compiled']} | {row['recompiles']} | {row['first_step_s']:.1f} | "
                f"{diff} | {row['eager_kernels_per_step']} | {row['compiled_kernels_per_step']} | "
                f"{row['compiled_regions_per_step']} | {row['eager_ms']:.2f} | {row['compiled_ms']:.2f} | "
                f"{row['compiled_vs_eager_time']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def parse_config(argv: list[str] | None = None) -> StepConfig:
    """The preset named by ``--preset`` with command-line overrides.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The resolved configuration.
    """
    parser = config_parser(
        __doc__, StepConfig, PRESETS, "full", presets_help=PRESETS_HELP, choices={"cases": CASES, "compiled": CASES}
    )
    config = resolve_config(parser.parse_args(argv), StepConfig, PRESETS)
    if config.batch_size < 4:
        parser.error(f"--batch-size must be >= 4 (both sub-batches need samples); got {config.batch_size}")
    if not 2 <= config.timed < config.steps:
        parser.error(f"--timed must lie in [2, --steps); got --timed {config.timed}, --steps {config.steps}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {config.device}: no CUDA device is available")
    return config


def main(argv: list[str] | None = None) -> int:
    """Trace every case, compile and run the chosen ones, write the JSON rows and the table."""
    config = parse_config(argv)
    device = torch.device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        torch._inductor.config.cpp.enable_kernel_profile = True  # generated kernels appear in the profiler
    env = environment(device)
    rows = []
    for name in config.cases:
        row = trace_case(name, config)
        print(
            f"{name:26s} graphs {row['step_graphs']} breaks {row['step_graph_breaks']} "
            f"optimizer graphs {row['optimizer_graphs']}",
            flush=True,
        )
        rows.append(row | env | {"config": dataclasses.asdict(config)})
    for name in config.compiled:
        row = run_case(name, config)
        print(
            f"{name:26s} compiled {row['graphs_compiled']} graphs, {row['recompiles']} recompiles, "
            f"kernels {row['eager_kernels_per_step']} -> {row['compiled_kernels_per_step']}, "
            f"time x{row['compiled_vs_eager_time']:.2f}",
            flush=True,
        )
        rows.append(row | env | {"config": dataclasses.asdict(config)})
    stem = config.out or f"compile_step-{device_slug(env['device'])}"
    table = markdown_table(rows, config)
    json_path, md_path = write_rows(stem, rows, table, directory=config.out_dir or None)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    clean = all(r["step_graphs"] == 1 and r["step_graph_breaks"] == 0 for r in rows if r["section"] == "graphs")
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
