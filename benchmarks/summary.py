"""The Benchmarks summary: headline figures and two charts, read from the committed results (nothing is run).

    python benchmarks/summary.py                                   # into runs/benchmarks
    python benchmarks/summary.py --out-dir benchmarks/results      # the summary the docs include

Speed: SoFlow's training step against the fastest and the leanest MeanFlow row measured in
each committed ``jvp_vs_soflow`` run (whichever JVP variant, eager or compiled), with the
MeanFlow rows that did not run and why. Quality: the seed means of
``quality_at_equal_budget.json``, SoFlow at one network evaluation against MeanFlow at one and
against Flow Matching's best result at any number of Euler steps, each in units of its
dataset's floor (the score of real data against real data).

Writes ``<out-dir>/<out>.md`` (the two tables), ``<out>.json`` (their rows, each with the
device and commit of the run it comes from), ``<out>-speed.png`` and ``<out>-quality.png``
(``--out-dir``, default ``runs/benchmarks``; ``--out-dir benchmarks/results`` writes the
committed summary). The docs include that table and show copies of its charts from
``docs/assets``.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PUBLISHED_RESULTS, config_parser, resolve_config, write_rows

# The committed runs the summary reads: (file stem in the results folder, how the table names the setting).
SPEED_RUNS = (
    ("jvp_vs_soflow-dit-b-2-h100", "H100, DiT-B/2, batch 256, bf16"),
    ("jvp_vs_soflow-dit-xl-2-h100", "H100, DiT-XL/2, batch 64, bf16"),
    ("jvp_vs_soflow-dit-s-4-bs16-cpu", "CPU, DiT-S/4, batch 16, fp32"),
)
QUALITY_RUN = "quality_at_equal_budget"
DATASETS = {
    "checkerboard": ("energy_distance", "checkerboard"),
    "eight_gaussians": ("energy_distance", "8 Gaussians"),
    "two_moons": ("energy_distance", "two moons"),
    "digits": ("frechet_distance", "8×8 digits"),
}
STATUS_WORDS = {
    "oom": "out of memory at this batch",
    "unsupported": "cannot be compiled",
    "error": "failed",
}


@dataclass(frozen=True, kw_only=True)
class SummaryConfig:
    """Where to read and write."""

    results_dir: str = str(PUBLISHED_RESULTS)  # the committed results to read
    out: str = "summary"  # output file stem
    out_dir: str = ""  # output folder ("": runs/benchmarks; benchmarks/results holds the committed summary)


PRESETS = {"default": SummaryConfig()}


def _short_device(name: str) -> str:
    return "H100" if "H100" in name else ("CPU x86-64" if name.startswith("CPU") else name)


def _device_words(row: dict) -> str:
    """``NVIDIA H100 80GB HBM3, torch 2.11.0+cu130`` / ``x86-64 CPU, one thread, torch 2.13.0+cpu``."""
    device = row["device"].replace("CPU x86_64 (1 threads)", "x86-64 CPU, one thread")
    return f"{device}, torch {row['torch']}"


def speed_rows(folder: Path) -> list[dict]:
    """One row per committed run: SoFlow against the fastest and the leanest MeanFlow row that ran."""
    found = []
    for stem, setting in SPEED_RUNS:
        rows = json.loads((folder / f"{stem}.json").read_text())
        ran = [r for r in rows if r["method"] == "meanflow" and r["status"] == "ok"]
        fastest = min(ran, key=lambda r: r["median_ms"])
        measured = [r for r in ran if r.get("peak_memory_mb") is not None]
        leanest = min(measured, key=lambda r: r["peak_memory_mb"]) if measured else None
        soflow = {r["variant"]: r for r in rows if r["method"] == "soflow" and r["status"] == "ok"}
        failed = [
            f"`{r['variant']}` ({_short_device(r['device'])}): {STATUS_WORDS.get(r['status'], r['status'])}"
            for r in rows
            if r["method"] == "meanflow" and r["status"] != "ok"
        ]
        for variant in ("soflow", "soflow+compile"):
            if variant not in soflow:
                continue
            row = soflow[variant]
            memory = row.get("peak_memory_mb")
            found.append(
                {
                    "run": stem,
                    "setting": setting,
                    "device": row["device"],
                    "torch": row["torch"],
                    "commit": row["commit"],
                    "soflow_variant": variant,
                    "soflow_ms": row["median_ms"],
                    "fastest_meanflow": fastest["variant"],
                    "fastest_meanflow_ms": fastest["median_ms"],
                    "time_ratio": row["median_ms"] / fastest["median_ms"],
                    "soflow_memory_mib": memory,
                    "leanest_meanflow": None if leanest is None else leanest["variant"],
                    "leanest_meanflow_mib": None if leanest is None else leanest["peak_memory_mb"],
                    "memory_ratio": None if memory is None or leanest is None else memory / leanest["peak_memory_mb"],
                    "meanflow_rows_not_run": failed,
                }
            )
    return found


def quality_rows(folder: Path) -> list[dict]:
    """One row per dataset: seed means of SoFlow 1 NFE, MeanFlow 1 NFE and Flow Matching's best, over the floor."""
    rows = json.loads((folder / f"{QUALITY_RUN}.json").read_text())
    means = [r for r in rows if r.get("seed") == "mean"]
    found = []
    for dataset, (metric, name) in DATASETS.items():
        floor = next(r for r in means if r["kind"] == "floor" and r["dataset"] == dataset)[metric]
        samples = [r for r in means if r["kind"] == "sample" and r["dataset"] == dataset]
        at = {(r["method"], r["nfe"]): r for r in samples}
        flow = min((r for r in samples if r["method"] == "flow_matching"), key=lambda r: r[metric])
        soflow, meanflow = at["soflow", 1], at["meanflow", 1]
        found.append(
            {
                "dataset": dataset,
                "name": name,
                "metric": metric,
                "device": soflow["device"],
                "torch": soflow["torch"],
                "commit": soflow["commit"],
                "seeds": soflow["num_seeds"],
                "budget_cpu_s": soflow["config"]["budget_s"],
                "floor": floor,
                "soflow_1": soflow[metric],
                "meanflow_1": meanflow[metric],
                "flow_matching_best": flow[metric],
                "flow_matching_best_nfe": flow["nfe"],
                "soflow_steps": soflow["steps"],
                "meanflow_steps": meanflow["steps"],
            }
        )
    return found


