"""Sample quality of SoFlow, MeanFlow and Flow Matching trained for the same wall-clock budget.

    python benchmarks/quality_at_equal_budget.py                   # full: 3 toys + digits, 3 seeds
    python benchmarks/quality_at_equal_budget.py --preset tiny     # seconds; CI runs this
    python benchmarks/quality_at_equal_budget.py --budget-s 120 --seeds 0,1 --datasets checkerboard,digits
    python benchmarks/quality_at_equal_budget.py --table-from benchmarks/results/quality_at_equal_budget.json  # redraw

Data with known answers, on a CPU: the 2-D toys of ``soflow_core.data`` (checkerboard, 8
Gaussians, two moons) and the 8×8 digits that ship with scikit-learn (pixels 0..16 scaled to
[−1, 1], 64 dimensions, unconditional). Every method trains the same backbone
(``MLPBackbone``, same initial weights per seed; on the toys the main command's, with random
Fourier features of the input) with the same optimizer, batch, learning-rate decay and EMA, for
the same budget of process CPU time with one torch thread, which other jobs on the machine
barely change (wall-clock time would charge their load to whichever method ran beside it).
Only training steps are timed (``time.process_time`` around loss, backward, optimizer and EMA
update; drawing the batch and evaluating are outside). Progress through the budget (used /
budget) drives both the learning-rate decay and SoFlow's r(k, K) schedule, since the number of
steps is not known in advance. Methods run one after the other, in an order rotated per seed.
Each method trains with its own loss settings: SoFlow with ``SoFlowObjective.from_preset("toy")``,
Flow Matching with the plain squared error (p = 0), MeanFlow with its authors' CIFAR-10 settings.

Evaluation (EMA weights, the same noise for every method): SoFlow and MeanFlow at 1, 2, 4
network evaluations (NFE; SoFlow's 2-step sampler re-noises to t = 0.3, its 4-step one to the
uniform grid), Flow Matching with 1 … 100 Euler steps. 2-D: energy distance, MMD²
with a fixed set of Gaussian bandwidths and sliced Wasserstein-2 with fixed seeded directions,
each beside its real-vs-real floor. Digits: a small classifier trained here on the training
split gives a Fréchet distance in its penultimate-layer features (against held-out digits,
floor = two halves of the held-out split) and confidence-based scores.

Writes ``<out-dir>/<out>.json`` (rows with device, versions, commit, config), ``<out>.md``
(tables), ``<out>-samples-<dataset>.png`` (methods × NFE), ``<out>-vs-nfe.png`` and
``<out>-config.json`` (``--out-dir``, default ``runs/benchmarks``; ``--out-dir benchmarks/results``
writes the committed results).
"""

import copy
import dataclasses
import hashlib
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
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import RESULTS, comma_list, environment, preset_parser, resolve_preset, write_rows
from train_toy_2d import ToyConfig
from train_toy_2d import build_model as build_toy_model

from soflow_core import AdaptiveWeighting, EulerParam, SoFlowObjective, sample_few_step
from soflow_core.data import TOY_DISTRIBUTIONS, sample_toy_2d
from soflow_core.metrics import energy_distance, frechet_distance, mmd, sliced_wasserstein
from soflow_core.nets import MLPBackbone

DATASETS = (*TOY_DISTRIBUTIONS, "digits")
METHODS = ("soflow", "meanflow", "flow_matching")
LABELS = {"soflow": "SoFlow", "meanflow": "MeanFlow", "flow_matching": "Flow Matching (Euler)"}
TOY_METRICS = ("energy_distance", "mmd", "sliced_wasserstein")
DIGIT_METRICS = ("frechet_distance", "mean_confidence", "confident_fraction", "class_entropy", "class_coverage")
METRIC_NAMES = {
    "energy_distance": "energy distance",
    "mmd": "MMD²",
    "sliced_wasserstein": "sliced W₂",
    "frechet_distance": "Fréchet distance",
    "mean_confidence": "mean confidence",
    "confident_fraction": "confident fraction",
    "class_entropy": "class entropy (nats)",
    "class_coverage": "classes covered",
}
LOWER_IS_BETTER = ("energy_distance", "mmd", "sliced_wasserstein", "frechet_distance")
HEADLINE = {"digits": "frechet_distance", **{name: "energy_distance" for name in TOY_DISTRIBUTIONS}}
# The CIFAR-10 settings of the authors' PyTorch port of MeanFlow (github.com/Gsunshine/py-meanflow).
MEANFLOW_SETTINGS = {"p": 0.75, "eps": 1e-3, "ratio_r_neq_t": 0.75, "time_mean": -0.6, "time_std": 1.6}
MEANFLOW_R = {"r_mean": -4.0, "r_std": 1.6}


