"""Train a one-step SoFlow generator on a 2-D toy distribution and draw its samples beside the data.

    python examples/train_toy_2d.py                       # checkerboard, about 100 s on one CPU core
    python examples/train_toy_2d.py --toy eight_gaussians --steps 2000
    python examples/train_toy_2d.py --recipe imagenet     # class-conditional, guidance ω = 3 baked in
                                                          # (strong guidance pushes classes apart: by design
                                                          # the samples then differ from the data)
    python examples/train_toy_2d.py --preset tiny         # a few seconds (smoke test)
    python examples/train_toy_2d.py --recipe finetune --pretrain-steps 2500 --steps 2000
                                                          # Flow Matching first, then SoFlow fine-tuning
    python examples/train_toy_2d.py --recipe finetune --init runs/my_flow_matching_mlp

Writes into ``--out`` (default ``runs/toy_2d``): ``samples.png`` (data | 1-step | 2-step samples),
``metrics.json`` (energy distances with the real-vs-real floor, each the mean over
``--eval-repeats`` independent draws; on the checkerboard also the share of samples on its
squares; timings), ``train_metrics.jsonl`` (the training metrics every ``--metrics-every``
steps) and ``config.json`` (the resolved configuration). The quick start's "Reading the
training metrics" says what each metric means and which to watch.

``--recipe`` names the training objective (``SoFlowObjective.from_preset``); the run size is
``--preset`` (``default`` or ``tiny``), as in the other trainers. ``--threads`` sets torch's CPU
threads (default 1: this small MLP gains nothing from more, and on cores shared with other work
extra threads only wait for each other). Training shows a progress line with the step rate and the time left (a tqdm
bar on a terminal when tqdm is installed).

The defaults are the library's recipe for low-dimensional data: ``SoFlowObjective.from_preset("toy")``
with an ``MLPBackbone`` of width 96 and depth 3 that sees 32 random Fourier features of its
input, batch 2048, Adam at 2e-3 decaying linearly to 0 over the last 30 % of 4000 steps, EMA
0.995, and a 2-step sampler that re-noises to t = 0.3. docs/benchmarks/toy-recipe.md holds the ablation
behind each value.

Fine-tuning (docs/finetune.md): ``--init`` converts a velocity model (an ``MLPBackbone`` trained with
Flow Matching; ``soflow_core.nets.from_velocity_model``) and trains from it; ``--pretrain-steps N``
trains one with Flow Matching first, in the same run (same optimizer, decay and EMA). ``--recipe
finetune`` then steps the consistency samples along the frozen converted network's velocity.
"""

import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import torch
from _cli import config_parser, resolve_config

from soflow_core import AdaptiveWeighting, ClassifierFreeGuidance, SoFlowObjective, sample_few_step, sample_one_step
from soflow_core.data import TOY_DISTRIBUTIONS, on_checkerboard, sample_toy_2d
from soflow_core.metrics import energy_distance
from soflow_core.nets import MLPBackbone, from_velocity_model

