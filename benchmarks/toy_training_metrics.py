"""The main command's training metrics, step by step, and why ``consistency_mse`` rises while the loss falls.

    python benchmarks/toy_training_metrics.py                 # the main command's run (about 90 CPU s)
    python benchmarks/toy_training_metrics.py --preset tiny   # seconds; CI runs this

Trains ``examples/train_toy_2d.py`` with its defaults (the main command: checkerboard, the
``toy`` recipe, 4000 steps at batch 2048) and records every metric the objective logs, with
r(k, K) and the learning rate, every ``--metrics-every`` steps; then evaluates the EMA model as
the main command does (energy distances against the real-vs-real floor).

It also measures what ``consistency_mse`` is made of. That metric is the mean square of the
finite-difference quotient q = (f(x_t, t, s) − f(x_ℓ, ℓ, s))/(t − ℓ), whose teacher state x_ℓ
is one Euler step of the *conditional* velocity v = noise − data. Copies of the trained
network taken during training are probed on one fixed set of (data, noise, t, s) draws at
several ratios r, which place ℓ = t + (s − t)·r: once with the teacher stepped along v, as
training does, and once along the network's own velocity v_θ(x_t, t). The first is
``consistency_mse``; the second shows how consistent the network is along its own flow.

Writes ``<out-dir>/<out>.json`` (rows with device, versions, commit and config: one per
recorded step, one per probe, and the evaluation), ``<out>.md`` (the probe table) and
``<out>.png`` (the curves) (``--out-dir``, default ``runs/benchmarks``; ``--out-dir
benchmarks/results`` writes the committed results).
"""

import copy
import dataclasses
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import config_parser, environment, resolve_config, write_rows
from train_toy_2d import CONFIGS, build_model, evaluate, train

from soflow_core import SoFlowObjective
from soflow_core.data import sample_toy_2d
from soflow_core.losses import consistency_quotient, solution_consistency_loss, teacher_state
from soflow_core.time_samplers import MIN_TIME_GAP, consistency_times


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """What to record; saved in every row."""

    base: Literal["default", "tiny"] = "default"  # the main command's run, or its smoke-test size
    metrics_every: int = 10  # record the training metrics every this many steps
    snapshots: tuple[float, ...] = (0.0, 0.0625, 0.25, 0.5, 0.75, 1.0)  # when to copy the network, as shares of K
    ratios: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03, 0.01, 0.002)  # the ratios r at which the quotient is probed
    probe_samples: int = 8192  # (data, noise, t, s) draws the quotient is probed on
    smooth: int = 10  # the curves' running mean, in recorded rows
    threads: int = 1  # torch CPU threads
    out: str = "toy_training_metrics"  # results file stem
    out_dir: str = ""  # results folder ("": runs/benchmarks; benchmarks/results holds the committed ones)


PRESETS = {
    "default": MetricsConfig(),
    "tiny": MetricsConfig(base="tiny", metrics_every=2, probe_samples=256, smooth=2, ratios=(1.0, 0.1, 0.002)),
}
PRESETS_HELP = {
    "default": "the main command's 4000 steps at batch 2048 (about 90 CPU seconds, one thread)",
    "tiny": "30 steps of a tiny model (seconds; CI)",
}
PLOTTED = (
    ("fm_mse", "consistency_mse"),
    ("fm_loss", "consistency_loss"),
    ("fm_weight", "consistency_weight"),
    ("r", "lr"),
)