TOY = ToyConfig()  # the main command's training recipe, shared by every method on the toys


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    """Everything that defines a run; saved beside its outputs and in every row."""

    datasets: tuple[str, ...] = DATASETS
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    budget_s: float = 60.0  # process CPU seconds of training per method, dataset and seed (one thread)
    # SoFlow's sampler: one tuple of re-noising times per NFE (2 steps through t = 0.3, 4 on the uniform grid)
    soflow_times: tuple[tuple[float, ...], ...] = ((1.0,), (1.0, TOY.two_step_time), (1.0, 0.75, 0.5, 0.25))
    meanflow_nfe: tuple[int, ...] = (1, 2, 4)
    flow_matching_nfe: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 100)
    # training recipe shared by every method: on the toys the main command's (examples/train_toy_2d.py)
    lr_decay_fraction: float = TOY.lr_decay_fraction  # linear decay to 0 over this last share of the budget
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
    # each method's own loss settings
    soflow_preset: str = "toy"  # SoFlowObjective.from_preset(...), on every dataset
    flow_matching_p: float = 0.0  # the plain squared error: any p > 0 biases the learned velocity
    meanflow_jvp: str = "shared_primal"
    # evaluation
    toy_samples: int = 4096
    toy_eval_draws: int = 5  # toy metrics and floors: the mean over this many independent draws
    digit_samples: int = 2000
    mmd_bandwidths: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)
    sw_projections: int = 256
    sw_seed: int = 12345
    digits_test_fraction: float = 0.5  # held out from generative and classifier training
    split_seed: int = 0
    classifier_seed: int = 0
    classifier_epochs: int = 300
    confidence_threshold: float = 0.9
    coverage_min_share: float = 0.01
    threads: int = 1
    figure_points: int = 2000  # points per 2-D panel
    out: str = "quality_at_equal_budget"
    out_dir: str = ""  # default runs/benchmarks (--out-dir benchmarks/results: the committed results)

    @property
    def soflow_nfe(self) -> tuple[int, ...]:
        """SoFlow's NFE, one per tuple of re-noising times."""
        return tuple(len(times) for times in self.soflow_times)


PRESETS = {
    "full": QualityConfig(),
    "tiny": QualityConfig(
        datasets=TOY_DISTRIBUTIONS,
        seeds=(0,),
        budget_s=2.0,
        flow_matching_nfe=(1, 2, 4, 8),
        toy_batch_size=128,
        toy_width=64,
        toy_depth=2,
        toy_fourier_features=8,
        digits_width=64,
        digits_depth=2,
        digits_batch_size=64,
        toy_samples=256,
        toy_eval_draws=2,
        digit_samples=200,
        sw_projections=32,
        classifier_epochs=20,
        figure_points=256,
    ),
}


# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Digits:
    """The scikit-learn 8×8 digits in [−1, 1], split once with a fixed seed."""

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor


def load_digits(config: QualityConfig) -> Digits:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0 * 2.0 - 1.0
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(config.split_seed))
    n_test = round(config.digits_test_fraction * images.shape[0])
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test])


def batch_source(dataset: str, digits: Digits | None, batch_size: int) -> Callable[[torch.Generator], Tensor]:
    if dataset == "digits":
        assert digits is not None
        return lambda g: digits.train[torch.randint(digits.train.shape[0], (batch_size,), generator=g)]
    return lambda g: sample_toy_2d(dataset, batch_size, generator=g)[0]


# ------------------------------------------------------------------------------------- methods


def flow_matching_objective(config: QualityConfig) -> SoFlowObjective:
    """SoFlow's Flow Matching term alone (λ = 1) with the adaptive weight's power p set for Flow Matching."""
    return SoFlowObjective(fm_fraction=1.0, weighting=AdaptiveWeighting(p=config.flow_matching_p))