NUM_CLASSES = {"checkerboard": 8, "eight_gaussians": 8, "two_moons": 2}


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """Everything that defines a run; saved beside its outputs."""

    toy: str = "checkerboard"  # the 2-D distribution to learn
    # the training objective: "toy", SoFlowObjective.from_preset("toy"), the library's recipe for
    # low-dimensional data; "imagenet" (with CFG) and "cifar10": the released recipes; "finetune": the library's
    # recipe for fine-tuning a velocity model (from --init or --pretrain-steps), stepping along its velocity
    recipe: Literal["toy", "imagenet", "cifar10", "finetune"] = "toy"
    # start from a velocity model: a pretrained folder or checkpoint of an MLPBackbone on 2-D data trained with Flow
    # Matching, converted by soflow_core.nets.from_velocity_model (its size replaces --width, --depth, Fourier flags)
    init: str | None = None
    init_convention: Literal["", "soflow", "sit", "sit_gvp"] = ""  # --init's convention ("": recognised or soflow)
    # Flow Matching steps (plain squared error) before the SoFlow steps; their EMA model is converted and fine-tuned
    pretrain_steps: int = 0
    p: float | None = None  # overrides the recipe's adaptive-weight power when given
    eps: float | None = None  # overrides the recipe's adaptive-weight offset when given
    fm_fraction: float | None = None  # overrides the recipe's Flow Matching share λ when given
    steps: int = 4000  # optimizer steps
    batch_size: int = 2048  # samples per step
    width: int = 96  # hidden width of the MLP
    depth: int = 3  # hidden layers of the MLP
    fourier_features: int = 32  # random Fourier features of the input (0: the plain coordinates)
    fourier_scale: float = 0.5  # their frequencies' standard deviation, in cycles per unit
    lr: float = 2e-3  # Adam's learning rate
    lr_decay_fraction: float = 0.3  # the learning rate decays linearly to 0 over this last share of steps
    ema_decay: float = 0.995  # decay of the weights' exponential moving average (the samples use it)
    two_step_time: float = 0.3  # the 2-step sampler re-noises to this time (the paper's grid: 0.5)
    eval_samples: int = 4000  # points per draw when measuring the energy distances
    eval_repeats: int = 5  # metrics are means over this many independent draws of noise and data
    seed: int = 0  # seeds the model's initialisation and every draw
    threads: int = 1  # torch CPU threads
    progress: bool = True  # a progress line (a tqdm bar on a terminal when installed) during training
    metrics_every: int = 10  # append the training metrics to train_metrics.jsonl every this many steps (0: never)
    out: str = "runs/toy_2d"  # the run folder: samples.png, metrics.json, train_metrics.jsonl, config.json


CONFIGS = {
    "default": ToyConfig(),
    "tiny": ToyConfig(steps=30, batch_size=64, width=32, depth=1, fourier_features=4, eval_samples=256, eval_repeats=1),
}
CONFIGS_HELP = {
    "default": "the main job: 4000 steps at batch 2048, about 100 CPU seconds",
    "tiny": "a smoke test of a few seconds (the objective is --recipe, not --preset)",
}


def parse_config(argv: list[str] | None = None) -> ToyConfig:
    parser = config_parser(
        __doc__, ToyConfig, CONFIGS, "default", presets_help=CONFIGS_HELP, choices={"toy": tuple(TOY_DISTRIBUTIONS)}
    )
    config = resolve_config(parser.parse_args(argv), ToyConfig, CONFIGS)
    if config.threads < 1:
        parser.error(f"--threads must be >= 1; got {config.threads}")
    if config.steps < 1 or config.batch_size < 2:
        parser.error(f"--steps must be >= 1 and --batch-size >= 2; got {config.steps} and {config.batch_size}")
    if not 0.0 < config.two_step_time < 1.0:
        parser.error(f"--two-step-time must lie in (0, 1); got {config.two_step_time}")
    if config.eval_repeats < 1 or config.eval_samples < 2:
        parser.error(
            f"--eval-repeats must be >= 1 and --eval-samples >= 2; got {config.eval_repeats} and {config.eval_samples}"
        )
    if config.fourier_features < 0 or not config.fourier_scale > 0:
        parser.error(
            f"--fourier-features must be >= 0 and --fourier-scale > 0; "
            f"got {config.fourier_features} and {config.fourier_scale}"
        )
    if config.fm_fraction is not None and not 0.0 <= config.fm_fraction <= 1.0:
        parser.error(f"--fm-fraction must lie in [0, 1]; got {config.fm_fraction}")
    if config.metrics_every < 0:
        parser.error(f"--metrics-every must be >= 0; got {config.metrics_every}")
    if config.pretrain_steps < 0:
        parser.error(f"--pretrain-steps must be >= 0; got {config.pretrain_steps}")
    if config.init is not None and config.pretrain_steps:
        parser.error("--init and --pretrain-steps both give the velocity model to fine-tune: pass one")
    if config.init is not None and not Path(config.init).exists():
        parser.error(f"--init {config.init} does not exist")
    if config.init_convention and config.init is None:
        parser.error(f"--init-convention {config.init_convention} converts the --init network: give --init")
    if config.recipe == "finetune" and config.init is None and not config.pretrain_steps:
        parser.error("--recipe finetune fine-tunes a velocity model: give --init or --pretrain-steps")
    return config


