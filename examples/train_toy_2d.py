"""Train a one-step SoFlow generator on a 2-D toy distribution and draw its samples beside the data.

    python examples/train_toy_2d.py                       # checkerboard, about a minute on a laptop CPU
    python examples/train_toy_2d.py --toy eight_gaussians --steps 2000
    python examples/train_toy_2d.py --preset imagenet     # class-conditional, guidance ω = 3 baked in
                                                          # (strong guidance pushes classes apart: by design
                                                          # the samples then differ from the data)
    python examples/train_toy_2d.py --config tiny         # a few seconds (smoke test)

Writes into ``--out`` (default ``runs/toy_2d``): ``samples.png`` (data | 1-step | 2-step samples),
``metrics.json`` (energy distances with the real-vs-real floor, timings) and ``config.json``
(the resolved configuration).
"""

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from soflow_core import AdaptiveWeighting, SoFlowObjective, sample_few_step, sample_one_step
from soflow_core.data import TOY_DISTRIBUTIONS, sample_toy_2d
from soflow_core.metrics import energy_distance
from soflow_core.nets import MLPBackbone

NUM_CLASSES = {"checkerboard": 8, "eight_gaussians": 8, "two_moons": 2}


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """Everything that defines a run; saved beside its outputs."""

    toy: str = "checkerboard"
    # "toy": SoFlowObjective() with p = 0.5; "imagenet" (with CFG) and "cifar10": the released recipes
    preset: str = "toy"
    p: float | None = None  # overrides the preset's adaptive-weight power when given
    eps: float | None = None  # overrides the preset's adaptive-weight offset when given
    steps: int = 3000
    batch_size: int = 512
    width: int = 256
    depth: int = 3
    lr: float = 1e-3
    lr_decay_fraction: float = 0.3  # the learning rate decays linearly to 0 over this last share of steps
    ema_decay: float = 0.995
    eval_samples: int = 4000
    seed: int = 0
    out: str = "runs/toy_2d"


CONFIGS = {
    "default": ToyConfig(),
    "tiny": ToyConfig(steps=30, batch_size=64, width=32, depth=1, eval_samples=256),
}


def parse_config(argv: list[str] | None = None) -> ToyConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default", help="base configuration")
    for f in dataclasses.fields(ToyConfig):
        kind = float if f.default is None else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ToyConfig)}
    config = dataclasses.replace(CONFIGS[args.config], **{k: v for k, v in overrides.items() if v is not None})
    if config.toy not in TOY_DISTRIBUTIONS:
        parser.error(f"--toy must be one of {', '.join(TOY_DISTRIBUTIONS)}; got {config.toy!r}")
    if config.preset not in ("toy", "imagenet", "cifar10"):
        parser.error(f"--preset must be toy, imagenet or cifar10; got {config.preset!r}")
    if config.steps < 1 or config.batch_size < 2:
        parser.error(f"--steps must be >= 1 and --batch-size >= 2; got {config.steps} and {config.batch_size}")
    return config


def build_objective(config: ToyConfig) -> SoFlowObjective:
    if config.preset == "toy":
        # The defaults (the reference ImageNet recipe without guidance) with p = 0.5: on 2-D data the
        # log-like weight of p = 1 biases the learned velocity towards the modes and sharpens them.
        objective = SoFlowObjective(weighting=AdaptiveWeighting(p=0.5, eps=0.01))
    else:
        objective = SoFlowObjective.from_preset(config.preset)
    if objective.guidance is not None:  # the toy's classes replace ImageNet's 1000
        guidance = dataclasses.replace(objective.guidance, null_cond=NUM_CLASSES[config.toy])
        objective = dataclasses.replace(objective, guidance=guidance)
    weighting = dataclasses.replace(
        objective.weighting,
        **{k: v for k, v in (("p", config.p), ("eps", config.eps)) if v is not None},
    )
    return dataclasses.replace(objective, weighting=weighting)


def lr_factor(step: int, config: ToyConfig) -> float:
    decay_steps = max(1, int(config.lr_decay_fraction * config.steps))
    return min(1.0, (config.steps - step) / decay_steps)


