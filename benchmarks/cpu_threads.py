"""How many CPU threads a small model's training step wants: one thread against torch's default, in one run.

    python benchmarks/cpu_threads.py                  # the home page's loop: MLP width 96, batch 256
    python benchmarks/cpu_threads.py --batch-size 2048   # the main command's batch
    python benchmarks/cpu_threads.py --preset tiny    # seconds; CI runs this

Times the training step of the home page's loop (``MLPBackbone`` of width 96 with 32 Fourier
features, ``SoFlowObjective.from_preset("toy")``, Adam; objective, backward and optimizer step)
at each thread count of ``--threads`` (0: torch's default, the number of cores it found). The
counts take turns in rounds of ``--steps-per-round`` steps within one process, so the load of
a shared machine falls on every count alike and the ratio holds even when the times do not.
Reported per count: the median wall-clock and process CPU time per step, and the wall-clock
ratio to one thread.

Writes ``<out-dir>/<out>.json`` (rows with device, versions, commit and config) and ``<out>.md``
(the table) (``--out-dir``, default ``runs/benchmarks``; ``--out-dir benchmarks/results`` writes
the committed results).
"""

import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_parser, environment, resolve_config, write_rows

from soflow_core import SoFlowObjective, step_generator
from soflow_core.data import sample_toy_2d
from soflow_core.nets import MLPBackbone


@dataclass(frozen=True, kw_only=True)
class ThreadsConfig:
    """What to time; saved in every row."""

    threads: tuple[int, ...] = (1, 0)  # thread counts to compare (0: torch's default)
    batch_size: int = 256  # points per step
    width: int = 96  # hidden width of the MLP
    rounds: int = 20  # rounds over the thread counts
    steps_per_round: int = 25  # timed steps per thread count and round
    out: str = "cpu_threads"  # results file stem
    out_dir: str = ""  # results folder ("": runs/benchmarks; benchmarks/results holds the committed ones)


PRESETS = {"default": ThreadsConfig(), "tiny": ThreadsConfig(rounds=2, steps_per_round=3, batch_size=32, width=16)}
PRESETS_HELP = {
    "default": "the home page's loop, 20 rounds of 25 steps per thread count (a minute or two)",
    "tiny": "2 rounds of 3 steps of a tiny MLP (seconds; CI)",
}


def make_step(config: ThreadsConfig):
    """One training step of the home page's loop, as a function of the step number."""
    torch.manual_seed(0)
    model = MLPBackbone(dim=2, width=config.width, fourier_features=32, fourier_scale=0.5)
    objective = SoFlowObjective.from_preset("toy")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    total = 2 * config.rounds * config.steps_per_round * len(config.threads)

    def step(k: int) -> None:
        generator = step_generator(seed=0, step=k)
        data, _ = sample_toy_2d("two_moons", config.batch_size, generator=generator)
        out = objective(model, data, None, step=k, total_steps=total, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.backprop.backward()
        optimizer.step()

    return step


def run(config: ThreadsConfig) -> list[dict]:
    """Time the step at each thread count, in turns; one row per count."""
    default = torch.get_num_threads()
    counts = [count or default for count in config.threads]
    step = make_step(config)
    wall: list[list[float]] = [[] for _ in counts]
    cpu: list[list[float]] = [[] for _ in counts]
    k = 0
    for count in counts:  # warm-up, once per count
        torch.set_num_threads(count)
        for _ in range(3):
            step(k)
            k += 1
    for _ in range(config.rounds):
        for i, count in enumerate(counts):
            torch.set_num_threads(count)
            for _ in range(config.steps_per_round):
                start, cpu_start = time.perf_counter(), time.process_time()
                step(k)
                wall[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - cpu_start)
                k += 1
    torch.set_num_threads(default)
    one = [statistics.median(times) for count, times in zip(counts, wall) if count == 1]
    rows = []
    for i, (requested, count) in enumerate(zip(config.threads, counts)):
        median = statistics.median(wall[i])
        rows.append(
            {
                "threads": count,
                "torch_default": requested == 0,
                "median_step_ms": 1e3 * median,
                "median_cpu_ms": 1e3 * statistics.median(cpu[i]),
                "wall_vs_one_thread": median / one[0] if one else None,
                "steps_timed": len(wall[i]),
                "cores": os.cpu_count(),
                "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            }
        )
    return rows


def markdown_table(rows: list[dict], config: ThreadsConfig) -> str:
    env = rows[0]
    lines = [
        f"Device: {env['device'].split(' (')[0]}, {env['cores']} cores (load average {env['load_average_1min']:.1f} "
        f"at the end); torch {env['torch']}; commit {env['commit']}. MLP width {config.width}, batch "
        f"{config.batch_size}; {config.rounds} rounds of {config.steps_per_round} steps per thread count, in turns.",
        "",
        "| threads | wall ms per step (median) | CPU ms per step (median) | wall time vs 1 thread |",
        "|---|---|---|---|",
    ]
    for row in rows:
        name = f"{row['threads']} (torch's default)" if row["torch_default"] else str(row["threads"])
        ratio = "n/a" if row["wall_vs_one_thread"] is None else f"{row['wall_vs_one_thread']:.2f}×"
        lines.append(f"| {name} | {row['median_step_ms']:.2f} | {row['median_cpu_ms']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def parse_config(argv: list[str] | None = None) -> ThreadsConfig:
    """The preset named by ``--preset`` with command-line overrides.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The resolved configuration.
    """
    parser = config_parser(__doc__, ThreadsConfig, PRESETS, "default", presets_help=PRESETS_HELP)
    config = resolve_config(parser.parse_args(argv), ThreadsConfig, PRESETS)
    if not config.threads or any(count < 0 for count in config.threads):
        parser.error(f"--threads: give thread counts >= 0 (0: torch's default); got {config.threads}")
    if min(config.batch_size, config.width, config.rounds, config.steps_per_round) < 1:
        parser.error("--batch-size, --width, --rounds and --steps-per-round must be >= 1")
    return config


def main(argv: list[str] | None = None) -> int:
    """Time every thread count and write the rows and the table."""
    config = parse_config(argv)
    env = {**environment(torch.device("cpu")), "config": dataclasses.asdict(config)}
    rows = [{**env, **row} for row in run(config)]
    table = markdown_table(rows, config)
    json_path, md_path = write_rows(config.out, rows, table, directory=config.out_dir or None)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