def build_objective(config: ToyConfig) -> SoFlowObjective:
    objective = SoFlowObjective.from_preset(config.recipe)
    if objective.guidance is not None:  # the toy's classes replace ImageNet's 1000
        guidance = dataclasses.replace(objective.guidance, null_cond=NUM_CLASSES[config.toy])
        objective = dataclasses.replace(objective, guidance=guidance)
    weighting = dataclasses.replace(
        objective.weighting,
        **{k: v for k, v in (("p", config.p), ("eps", config.eps)) if v is not None},
    )
    objective = dataclasses.replace(objective, weighting=weighting)
    if config.fm_fraction is not None:
        objective = dataclasses.replace(objective, fm_fraction=config.fm_fraction)
    return objective


def build_model(config: ToyConfig, conditional: bool) -> MLPBackbone:
    return MLPBackbone(
        dim=2,
        width=config.width,
        depth=config.depth,
        fourier_features=config.fourier_features,
        fourier_scale=config.fourier_scale,
        num_classes=NUM_CLASSES[config.toy] if conditional else None,
    )


class Progress:
    """Progress through training: a tqdm bar on a terminal when tqdm is installed, else a plain line.

    The plain line (every ``every_s`` seconds and at the end) suits logs, where a bar's redraws
    would pile up. Both show the steps done, the rate and the time left; ``write`` prints a line
    without breaking the bar.
    """

    def __init__(self, total: int, enabled: bool, every_s: float = 5.0) -> None:
        self.total, self.enabled, self.every_s, self.done = total, enabled, every_s, 0
        self.start = self.shown = time.perf_counter()
        self.bar = None
        if enabled and sys.stdout.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stdout)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        if self.enabled and (now - self.shown >= self.every_s or self.done == self.total):
            self.shown = now
            rate = self.done / max(now - self.start, 1e-9)
            print(
                f"{self.done}/{self.total} steps ({100 * self.done / self.total:.0f} %), {rate:.1f} steps/s, "
                f"{(self.total - self.done) / rate:.0f} s left",
                flush=True,
            )

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


STAGE_NAMES = {"flow_matching": "Flow Matching"}  # a stage as the progress lines print it


def lr_factor(step: int, config: ToyConfig, steps: int | None = None) -> float:
    total = config.steps if steps is None else steps
    decay_steps = max(1, int(config.lr_decay_fraction * total))
    return min(1.0, (total - step) / decay_steps)


