"""One ω-conditioned SoFlow model sampled at several guidance scales against one fixed-ω model per scale.

    python benchmarks/guidance_at_sampling.py                      # full: 8 Gaussians + digits, 3 seeds
    python benchmarks/guidance_at_sampling.py --preset tiny        # seconds; CI runs this
    python benchmarks/guidance_at_sampling.py --datasets eight_gaussians --seeds 0 --toy-budget-s 30
    python benchmarks/guidance_at_sampling.py --table-from benchmarks/results/guidance_at_sampling.json  # redraw
    python benchmarks/guidance_at_sampling.py --table-from a.json,b.json --out-dir DIR  # merge runs (datasets)

Class-conditional data with known answers, on a CPU: the 8 Gaussians of ``soflow_core.data``
with their 8 classes, and the scikit-learn 8×8 digits with their 10 labels (the split, the
classifier and the backbones of ``quality_at_equal_budget.py``). For each dataset and seed,
ONE model is trained with ω drawn per sample from ``GuidanceScaleDistribution(low, high)`` (an
``MLPBackbone`` with ``omega_range``), and one model per measured ω is trained with that ω
baked in (the paper's recipe), each for the same budget of process CPU time with one torch
thread. Everything else is shared: initial weights per seed, optimizer, batch, learning-rate
decay, EMA and guidance settings (mix m, label-drop rate, decay time). The fixed model at ω = 1
is trained without label dropout, as one would train a model that never uses guidance. Only
training steps are timed (loss, backward, optimizer, EMA); progress through the budget drives
the learning-rate decay and SoFlow's r(k, K) schedule.

Evaluation (EMA weights; the same noise and labels for every model): each model at each ω it
can sample (the ω-conditioned one at every ω of ``curve_omegas``, a fixed one at its own), at 1
and 2 NFE (2 steps re-noise to t = 0.3). Samples are drawn class by class and compared with the
data of that class:

* toy: per-class energy distance (fidelity; real-vs-real floor beside it), per-class k-NN
  precision, recall and coverage (diversity), each averaged over the classes;
* digits: per-class Fréchet distance in the digit classifier's 64 features against the held-out
  digits of that class, class accuracy (the share the classifier assigns to the class asked
  for), and per-class precision, recall and coverage in the same features.

Guidance moves each class's samples away from the other classes, so fidelity to the class's
data worsens and diversity falls as ω grows, for every model: the comparison is between models
at the same ω. The verdict compares the 1-NFE headline (toy: per-class energy distance, digits:
per-class Fréchet distance) of the ω-conditioned model with the fixed model's, seed means and
per seed. Sampling time: one network evaluation per step for both, timed on the same batch.

Writes ``<out-dir>/<out>.json`` (rows with device, versions, commit, config), ``<out>.md``
(tables and verdicts), ``<out>-tradeoff.png`` (fidelity against coverage) and
``<out>-config.json``; default folder ``runs/benchmarks``.
"""

import copy
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, comma_list, environment, preset_parser, resolve_preset, write_rows
from quality_at_equal_budget import TOY, Classifier, Digits, QualityConfig, _plt, load_digits, train_classifier
from train_toy_2d import NUM_CLASSES

from soflow_core import ClassifierFreeGuidance, LogitNormal, SoFlowObjective, Uniform, sample_few_step
from soflow_core.data import sample_toy_2d
from soflow_core.guidance import GuidanceScaleDistribution, cfg_decay
from soflow_core.metrics import coverage, energy_distance, frechet_distance, knn_precision_recall
from soflow_core.nets import MLPBackbone

DATASETS = ("eight_gaussians", "checkerboard", "digits")
HEADLINE = {
    "digits": "frechet_distance",
    "eight_gaussians": "guided_energy_distance",
    "checkerboard": "energy_distance",
}
EIGHT_GAUSSIANS_STD = 0.2  # the modes of soflow_core.data's eight_gaussians: N(2·(cos, sin)(2πk/8), 0.2²)
METRICS = {
    "eight_gaussians": ("guided_energy_distance", "energy_distance", "precision", "recall", "coverage"),
    "checkerboard": ("energy_distance", "precision", "recall", "coverage"),
    "digits": ("frechet_distance", "class_accuracy", "precision", "recall", "coverage"),
}
METRIC_NAMES = {
    "guided_energy_distance": "energy distance to the exact guided distribution",
    "energy_distance": "per-class energy distance to the data",
    "frechet_distance": "per-class Fréchet distance",
    "class_accuracy": "class accuracy",
    "precision": "precision",
    "recall": "recall",
    "coverage": "coverage",
}
BASES = {"uniform": Uniform(), "logit_normal": LogitNormal(mean=0.0, std=1.0)}