def meanflow_objective(config: QualityConfig) -> tuple[object, dict]:
    """The MeanFlow baseline with the CIFAR-10 settings as far as its fields allow, and the settings used."""
    from meanflow import MeanFlowObjective

    fields = {f.name for f in dataclasses.fields(MeanFlowObjective)}
    wanted = {**MEANFLOW_SETTINGS, **MEANFLOW_R, "jvp_variant": config.meanflow_jvp}
    settings = {k: v for k, v in wanted.items() if k in fields}
    return MeanFlowObjective(**settings), settings


def euler_sample(model: nn.Module, noise: Tensor, num_steps: int) -> Tensor:
    """Flow Matching's sampler: Euler steps x ← x + (s − t)·v_θ(x, t) on the uniform grid 1 → 0."""
    param = EulerParam()
    x = noise
    grid = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
    with torch.no_grad():
        for t_value, s_value in itertools.pairwise(grid):
            t = torch.full((x.shape[0],), t_value)
            x = x + (s_value - t_value) * param.velocity(model, x, t)
    return x


class Method:
    """One training method: its loss for a batch and its sampler at a given NFE."""

    def __init__(self, name: str, config: QualityConfig) -> None:
        self.name = name
        self.settings: dict = {}
        if name == "soflow":
            self.objective = SoFlowObjective.from_preset(config.soflow_preset)
            self.nfe = config.soflow_nfe
            self.times = dict(zip(config.soflow_nfe, config.soflow_times))
        elif name == "flow_matching":
            self.objective = flow_matching_objective(config)
            self.nfe = config.flow_matching_nfe
        else:
            self.objective, self.settings = meanflow_objective(config)
            self.nfe = config.meanflow_nfe

    def loss(self, model: nn.Module, data: Tensor, progress: float, generator: torch.Generator) -> Tensor:
        if self.name == "meanflow":
            return self.objective(model, data, generator=generator).loss
        # r(k, K) depends on k/K only: the budget's progress, on a fine integer grid
        total = 1_000_000
        step = min(int(progress * total), total - 1)
        return self.objective(model, data, step=step, total_steps=total, generator=generator).backprop

    def sample(self, model: nn.Module, noise: Tensor, nfe: int, generator: torch.Generator) -> Tensor:
        if self.name == "meanflow":
            from meanflow import meanflow_sample

            with torch.no_grad():
                return meanflow_sample(model, noise, steps=nfe)
        if self.name == "flow_matching":
            return euler_sample(model, noise, nfe)
        return sample_few_step(
            model,
            noise,
            param=self.objective.param,
            path=self.objective.path,
            times=self.times[nfe],
            generator=generator,
        )


@dataclass
class Trained:
    model: nn.Module  # the EMA weights, in eval mode
    steps: int
    seconds: float  # process CPU time of the training steps
    wall_seconds: float  # their wall-clock time
    diverged: bool


def build_model(dataset: str, config: QualityConfig) -> MLPBackbone:
    """The backbone every method trains on ``dataset`` (initial weights from the global seed)."""
    if dataset == "digits":
        return MLPBackbone(dim=64, width=config.digits_width, depth=config.digits_depth)
    toy = dataclasses.replace(
        TOY,
        width=config.toy_width,
        depth=config.toy_depth,
        fourier_features=config.toy_fourier_features,
        fourier_scale=config.toy_fourier_scale,
    )
    return build_toy_model(toy, conditional=False)  # the main command's backbone


def train(method: Method, dataset: str, seed: int, config: QualityConfig, digits: Digits | None) -> Trained:
    """Train for ``budget_s`` seconds of process CPU time spent in training steps."""
    torch.manual_seed(seed)  # the same initial weights for every method
    model = build_model(dataset, config)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    lr = config.digits_lr if dataset == "digits" else config.toy_lr
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data_generator = torch.Generator().manual_seed(seed)
    loss_generator = torch.Generator().manual_seed(seed + 1)
    batch_size = config.digits_batch_size if dataset == "digits" else config.toy_batch_size
    draw = batch_source(dataset, digits, batch_size)
    used, wall, steps, diverged = 0.0, 0.0, 0, False
    while used < config.budget_s:
        data = draw(data_generator)
        start, wall_start = time.process_time(), time.perf_counter()
        progress = used / config.budget_s
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (1.0 - progress) / config.lr_decay_fraction)
        loss = method.loss(model, data, progress, loss_generator)
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
    return Trained(ema, steps, used, wall, diverged)


