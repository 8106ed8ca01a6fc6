"""The toy recipe, one choice at a time: what each value of the main command's recipe buys.

    python benchmarks/toy_recipe_ablation.py                  # every row, seeds 0 and 1 (about 40 CPU minutes)
    python benchmarks/toy_recipe_ablation.py --preset tiny    # seconds; CI runs this
    python benchmarks/toy_recipe_ablation.py --rows recipe,p=0 --seeds 0

Each row trains the main command (``examples/train_toy_2d.py``, checkerboard) with its defaults
except for one choice, put back to what it was before the recipe was tuned or to a neighbouring
value: the ``toy`` preset's loss settings (p and ε, λ, the time distributions, the ℓ-schedule's
end points), the backbone (random Fourier features of the input, width and batch), the learning
rate and the 2-step sampler's re-noising time. The first row is the configuration before the
tuning. Steps are fixed per row, so the rows are comparable whatever else runs on the machine;
the process CPU time of each training is recorded beside them (one torch thread).

Metrics are those of the main command, means over its independent evaluation draws and over
the seeds: energy distance of 1-step and 2-step samples in units of the real-vs-real floor, and
the share of samples on the checkerboard's squares (the data: 100 %), which shows the sharpness
of the squares' edges that the energy distance barely sees.

Writes ``<out-dir>/<out>.json`` (rows with device, versions, commit and config) and ``<out>.md``
(the table) (``--out-dir``, default ``runs/benchmarks``; ``--out-dir benchmarks/results`` writes the
committed results).
"""

import dataclasses
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import comma_list, environment, preset_parser, resolve_preset, write_rows
from train_toy_2d import ToyConfig, evaluate, train

from soflow_core import AdaptiveWeighting, ExponentSchedule, LogitNormal, SoFlowObjective

Change = Callable[[SoFlowObjective], SoFlowObjective]


def _same(objective: SoFlowObjective) -> SoFlowObjective:
    return objective


def _replace(**fields: object) -> Change:
    return lambda objective: dataclasses.replace(objective, **fields)


def _times(**fields: object) -> Change:
    return lambda objective: dataclasses.replace(
        objective, consistency_times=dataclasses.replace(objective.consistency_times, **fields)
    )


@dataclass(frozen=True)
class Row:
    """One ablation row: the main command's defaults with these changes."""

    name: str
    what: str
    toy: dict
    objective: Change = _same
    before: bool = False  # the configuration before tuning: its own objective, not the preset's


ROWS = (
    Row(
        "before",
        "before tuning: width 256, no Fourier features, batch 512, 3000 steps, lr 1e-3, the ImageNet "
        "recipe without guidance with p = 0.5, 2 steps through t = 0.5",
        {
            "width": 256,
            "fourier_features": 0,
            "batch_size": 512,
            "steps": 3000,
            "lr": 1e-3,
            "two_step_time": 0.5,
        },
        lambda _: SoFlowObjective(weighting=AdaptiveWeighting(p=0.5, eps=0.01)),
        before=True,
    ),
    Row("recipe", "this recipe (the main command's defaults)", {}),
    Row("p=0", "p = 0: the plain squared error", {}, _replace(weighting=AdaptiveWeighting(p=0.0, eps=1.0))),
    Row("p=0.5", "p = 0.5", {}, _replace(weighting=AdaptiveWeighting(p=0.5, eps=1.0))),
    Row("eps=0.01", "ε = 0.01 (the ImageNet value)", {}, _replace(weighting=AdaptiveWeighting(p=0.35, eps=0.01))),
    Row("fm=0.75", "λ = 0.75 (the ImageNet value)", {}, _replace(fm_fraction=0.75)),
    Row(
        "times=imagenet",
        "t ~ logit-normal(0.2, 0.8), s ~ logit-normal(−1.0, 0.8) (the ImageNet values)",
        {},
        _times(t_distribution=LogitNormal(mean=0.2, std=0.8), s_distribution=LogitNormal(mean=-1.0, std=0.8)),
    ),
    Row("r_init=0.1", "r: 0.1 → 0.002 (the ImageNet end points)", {}, _times(schedule=ExponentSchedule(r_init=0.1))),
    Row("r_end=0.02", "r: 1.0 → 0.02", {}, _times(schedule=ExponentSchedule(r_init=1.0, r_end=0.02))),
    Row("no-fourier", "no Fourier features of the input", {"fourier_features": 0}),
    Row(
        "width=256",
        "width 256 and batch 512 (about the same CPU time per step)",
        {"width": 256, "batch_size": 512},
    ),
    Row("lr=1e-3", "learning rate 1e-3", {"lr": 1e-3}),
    Row("two-step=0.5", "2 steps through t = 0.5 (the paper's grid)", {"two_step_time": 0.5}),
)
ROW_NAMES = tuple(row.name for row in ROWS)