def fit(
    model: torch.nn.Module,
    objective: SoFlowObjective,
    config: ToyConfig,
    generator: torch.Generator,
    *,
    steps: int,
    conditional: bool,
    start: float,
    velocity_model: torch.nn.Module | None = None,
    stage: str | None = None,
    log: TextIO | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """``steps`` Adam steps of ``objective`` with the config's learning-rate decay; returns the EMA model.

    Rows of the training metrics go to ``log`` (with ``"stage": stage`` when given); ``start`` is
    the wall-clock start of the run, which their ``seconds`` count from.
    """
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    progress = Progress(steps, config.progress)
    extra = {} if velocity_model is None else {"velocity_model": velocity_model}
    label = "" if stage is None else f"{STAGE_NAMES.get(stage, stage)} "
    for step in range(steps):
        data, labels = sample_toy_2d(config.toy, config.batch_size, generator=generator)
        out = objective(
            model, data, labels if conditional else None, step=step, total_steps=steps, generator=generator, **extra
        )
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config, steps)
        optimizer.zero_grad(set_to_none=True)
        out.backprop.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - config.ema_decay)
        if on_step is not None:
            on_step(step, model)
        if not bool(out.metrics["finite"]):
            raise FloatingPointError(f"non-finite loss at {label}step {step}: {out.metrics}")
        if log is not None and (step % config.metrics_every == 0 or step == steps - 1):
            row = {"step": step, "r": objective.consistency_times.schedule(step, steps)}
            row |= {"lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
            row |= {} if stage is None else {"stage": stage}
            log.write(json.dumps(row | {k: v.item() for k, v in out.metrics.items()}) + "\n")
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            shown = " ".join(f"{k}={v.item():.4g}" for k, v in out.metrics.items() if k != "finite")
            progress.write(f"{label}step {step:>6}/{steps}  {shown}")
        progress.step()
    progress.close()
    return ema


def pretraining_objective(objective: SoFlowObjective) -> SoFlowObjective:
    """Flow Matching alone (λ = 1) with the plain squared error; labels dropped as the SoFlow recipe drops them."""
    guidance = objective.guidance
    if guidance is not None:  # train the null class too, without guidance
        guidance = ClassifierFreeGuidance(
            scale=1.0, drop_rate=max(guidance.drop_rate, 0.1), null_cond=guidance.null_cond
        )
    return SoFlowObjective(fm_fraction=1.0, weighting=AdaptiveWeighting(p=0.0), guidance=guidance)


def initial_model(config: ToyConfig, conditional: bool) -> torch.nn.Module:
    """The MLP that ``--init`` holds, converted (F independent of s, equal to its velocity)."""
    model = from_velocity_model(config.init, convention=config.init_convention or None).model.train()
    if not isinstance(model, MLPBackbone) or model.dim != 2:
        raise SystemExit(f"--init {config.init} holds a {type(model).__name__}, not an MLPBackbone on 2-D data")
    classes = NUM_CLASSES[config.toy] if conditional else None
    if model.num_classes != classes:
        raise SystemExit(
            f"--init {config.init} has num_classes={model.num_classes}; recipe {config.recipe} on {config.toy} "
            f"needs {classes}"
        )
    return model


def train(
    config: ToyConfig,
    objective: SoFlowObjective | None = None,
    *,
    metrics_path: Path | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[torch.nn.Module, SoFlowObjective, dict[str, float]]:
    """Train with the config's objective (or ``objective``), after Flow Matching pretraining when asked.

    Every ``config.metrics_every`` steps (and at the last) a row goes to ``metrics_path`` (JSON
    lines): the step, r(k, K), the learning rate, the seconds so far and every metric of the
    step (rows of the pretraining stage also have ``"stage": "flow_matching"``). ``on_step(step,
    model)`` is called after each SoFlow optimizer step with the trained (not EMA) model. Returns
    the EMA model, the objective and the training time: ``train_seconds`` (wall clock) and
    ``train_cpu_seconds`` (process CPU time, all threads together), pretraining included (also
    given alone as ``pretrain_seconds`` and ``pretrain_cpu_seconds``).
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    objective = build_objective(config) if objective is None else objective
    conditional = objective.guidance is not None
    model = initial_model(config, conditional) if config.init is not None else build_model(config, conditional)
    log = open(metrics_path, "w", buffering=1) if metrics_path and config.metrics_every else None  # noqa: SIM115
    start, cpu_start = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}
    if config.pretrain_steps:
        pretrained = fit(
            model, pretraining_objective(objective), config, generator, steps=config.pretrain_steps,
            conditional=conditional, start=start, stage="flow_matching", log=log,
        )  # fmt: skip
        seconds = {
            "pretrain_seconds": time.perf_counter() - start,
            "pretrain_cpu_seconds": time.process_time() - cpu_start,
        }
        model = from_velocity_model(pretrained).model.train()
    velocity_model = None
    if objective.consistency_velocity == "pretrained":
        velocity_model = copy.deepcopy(model).eval().requires_grad_(False)
    ema = fit(
        model, objective, config, generator, steps=config.steps, conditional=conditional, start=start,
        velocity_model=velocity_model, log=log, on_step=on_step,
    )  # fmt: skip
    if log is not None:
        log.close()
    seconds |= {"train_seconds": time.perf_counter() - start, "train_cpu_seconds": time.process_time() - cpu_start}
    return ema, objective, seconds


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: SoFlowObjective, config: ToyConfig) -> tuple[dict, dict]:
    """Energy distances (means over ``eval_repeats`` draws) and the samples of the first draw."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    n = config.eval_samples
    draws: list[dict] = []
    samples: dict = {}
    for repeat in range(config.eval_repeats):
        real, labels = sample_toy_2d(config.toy, n, generator=generator)
        real_again, _ = sample_toy_2d(config.toy, n, generator=generator)
        noise = torch.randn(n, 2, generator=generator)
        cond = labels if objective.guidance is not None else None
        start = time.perf_counter()
        one_step = sample_one_step(model, noise, param=objective.param, cond=cond)
        seconds = time.perf_counter() - start
        two_step = sample_few_step(
            model,
            noise,
            param=objective.param,
            path=objective.path,
            times=[1.0, config.two_step_time],
            cond=cond,
            generator=generator,
        )
        draw = {
            "energy_distance_1_step": energy_distance(one_step, real),
            "energy_distance_2_step": energy_distance(two_step, real),
            "energy_distance_real_vs_real_floor": energy_distance(real_again, real),
            "energy_distance_noise": energy_distance(noise, real),
        }
        if config.toy == "checkerboard":
            draw["share_on_squares_1_step"] = float(on_checkerboard(one_step).double().mean())
            draw["share_on_squares_2_step"] = float(on_checkerboard(two_step).double().mean())
        draws.append(draw)
        if repeat == 0:
            samples = {"data": real, "1 step": one_step, "2 steps": two_step}
            one_step_seconds = seconds
    metrics: dict = {key: statistics.fmean(d[key] for d in draws) for key in draws[0]}
    metrics["energy_distance_1_step_over_floor"] = metrics["energy_distance_1_step"] / max(
        metrics["energy_distance_real_vs_real_floor"], 1e-12
    )
    metrics.update(
        eval_samples=n,
        eval_repeats=config.eval_repeats,
        two_step_time=config.two_step_time,
        one_step_sampling_seconds=one_step_seconds,
    )
    return metrics, samples


def draw(samples: dict, metrics: dict, config: ToyConfig, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('matplotlib is needed for the picture: pip install -e ".[viz]"')
    keys = {"1 step": "1_step", "2 steps": "2_step"}
    floor = metrics["energy_distance_real_vs_real_floor"]
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
            ax.set_title(f"data ({config.toy})\nreal-vs-real floor {floor:.5f}")
            continue
        value = metrics[f"energy_distance_{keys[name]}"]
        label = f"SoFlow, {name}" + (f" (re-noised at t = {config.two_step_time:g})" if name == "2 steps" else "")
        detail = f"energy distance {value:.5f} ({value / max(floor, 1e-12):.1f}× floor)"
        share = metrics.get(f"share_on_squares_{keys[name]}")
        ax.set_title(label + "\n" + detail + ("" if share is None else f", {100 * share:.0f}% on squares"), fontsize=9)
    pretraining = f"{config.pretrain_steps} Flow Matching steps, then " if config.pretrain_steps else ""
    fig.suptitle(
        f"{pretraining}{config.steps} steps, batch {config.batch_size}, recipe {config.recipe}; metrics: means over "
        f"{config.eval_repeats} draws of {config.eval_samples} points; untrained (= noise) "
        f"{metrics['energy_distance_noise']:.4f}",
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
    torch.set_num_threads(config.threads)
    model, objective, seconds = train(config, metrics_path=out / "train_metrics.jsonl")
    metrics, samples = evaluate(model, objective, config)
    metrics.update(
        **seconds,
        steps=config.steps,
        device=f"cpu ({torch.get_num_threads()} threads)",
        torch=torch.__version__,
    )
    draw(samples, metrics, config, out / "samples.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    floor = metrics["energy_distance_real_vs_real_floor"]
    print(
        f"one-step energy distance {metrics['energy_distance_1_step']:.5f} "
        f"(untrained {metrics['energy_distance_noise']:.4f}, real-vs-real floor {floor:.5f}, "
        f"{metrics['energy_distance_1_step_over_floor']:.1f}x the floor); two-step "
        f"{metrics['energy_distance_2_step']:.5f}; trained in {seconds['train_seconds']:.0f} s "
        f"({seconds['train_cpu_seconds']:.0f} CPU s, {config.threads} thread(s)); "
        f"wrote {out / 'samples.png'} and {out / 'metrics.json'}"
    )
    return metrics


if __name__ == "__main__":
    main()