# ------------------------------------------------------------------------------------- metrics


def mean_metrics(scores: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over ``scores`` (one dict per evaluation draw)."""
    return {key: sum(score[key] for score in scores) / len(scores) for key in scores[0]}


def toy_metrics(samples: Tensor, real: Tensor, config: QualityConfig) -> dict[str, float]:
    return {
        "energy_distance": energy_distance(samples, real),
        "mmd": mmd(samples, real, bandwidths=config.mmd_bandwidths),
        "sliced_wasserstein": sliced_wasserstein(
            samples,
            real,
            num_projections=config.sw_projections,
            generator=torch.Generator().manual_seed(config.sw_seed),
        ),
    }


class Classifier(nn.Module):
    """64 → 256 → 64 → 10 MLP; the 64 ReLU features before the last layer are the Fréchet feature space."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return h, self.head(h)


def train_classifier(digits: Digits, config: QualityConfig) -> tuple[Classifier, float]:
    """Train on the training split (fixed seed); return the model and its held-out accuracy."""
    torch.manual_seed(config.classifier_seed)
    net = Classifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.classifier_seed)
    n = digits.train.shape[0]
    for _ in range(config.classifier_epochs):
        for idx in torch.randperm(n, generator=generator).split(128):
            loss = nn.functional.cross_entropy(net(digits.train[idx])[1], digits.train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval().requires_grad_(False)
    accuracy = float((net(digits.test)[1].argmax(dim=1) == digits.test_labels).float().mean())
    return net, accuracy


def digit_scores(
    images: Tensor, classifier: Classifier, reference_features: Tensor, config: QualityConfig
) -> dict[str, float]:
    """Fréchet distance to the reference features plus the confidence-based scores.

    Images are clipped to the pixel range [−1, 1] first. The Fréchet distance is averaged over
    disjoint chunks of the reference's size, so it always compares equal sample sizes.
    """
    with torch.no_grad():
        features, logits = classifier(images.clamp(-1.0, 1.0))
    probs = logits.softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    m = reference_features.shape[0]
    chunks = [features[i : i + m] for i in range(0, features.shape[0] - m + 1, m)]
    histogram = torch.bincount(predicted, minlength=10).double() / predicted.shape[0]
    nonzero = histogram[histogram > 0]
    confident = confidence >= config.confidence_threshold
    confident_counts = torch.bincount(predicted[confident], minlength=10)
    return {
        "frechet_distance": statistics.fmean(frechet_distance(c, reference_features) for c in chunks),
        "mean_confidence": float(confidence.mean()),
        "confident_fraction": float(confident.double().mean()),
        "class_entropy": float(-(nonzero * nonzero.log()).sum()),
        "class_coverage": int((confident_counts >= config.coverage_min_share * predicted.shape[0]).sum()),
    }


# ------------------------------------------------------------------------------------ the grid


def method_order(methods: tuple[str, ...], seed_index: int) -> list[str]:
    """The methods rotated by the seed's position, so no method always runs first."""
    k = seed_index % len(methods)
    return list(methods[k:] + methods[:k])


def run(config: QualityConfig) -> tuple[list[dict], dict]:
    """Train and evaluate the grid; return the rows and the samples of the first seed for the figures."""
    torch.set_num_threads(config.threads)
    env = environment(torch.device("cpu"))
    methods = {name: Method(name, config) for name in config.methods}
    digits = load_digits(config) if "digits" in config.datasets else None
    classifier, accuracy = (None, None)
    base = {**env, "config": dataclasses.asdict(config)}
    rows: list[dict] = []
    if "meanflow" in methods:
        import meanflow

        source = Path(meanflow.__file__).read_bytes()
        base["meanflow_settings"] = methods["meanflow"].settings
        base["meanflow_sha256"] = hashlib.sha256(source).hexdigest()
    if digits is not None:
        classifier, accuracy = train_classifier(digits, config)
        rows.append({"kind": "classifier", "dataset": "digits", "test_accuracy": accuracy, **base})
        print(f"digit classifier: held-out accuracy {accuracy:.4f}", flush=True)
    figures: dict[str, dict] = {}
    for dataset in config.datasets:
        for seed_index, seed in enumerate(config.seeds):
            eval_generator = torch.Generator().manual_seed(10_000 + seed)
            if dataset == "digits":
                assert digits is not None and classifier is not None
                n = config.digit_samples
                noises = [torch.randn(n, 64, generator=eval_generator)]
                # the held-out split, halved: half B is the reference, half A gives the floor
                order = torch.randperm(digits.test.shape[0], generator=eval_generator)
                half = min(digits.test.shape[0] // 2, n)
                real_a, real_b = digits.test[order[:half]], digits.test[order[half : 2 * half]]
                with torch.no_grad():
                    reference = classifier(real_b)[0]
                score = lambda xs, ref=reference: digit_scores(xs[0], classifier, ref, config)  # noqa: E731
                floor = score([real_a])
                real_view = real_a
            else:
                # independent draws of (noise, real, second real); every score is the mean over them
                n = config.toy_samples
                draws = [
                    (
                        torch.randn(n, 2, generator=eval_generator),
                        sample_toy_2d(dataset, n, generator=eval_generator)[0],
                        sample_toy_2d(dataset, n, generator=eval_generator)[0],
                    )
                    for _ in range(config.toy_eval_draws)
                ]
                noises = [noise for noise, _, _ in draws]
                score = lambda xs, d=draws: mean_metrics(  # noqa: E731
                    [toy_metrics(x, real, config) for x, (_, real, _) in zip(xs, d, strict=True)]
                )
                floor = mean_metrics([toy_metrics(again, real, config) for _, real, again in draws])
                real_view = draws[0][2]
            rows.append({"kind": "floor", "dataset": dataset, "seed": seed, "samples": n, **floor, **base})
            if seed_index == 0:
                figures[dataset] = {"real": real_view}
            for name in method_order(config.methods, seed_index):
                method = methods[name]
                trained = train(method, dataset, seed, config, digits)
                print(
                    f"{dataset:16s} seed {seed} {name:14s} {trained.steps:6d} steps in {trained.seconds:6.1f} s CPU "
                    f"({trained.wall_seconds:.1f} s wall)" + (" (diverged)" if trained.diverged else ""),
                    flush=True,
                )
                for nfe in method.nfe:
                    sample_generator = torch.Generator().manual_seed(20_000 + seed)
                    draws_samples = [method.sample(trained.model, z, nfe, sample_generator).detach() for z in noises]
                    samples = draws_samples[0]
                    finite = all(bool(torch.isfinite(x).all()) for x in draws_samples)
                    keys = DIGIT_METRICS if dataset == "digits" else TOY_METRICS
                    metrics = score(draws_samples) if finite else dict.fromkeys(keys, float("nan"))
                    rows.append(
                        {
                            "kind": "sample",
                            "dataset": dataset,
                            "method": name,
                            "nfe": nfe,
                            "seed": seed,
                            "samples": n,
                            "steps": trained.steps,
                            "train_seconds": trained.seconds,
                            "train_wall_seconds": trained.wall_seconds,
                            "diverged": trained.diverged or not finite,
                            **metrics,
                            **base,
                        }
                    )
                    print(
                        f"{'':16s}   NFE {nfe:3d}: "
                        + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                        + "   | floor "
                        + "  ".join(f"{v:.4g}" for v in floor.values()),
                        flush=True,
                    )
                    if seed_index == 0:
                        figures[dataset][(name, nfe)] = samples[: config.figure_points]
    rows.extend(seed_means(rows, base))
    return rows, figures


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def seed_means(rows: list[dict], base: dict) -> list[dict]:
    """Seed-averaged rows (``seed: "mean"``) with the seeds' standard deviation as ``<metric>_std``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["kind"] in ("sample", "floor"):
            groups.setdefault((row["kind"], row["dataset"], row.get("method"), row.get("nfe")), []).append(row)
    means = []
    for (kind, dataset, method, nfe), members in groups.items():
        keys = DIGIT_METRICS if dataset == "digits" else TOY_METRICS
        keys = (*keys, "steps", "train_seconds", "train_wall_seconds") if kind == "sample" else keys
        row: dict = {"kind": kind, "dataset": dataset, "seed": "mean", "num_seeds": len(members)}
        if kind == "sample":
            row.update(method=method, nfe=nfe, diverged=sum(bool(m["diverged"]) for m in members))
        row["samples"] = members[0]["samples"]
        for key in keys:
            row[key], row[f"{key}_std"] = _mean_std([float(m[key]) for m in members])
        means.append({**row, **base})
    return means


# ------------------------------------------------------------------------------------- reports


def _fmt(row: dict, key: str, digits: int = 4) -> str:
    value, spread = row[key], row.get(f"{key}_std", 0.0)
    if not math.isfinite(value):
        return "diverged"
    if key in ("steps", "train_seconds", "class_coverage"):
        return f"{value:.0f} ± {spread:.0f}" if key == "steps" else f"{value:.1f} ± {spread:.1f}"
    return f"{value:.{digits}g} ± {spread:.2g}"


def verdict(rows: list[dict], dataset: str) -> str | None:
    """SoFlow at 1 NFE against MeanFlow at 1 NFE on every metric: seed means and per-seed wins."""
    keys = DIGIT_METRICS if dataset == "digits" else TOY_METRICS
    by_seed: dict[str, dict] = {}
    for row in rows:
        if row["kind"] == "sample" and row["dataset"] == dataset and row["nfe"] == 1 and row["seed"] != "mean":
            by_seed.setdefault(row["method"], {})[row["seed"]] = row
    if "soflow" not in by_seed or "meanflow" not in by_seed:
        return None
    seeds = sorted(set(by_seed["soflow"]) & set(by_seed["meanflow"]))
    parts = []
    for key in keys:
        ours = [float(by_seed["soflow"][s][key]) for s in seeds]
        theirs = [float(by_seed["meanflow"][s][key]) for s in seeds]
        sign = 1.0 if key in LOWER_IS_BETTER else -1.0
        wins = sum(sign * (a - b) < 0 for a, b in zip(ours, theirs))
        ties = sum(a == b for a, b in zip(ours, theirs))
        tied = f", tied in {ties}" if ties else ""
        text = (
            f"{METRIC_NAMES[key]} {statistics.fmean(ours):.4g} vs {statistics.fmean(theirs):.4g} "
            f"(SoFlow better in {wins} of {len(seeds)} seeds{tied})"
        )
        parts.append(f"**{text}**" if key == HEADLINE[dataset] else text)
    return "SoFlow 1-NFE vs MeanFlow 1-NFE: " + "; ".join(parts) + "."


def against_flow_matching(rows: list[dict], dataset: str) -> str | None:
    """SoFlow at 1 NFE against Flow Matching's best seed mean at any NFE, on the headline metric."""
    key = HEADLINE[dataset]
    means = [r for r in rows if r["kind"] == "sample" and r["dataset"] == dataset and r["seed"] == "mean"]
    ours = next((r for r in means if r["method"] == "soflow" and r["nfe"] == 1), None)
    theirs = [r for r in means if r["method"] == "flow_matching" and math.isfinite(float(r[key]))]
    if ours is None or not theirs:
        return None
    best = min(theirs, key=lambda r: float(r[key]))
    reached = "at most" if float(ours[key]) <= float(best[key]) else "above"
    return (
        f"SoFlow 1-NFE vs the best Flow Matching result: {METRIC_NAMES[key]} {float(ours[key]):.4g} vs "
        f"{float(best[key]):.4g} at {best['nfe']} Euler steps (seed means; SoFlow {reached} it)."
    )


def markdown_table(rows: list[dict], config: QualityConfig) -> str:
    env = rows[0]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; commit {env['commit']}. "
        f"Training budget {config.budget_s:g} s of process CPU time (one thread) per method, dataset and seed; "
        f"seeds {', '.join(map(str, config.seeds))}; values are seed means ± standard deviation across seeds.",
        "",
    ]
    for row in rows:
        if row["kind"] == "classifier":
            lines += [f"Digit classifier (64-256-64-10 MLP): held-out accuracy {row['test_accuracy']:.4f}.", ""]
    for dataset in config.datasets:
        digits = dataset == "digits"
        keys = DIGIT_METRICS if digits else TOY_METRICS
        names = {**METRIC_NAMES, "confident_fraction": f"confident (≥ {config.confidence_threshold:g})"}
        means = [r for r in rows if r["dataset"] == dataset and r.get("seed") == "mean"]
        samples = next((r["samples"] for r in means), 0)
        lines += [
            f"### {dataset} ({samples} samples, 64-dim)"
            if digits
            else f"### {dataset} (2-D; each value the mean over {config.toy_eval_draws} draws of {samples} samples)",
            "",
            "| method | NFE | steps in budget | " + " | ".join(names[k] for k in keys) + " |",
            "|---|---|---|" + "---|" * len(keys),
        ]
        for name in config.methods:
            for row in sorted(
                (r for r in means if r["kind"] == "sample" and r["method"] == name), key=lambda r: r["nfe"]
            ):
                cells = [_fmt(row, k, 3 if k == "class_entropy" else 4) for k in keys]
                flag = f" ({row['diverged']} diverged)" if row["diverged"] else ""
                lines.append(
                    f"| {LABELS[name]}{flag} | {row['nfe']} | {_fmt(row, 'steps')} | " + " | ".join(cells) + " |"
                )
        for row in (r for r in means if r["kind"] == "floor"):
            label = "real vs real (floor)" if not digits else "held-out real (floor / reference)"
            lines.append(f"| {label} | – | – | " + " | ".join(_fmt(row, k) for k in keys) + " |")
        lines.append("")
        for line in (verdict(rows, dataset), against_flow_matching(rows, dataset)):
            lines += [line, ""] if line else []
    return "\n".join(lines) + "\n"


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('matplotlib is needed for the figures: pip install -e ".[bench]"')
    return plt


def digit_mosaic(images: Tensor, side: int = 6) -> Tensor:
    """The first side² images as one (8·side, 8·side) picture with a 1-pixel gap."""
    canvas = torch.full((9 * side - 1, 9 * side - 1), -1.0)
    for k, image in enumerate(images[: side * side].clamp(-1, 1)):
        i, j = divmod(k, side)
        canvas[9 * i : 9 * i + 8, 9 * j : 9 * j + 8] = image.view(8, 8)
    return canvas


def draw_samples(figures: dict, config: QualityConfig, folder: Path) -> list[Path]:
    """One figure per dataset: a row per method, a column per NFE, the real data first."""
    plt = _plt()
    paths = []
    for dataset, panels in figures.items():
        columns = max(len(nfe_list(name, config)) for name in config.methods) + 1
        rows = len(config.methods)
        fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
        real = panels["real"]
        lim = 1.15 * float(real.abs().max()) if dataset != "digits" else 1.0
        for r, name in enumerate(config.methods):
            nfes = nfe_list(name, config)
            for c in range(columns):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    points, title = real, "real data"
                elif c - 1 < len(nfes):
                    points, title = panels.get((name, nfes[c - 1])), f"{nfes[c - 1]} NFE"
                else:
                    ax.axis("off")
                    continue
                if points is None:
                    ax.axis("off")
                    continue
                if dataset == "digits":
                    ax.imshow(digit_mosaic(points).numpy(), cmap="gray_r", vmin=-1, vmax=1)
                else:
                    pts = points.clamp(-lim, lim)
                    ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=1.0, alpha=0.5, color="#1f4e79", linewidths=0)
                    ax.set_xlim(-lim, lim)
                    ax.set_ylim(-lim, lim)
                    ax.set_aspect("equal")
                ax.set_title(title, fontsize=8)
                if c == 0:
                    ax.set_ylabel(LABELS[name], fontsize=8)
        fig.suptitle(
            f"{dataset}: samples of seed {config.seeds[0]} after {config.budget_s:g} CPU seconds of training",
            fontsize=10,
        )
        fig.tight_layout()
        path = folder / f"{config.out}-samples-{dataset}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def nfe_list(name: str, config: QualityConfig) -> tuple[int, ...]:
    return {"soflow": config.soflow_nfe, "meanflow": config.meanflow_nfe, "flow_matching": config.flow_matching_nfe}[
        name
    ]