@dataclass(frozen=True, kw_only=True)
class GuidanceConfig:
    """Everything that defines a run; saved beside its outputs and in every row."""

    datasets: tuple[str, ...] = ("eight_gaussians", "digits")
    seeds: tuple[int, ...] = (0, 1, 2)
    omegas: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)  # one fixed-ω model each; the ω-conditioned model at each
    curve_omegas: tuple[float, ...] = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)  # the ω-conditioned model's sweep
    omega_low: float = 1.0  # the ω-conditioned model's range
    omega_high: float = 3.0
    omega_base: str = "uniform"  # the distribution of u = (ω − low)/(high − low): uniform or logit_normal
    omega_unguided_share: float = 0.0  # share of samples at ω = 1 exactly, trained without guidance terms
    toy_budget_s: float = 60.0  # process CPU seconds of training per model on a toy (one thread)
    digits_budget_s: float = 120.0  # the same on the digits
    # guidance settings shared by every model (the ImageNet recipe's)
    mix: float = 0.25
    drop_rate: float = 0.1
    decay_time: float = 0.8
    # training recipe shared by every model: the quality benchmark's
    lr_decay_fraction: float = TOY.lr_decay_fraction
    ema_decay: float = TOY.ema_decay
    toy_batch_size: int = TOY.batch_size
    toy_lr: float = TOY.lr
    toy_width: int = TOY.width
    toy_depth: int = TOY.depth
    toy_fourier_features: int = TOY.fourier_features
    toy_fourier_scale: float = TOY.fourier_scale
    digits_batch_size: int = 256
    digits_lr: float = 1e-3
    digits_width: int = 384
    digits_depth: int = 3
    soflow_preset: str = "toy"  # SoFlowObjective.from_preset(...), plus the guidance above
    two_step_time: float = TOY.two_step_time  # the 2-NFE sampler re-noises here
    # evaluation
    toy_samples_per_class: int = 1024
    digit_samples_per_class: int = 200
    knn_k: int = 5  # the neighbour of precision, recall and coverage
    digits_test_fraction: float = 0.5  # as quality_at_equal_budget: held out from every training
    split_seed: int = 0
    classifier_seed: int = 0
    classifier_epochs: int = 300
    timing_samples: int = 4096  # one-step sampling time, fixed against ω-conditioned, on this many points
    timing_repeats: int = 20
    threads: int = 1
    out: str = "guidance_at_sampling"
    out_dir: str = ""  # default runs/benchmarks (--out-dir benchmarks/results: the committed results)


PRESETS = {
    "full": GuidanceConfig(),
    "tiny": GuidanceConfig(
        datasets=("eight_gaussians",),
        seeds=(0,),
        omegas=(1.0, 2.0),
        curve_omegas=(1.0, 1.5, 2.0),
        omega_high=2.0,
        toy_budget_s=0.5,
        digits_budget_s=0.5,
        toy_batch_size=128,
        toy_width=32,
        toy_depth=1,
        toy_fourier_features=4,
        digits_width=32,
        digits_depth=1,
        digits_batch_size=64,
        toy_samples_per_class=64,
        digit_samples_per_class=20,
        classifier_epochs=10,
        timing_samples=256,
        timing_repeats=3,
    ),
}


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Reference:
    """What a dataset's samples are scored against, class by class."""

    num_classes: int
    real: list[Tensor]  # per class: the reference points (toy) or features (digits)
    again: list[Tensor]  # per class: an independent real sample of the same size, for the floor
    noise: list[Tensor]  # per class: the noise every model samples from
    to_space: Callable[[Tensor], Tensor]  # samples to the space the metrics live in
    classify: Callable[[Tensor], Tensor] | None  # digits: predicted labels
    guided: dict[float, tuple[list[Tensor], list[Tensor]]] | None = None  # 8 Gaussians: ω -> (exact, again) per class


def toy_reference(dataset: str, seed: int, config: GuidanceConfig) -> Reference:
    classes = NUM_CLASSES[dataset]
    n = config.toy_samples_per_class
    generator = torch.Generator().manual_seed(10_000 + seed)
    pool, labels = sample_toy_2d(dataset, 4 * classes * n, generator=generator)
    real = [pool[labels == k][:n] for k in range(classes)]
    again = [pool[labels == k][n : 2 * n] for k in range(classes)]
    noise = [torch.randn(n, 2, generator=generator) for _ in range(classes)]
    guided = None
    if dataset == "eight_gaussians":
        guided = {}
        for omega in sorted({*config.omegas, *config.curve_omegas}):
            draws = [
                [exact_guided_samples(torch.randn(n, 2, generator=generator), k, omega, config) for k in range(classes)]
                for _ in range(2)
            ]
            guided[omega] = (draws[0], draws[1])
    return Reference(classes, real, again, noise, lambda x: x, None, guided)


def _posterior_mean(x: Tensor, t: float, labels: list[int]) -> Tensor:
    """E[data | x_t = x] for the 8-Gaussian mixture restricted to ``labels`` (equal weights), linear path."""
    angles = torch.tensor(labels, dtype=torch.float64) * (2 * math.pi / 8)
    mu = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    a, var = 1.0 - t, EIGHT_GAUSSIANS_STD**2
    s2 = a * a * var + t * t  # variance of x_t given the mode
    offset = x[:, None, :] - a * mu[None]
    means = mu[None] + (a * var / s2) * offset  # E[data | x_t, mode]
    weights = torch.softmax(-offset.square().sum(-1) / (2 * s2), dim=1)
    return (weights[..., None] * means).sum(dim=1)


def exact_guided_velocity(x: Tensor, t: float, label: int, omega: float, decay_time: float) -> Tensor:
    """The guided velocity the objective's fixed point is, from the exact 8-Gaussian velocities.

    v(x | c) = (x − E[data | x_t = x, c]) / t on the linear path; v_g = v_c + c(t)(ω − 1)(v_c − v_u).
    """
    v_c = (x - _posterior_mean(x, t, [label])) / t
    v_u = (x - _posterior_mean(x, t, list(range(8)))) / t
    gain = float(cfg_decay(torch.tensor([t], dtype=torch.float64), decay_time)[0]) * (omega - 1.0)
    return v_c + gain * (v_c - v_u)