def markdown(speed: list[dict], quality: list[dict]) -> str:
    """The two summary tables."""
    devices = "; ".join(sorted({_device_words(row) for row in speed}))
    lines = [  # the section markers let the docs include each table on its own (pymdownx.snippets)
        "<!-- --8<-- [start:speed] -->",
        f"Training step with CFG; SoFlow against the fastest and the leanest MeanFlow row of each run ({devices}):",
        "",
        "| setting | SoFlow step | fastest MeanFlow row | time | peak memory vs the leanest MeanFlow row |",
        "|---|---|---|---|---|",
    ]
    for row in speed:
        name = row["setting"].replace(", CFG", "") + (", compiled" if row["soflow_variant"] == "soflow+compile" else "")
        if row["soflow_memory_mib"] is None or row["memory_ratio"] is None:
            memory = "not measured"
        else:
            memory = (
                f"**{row['memory_ratio']:.2f}×** ({row['soflow_memory_mib'] / 1024:.1f} GiB; "
                f"`{row['leanest_meanflow']}`)"
            )
        lines.append(
            f"| {name} | {row['soflow_ms']:.0f} ms | `{row['fastest_meanflow']}`, {row['fastest_meanflow_ms']:.0f} ms "
            f"| **{row['time_ratio']:.2f}×** | {memory} |"
        )
    notes = sorted({note for row in speed for note in row["meanflow_rows_not_run"]})
    lines += ["", "MeanFlow rows that did not run: " + "; ".join(notes) + "." if notes else ""]
    first = quality[0]
    lines += [
        "<!-- --8<-- [end:speed] -->",
        "",
        "<!-- --8<-- [start:quality] -->",
        f"Each score over its dataset's floor (real data against real data), so 1.00× is perfect; "
        f"{first['budget_cpu_s']:.0f} s of process CPU time per method ({_device_words(first)}), means of "
        f"{first['seeds']} seeds:",
        "",
        "| dataset (metric) | SoFlow, 1 step | MeanFlow, 1 step | Flow Matching, best (Euler steps) | floor |",
        "|---|---|---|---|---|",
    ]
    for row in quality:
        metric = "energy distance" if row["metric"] == "energy_distance" else "Fréchet distance"
        floor = row["floor"]
        lines.append(
            f"| {row['name']} ({metric}) | **{row['soflow_1'] / floor:.2f}×** | {row['meanflow_1'] / floor:.2f}× "
            f"| {row['flow_matching_best'] / floor:.2f}× ({row['flow_matching_best_nfe']}) | {floor:.3g} |"
        )
    lines.append("<!-- --8<-- [end:quality] -->")
    return "\n".join(lines) + "\n"