@dataclass(frozen=True, kw_only=True)
class AblationConfig:
    """Everything that defines a run; saved in every row."""

    rows: tuple[str, ...] = ROW_NAMES
    seeds: tuple[int, ...] = (0, 1)
    base: str = "default"  # "tiny": a few steps of a tiny model, to check the script
    threads: int = 1
    out: str = "toy_recipe_ablation"
    out_dir: str = ""  # default runs/benchmarks (--out-dir benchmarks/results: the committed results)


PRESETS = {"full": AblationConfig(), "tiny": AblationConfig(rows=("before", "recipe", "p=0"), seeds=(0,), base="tiny")}
TINY = {"steps": 20, "batch_size": 64, "width": 32, "depth": 1, "eval_samples": 256, "eval_repeats": 1}
METRICS = (
    "energy_distance_1_step_over_floor",
    "energy_distance_2_step_over_floor",
    "share_on_squares_1_step",
    "share_on_squares_2_step",
)


def run_row(row: Row, seed: int, config: AblationConfig) -> dict:
    """Train and evaluate one row for one seed."""
    toy = dataclasses.replace(ToyConfig(), **row.toy, seed=seed, progress=False)
    if config.base == "tiny":
        toy = dataclasses.replace(toy, **TINY, fourier_features=min(toy.fourier_features, 4))
    objective = row.objective(SoFlowObjective.from_preset(toy.recipe))
    model, objective, seconds = train(toy, objective)
    metrics, _ = evaluate(model, objective, toy)
    metrics["energy_distance_2_step_over_floor"] = (
        metrics["energy_distance_2_step"] / metrics["energy_distance_real_vs_real_floor"]
    )
    return {
        "row": row.name,
        "seed": seed,
        "steps": toy.steps,
        "train_cpu_seconds": seconds["train_cpu_seconds"],
        **metrics,
    }


def markdown_table(rows: list[dict], config: AblationConfig) -> str:
    env = rows[0]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; commit {env['commit']}. Checkerboard; seeds "
        f"{', '.join(map(str, config.seeds))}; each value is the mean over the seeds of the mean over "
        f"{rows[0]['eval_repeats']} evaluation draws of {rows[0]['eval_samples']} points; energy distances in units "
        "of the real-vs-real floor.",
        "",
        "| row | steps | training CPU s | 1 step: energy distance / floor | 2 steps / floor "
        "| 1 step on squares | 2 steps on squares |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {row.name: row.what for row in ROWS}
    for name in config.rows:
        members = [r for r in rows if r["row"] == name]
        mean = {k: statistics.fmean(r[k] for r in members) for k in (*METRICS, "train_cpu_seconds")}
        lines.append(
            f"| {names[name]} | {members[0]['steps']} | {mean['train_cpu_seconds']:.0f} "
            f"| {mean['energy_distance_1_step_over_floor']:.2f} | {mean['energy_distance_2_step_over_floor']:.2f} "
            f"| {100 * mean['share_on_squares_1_step']:.1f} % | {100 * mean['share_on_squares_2_step']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def parse_config(argv: list[str] | None = None) -> AblationConfig:
    """The preset named by ``--preset`` with command-line overrides.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The resolved configuration.
    """
    parser = preset_parser(__doc__, PRESETS, "full")
    parser.add_argument("--rows", type=comma_list(), help="comma-separated, from " + ", ".join(ROW_NAMES))
    parser.add_argument("--seeds", type=comma_list(int), help="comma-separated, e.g. 0,1")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="file stem of the outputs")
    parser.add_argument("--out-dir", dest="out_dir", help="output folder; empty: runs/benchmarks")
    args = parser.parse_args(argv)
    config = resolve_preset(args, PRESETS)
    unknown = sorted(set(config.rows) - set(ROW_NAMES))
    if unknown or not config.rows:
        parser.error(f"--rows: unknown or empty {unknown or list(config.rows)}; choose from {', '.join(ROW_NAMES)}")
    if not config.seeds:
        parser.error("--seeds: give at least one seed")
    if config.threads < 1:
        parser.error(f"--threads must be >= 1; got {config.threads}")
    return config


def main(argv: list[str] | None = None) -> int:
    """Train every row and seed, then write the rows and the table."""
    config = parse_config(argv)
    torch.set_num_threads(config.threads)
    base = {**environment(torch.device("cpu")), "config": dataclasses.asdict(config)}
    by_name = {row.name: row for row in ROWS}
    rows = []
    for name in config.rows:
        for seed in config.seeds:
            row = {**run_row(by_name[name], seed, config), **base}
            rows.append(row)
            print(
                f"{name:16s} seed {seed}: 1 step {row['energy_distance_1_step_over_floor']:.2f}x floor, "
                f"{100 * row['share_on_squares_1_step']:.1f} % on squares; 2 steps "
                f"{row['energy_distance_2_step_over_floor']:.2f}x, {100 * row['share_on_squares_2_step']:.1f} %; "
                f"{row['train_cpu_seconds']:.0f} s CPU",
                flush=True,
            )
    table = markdown_table(rows, config)
    json_path, md_path = write_rows(config.out, rows, table, directory=config.out_dir or None)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