def exact_guided_samples(noise: Tensor, label: int, omega: float, config: GuidanceConfig, steps: int = 200) -> Tensor:
    """The ω-guided ODE solved from ``noise`` (t = 1) to t = 1e-4 with RK4 in float64: what a perfect model samples.

    200 steps agree with 400 to 1e-5 at ω = 2; t stops at 1e-4, where v = (x − E[data | x])/t still has no 0/0.
    """
    x = noise.double()
    grid = torch.linspace(1.0, 1e-4, steps + 1, dtype=torch.float64).tolist()

    def v(y: Tensor, t: float) -> Tensor:
        return exact_guided_velocity(y, t, label, omega, config.decay_time)

    for t0, t1 in itertools.pairwise(grid):
        h = t1 - t0
        k1 = v(x, t0)
        k2 = v(x + 0.5 * h * k1, t0 + 0.5 * h)
        k3 = v(x + 0.5 * h * k2, t0 + 0.5 * h)
        k4 = v(x + h * k3, t1)
        x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x.float()


def digits_reference(digits: Digits, classifier: Classifier, seed: int, config: GuidanceConfig) -> Reference:
    generator = torch.Generator().manual_seed(10_000 + seed)
    n = config.digit_samples_per_class

    def features(images: Tensor) -> Tensor:
        with torch.no_grad():
            return classifier(images.clamp(-1.0, 1.0))[0]

    def classify(images: Tensor) -> Tensor:
        with torch.no_grad():
            return classifier(images.clamp(-1.0, 1.0))[1].argmax(dim=1)

    real = [features(digits.test[digits.test_labels == k]) for k in range(10)]
    again = [features(digits.train[digits.train_labels == k]) for k in range(10)]
    noise = [torch.randn(n, 64, generator=generator) for _ in range(10)]
    return Reference(10, real, again, noise, features, classify)


def batch_source(dataset: str, digits: Digits | None, batch_size: int) -> Callable[[torch.Generator], tuple]:
    if dataset == "digits":
        assert digits is not None

        def draw(g: torch.Generator) -> tuple[Tensor, Tensor]:
            idx = torch.randint(digits.train.shape[0], (batch_size,), generator=g)
            return digits.train[idx], digits.train_labels[idx]

        return draw
    return lambda g: sample_toy_2d(dataset, batch_size, generator=g)


# -------------------------------------------------------------------------------------- training


def scale_distribution(config: GuidanceConfig) -> GuidanceScaleDistribution:
    return GuidanceScaleDistribution(
        low=config.omega_low,
        high=config.omega_high,
        base=BASES[config.omega_base],
        unguided_share=config.omega_unguided_share,
    )


def build_objective(config: GuidanceConfig, scale: float | GuidanceScaleDistribution, classes: int) -> SoFlowObjective:
    """The toy recipe with guidance at ``scale``; a fixed ω = 1 drops no labels (it never needs the null class)."""
    drop = 0.0 if scale == 1.0 else config.drop_rate
    guidance = ClassifierFreeGuidance(
        scale=scale, mix=config.mix, drop_rate=drop, decay_time=config.decay_time, null_cond=classes
    )
    return SoFlowObjective.from_preset(config.soflow_preset, guidance=guidance)


def build_model(dataset: str, config: GuidanceConfig, omega_range: tuple[float, float] | None) -> MLPBackbone:
    """The quality benchmark's backbone for ``dataset``, with labels (and an ω input for the ω-conditioned model)."""
    if dataset == "digits":
        return MLPBackbone(
            dim=64, width=config.digits_width, depth=config.digits_depth, num_classes=10, omega_range=omega_range
        )
    return MLPBackbone(
        dim=2,
        width=config.toy_width,
        depth=config.toy_depth,
        fourier_features=config.toy_fourier_features,
        fourier_scale=config.toy_fourier_scale,
        num_classes=NUM_CLASSES[dataset],
        omega_range=omega_range,
    )


@dataclass
class Trained:
    name: str  # "conditioned" or "fixed"
    omega: float | None  # the baked-in ω of a fixed model
    model: MLPBackbone  # the EMA weights, in eval mode
    objective: SoFlowObjective
    steps: int
    seconds: float
    wall_seconds: float
    diverged: bool


def train(
    dataset: str, seed: int, config: GuidanceConfig, digits: Digits | None, omega: float | None, classes: int
) -> Trained:
    """Train the ω-conditioned model (``omega`` None) or the model with ``omega`` baked in, for the budget."""
    budget = config.digits_budget_s if dataset == "digits" else config.toy_budget_s
    conditioned = omega is None
    objective = build_objective(config, scale_distribution(config) if conditioned else omega, classes)
    torch.manual_seed(seed)  # the same initial weights (the ω embedding is built last, after the others)
    model = build_model(dataset, config, (config.omega_low, config.omega_high) if conditioned else None)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    lr = config.digits_lr if dataset == "digits" else config.toy_lr
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data_generator = torch.Generator().manual_seed(seed)
    loss_generator = torch.Generator().manual_seed(seed + 1)
    batch_size = config.digits_batch_size if dataset == "digits" else config.toy_batch_size
    draw = batch_source(dataset, digits, batch_size)
    used, wall, steps, diverged = 0.0, 0.0, 0, False
    total = 1_000_000  # r(k, K) depends on k/K only: the budget's progress, on a fine integer grid
    while used < budget:
        data, labels = draw(data_generator)
        start, wall_start = time.process_time(), time.perf_counter()
        progress = used / budget
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (1.0 - progress) / config.lr_decay_fraction)
        step = min(int(progress * total), total - 1)
        loss = objective(model, data, labels, step=step, total_steps=total, generator=loss_generator).backprop
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - config.ema_decay)
        used += time.process_time() - start
        wall += time.perf_counter() - wall_start
        steps += 1
        if steps % 100 == 0 and not math.isfinite(float(loss.detach())):
            diverged = True
            break
    name = "conditioned" if conditioned else "fixed"
    return Trained(name, omega, ema, objective, steps, used, wall, diverged)