def draw_speed(speed: list[dict], path: Path) -> Path:
    """Step time over the fastest MeanFlow row's, one bar per setting (eager and compiled SoFlow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 2.5))
    labels = [row["setting"] + (", compiled" if row["soflow_variant"] == "soflow+compile" else "") for row in speed]
    ratios = [row["time_ratio"] for row in speed]
    colors = ["#1f4e79" if _short_device(row["device"]) == "H100" else "#7f9fbf" for row in speed]
    bars = ax.barh(range(len(speed)), ratios, color=colors)
    ax.axvline(1.0, color="#c55a11", linewidth=1.5)
    for bar, ratio, row in zip(bars, ratios, speed):
        middle = bar.get_y() + bar.get_height() / 2
        ax.text(ratio + 0.01, middle, f"{ratio:.2f}× {row['fastest_meanflow']}", va="center", fontsize=8)
    ax.set_yticks(range(len(speed)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.3)
    ax.set_xlabel("SoFlow's step time ÷ the fastest MeanFlow row's (orange line; lower is faster)", fontsize=9)
    names = sorted({_device_words(row) for row in speed})
    ax.set_title("Training step with CFG\n" + "; ".join(names), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_quality(quality: list[dict], path: Path) -> Path:
    """SoFlow 1 step, MeanFlow 1 step and Flow Matching's best, over the floor, per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 2.9))
    series = (
        ("soflow_1", "SoFlow, 1 step", "#1f4e79"),
        ("meanflow_1", "MeanFlow, 1 step", "#c55a11"),
        ("flow_matching_best", "Flow Matching, best of ≤ 100 Euler steps", "#a5a5a5"),
    )
    width = 0.26
    for i, (key, label, color) in enumerate(series):
        values = [row[key] / row["floor"] for row in quality]
        bars = ax.bar([x + (i - 1) * width for x in range(len(quality))], values, width, label=label, color=color)
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(quality)), [row["name"] for row in quality])
    ax.set_ylabel("score ÷ real-vs-real floor")
    top = max(row["meanflow_1"] / row["floor"] for row in quality)
    ax.set_ylim(0, 1.35 * top)
    ax.legend(fontsize=8, frameon=False, ncol=3, loc="upper center")
    first = quality[0]
    ax.set_title(
        f"Quality at equal budget, lower is better (1 = real data)\n{_device_words(first)}; "
        f"{first['budget_cpu_s']:.0f} CPU s per method, {first['seeds']} seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_config(argv: list[str] | None = None) -> SummaryConfig:
    """The configuration with command-line overrides.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The resolved configuration.
    """
    parser = config_parser(__doc__, SummaryConfig, PRESETS, "default")
    config = resolve_config(parser.parse_args(argv), SummaryConfig, PRESETS)
    if not Path(config.results_dir).is_dir():
        parser.error(f"--results-dir {config.results_dir} is not a folder")
    return config


def main(argv: list[str] | None = None) -> int:
    """Read the committed results, write the tables and the charts."""
    config = parse_config(argv)
    folder = Path(config.results_dir)
    speed, quality = speed_rows(folder), quality_rows(folder)
    table = markdown(speed, quality)
    rows = [{"kind": "speed", **row} for row in speed] + [{"kind": "quality", **row} for row in quality]
    json_path, md_path = write_rows(config.out, rows, table, directory=config.out_dir or None)
    charts = [
        draw_speed(speed, md_path.with_name(f"{config.out}-speed.png")),
        draw_quality(quality, md_path.with_name(f"{config.out}-quality.png")),
    ]
    print(table)
    print(f"wrote {json_path}, {md_path}, {charts[0]} and {charts[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