@torch.no_grad()
def quotient_mse(model: torch.nn.Module, objective: SoFlowObjective, probe: dict, r: float) -> dict[str, float]:
    """Mean q² on the probe at ratio r, teacher stepped along the conditional velocity and along the model's own.

    Args:
        model: A copy of the trained (not EMA) network.
        objective: The objective it was trained with (path, parameterization, weighting).
        probe: Fixed ``data``, ``noise``, ``t_draw`` and ``s_draw`` tensors.
        r: The ratio that places ℓ = t + (s − t)·r.

    Returns:
        ``conditional``: mean q² with the teacher stepped along the conditional velocity, what
        training logs as ``consistency_mse``; ``loss``: the loss value training logs as
        ``consistency_loss`` there; ``loss_share_pinned``: the share of that loss from draws whose
        s was clamped to t − 10⁻⁴ (where t − ℓ = |b(t, s)|, whatever r); ``model_velocity``: mean q²
        with the teacher stepped along the network's own velocity v_θ(x_t, t).
    """
    times = consistency_times(probe["t_draw"], probe["s_draw"], r)
    on_path = objective.path.sample(probe["data"], probe["noise"], times.t)
    output = model(on_path.x_t, times.t, times.s, None)
    x_ell = teacher_state(on_path.x_t, on_path.v_t, times.t, times.ell)
    f_ell = objective.param.solution(model, x_ell, times.ell, times.s)
    options = {"param": objective.param, "weighting": objective.weighting, "backend": "torch"}
    result = solution_consistency_loss(output, on_path.x_t, f_ell, times.t, times.s, times.ell, **options)
    pinned = probe["s_draw"] > times.t - MIN_TIME_GAP
    f_t = objective.param.solution(model, on_path.x_t, times.t, times.s)
    x_own = teacher_state(on_path.x_t, objective.param.velocity(model, on_path.x_t, times.t), times.t, times.ell)
    f_own = objective.param.solution(model, x_own, times.ell, times.s)
    return {
        "conditional": float(result.quotient_mse.mean()),
        "loss": float(result.equivalent_loss.mean()),
        "loss_share_pinned": float(result.equivalent_loss[pinned].sum() / result.equivalent_loss.sum()),
        "model_velocity": float(consistency_quotient(f_t, f_own, times.t, times.ell).pow(2).mean()),
    }


def run(config: MetricsConfig) -> tuple[list[dict], dict]:
    """Train, probe the copies, evaluate; the rows (without the environment) and the evaluation."""
    toy = dataclasses.replace(CONFIGS[config.base], progress=False, metrics_every=config.metrics_every)
    steps = toy.steps
    keep = {min(steps, round(share * steps)) for share in config.snapshots}
    copies: dict[int, torch.nn.Module] = {}

    def on_step(step: int, model: torch.nn.Module) -> None:
        if step + 1 in keep:  # optimizer steps done
            copies[step + 1] = copy.deepcopy(model).eval()

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "train_metrics.jsonl"
        if 0 in keep:  # the initial network: train() seeds torch before it builds the model, as here
            torch.manual_seed(toy.seed)
            copies[0] = build_model(toy, conditional=False).eval()
        ema, objective, seconds = train(toy, metrics_path=log, on_step=on_step)
        recorded = [json.loads(line) for line in log.read_text().splitlines()]
    rows: list[dict] = [{"kind": "training", **row} for row in recorded]

    generator = torch.Generator().manual_seed(toy.seed + 7)
    data, _ = sample_toy_2d(toy.toy, config.probe_samples, generator=generator)
    noise = torch.randn(config.probe_samples, 2, generator=generator)
    times = objective.consistency_times
    probe = {
        "data": data,
        "noise": noise,
        "t_draw": times.t_distribution.sample(config.probe_samples, generator=generator),
        "s_draw": times.s_distribution.sample(config.probe_samples, generator=generator),
    }
    for step in sorted(copies):
        for r in config.ratios:
            rows.append({"kind": "probe", "step": step, "r": r, **quotient_mse(copies[step], objective, probe, r)})
    evaluation, _ = evaluate(ema, objective, toy)
    evaluation |= seconds
    rows.append({"kind": "evaluation", "steps": steps, **evaluation})
    return rows, evaluation


def markdown_table(rows: list[dict], config: MetricsConfig) -> str:
    """The probe table: mean q² per copy (rows) and ratio r (columns), both teachers."""
    env = rows[0]
    probes = [row for row in rows if row["kind"] == "probe"]
    evaluation = next(row for row in rows if row["kind"] == "evaluation")
    steps = sorted({row["step"] for row in probes})
    at = {(row["step"], row["r"]): row for row in probes}
    head = " | ".join(f"r = {r:g}" for r in config.ratios)
    size = "its defaults" if config.base == "default" else "its tiny preset"
    distance, ratio = evaluation["energy_distance_1_step"], evaluation["energy_distance_1_step_over_floor"]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; commit {env['commit']}. The main command "
        f"({size}, {evaluation['steps']} steps): one-step energy distance {distance:.5f}, {ratio:.1f}× the "
        f"real-vs-real floor ({evaluation['train_cpu_seconds']:.0f} CPU s of training).",
        "",
        f"Mean q² on {config.probe_samples} fixed draws, teacher stepped along the conditional velocity "
        "(what training logs as `consistency_mse`) / along the network's own velocity:",
        "",
        f"| optimizer steps done | {head} |",
        "|---|" + "---|" * len(config.ratios),
    ]
    for step in steps:
        cells = " | ".join(
            f"{at[step, r]['conditional']:.3f} / {at[step, r]['model_velocity']:.3f}" for r in config.ratios
        )
        lines.append(f"| {step} | {cells} |")
    first, last = steps[0], steps[-1]
    lines += [
        "",
        f"`consistency_loss` on the same draws, the network after {first} and after {last} optimizer steps "
        "(in brackets: the share of it from the draws whose s was clamped to t − 10⁻⁴):",
        "",
        f"| optimizer steps done | {head} |",
        "|---|" + "---|" * len(config.ratios),
    ]
    for step in (first, last):
        cells = " | ".join(
            f"{at[step, r]['loss']:.4f} ({100 * at[step, r]['loss_share_pinned']:.0f} %)" for r in config.ratios
        )
        lines.append(f"| {step} | {cells} |")
    return "\n".join(lines) + "\n"