# ------------------------------------------------------------------------------------ evaluation


def sample_class(
    trained: Trained, noise: Tensor, label: int, omega: float, nfe: int, seed: int, config: GuidanceConfig
) -> Tensor:
    """Samples of one class at ``nfe`` evaluations; ω goes to the ω-conditioned model only."""
    times = (1.0,) if nfe == 1 else (1.0, config.two_step_time)
    cond = torch.full((noise.shape[0],), label, dtype=torch.long)
    extra = {"omega": omega} if trained.name == "conditioned" else {}
    return sample_few_step(
        trained.model,
        noise,
        param=trained.objective.param,
        path=trained.objective.path,
        times=times,
        cond=cond,
        generator=torch.Generator().manual_seed(20_000 + seed + label),
        **extra,
    )


def score(
    samples: list[Tensor], reference: Reference, config: GuidanceConfig, digits: bool, omega: float
) -> dict[str, float]:
    """The per-class metrics of one model at one ω and NFE, averaged over the classes."""
    per_class: dict[str, list[float]] = {}
    for k, images in enumerate(samples):
        points = reference.to_space(images)
        precision, recall = knn_precision_recall(points, reference.real[k], k=config.knn_k)
        values = {
            "precision": precision,
            "recall": recall,
            "coverage": coverage(points, reference.real[k], k=config.knn_k),
        }
        if digits:
            assert reference.classify is not None
            values["frechet_distance"] = frechet_distance(points, reference.real[k])
            values["class_accuracy"] = float((reference.classify(images) == k).double().mean())
        else:
            values["energy_distance"] = energy_distance(points, reference.real[k])
            if reference.guided is not None:
                values["guided_energy_distance"] = energy_distance(points, reference.guided[omega][0][k])
        for key, value in values.items():
            per_class.setdefault(key, []).append(value)
    return {key: statistics.fmean(values) for key, values in per_class.items()}


def floor_scores(reference: Reference, config: GuidanceConfig, digits: bool) -> dict[str, float]:
    """The same metrics for real data against the reference: held-out vs training digits, two toy draws."""
    per_class: dict[str, list[float]] = {}
    for k in range(reference.num_classes):
        points, real = reference.again[k], reference.real[k]
        precision, recall = knn_precision_recall(points, real, k=config.knn_k)
        values = {"precision": precision, "recall": recall, "coverage": coverage(points, real, k=config.knn_k)}
        if digits:
            values["frechet_distance"] = frechet_distance(points, real)
            values["class_accuracy"] = float("nan")
        else:
            values["energy_distance"] = energy_distance(points, real)
        for key, value in values.items():
            per_class.setdefault(key, []).append(value)
    return {key: statistics.fmean(values) for key, values in per_class.items()}


def guided_floors(reference: Reference) -> dict[float, float]:
    """Per ω: the energy distance between two independent exact draws of the guided distribution (class mean)."""
    assert reference.guided is not None
    return {
        omega: statistics.fmean(energy_distance(again[k], exact[k]) for k in range(reference.num_classes))
        for omega, (exact, again) in reference.guided.items()
    }


def sampling_seconds(conditioned: Trained, fixed: Trained, omega: float, classes: int, config: GuidanceConfig) -> dict:
    """Median one-step sampling CPU time of both models on the same batch, interleaved (one thread)."""
    generator = torch.Generator().manual_seed(0)
    dim = conditioned.model.dim
    noise = torch.randn(config.timing_samples, dim, generator=generator)
    labels = torch.randint(0, classes, (config.timing_samples,), generator=generator)
    timings: dict[str, list[float]] = {"fixed": [], "conditioned": []}
    runs = {"fixed": (fixed, {}), "conditioned": (conditioned, {"omega": omega})}
    for repeat in range(config.timing_repeats + 2):
        for name, (trained, extra) in runs.items():
            # process CPU time with one thread: what the call costs, whatever else runs on the machine
            start = time.process_time()
            sample_few_step(
                trained.model, noise, param=trained.objective.param, path=trained.objective.path, times=(1.0,),
                cond=labels, **extra,
            )  # fmt: skip
            if repeat >= 2:  # two warm-up rounds
                timings[name].append(time.process_time() - start)
    fixed_ms = 1000 * statistics.median(timings["fixed"])
    conditioned_ms = 1000 * statistics.median(timings["conditioned"])
    return {"fixed_ms": fixed_ms, "conditioned_ms": conditioned_ms, "ratio": conditioned_ms / fixed_ms}


# ---------------------------------------------------------------------------------------- the grid


