"""FLOPs of the ImageNet training step and one-step sampling throughput of the DiT.

    python benchmarks/dit_throughput.py --models DiT-B/2 --batch-size 256       # FLOPs + sampling
    python benchmarks/dit_throughput.py --preset tiny                            # seconds on a CPU

Training FLOPs are counted, not estimated: one full step of ``examples/train_dit_imagenet.py``'s
objective (the model, the ``imagenet`` preset with the size's guidance scale, the same batch
split) runs under ``torch.utils.flop_counter.FlopCounterMode``, which adds up every matrix
product, convolution and attention call the step really makes, forward passes with and without
gradient and the backward alike (2 FLOPs per multiply-add; elementwise work is not counted).
Model FLOP utilisation is then counted FLOPs per step × steps per second over the device's
dense peak; the images/s come from the trainer's own ``metrics.jsonl`` (``--metrics``).

Sampling throughput times ``soflow_core.sample_one_step`` (one network evaluation per image)
on random noise and labels, eager and, with ``--compile``, compiled, in images/s.

Rows (device, versions, commit, config) go to ``<out-dir>/dit_throughput-<device>.json`` (``--out-dir``,
default ``runs/benchmarks``; ``--out-dir benchmarks/results`` writes the committed results) with a
markdown table beside them.
"""

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
import _training as T  # noqa: E402
import train_dit_imagenet as imagenet  # noqa: E402
from _common import bench, config_parser, device_slug, environment, resolve_config, write_rows  # noqa: E402

from soflow_core import sample_one_step  # noqa: E402

# Dense (no sparsity) datasheet peaks in TFLOP/s of the matrix units (fp32 runs as TF32), by a
# substring of the device name. The H100 SXM and the H200 share the same tensor cores.
PEAK_TFLOPS = {"H100 80GB HBM3": {"bf16": 989.4, "fp32": 494.7}, "H200": {"bf16": 989.4, "fp32": 494.7}}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense datasheet peak for a device name such as "NVIDIA H100 80GB HBM3", or None."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(precision)
    return None


@dataclass(frozen=True, kw_only=True)
class ThroughputConfig:
    """What to measure; saved in every row."""

    models: tuple[str, ...] = ("DiT-B/2", "DiT-XL/2")  # DiT sizes whose training step is counted and timed
    batch_size: int = 256  # training batch
    precision: Literal["fp32", "bf16"] = "bf16"  # autocast of the network, as the trainer's --precision
    sample_models: tuple[str, ...] = ("DiT-XL/2",)  # DiT sizes whose 1-NFE sampling throughput is timed
    sample_batch: int = 256  # sampling batch
    compile: bool = False  # also time the sampler under torch.compile
    metrics: tuple[str, ...] = ()  # trainer metrics.jsonl files, "MODEL=PATH[:label]"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # "cuda" or "cpu"
    out: str = ""  # results file stem ("": dit_throughput-<device>)
    out_dir: str = ""  # results folder ("": runs/benchmarks; benchmarks/results holds the committed ones)


PRESETS_HELP = {"paper": "DiT-B/2 and DiT-XL/2 at batch 256 in bf16 (a GPU run)", "tiny": "a tiny DiT (CI)"}
PRESETS = {
    "paper": ThroughputConfig(),
    "tiny": ThroughputConfig(
        models=("DiT-tiny/4",), batch_size=8, sample_models=("DiT-tiny/4",), sample_batch=8, device="cpu"
    ),
}


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(model: str, batch_size: int, device: torch.device):
    """The trainer's network and objective for ``model`` and a synthetic batch."""
    config = dataclasses.replace(imagenet.PRESETS["B-4-cond"], model=model, batch_size=batch_size, synthetic=True)
    if model not in imagenet.RELEASED_SIZES:  # no released run: the B/4 run's K and ω
        config = dataclasses.replace(config, total_steps=400_000, cfg_scale=3.0)
    if model.startswith("DiT-tiny"):
        config = dataclasses.replace(config, num_classes=10)
    config = imagenet.resolve(config)
    config_dict = imagenet.record(config)
    torch.manual_seed(0)
    net = T.build_net(config_dict).to(device)
    objective = T.build_objective(config_dict)
    generator = torch.Generator(device).manual_seed(0)
    data = torch.randn(batch_size, 4, 32, 32, device=device, generator=generator)
    labels = torch.randint(0, config.num_classes, (batch_size,), device=device, generator=generator)
    return net, objective, data, labels, config