def device_words(row: dict) -> str:
    """The device and torch version of a row, in words (``x86-64 CPU, one thread, torch 2.13.0+cpu``)."""
    device = row["device"].replace("CPU x86_64 (1 threads)", "x86-64 CPU, one thread")
    return f"{device}, torch {row['torch']}"


def running_mean(values: list[float], width: int) -> list[float]:
    """The mean of each value and the ``width − 1`` before it (fewer at the start)."""
    return [statistics.fmean(values[max(0, i + 1 - width) : i + 1]) for i in range(len(values))]


def draw(rows: list[dict], config: MetricsConfig, path: Path) -> Path:
    """The training curves, one panel per pair of metrics; faint: every recorded step, solid: the running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = [row for row in rows if row["kind"] == "training"]
    evaluation = next(row for row in rows if row["kind"] == "evaluation")
    steps = [row["step"] for row in training]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.8), sharex=True)
    for ax, names in zip(axes.flat, PLOTTED):
        for name, color in zip(names, ("#1f4e79", "#c55a11")):
            values = [row[name] for row in training if name in row]
            if not values:
                continue
            if name in ("r", "lr"):  # set by the schedules, nothing to smooth
                ax.plot(steps, values, color=color, linewidth=1.8, label=name)
                continue
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, running_mean(values, config.smooth), color=color, linewidth=1.8, label=name)
        if names == ("r", "lr"):
            ax.set_yscale("log")
        ax.legend(loc="best", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step k")
    distance, ratio = evaluation["energy_distance_1_step"], evaluation["energy_distance_1_step_over_floor"]
    fig.suptitle(
        f"The main command's training metrics ({evaluation['steps']} steps; one-step energy distance "
        f"{distance:.5f}, {ratio:.1f}× the floor)\n"
        f"{device_words(rows[0])}; faint: every {config.metrics_every}th step, solid: their running mean over "
        f"{config.smooth}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_config(argv: list[str] | None = None) -> MetricsConfig:
    """The preset named by ``--preset`` with command-line overrides.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The resolved configuration.
    """
    parser = config_parser(__doc__, MetricsConfig, PRESETS, "default", presets_help=PRESETS_HELP)
    config = resolve_config(parser.parse_args(argv), MetricsConfig, PRESETS)
    if config.metrics_every < 1 or config.smooth < 1 or config.threads < 1 or config.probe_samples < 2:
        parser.error(
            "--metrics-every, --smooth and --threads must be >= 1 and --probe-samples >= 2; got "
            f"{config.metrics_every}, {config.smooth}, {config.threads} and {config.probe_samples}"
        )
    if not config.ratios or not all(0.0 < r <= 1.0 for r in config.ratios):
        parser.error(f"--ratios must lie in (0, 1]; got {config.ratios}")
    if not all(0.0 <= share <= 1.0 for share in config.snapshots):
        parser.error(f"--snapshots are shares of the run in [0, 1]; got {config.snapshots}")
    return config


def main(argv: list[str] | None = None) -> int:
    """Train, probe and evaluate, then write the rows, the probe table and the curves."""
    config = parse_config(argv)
    torch.set_num_threads(config.threads)
    env = environment(torch.device("cpu"))
    found, evaluation = run(config)
    # every row names its device and commit; the configuration goes with the evaluation row only
    rows = [{**env, **row} for row in found]
    rows[-1]["config"] = dataclasses.asdict(config)
    table = markdown_table(rows, config)
    json_path, md_path = write_rows(config.out, rows, table, directory=config.out_dir or None)
    png_path = draw(rows, config, md_path.with_suffix(".png"))
    print(table)
    distance = evaluation["energy_distance_1_step"]
    print(f"one-step energy distance {distance:.5f}; wrote {json_path}, {md_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