def run(config: GuidanceConfig) -> tuple[list[dict], dict]:
    """Train and evaluate the grid; return the rows and the first seed's samples for the figure."""
    torch.set_num_threads(config.threads)
    env = environment(torch.device("cpu"))
    base = {**env, "config": dataclasses.asdict(config)}
    rows: list[dict] = []
    digits = classifier = None
    if "digits" in config.datasets:
        split = QualityConfig(
            digits_test_fraction=config.digits_test_fraction,
            split_seed=config.split_seed,
            classifier_seed=config.classifier_seed,
            classifier_epochs=config.classifier_epochs,
        )
        digits = load_digits(split)
        classifier, accuracy = train_classifier(digits, split)
        rows.append({"kind": "classifier", "dataset": "digits", "test_accuracy": accuracy, **base})
        print(f"digit classifier: held-out accuracy {accuracy:.4f}", flush=True)
    samples_for_figure: dict = {}
    for dataset in config.datasets:
        is_digits = dataset == "digits"
        for seed_index, seed in enumerate(config.seeds):
            if is_digits:
                assert digits is not None and classifier is not None
                reference = digits_reference(digits, classifier, seed, config)
            else:
                reference = toy_reference(dataset, seed, config)
            floor = floor_scores(reference, config, is_digits)
            rows.append({"kind": "floor", "dataset": dataset, "seed": seed, **floor, **base})
            if reference.guided is not None:
                for omega, value in guided_floors(reference).items():
                    row = {"kind": "guided_floor", "dataset": dataset, "seed": seed, "omega": omega}
                    rows.append({**row, "guided_energy_distance": value, **base})
            # the ω-conditioned model first on even seed positions, last on odd ones
            plans: list[float | None] = [None, *config.omegas]
            if seed_index % 2:
                plans = [*config.omegas, None]
            models: dict[float | None, Trained] = {}
            for omega in plans:
                trained = train(dataset, seed, config, digits, omega, reference.num_classes)
                models[omega] = trained
                label = "ω-conditioned" if omega is None else f"fixed ω = {omega:g}"
                print(
                    f"{dataset:16s} seed {seed} {label:16s} {trained.steps:6d} steps in {trained.seconds:6.1f} s CPU "
                    f"({trained.wall_seconds:.1f} s wall)" + (" (diverged)" if trained.diverged else ""),
                    flush=True,
                )
            for omega, trained in models.items():
                sweep = config.curve_omegas if omega is None else (omega,)
                for w in sweep:
                    for nfe in (1, 2):
                        samples = [
                            sample_class(trained, reference.noise[k], k, w, nfe, seed, config)
                            for k in range(reference.num_classes)
                        ]
                        finite = all(bool(torch.isfinite(x).all()) for x in samples)
                        keys = METRICS[dataset]
                        metrics = (
                            score(samples, reference, config, is_digits, w) if finite else dict.fromkeys(keys, math.nan)
                        )
                        rows.append(
                            {
                                "kind": "sample",
                                "dataset": dataset,
                                "seed": seed,
                                "model": trained.name,
                                "omega": w,
                                "nfe": nfe,
                                "steps": trained.steps,
                                "train_seconds": trained.seconds,
                                "train_wall_seconds": trained.wall_seconds,
                                "diverged": trained.diverged or not finite,
                                **metrics,
                                **base,
                            }
                        )
                        print(
                            f"{'':16s}   {trained.name:11s} ω {w:4.2f} NFE {nfe}: "
                            + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                            flush=True,
                        )
                        if seed_index == 0 and nfe == 1:
                            samples_for_figure.setdefault(dataset, {})[(trained.name, w)] = samples
            for omega in config.omegas:
                timing = sampling_seconds(models[None], models[omega], omega, reference.num_classes, config)
                rows.append({"kind": "timing", "dataset": dataset, "seed": seed, "omega": omega, **timing, **base})
    rows.extend(seed_means(rows, base))
    return rows, samples_for_figure


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def seed_means(rows: list[dict], base: dict) -> list[dict]:
    """Seed-averaged rows (``seed: "mean"``) with the seeds' standard deviation as ``<metric>_std``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["kind"] in ("sample", "floor", "guided_floor", "timing"):
            key = (row["kind"], row["dataset"], row.get("model"), row.get("omega"), row.get("nfe"))
            groups.setdefault(key, []).append(row)
    means = []
    for (kind, dataset, model, omega, nfe), members in groups.items():
        metric_keys = METRICS[dataset]
        keys = {
            "sample": (*metric_keys, "steps", "train_seconds", "train_wall_seconds"),
            "floor": tuple(k for k in metric_keys if k != "guided_energy_distance"),
            "guided_floor": ("guided_energy_distance",),
            "timing": ("fixed_ms", "conditioned_ms", "ratio"),
        }[kind]
        row: dict = {"kind": kind, "dataset": dataset, "seed": "mean", "num_seeds": len(members)}
        if kind == "sample":
            row.update(model=model, omega=omega, nfe=nfe, diverged=sum(bool(m["diverged"]) for m in members))
        if kind in ("timing", "guided_floor"):
            row.update(omega=omega)
        for key in keys:
            row[key], row[f"{key}_std"] = _mean_std([float(m[key]) for m in members])
        means.append({**row, **base})
    return means


# --------------------------------------------------------------------------------------- reports


def _find(rows: list[dict], **match: object) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _fmt(value: float, spread: float | None = None) -> str:
    if not math.isfinite(value):
        return "–"
    text = f"{value:.4g}"
    return text if spread is None else f"{text} ± {spread:.2g}"


def verdicts(rows: list[dict], dataset: str, config: GuidanceConfig, nfe: int = 1) -> list[str]:
    """The ω-conditioned model against the fixed one at each ω: headline ratio of seed means, and per seed."""
    key = HEADLINE[dataset]
    lines = []
    for omega in config.omegas:
        ours = _find(rows, kind="sample", dataset=dataset, seed="mean", model="conditioned", omega=omega, nfe=nfe)
        theirs = _find(rows, kind="sample", dataset=dataset, seed="mean", model="fixed", omega=omega, nfe=nfe)
        if ours is None or theirs is None:
            continue
        ratio = ours[key] / theirs[key]
        per_seed = []
        for seed in config.seeds:
            a = _find(rows, kind="sample", dataset=dataset, seed=seed, model="conditioned", omega=omega, nfe=nfe)
            b = _find(rows, kind="sample", dataset=dataset, seed=seed, model="fixed", omega=omega, nfe=nfe)
            if a is not None and b is not None:
                per_seed.append(a[key] / b[key])
        within = sum(r <= 1.10 for r in per_seed)
        mark = "within 10 %" if ratio <= 1.10 else "NOT within 10 %"
        lines.append(
            f"ω = {omega:g}: {METRIC_NAMES[key]} {ours[key]:.4g} (ω-conditioned) vs {theirs[key]:.4g} (fixed), "
            f"ratio {ratio:.3f}: **{mark}**; per seed {', '.join(f'{r:.2f}' for r in per_seed)} "
            f"({within} of {len(per_seed)} within 10 %)."
        )
    return lines


def markdown_table(rows: list[dict], config: GuidanceConfig) -> str:
    env = next(r for r in rows if "device" in r)
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; commit {env['commit']}. Training budget per model: "
        f"{config.toy_budget_s:g} s (toys) and {config.digits_budget_s:g} s (digits) of process CPU time, one thread. "
        f"The ω-conditioned model draws ω ~ {config.omega_base} on [{config.omega_low:g}, {config.omega_high:g}]"
        + (f" with {config.omega_unguided_share:g} of the samples at ω = 1" if config.omega_unguided_share else "")
        + "; "
        f"every model: m = {config.mix:g}, drop rate {config.drop_rate:g} (0 for the fixed ω = 1 model), "
        f"t_d = {config.decay_time:g}. Seeds {', '.join(map(str, config.seeds))}; values are seed means ± the "
        "seeds' standard deviation; metrics are per class, averaged over the classes.",
        "",
    ]
    for row in rows:
        if row["kind"] == "classifier":
            lines += [f"Digit classifier (64-256-64-10 MLP): held-out accuracy {row['test_accuracy']:.4f}.", ""]
    for dataset in config.datasets:
        digits = dataset == "digits"
        keys = METRICS[dataset]
        n = config.digit_samples_per_class if digits else config.toy_samples_per_class
        lines += [f"### {dataset} ({n} samples per class)", ""]
        for nfe in (1, 2):
            lines += [
                f"**{nfe} NFE**",
                "",
                "| ω | model | steps in budget | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |",
                "|---|---|---|" + "---|" * len(keys),
            ]
            shown = sorted({*config.omegas, *config.curve_omegas})
            for omega in shown:
                for model in ("fixed", "conditioned"):
                    row = _find(rows, kind="sample", dataset=dataset, seed="mean", model=model, omega=omega, nfe=nfe)
                    if row is None:
                        continue
                    label = "fixed ω" if model == "fixed" else "ω-conditioned"
                    flag = f" ({row['diverged']} diverged)" if row["diverged"] else ""
                    cells = [_fmt(row[k], row.get(f"{k}_std")) for k in keys]
                    steps = f"{row['steps']:.0f} ± {row['steps_std']:.0f}"
                    lines.append(f"| {omega:g} | {label}{flag} | {steps} | " + " | ".join(cells) + " |")
            floor = _find(rows, kind="floor", dataset=dataset, seed="mean")
            if floor is not None:
                label = "held-out vs training digits" if digits else "real vs real"
                cells = [_fmt(floor.get(k, math.nan)) for k in keys]
                lines.append(f"| – | {label} (floor) | – | " + " | ".join(cells) + " |")
            lines.append("")
            guided = sorted(
                (r for r in rows if r["kind"] == "guided_floor" and r["dataset"] == dataset and r["seed"] == "mean"),
                key=lambda r: r["omega"],
            )
            if guided:
                floors = ", ".join(f"{r['omega']:g}: {r['guided_energy_distance']:.3g}" for r in guided)
                lines += [
                    "The exact guided distribution: the ω-guided ODE of the exact 8-Gaussian velocities, solved from "
                    "noise with RK4 (200 steps, float64); its floor (two independent exact draws) by ω: "
                    + floors
                    + ".",
                    "",
                ]
            lines += [f"ω-conditioned vs fixed at {nfe} NFE: " + line for line in verdicts(rows, dataset, config, nfe)]
            lines.append("")
        timings = [r for r in rows if r["kind"] == "timing" and r["dataset"] == dataset and r["seed"] == "mean"]
        if timings:
            parts = [
                f"ω = {r['omega']:g}: {r['conditioned_ms']:.3g} ms vs {r['fixed_ms']:.3g} ms ({r['ratio']:.2f}×)"
                for r in sorted(timings, key=lambda r: r["omega"])
            ]
            lines += [
                f"One-step sampling time of {config.timing_samples} samples (process CPU time, median of "
                f"{config.timing_repeats}, ω-conditioned vs fixed, one thread): " + "; ".join(parts) + ".",
                "",
            ]
    return "\n".join(lines) + "\n"


TRADEOFF = {  # the trade-off panel: diversity (x), fidelity (y) and whether higher fidelity is better
    "eight_gaussians": ("coverage", "energy_distance", False),
    "checkerboard": ("coverage", "energy_distance", False),
    "digits": ("recall", "precision", True),  # class accuracy is 0.99-1.0 at every ω: no trade-off to see
}
SHORT_NAMES = {
    "guided_energy_distance": "energy distance to exact guided",
    "energy_distance": "energy distance to the class data",
    "frechet_distance": "Fréchet distance to the class data",
    "class_accuracy": "class accuracy",
    "precision": "precision (k-NN, classifier features)",
    "recall": "recall (k-NN, classifier features)",
    "coverage": "coverage of the class data",
}


def _curve(rows: list[dict], dataset: str, nfe: int) -> list[dict]:
    """The ω-conditioned model's seed means at ``nfe``, by increasing ω."""
    picked = [
        r for r in rows
        if r["kind"] == "sample" and r["dataset"] == dataset and r["seed"] == "mean" and r["model"] == "conditioned"
        and r["nfe"] == nfe
    ]  # fmt: skip
    return sorted(picked, key=lambda r: r["omega"])