def draw_quality_vs_nfe(rows: list[dict], config: QualityConfig, folder: Path) -> Path:
    """The headline metric against NFE (log-log), seed means with the seeds' spread, floor dashed."""
    plt = _plt()
    n = len(config.datasets)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    colors = {"soflow": "#1f77b4", "meanflow": "#d62728", "flow_matching": "#2ca02c"}
    for ax, dataset in zip(axes[0], config.datasets):
        key = HEADLINE[dataset]
        means = [r for r in rows if r["dataset"] == dataset and r.get("seed") == "mean"]
        for name in config.methods:
            line = sorted((r for r in means if r["kind"] == "sample" and r["method"] == name), key=lambda r: r["nfe"])
            x = [r["nfe"] for r in line]
            y = [r[key] for r in line]
            err = [r[f"{key}_std"] for r in line]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=LABELS[name], color=colors[name])
        for r in means:
            if r["kind"] == "floor":
                ax.axhline(r[key], ls="--", color="gray", label="real-vs-real floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(dataset)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Sample quality at equal training budget ({config.budget_s:g} CPU seconds per method)", fontsize=10)
    fig.tight_layout()
    path = folder / f"{config.out}-vs-nfe.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- CLI


def _tuples(value: object) -> object:
    """JSON lists back to the (nested) tuples of the configuration."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def parse_config(argv: list[str] | None = None) -> tuple[QualityConfig, Path | None]:
    """The preset named by ``--preset`` with command-line overrides.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The resolved configuration, and the results file given by ``--table-from`` (else None),
        in which case the configuration is the one saved in that file.
    """
    parser = preset_parser(__doc__, PRESETS, "full")
    parser.add_argument("--budget-s", dest="budget_s", type=float, help="training seconds per method")
    parser.add_argument("--seeds", type=comma_list(int), help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--datasets", type=comma_list(), help="comma-separated, from " + ", ".join(DATASETS))
    parser.add_argument("--methods", type=comma_list(), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="file stem of the outputs")
    parser.add_argument("--out-dir", dest="out_dir", help="output folder; empty: runs/benchmarks")
    parser.add_argument("--skip-digits", action="store_true", help="leave out the scikit-learn digits")
    parser.add_argument(
        "--table-from", dest="table_from", metavar="JSON", help="only redraw the table and NFE plot of a results file"
    )
    args = parser.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())[0]["config"]
        fields = {f.name for f in dataclasses.fields(QualityConfig)}
        values = {k: _tuples(v) for k, v in saved.items() if k in fields}
        return QualityConfig(**values), Path(args.table_from)
    config = resolve_preset(args, PRESETS, ignore=("skip_digits", "table_from"))
    if args.skip_digits:
        config = dataclasses.replace(config, datasets=tuple(d for d in config.datasets if d != "digits"))
    for name, allowed in (("datasets", DATASETS), ("methods", METHODS)):
        values = getattr(config, name)
        unknown = sorted(set(values) - set(allowed))
        if unknown or not values:
            parser.error(f"--{name}: unknown or empty {unknown or list(values)}; choose from {', '.join(allowed)}")
    if not config.seeds:
        parser.error("--seeds: give at least one seed")
    if not config.budget_s > 0:
        parser.error(f"--budget-s must be > 0; got {config.budget_s}")
    if config.threads < 1:
        parser.error(f"--threads must be >= 1; got {config.threads}")
    if "digits" in config.datasets:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            parser.error(
                'the digits need scikit-learn: pip install -e ".[bench]", '
                "or pass --skip-digits to run the 2-D toys only"
            )
    if "meanflow" in config.methods:
        try:
            import meanflow  # noqa: F401
        except ImportError as error:
            parser.error(f"the MeanFlow baseline (benchmarks/meanflow.py) does not import: {error}")
    return config, None


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, and write the rows, table, figures and resolved config."""
    config, saved = parse_config(argv)
    if saved is not None:
        rows = json.loads(saved.read_text())
        md_path = saved.with_suffix(".md")
        md_path.write_text(markdown_table(rows, config))
        print(f"redrew {md_path} and {draw_quality_vs_nfe(rows, config, saved.parent)}")
        return 0
    folder = Path(config.out_dir) if config.out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, figures = run(config)  # records the commit first, before this run writes any file
    (folder / f"{config.out}-config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    table = markdown_table(rows, config)
    json_path, md_path = write_rows(config.out, rows, table, directory=folder)
    pictures = [*draw_samples(figures, config, folder), draw_quality_vs_nfe(rows, config, folder)]
    print(table)
    print(
        f"wrote {json_path}, {md_path} and {', '.join(str(p) for p in pictures)} in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