def count_step_flops(model: str, batch_size: int, precision: str, device: torch.device) -> dict:
    """FLOPs of one training step (objective forward passes + backward), counted."""
    from torch.utils.flop_counter import FlopCounterMode

    net, objective, data, labels, _ = build(model, batch_size, device)
    generator = torch.Generator(device).manual_seed(1)
    counter = FlopCounterMode(display=False)
    with counter, _autocast(precision, device):
        out = objective(net, data, labels, step=1000, total_steps=400_000, generator=generator)
        out.backprop.backward()
    total = counter.get_total_flops()
    forward_one = _forward_flops(net, batch_size, device, precision)
    return {
        "kind": "train_flops",
        "model": model,
        "batch": batch_size,
        "precision": precision,
        "flops_per_step": total,
        "flops_per_image": total / batch_size,
        "forward_flops_per_image": forward_one / batch_size,
        "forward_equivalents": total / forward_one,
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def _forward_flops(net: torch.nn.Module, batch_size: int, device: torch.device, precision: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch_size, 4, 32, 32, device=device)
    t = torch.rand(batch_size, device=device)
    labels = torch.zeros(batch_size, dtype=torch.int64, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, _autocast(precision, device):
        net(x, t, t * 0.5, labels)
    return counter.get_total_flops()


def sampling_throughput(model: str, batch: int, precision: str, compiled: bool, device: torch.device) -> dict:
    """Images/s of one-step sampling (one network evaluation per image)."""
    net, objective, _, _, config = build(model, batch, device)
    net.eval()
    runner = torch.compile(net) if compiled else net
    noise = torch.randn(batch, 4, 32, 32, device=device)
    labels = torch.randint(0, config.num_classes, (batch,), device=device)

    @torch.no_grad()
    def once():
        with _autocast(precision, device):
            return sample_one_step(runner, noise, param=objective.param, cond=labels)

    median, p20, p80 = bench(once, device, repeats=5)
    return {
        "kind": "sampling",
        "model": model,
        "batch": batch,
        "precision": precision,
        "compiled": compiled,
        "median_ms": median,
        "p20_ms": p20,
        "p80_ms": p80,
        "images_per_s": batch / (median * 1e-3),
    }


def trainer_rows(specs: tuple[str, ...], flops: dict[str, dict], device_name: str) -> list[dict]:
    """Images/s and peak memory from trainer metrics.jsonl files, with model FLOP utilisation."""
    rows = []
    for spec in specs:
        model, _, rest = spec.partition("=")
        path, _, label = rest.partition(":")
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        lines = [row for row in rows if "event" not in row]  # event rows (resume, stopped, ...) carry no metrics
        steady = lines[1:] or lines  # the first interval holds warm-up and compilation
        images_per_s = sum(r["images_per_s"] for r in steady) / len(steady)
        row = {
            "kind": "train",
            "model": model,
            "label": label or "eager",
            "images_per_s": images_per_s,
            "peak_memory_gib": max((r.get("max_memory_gib") or 0.0) for r in lines) or None,
            "intervals": len(steady),
        }
        counted = flops.get(model)
        if counted is not None:
            achieved = counted["flops_per_image"] * images_per_s
            row["achieved_tflops"] = achieved / 1e12
            peak = peak_tflops(device_name, counted["precision"])
            row["mfu"] = achieved / (peak * 1e12) if peak else None
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], env: dict) -> str:
    lines = [f"Device: {env['device']}; torch {env['torch']}; commit {env['commit']}.", ""]
    flops = [r for r in rows if r["kind"] == "train_flops"]
    if flops:
        lines += [
            "| model | batch | precision | counted TFLOP per step | GFLOP per image | forward-pass equivalents |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['batch']} | {r['precision']} | {r['flops_per_step'] / 1e12:.2f} "
            f"| {r['flops_per_image'] / 1e9:.1f} | {r['forward_equivalents']:.2f} |"
            for r in flops
        ]
        lines.append("")
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        lines += ["| model | run | images/s | achieved TFLOP/s | MFU | peak memory GiB |", "|---|---|---|---|---|---|"]
        for r in train:
            mfu = "–" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
            tflops = "–" if r.get("achieved_tflops") is None else f"{r['achieved_tflops']:.0f}"
            memory = "–" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f}"
            lines.append(f"| {r['model']} | {r['label']} | {r['images_per_s']:.0f} | {tflops} | {mfu} | {memory} |")
        lines.append("")
    sampling = [r for r in rows if r["kind"] == "sampling"]
    if sampling:
        lines += ["| model | batch | precision | compiled | ms per batch | images/s |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['batch']} | {r['precision']} | {r['compiled']} | {r['median_ms']:.2f} "
            f"| {r['images_per_s']:.0f} |"
            for r in sampling
        ]
    return "\n".join(lines) + "\n"


def parse_config(argv: list[str] | None = None) -> ThroughputConfig:
    """The preset named by ``--preset`` with command-line overrides.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The resolved configuration.
    """
    choices = {"models": tuple(T.ALL_DIT_SIZES), "sample_models": tuple(T.ALL_DIT_SIZES)}
    parser = config_parser(__doc__, ThroughputConfig, PRESETS, "paper", presets_help=PRESETS_HELP, choices=choices)
    config = resolve_config(parser.parse_args(argv), ThroughputConfig, PRESETS)
    if config.batch_size < 1 or config.sample_batch < 1:
        parser.error(f"--batch-size and --sample-batch must be >= 1; got {config.batch_size}, {config.sample_batch}")
    for model in (*config.models, *config.sample_models):
        if model not in T.ALL_DIT_SIZES:
            parser.error(f"unknown model {model!r}; choose from {', '.join(T.ALL_DIT_SIZES)}")
    return config


def main(argv: list[str] | None = None) -> int:
    """Count, time, print, and write the JSON rows and the markdown table."""
    config = parse_config(argv)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = environment(device)
    rows = [count_step_flops(m, config.batch_size, config.precision, device) for m in config.models]
    flops = {r["model"]: r for r in rows}
    rows += trainer_rows(config.metrics, flops, env["device"])
    for model in config.sample_models:
        for compiled in (False, True) if config.compile else (False,):
            rows.append(sampling_throughput(model, config.sample_batch, config.precision, compiled, device))
    rows = [{**r, **env, "config": dataclasses.asdict(config)} for r in rows]
    table = markdown_table(rows, env)
    stem = config.out or f"dit_throughput-{device_slug(env['device'])}"
    json_path, md_path = write_rows(stem, rows, table, directory=config.out_dir or None)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