def draw_tradeoff(rows: list[dict], config: GuidanceConfig, folder: Path, nfe: int = 1) -> Path:
    """Per dataset, at ``nfe``: the headline against ω, and fidelity against coverage (diversity).

    The ω-conditioned model's sweep is a line, the fixed-ω models are points with the seeds' spread.
    """
    plt = _plt()
    device = next(r["device"] for r in rows if "device" in r)
    columns = len(config.datasets)
    fig, axes = plt.subplots(2, columns, figsize=(4.8 * columns, 8.0), squeeze=False)
    blue, red = "#1f77b4", "#d62728"
    for c, dataset in enumerate(config.datasets):
        curve = _curve(rows, dataset, nfe)
        fixed = [
            p
            for omega in config.omegas
            if (p := _find(rows, kind="sample", dataset=dataset, seed="mean", model="fixed", omega=omega, nfe=nfe))
        ]
        # top: how well each model samples at ω (headline, lower is better)
        key = HEADLINE[dataset]
        ax = axes[0][c]
        ax.plot([p["omega"] for p in curve], [p[key] for p in curve], "-o", ms=3, color=blue,
                label="one ω-conditioned model")  # fmt: skip
        ax.fill_between([p["omega"] for p in curve], [p[key] - p[f"{key}_std"] for p in curve],
                        [p[key] + p[f"{key}_std"] for p in curve], color=blue, alpha=0.15, lw=0)  # fmt: skip
        ax.errorbar([p["omega"] for p in fixed], [p[key] for p in fixed], yerr=[p[f"{key}_std"] for p in fixed],
                    fmt="s", ms=5, color=red, capsize=2, label="one fixed-ω model per ω")  # fmt: skip
        guided = [r for r in rows if r["kind"] == "guided_floor" and r["dataset"] == dataset and r["seed"] == "mean"]
        floor = _find(rows, kind="floor", dataset=dataset, seed="mean")
        if key == "guided_energy_distance" and guided:
            guided.sort(key=lambda r: r["omega"])
            ax.plot([r["omega"] for r in guided], [r[key] for r in guided], "--", color="gray", lw=0.8,
                    label="floor (two exact draws)")  # fmt: skip
        elif floor is not None:
            ax.axhline(floor[key], ls="--", color="gray", lw=0.8, label="floor (real data)")
        ax.set_yscale("log")
        ax.set_xlabel("guidance scale ω")
        ax.set_ylabel(SHORT_NAMES[key] + " (lower is better)")
        ax.set_title(f"{dataset}, {nfe} NFE: quality at each ω", fontsize=9)
        ax.legend(fontsize=7)
        # bottom: the trade-off guidance makes, fidelity against diversity
        x, key, higher = TRADEOFF[dataset]
        ax = axes[1][c]
        ax.plot([p[x] for p in curve], [p[key] for p in curve], "-o", ms=3, color=blue,
                label="one ω-conditioned model")  # fmt: skip
        for p in curve:
            ax.annotate(f"{p['omega']:g}", (p[x], p[key]), fontsize=7, color=blue, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.errorbar([p[x] for p in fixed], [p[key] for p in fixed], xerr=[p[f"{x}_std"] for p in fixed],
                    yerr=[p[f"{key}_std"] for p in fixed], fmt="s", ms=5, color=red, capsize=2,
                    label="one fixed-ω model per ω")  # fmt: skip
        for p in fixed:
            ax.annotate(f"{p['omega']:g}", (p[x], p[key]), fontsize=7, color=red, xytext=(3, -9),
                        textcoords="offset points")  # fmt: skip
        if not higher:
            ax.set_yscale("log")
        ax.set_xlabel(SHORT_NAMES[x] + " (diversity)")
        ax.set_ylabel(SHORT_NAMES[key] + (" (higher: more faithful)" if higher else " (lower: closer)"))
        ax.set_title(f"{dataset}, {nfe} NFE: fidelity against diversity, labels ω", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        "Guidance chosen at sampling: one ω-conditioned SoFlow model against one model per ω "
        f"(seed means of {len(config.seeds)} seeds;\n{config.toy_budget_s:g} / {config.digits_budget_s:g} CPU seconds "
        f"of training per model on the toy / the digits; {device})",
        fontsize=9,
    )
    fig.tight_layout()
    path = folder / f"{config.out}-tradeoff.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- CLI


def _tuples(value: object) -> object:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def merge_results(files: list[Path], folder: Path, stem: str) -> Path:
    """Rows of runs on different datasets (same settings otherwise) as one results file, its config their union."""
    runs = [json.loads(f.read_text()) for f in files]
    configs = [run[0]["config"] for run in runs]
    datasets = [d for config in configs for d in config["datasets"]]
    if len(set(datasets)) != len(datasets):
        raise SystemExit(f"--table-from: the files must hold different datasets; got {datasets}")
    merged = []
    for run in runs:
        for row in run:
            if row.get("kind") == "classifier" and any(r.get("kind") == "classifier" for r in merged):
                continue
            merged.append({**row, "config": {**row["config"], "datasets": datasets}})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return path


def parse_config(argv: list[str] | None = None) -> tuple[GuidanceConfig, Path | None]:
    """The preset named by ``--preset`` with command-line overrides (or the configuration of ``--table-from``).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The configuration, and the results file of ``--table-from`` (else None).
    """
    parser = preset_parser(__doc__, PRESETS, "full")
    parser.add_argument("--seeds", type=comma_list(int), help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--datasets", type=comma_list(), help="comma-separated, from " + ", ".join(DATASETS))
    parser.add_argument("--omegas", type=comma_list(float), help="the measured ω: one fixed-ω model each")
    parser.add_argument("--curve-omegas", dest="curve_omegas", type=comma_list(float), help="the ω-model's sweep")
    parser.add_argument("--omega-low", dest="omega_low", type=float, help="the ω-conditioned model's lowest ω")
    parser.add_argument("--omega-high", dest="omega_high", type=float, help="the ω-conditioned model's highest ω")
    parser.add_argument("--omega-base", dest="omega_base", choices=sorted(BASES), help="distribution of ω in range")
    parser.add_argument(
        "--omega-unguided-share", dest="omega_unguided_share", type=float, help="share of samples at ω = 1 exactly"
    )
    parser.add_argument("--toy-budget-s", dest="toy_budget_s", type=float, help="CPU seconds per model (toys)")
    parser.add_argument("--digits-budget-s", dest="digits_budget_s", type=float, help="CPU seconds per model (digits)")
    parser.add_argument("--mix", type=float, help="the guidance mix m of every model")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="file stem of the outputs")
    parser.add_argument("--out-dir", dest="out_dir", help="output folder; empty: runs/benchmarks")
    parser.add_argument(
        "--table-from",
        dest="table_from",
        metavar="JSON",
        help="only redraw the table and figure of a results file; several (comma-separated, one dataset each) are "
        "merged into <--out-dir>/<--out>.json first",
    )
    args = parser.parse_args(argv)
    if args.table_from:
        files = [Path(f) for f in args.table_from.split(",") if f]
        if len(files) > 1:
            files = [
                merge_results(files, Path(args.out_dir) if args.out_dir else RESULTS, args.out or PRESETS["full"].out)
            ]
        saved = json.loads(files[0].read_text())[0]["config"]
        fields = {f.name for f in dataclasses.fields(GuidanceConfig)}
        return GuidanceConfig(**{k: _tuples(v) for k, v in saved.items() if k in fields}), files[0]
    config = resolve_preset(args, PRESETS, ignore=("table_from",))
    unknown = sorted(set(config.datasets) - set(DATASETS))
    if unknown or not config.datasets:
        parser.error(
            f"--datasets: unknown or empty {unknown or list(config.datasets)}; choose from {', '.join(DATASETS)}"
        )
    if not config.seeds:
        parser.error("--seeds: give at least one seed")
    if not 0.0 <= config.omega_low <= config.omega_high:
        parser.error(
            f"--omega-low and --omega-high must satisfy 0 <= low <= high; got {config.omega_low}, {config.omega_high}"
        )
    outside = [w for w in (*config.omegas, *config.curve_omegas) if not config.omega_low <= w <= config.omega_high]
    if outside or not config.omegas or any(w < 1.0 for w in config.omegas):
        parser.error(
            f"--omegas (>= 1, a fixed model each) and --curve-omegas must lie in [--omega-low, --omega-high] = "
            f"[{config.omega_low:g}, {config.omega_high:g}]; got {list(config.omegas)} and {list(config.curve_omegas)}"
        )
    if not (config.toy_budget_s > 0 and config.digits_budget_s > 0):
        parser.error(f"the budgets must be > 0; got {config.toy_budget_s} and {config.digits_budget_s}")
    if config.threads < 1:
        parser.error(f"--threads must be >= 1; got {config.threads}")
    if "digits" in config.datasets:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            parser.error('the digits need scikit-learn: pip install -e ".[bench]"')
    return config, None


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, and write the rows, table, figure and resolved config."""
    config, saved = parse_config(argv)
    if saved is not None:
        rows = json.loads(saved.read_text())
        md_path = saved.with_suffix(".md")
        md_path.write_text(markdown_table(rows, config))
        print(f"redrew {md_path} and {draw_tradeoff(rows, config, saved.parent)}")
        return 0
    folder = Path(config.out_dir) if config.out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, _ = run(config)  # records the commit first, before this run writes any file
    (folder / f"{config.out}-config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    table = markdown_table(rows, config)
    json_path, md_path = write_rows(config.out, rows, table, directory=folder)
    figure = draw_tradeoff(rows, config, folder)
    print(table)
    print(f"wrote {json_path}, {md_path} and {figure} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