def train(config: ToyConfig) -> tuple[torch.nn.Module, SoFlowObjective, float]:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    objective = build_objective(config)
    conditional = objective.guidance is not None
    model = MLPBackbone(
        dim=2, width=config.width, depth=config.depth, num_classes=NUM_CLASSES[config.toy] if conditional else None
    )
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start = time.perf_counter()
    for step in range(config.steps):
        data, labels = sample_toy_2d(config.toy, config.batch_size, generator=generator)
        out = objective(
            model, data, labels if conditional else None, step=step, total_steps=config.steps, generator=generator
        )
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        optimizer.zero_grad(set_to_none=True)
        out.backprop.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - config.ema_decay)
        if not bool(out.metrics["finite"]):
            raise FloatingPointError(f"non-finite loss at step {step}: {out.metrics}")
        if step % max(1, config.steps // 10) == 0 or step == config.steps - 1:
            shown = " ".join(f"{k}={v.item():.4g}" for k, v in out.metrics.items() if k != "finite")
            print(f"step {step:>6}/{config.steps}  {shown}", flush=True)
    return ema, objective, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: SoFlowObjective, config: ToyConfig) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(config.seed + 1)
    n = config.eval_samples
    real, labels = sample_toy_2d(config.toy, n, generator=generator)
    real_again, _ = sample_toy_2d(config.toy, n, generator=generator)
    noise = torch.randn(n, 2, generator=generator)
    cond = labels if objective.guidance is not None else None
    start = time.perf_counter()
    one_step = sample_one_step(model, noise, param=objective.param, cond=cond)
    one_step_seconds = time.perf_counter() - start
    two_step = sample_few_step(
        model, noise, param=objective.param, path=objective.path, num_steps=2, cond=cond, generator=generator
    )
    metrics = {
        "energy_distance_1_step": energy_distance(one_step, real),
        "energy_distance_2_step": energy_distance(two_step, real),
        "energy_distance_real_vs_real_floor": energy_distance(real_again, real),
        "energy_distance_noise": energy_distance(noise, real),
        "eval_samples": n,
        "one_step_sampling_seconds": one_step_seconds,
    }
    return metrics, {"data": real, "1 step": one_step, "2 steps": two_step}


def draw(samples: dict, metrics: dict, config: ToyConfig, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('matplotlib is needed for the picture: pip install -e ".[viz]"')
    keys = {"1 step": "energy_distance_1_step", "2 steps": "energy_distance_2_step"}
    fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 4.6))
    lim = 1.15 * float(samples["data"].abs().max())
    for ax, (name, points) in zip(axes, samples.items()):
        ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=1.5, alpha=0.5, color="#1f4e79", linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if name == "data":
            ax.set_title(f"data ({config.toy})\nreal-vs-real floor {metrics['energy_distance_real_vs_real_floor']:.4f}")
        else:
            ax.set_title(f"SoFlow, {name}\nenergy distance {metrics[keys[name]]:.4f}")
    fig.suptitle(
        f"{config.steps} steps, batch {config.batch_size}, preset {config.preset}; "
        f"untrained model (= noise) energy distance {metrics['energy_distance_noise']:.4f}",
        fontsize=10,
        y=0.99,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(argv)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    model, objective, seconds = train(config)
    metrics, samples = evaluate(model, objective, config)
    metrics.update(train_seconds=seconds, steps=config.steps, device="cpu", torch=torch.__version__)
    draw(samples, metrics, config, out / "samples.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    floor = metrics["energy_distance_real_vs_real_floor"]
    print(
        f"one-step energy distance {metrics['energy_distance_1_step']:.4f} "
        f"(untrained {metrics['energy_distance_noise']:.4f}, real-vs-real floor {floor:.4f}, "
        f"{metrics['energy_distance_1_step'] / max(floor, 1e-12):.1f}x the floor); "
        f"trained in {seconds:.0f} s; wrote {out / 'samples.png'} and {out / 'metrics.json'}"
    )
    return metrics


if __name__ == "__main__":
    main()
