"""Flow Matching pretraining then SoFlow fine-tuning, against SoFlow from scratch, at equal CPU budgets.

    python benchmarks/finetune_from_flow_matching.py                     # full: 3 toys + digits (MLP, DiT), 3 seeds
    python benchmarks/finetune_from_flow_matching.py --preset tiny       # seconds; CI runs this
    python benchmarks/finetune_from_flow_matching.py --datasets digits --seeds 0 --out digits0
    python benchmarks/finetune_from_flow_matching.py --merge a.json,b.json --out merged   # one table from parts

For each dataset and seed, with a budget B of process CPU time (one torch thread; only training
steps are timed, as in ``quality_at_equal_budget.py``, whose data, backbones, optimizer,
learning-rate decay, EMA, metrics and Flow Matching baseline this benchmark reuses):

* **Flow Matching** for B and for 2B (plain squared error; Euler sampling with 1 … 100 steps);
* **fine-tuned**: the Flow Matching model of budget B (its EMA weights) converted by
  ``soflow_core.nets.from_velocity_model`` and trained for B more with
  ``SoFlowObjective.from_preset("finetune")`` (the converted network, frozen, is the velocity the
  consistency samples step along); its EMA is scored at ``curve_points`` equal shares of the budget
  (outside the clock), which gives one-step quality against fine-tuning steps;
* **naive fine-tune** (on ``naive_datasets``): the same start trained with the ``toy`` recipe, the
  conditional velocity of the paper;
* **SoFlow from scratch** for B and for 2B (the ``toy`` recipe);
* **long fine-tune** (on ``long_datasets``): the fine-tune planned for ``long_factor``·B, its curve
  the check for a regression with longer fine-tuning.

``digits_dit`` runs the path a SiT-XL/2 user takes, on the digits: a small class-conditional SiT
(``_sit.py``: SiT's layer names and layout, its convention x_τ = τ·data + (1 − τ)·noise with the
target data − noise, ``learn_sigma``) trained with SiT's loss for B, written as SiT's training file
``{"model", "ema", "opt", "args"}``, converted by ``from_velocity_model(file)`` and fine-tuned for B;
against a SoFlow DiT of the same size from scratch for B and 2B and SiT's own Euler sampler.

SoFlow models are sampled with one step, two steps re-noised at t = 0.3 (the main command's
sampler) and the deterministic two-step chain f(f(noise, 1, 0.4), 0.4, 0). Writes
``<out-dir>/<out>.json`` (rows with device, versions, commit and config), ``<out>.md`` (tables and
the targets' verdicts) and ``<out>-curve.png``; default folder ``runs/benchmarks``.
"""

import copy
import dataclasses
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_at_equal_budget as quality
from _common import RESULTS, comma_list, environment, preset_parser, resolve_preset, write_rows
from _sit import SiT, save_sit_training_file, sit_flow_matching_loss

from soflow_core import EulerParam, LinearPath, SoFlowObjective, sample_chain, sample_few_step
from soflow_core.data import TOY_DISTRIBUTIONS, on_checkerboard
from soflow_core.metrics import energy_distance
from soflow_core.nets import DiT, from_velocity_model

DATASETS = (*TOY_DISTRIBUTIONS, "digits", "digits_dit")
METHODS = {
    "flow_matching_B": "Flow Matching, B",
    "flow_matching_2B": "Flow Matching, 2B",
    "finetune": "fine-tuned: Flow Matching B, then SoFlow B",
    "naive_finetune": "naive fine-tune (toy recipe, conditional velocity): B + B",
    "soflow_B": "SoFlow from scratch, B",
    "soflow_2B": "SoFlow from scratch, 2B",
    "finetune_long": "fine-tuned for {long}B (the long curve)",
}
SAMPLERS = ("1", "2 re-noised at 0.3", "2 chained through 0.4")
HEADLINE = {"digits": "frechet_distance", "digits_dit": "frechet_distance"}
DIGIT_KEYS = ("frechet_distance", "mean_confidence", "confident_fraction")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything that defines a run; saved beside its outputs and in every row."""

    datasets: tuple[str, ...] = DATASETS
    seeds: tuple[int, ...] = (0, 1, 2)
    dit_seeds: tuple[int, ...] = (0,)  # seeds of digits_dit (its steps cost more)
    toy_budget_s: float = 30.0  # B on the 2-D toys: process CPU seconds per stage (one thread)
    digits_budget_s: float = 60.0  # B on the digits
    dit_budget_s: float = 60.0  # B of digits_dit
    naive_datasets: tuple[str, ...] = ("digits",)
    long_datasets: tuple[str, ...] = ("checkerboard", "digits")
    long_factor: int = 4
    curve_points: int = 8  # evaluations of a fine-tune's EMA, at equal shares of its budget
    finetune_preset: str = "finetune"
    soflow_preset: str = "toy"
    flow_matching_nfe: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 100)
    renoise_time: float = 0.3  # the two-step re-noising sampler's intermediate time
    chain_time: float = 0.4  # the two-step chain's intermediate time
    # the training recipe and evaluation of quality_at_equal_budget.py
    lr_decay_fraction: float = 0.3
    ema_decay: float = 0.995
    toy_batch_size: int = quality.TOY.batch_size
    toy_lr: float = quality.TOY.lr
    toy_width: int = quality.TOY.width
    toy_depth: int = quality.TOY.depth
    toy_fourier_features: int = quality.TOY.fourier_features
    toy_fourier_scale: float = quality.TOY.fourier_scale
    digits_batch_size: int = 256
    digits_lr: float = 1e-3
    digits_width: int = 384
    digits_depth: int = 3
    flow_matching_p: float = 0.0
    # digits_dit: a SiT / SoFlow DiT on 8×8×1 digits, class-conditional (SiT's label dropout 0.1, null row)
    dit_patch: int = 2
    dit_hidden: int = 96
    dit_depth: int = 4
    dit_heads: int = 4
    dit_batch_size: int = 256
    dit_lr: float = 1e-3
    # evaluation
    toy_samples: int = 4096
    toy_eval_draws: int = 5
    curve_eval_draws: int = 2  # toy draws per curve point
    digit_samples: int = 2000
    digits_test_fraction: float = 0.5
    split_seed: int = 0
    classifier_seed: int = 0
    classifier_epochs: int = 300
    confidence_threshold: float = 0.9
    coverage_min_share: float = 0.01
    threads: int = 1
    out: str = "finetune_from_flow_matching"
    out_dir: str = ""  # default runs/benchmarks (--out-dir benchmarks/results: the committed results)


PRESETS = {
    "full": FinetuneConfig(),
    "tiny": FinetuneConfig(
        datasets=("checkerboard", "digits_dit"),
        seeds=(0,),
        toy_budget_s=1.0,
        digits_budget_s=1.0,
        dit_budget_s=1.0,
        long_datasets=("checkerboard",),
        long_factor=2,
        curve_points=2,
        flow_matching_nfe=(1, 4),
        toy_batch_size=128,
        toy_width=32,
        toy_depth=1,
        toy_fourier_features=4,
        dit_hidden=16,
        dit_depth=1,
        dit_heads=2,
        dit_batch_size=32,
        toy_samples=256,
        toy_eval_draws=1,
        curve_eval_draws=1,
        digit_samples=200,
        classifier_epochs=5,
    ),
}


def budget(config: FinetuneConfig, dataset: str) -> float:
    """B of ``dataset``."""
    return {"digits": config.digits_budget_s, "digits_dit": config.dit_budget_s}.get(dataset, config.toy_budget_s)


def quality_config(config: FinetuneConfig, seconds: float) -> quality.QualityConfig:
    """The quality benchmark's configuration with this run's shared settings and a budget of ``seconds``."""
    shared = {f.name for f in dataclasses.fields(quality.QualityConfig)} & {
        f.name for f in dataclasses.fields(FinetuneConfig)
    }
    values = {name: getattr(config, name) for name in shared - {"datasets", "seeds", "out", "out_dir"}}
    return quality.QualityConfig(**values, budget_s=seconds)


# ------------------------------------------------------------------------------------- training


@dataclass
class Run:
    """A trained model (EMA weights, eval mode) and what its training cost."""

    model: nn.Module
    steps: int
    seconds: float
    curve: list[dict]
    optimizer: torch.optim.Optimizer | None = None


def train_loop(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Tensor, Tensor | None, float, torch.Generator], Tensor],
    draw: Callable[[torch.Generator], tuple[Tensor, Tensor | None]],
    *,
    seconds: float,
    lr: float,
    config: FinetuneConfig,
    seed: int,
    curve: Callable[[nn.Module], dict] | None = None,
) -> Run:
    """Adam for ``seconds`` of process CPU time in training steps, as ``quality_at_equal_budget.train``.

    The learning rate decays linearly to 0 over the last ``lr_decay_fraction`` of the budget; the
    EMA (``ema_decay``) is the returned model. With ``curve``, the EMA is scored at
    ``curve_points`` equal shares of the budget, outside the clock.
    """
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data_generator = torch.Generator().manual_seed(seed)
    loss_generator = torch.Generator().manual_seed(seed + 1)
    used, steps, points = 0.0, 0, []
    marks = [seconds * (k + 1) / config.curve_points for k in range(config.curve_points)] if curve else []
    if curve is not None:
        points.append({"cpu_seconds": 0.0, "steps": 0, **curve(ema)})
    while used < seconds:
        data, cond = draw(data_generator)
        start = time.process_time()
        progress = used / seconds
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (1.0 - progress) / config.lr_decay_fraction)
        loss = loss_fn(model, data, cond, progress, loss_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - config.ema_decay)
        used += time.process_time() - start
        steps += 1
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite loss after {steps} steps")
        while marks and used >= marks[0] and curve is not None:
            points.append({"cpu_seconds": marks.pop(0), "steps": steps, **curve(ema)})
    return Run(ema, steps, used, points, optimizer)


def soflow_loss(objective: SoFlowObjective, velocity_model: nn.Module | None = None) -> Callable:
    """The SoFlow objective as a loss of the budget's progress (which plays k/K, on a fine grid)."""
    total = 1_000_000
    extra = {} if velocity_model is None else {"velocity_model": velocity_model}

    def loss(model: nn.Module, data: Tensor, cond: Tensor | None, progress: float, g: torch.Generator) -> Tensor:
        step = min(int(progress * total), total - 1)
        return objective(model, data, cond, step=step, total_steps=total, generator=g, **extra).backprop

    return loss


def sit_loss(model: nn.Module, data: Tensor, cond: Tensor | None, progress: float, g: torch.Generator) -> Tensor:
    """SiT's velocity loss (its convention: data at τ = 1, target data − noise)."""
    return sit_flow_matching_loss(model, data, cond, g)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- sampling


def sit_euler(model: nn.Module, noise: Tensor, labels: Tensor, steps: int) -> Tensor:
    """SiT's ODE by Euler steps in its own time: x ← x + dτ·v_SiT(x, τ, y) from noise at τ = 0 to data at τ = 1."""
    x = noise
    grid = torch.linspace(0.0, 1.0, steps + 1)
    with torch.no_grad():
        for a, b in itertools.pairwise(grid.tolist()):
            x = x + (b - a) * model(x, torch.full((x.shape[0],), a), labels)
    return x


def soflow_samples(model: nn.Module, noise: Tensor, cond: Tensor | None, config: FinetuneConfig, seed: int) -> dict:
    """One step, two steps re-noised, two steps chained."""
    param, path = EulerParam(), LinearPath()
    generator = torch.Generator().manual_seed(20_000 + seed)
    with torch.no_grad():
        return {
            "1": sample_chain(model, noise, [1.0, 0.0], param=param, cond=cond),
            SAMPLERS[1]: sample_few_step(
                model, noise, param=param, path=path, times=[1.0, config.renoise_time], cond=cond, generator=generator
            ),
            SAMPLERS[2]: sample_chain(model, noise, [1.0, config.chain_time, 0.0], param=param, cond=cond),
        }


# ------------------------------------------------------------------------------------- one dataset


class Evaluation:
    """The fixed noise, labels and reference of a dataset and seed, and its scores."""

    def __init__(self, dataset: str, seed: int, config: FinetuneConfig, digits, classifier) -> None:
        self.dataset, self.config = dataset, config
        generator = torch.Generator().manual_seed(10_000 + seed)
        if dataset.startswith("digits"):
            n = config.digit_samples
            self.noises = [torch.randn(n, 64, generator=generator)]
            order = torch.randperm(digits.test.shape[0], generator=generator)
            half = min(digits.test.shape[0] // 2, n)
            real_a, real_b = digits.test[order[:half]], digits.test[order[half : 2 * half]]
            with torch.no_grad():
                self.reference = classifier(real_b)[0]
            self.classifier = classifier
            self.labels = torch.randint(0, 10, (n,), generator=generator)
            self.floor = self.score_digits(real_a)
        else:
            self.draws = [
                (
                    torch.randn(config.toy_samples, 2, generator=generator),
                    quality.sample_toy_2d(dataset, config.toy_samples, generator=generator)[0],
                    quality.sample_toy_2d(dataset, config.toy_samples, generator=generator)[0],
                )
                for _ in range(config.toy_eval_draws)
            ]
            self.noises = [noise for noise, _, _ in self.draws]
            self.floor = self.score_toy([again for _, _, again in self.draws])

    @property
    def headline(self) -> str:
        return HEADLINE.get(self.dataset, "energy_distance")

    def score_digits(self, images: Tensor) -> dict[str, float]:
        scores = quality.digit_scores(images.reshape(images.shape[0], 64), self.classifier, self.reference, self.config)
        return {k: scores[k] for k in DIGIT_KEYS}

    def score_toy(self, samples: list[Tensor], draws: int | None = None) -> dict[str, float]:
        out = []
        for x, (_, real, _) in list(zip(samples, self.draws))[: draws or len(self.draws)]:
            row = {"energy_distance": energy_distance(x, real)}
            if self.dataset == "checkerboard":
                row["share_on_squares"] = float(on_checkerboard(x).double().mean())
            out.append(row)
        return {k: statistics.fmean(r[k] for r in out) for k in out[0]}

    def noise(self, k: int = 0) -> Tensor:
        noise = self.noises[k]
        return noise.view(-1, 1, 8, 8) if self.dataset == "digits_dit" else noise

    def cond(self) -> Tensor | None:
        return self.labels if self.dataset == "digits_dit" else None

    def score(self, sample: Callable[[Tensor], Tensor], draws: int | None = None) -> dict[str, float]:
        """Scores of ``sample(noise)`` (toys: the mean over the evaluation draws)."""
        if self.dataset.startswith("digits"):
            return self.score_digits(sample(self.noise()))
        count = draws or len(self.draws)
        return self.score_toy([sample(self.noises[k]) for k in range(count)], draws=count)

    def soflow(
        self, model: nn.Module, seed: int, draws: int | None = None, samplers: tuple[str, ...] = SAMPLERS
    ) -> dict[str, dict[str, float]]:
        """Scores of each SoFlow sampler in ``samplers``."""
        count = 1 if self.dataset.startswith("digits") else (draws or len(self.draws))
        per_draw = [soflow_samples(model, self.noise(k), self.cond(), self.config, seed) for k in range(count)]
        out = {}
        for name in samplers:
            xs = [d[name] for d in per_draw]
            out[name] = self.score_digits(xs[0]) if self.dataset.startswith("digits") else self.score_toy(xs, count)
        return out

    def curve_point(self, seed: int) -> Callable[[nn.Module], dict]:
        """The one-step and chained two-step scores of a model (toys: ``curve_eval_draws`` draws)."""

        def point(model: nn.Module) -> dict:
            scores = self.soflow(model, seed, draws=self.config.curve_eval_draws, samplers=(SAMPLERS[0], SAMPLERS[2]))
            extra = {"one_step_on_squares": scores["1"]["share_on_squares"]} if self.dataset == "checkerboard" else {}
            return {
                "one_step": scores["1"][self.headline],
                "two_step_chain": scores[SAMPLERS[2]][self.headline],
                **extra,
            }

        return point


def run_dataset(
    dataset: str, seed: int, config: FinetuneConfig, digits, classifier, base: dict
) -> tuple[list[dict], dict[str, Tensor]]:
    """Every method of the grid for one dataset and seed; rows, and one-step samples for the figure."""
    b = budget(config, dataset)
    evaluation = Evaluation(dataset, seed, config, digits, classifier)
    rows = [{"kind": "floor", "dataset": dataset, "seed": seed, **evaluation.floor, **base}]
    pictures: dict[str, Tensor] = {}

    def add(method: str, run: Run, scores: dict[str, dict[str, float]], pretrain: Run | None = None) -> None:
        for sampler, values in scores.items():
            rows.append(
                {
                    "kind": "sample",
                    "dataset": dataset,
                    "seed": seed,
                    "method": method,
                    "sampler": sampler,
                    "nfe": int(sampler.split()[0]),
                    "steps": run.steps,
                    "train_seconds": run.seconds + (pretrain.seconds if pretrain else 0.0),
                    "budget_s": b,
                    **values,
                    **base,
                }
            )
        if run.curve:
            for point in run.curve:
                rows.append({"kind": "curve", "dataset": dataset, "seed": seed, "method": method, **point, **base})
        print(
            f"{dataset:15s} seed {seed} {method:17s} {run.steps:6d} steps in {run.seconds:6.1f} CPU s: "
            + "  ".join(f"{s} {v[evaluation.headline]:.4g}" for s, v in scores.items()),
            flush=True,
        )

    if dataset == "digits_dit":
        return run_dit(seed, config, digits, evaluation, add, rows, b)

    qc = quality_config(config, b)
    fm_method = quality.Method("flow_matching", qc)
    sf_method = quality.Method("soflow", dataclasses.replace(qc, soflow_preset=config.soflow_preset))
    draw = quality.batch_source(
        dataset, digits, config.digits_batch_size if dataset == "digits" else config.toy_batch_size
    )
    lr = config.digits_lr if dataset == "digits" else config.toy_lr

    def fm_scores(run: Run) -> dict[str, dict[str, float]]:
        return {
            f"{n} Euler": evaluation.score(lambda z, n=n: quality.euler_sample(run.model, z, n))
            for n in config.flow_matching_nfe
        }

    def from_quality(method: quality.Method, seconds: float) -> Run:
        trained = quality.train(method, dataset, seed, dataclasses.replace(qc, budget_s=seconds), digits)
        return Run(trained.model, trained.steps, trained.seconds, [])

    pretrained = from_quality(fm_method, b)
    add("flow_matching_B", pretrained, fm_scores(pretrained))
    add("flow_matching_2B", run := from_quality(fm_method, 2 * b), fm_scores(run))
    converted = from_velocity_model(pretrained.model).model

    def finetune(preset: str, seconds: float) -> Run:
        objective = SoFlowObjective.from_preset(preset)
        frozen = copy.deepcopy(converted).eval().requires_grad_(False)
        velocity = frozen if objective.consistency_velocity == "pretrained" else None
        torch.manual_seed(seed)
        return train_loop(
            copy.deepcopy(converted).train().requires_grad_(True),
            soflow_loss(objective, velocity),
            lambda g: (draw(g), None),
            seconds=seconds, lr=lr, config=config, seed=seed, curve=evaluation.curve_point(seed),
        )  # fmt: skip

    tuned = finetune(config.finetune_preset, b)
    scores = evaluation.soflow(tuned.model, seed)
    add("finetune", tuned, scores, pretrained)
    pictures["finetune"] = soflow_samples(tuned.model, evaluation.noise(), None, config, seed)["1"]
    if dataset in config.naive_datasets:
        naive = finetune("toy", b)
        add("naive_finetune", naive, evaluation.soflow(naive.model, seed), pretrained)
    for method, seconds in (("soflow_B", b), ("soflow_2B", 2 * b)):
        scratch = from_quality(sf_method, seconds)
        add(method, scratch, evaluation.soflow(scratch.model, seed))
        if method == "soflow_2B":
            pictures["soflow_2B"] = soflow_samples(scratch.model, evaluation.noise(), None, config, seed)["1"]
    if dataset in config.long_datasets:
        long = finetune(config.finetune_preset, config.long_factor * b)
        add("finetune_long", long, evaluation.soflow(long.model, seed), pretrained)
    return rows, pictures


def run_dit(seed: int, config: FinetuneConfig, digits, evaluation: Evaluation, add, rows: list, b: float):
    """SiT in its convention → SiT's training file → from_velocity_model(file) → fine-tune; SoFlow DiT from scratch."""
    images = digits.train.view(-1, 1, 8, 8)

    def draw(g: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(images.shape[0], (config.dit_batch_size,), generator=g)
        return images[index], digits.train_labels[index]

    size = {"input_size": 8, "in_channels": 1, "patch_size": config.dit_patch, "hidden_size": config.dit_hidden}
    size |= {"depth": config.dit_depth, "num_heads": config.dit_heads}

    def sit_scores(run: Run) -> dict[str, dict[str, float]]:
        return {
            f"{n} Euler": evaluation.score(lambda z, n=n: sit_euler(run.model, z, evaluation.labels, n))
            for n in config.flow_matching_nfe
        }

    torch.manual_seed(seed)
    sit = SiT(**size, num_classes=10, class_dropout_prob=0.1, learn_sigma=True)
    pretrained = train_loop(sit, sit_loss, draw, seconds=b, lr=config.dit_lr, config=config, seed=seed)
    add("flow_matching_B", pretrained, sit_scores(pretrained))
    with tempfile.TemporaryDirectory() as folder:
        # What SiT's train.py writes, then what a SiT-XL/2 user runs (XL/2 needs no num_heads: it is a named size).
        file = save_sit_training_file(
            Path(folder) / "0000100.pt", sit, pretrained.model, pretrained.optimizer, model_name="SiT-digits",
            num_classes=10, image_size=8,
        )  # fmt: skip
        converted = from_velocity_model(file, num_heads=config.dit_heads).model
    frozen = copy.deepcopy(converted).eval().requires_grad_(False)
    torch.manual_seed(seed)
    tuned = train_loop(
        copy.deepcopy(converted).train().requires_grad_(True),
        soflow_loss(SoFlowObjective.from_preset(config.finetune_preset), frozen),
        draw, seconds=b, lr=config.dit_lr, config=config, seed=seed, curve=evaluation.curve_point(seed),
    )  # fmt: skip
    add("finetune", tuned, evaluation.soflow(tuned.model, seed), pretrained)
    for method, seconds in (("soflow_B", b), ("soflow_2B", 2 * b)):
        torch.manual_seed(seed)
        scratch = train_loop(
            DiT(**size, num_classes=10),
            soflow_loss(SoFlowObjective.from_preset(config.soflow_preset)),
            draw, seconds=seconds, lr=config.dit_lr, config=config, seed=seed,
        )  # fmt: skip
        add(method, scratch, evaluation.soflow(scratch.model, seed))
    return rows, {}


# ------------------------------------------------------------------------------------- summaries


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def seed_means(rows: list[dict]) -> list[dict]:
    """Seed-averaged rows (``seed: "mean"``) with the seeds' standard deviation as ``<metric>_std``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["kind"] in ("sample", "floor") and row["seed"] != "mean":
            key = (row["kind"], row["dataset"], row.get("method"), row.get("sampler"))
            groups.setdefault(key, []).append(row)
    means = []
    numeric = ("steps", "train_seconds", "energy_distance", "share_on_squares", *DIGIT_KEYS)
    for members in groups.values():
        row = {k: v for k, v in members[0].items() if k not in numeric}
        row.update(seed="mean", num_seeds=len(members))
        for key in numeric:
            if key in members[0]:
                row[key], row[f"{key}_std"] = _mean_std([float(m[key]) for m in members])
        means.append(row)
    return means


def best(rows: list[dict], dataset: str, method: str, key: str, nfe_max: int | None = None) -> dict | None:
    """The seed-mean row of ``method`` with the lowest ``key`` (over its samplers / NFEs)."""
    found = [
        r
        for r in rows
        if r["kind"] == "sample" and r["seed"] == "mean" and r["dataset"] == dataset and r["method"] == method
        and (nfe_max is None or r["nfe"] <= nfe_max) and math.isfinite(float(r[key]))
    ]  # fmt: skip
    return min(found, key=lambda r: float(r[key])) if found else None


def mean_of(rows: list[dict], dataset: str, method: str, sampler: str) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["kind"] == "sample" and r["seed"] == "mean" and r["dataset"] == dataset
            and r["method"] == method and r["sampler"] == sampler
        ),
        None,
    )  # fmt: skip


def verdicts(rows: list[dict], dataset: str) -> list[str]:
    """The issue's targets, where they apply to ``dataset``."""
    key = HEADLINE.get(dataset, "energy_distance")
    out = []
    tuned = mean_of(rows, dataset, "finetune", "1")
    scratch_b, scratch_2b = mean_of(rows, dataset, "soflow_B", "1"), mean_of(rows, dataset, "soflow_2B", "1")
    fm_b, fm_2b = best(rows, dataset, "flow_matching_B", key), best(rows, dataset, "flow_matching_2B", key)
    two = [mean_of(rows, dataset, "finetune", s) for s in SAMPLERS[1:]]
    two = [r for r in two if r is not None]
    if tuned and scratch_b:
        ratio = tuned[key] / scratch_b[key]
        out.append(
            f"fine-tuned 1 step vs SoFlow from scratch for B: {tuned[key]:.4g} vs {scratch_b[key]:.4g} ({ratio:.2f}×)"
        )
    if two and fm_b:
        best_two = min(two, key=lambda r: r[key])
        out.append(
            f"fine-tuned 2 steps ({best_two['sampler']}) vs Flow Matching B's best: {best_two[key]:.4g} vs "
            f"{fm_b[key]:.4g} at {fm_b['sampler']} ({'at most' if best_two[key] <= fm_b[key] else 'above'})"
        )
    if tuned and scratch_2b:
        ratio = tuned[key] / scratch_2b[key]
        out.append(
            f"same total budget 2B, 1 step: fine-tuned {tuned[key]:.4g} vs scratch {scratch_2b[key]:.4g} ({ratio:.2f}×)"
        )
    if tuned and fm_2b:
        ratio = tuned[key] / fm_2b[key]
        out.append(
            f"fine-tuned 1 step vs Flow Matching 2B's best: {tuned[key]:.4g} vs {fm_2b[key]:.4g} at "
            f"{fm_2b['sampler']} ({ratio:.2f}×)"
        )
    if tuned and "share_on_squares" in tuned:
        out.append(f"fine-tuned 1 step on the squares: {100 * tuned['share_on_squares']:.1f} %")
    for method in ("finetune", "finetune_long"):
        curve = [r for r in rows if r["kind"] == "curve" and r["dataset"] == dataset and r["method"] == method]
        if not curve:
            continue
        seeds = sorted({r["seed"] for r in curve})
        last_is_best = 0
        worst_rise = 0.0
        for seed in seeds:
            points = [r["one_step"] for r in curve if r["seed"] == seed]
            last_is_best += points[-1] <= min(points)
            worst_rise = max(worst_rise, points[-1] / min(points) - 1.0)
        name = "fine-tune" if method == "finetune" else f"{config_long(rows)}B fine-tune"
        out.append(
            f"{name} curve, one step: the last point is the seed's best in {last_is_best} of {len(seeds)} seeds, "
            f"and at most {100 * worst_rise:.1f} % above the seed's best"
        )
    return out


def config_long(rows: list[dict]) -> int:
    return int(next(r for r in rows if "config" in r)["config"]["long_factor"])


def markdown(rows: list[dict], config: FinetuneConfig) -> str:
    env = next(r for r in rows if "device" in r)
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; commit {env['commit']}. Budgets B of process CPU time (one "
        f"thread): {config.toy_budget_s:g} s on the toys, {config.digits_budget_s:g} s on the digits, "
        f"{config.dit_budget_s:g} s for digits_dit. Values are seed means ± standard deviation across seeds.",
        "",
    ]
    datasets = [d for d in config.datasets if any(r["dataset"] == d for r in rows)]
    for dataset in datasets:
        key = HEADLINE.get(dataset, "energy_distance")
        means = [r for r in rows if r["kind"] == "sample" and r["seed"] == "mean" and r["dataset"] == dataset]
        floor = next(
            (r for r in rows if r["kind"] == "floor" and r["seed"] == "mean" and r["dataset"] == dataset), None
        )
        extra = (
            ["share_on_squares"]
            if dataset == "checkerboard"
            else (["confident_fraction"] if "digits" in dataset else [])
        )
        seeds = means[0]["num_seeds"] if means else 0
        lines += [
            f"### {dataset} (B = {budget(config, dataset):g} CPU s, {seeds} seed{'s' if seeds != 1 else ''})",
            "",
            "| method | sampler | steps | CPU s (all stages) | " + " | ".join([key.replace("_", " "), *extra]) + " |",
            "|---|---|---|---|" + "---|" * (1 + len(extra)),
        ]
        for method in METHODS:
            for row in (r for r in means if r["method"] == method):
                label = METHODS[method].format(long=config.long_factor)
                cells = [f"{row[k]:.4g} ± {row[f'{k}_std']:.2g}" for k in (key, *extra)]
                lines.append(
                    f"| {label} | {row['sampler']} | {row['steps']:.0f} | {row['train_seconds']:.0f} | "
                    + " | ".join(cells)
                    + " |"
                )
        if floor is not None:
            cells = [f"{floor[k]:.4g}" for k in (key, *extra) if k in floor]
            lines.append("| real vs real (floor) | – | – | – | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"* {v}" for v in verdicts(rows, dataset)] + [""]
    return "\n".join(lines) + "\n"


def draw_curves(rows: list[dict], config: FinetuneConfig, path: Path) -> Path:
    """One-step quality of the fine-tune's EMA against its CPU seconds, per dataset; the long runs dashed."""
    plt = quality._plt()
    datasets = [d for d in config.datasets if any(r["kind"] == "curve" and r["dataset"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        key = HEADLINE.get(dataset, "energy_distance")
        for method, style in (("finetune", "-"), ("finetune_long", "--")):
            curve = [r for r in rows if r["kind"] == "curve" and r["dataset"] == dataset and r["method"] == method]
            for seed in sorted({r["seed"] for r in curve}):
                points = [r for r in curve if r["seed"] == seed]
                label = f"{method.replace('_', ' ')}, seed {seed}"
                ax.plot([p["cpu_seconds"] for p in points], [p["one_step"] for p in points], style, marker="o",
                        ms=3, label=label)  # fmt: skip
        for method, color in (("soflow_B", "gray"), ("soflow_2B", "black")):
            row = mean_of(rows, dataset, method, "1")
            if row is not None:
                ax.axhline(row[key], color=color, ls=":", label=f"{METHODS[method]} (1 step, mean)")
        fm = best(rows, dataset, "flow_matching_B", key)
        if fm is not None:
            ax.axhline(fm[key], color="green", ls=":", label=f"Flow Matching B, best ({fm['sampler']})")
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning CPU seconds")
        ax.set_ylabel(f"one-step {key.replace('_', ' ')}")
        ax.set_title(dataset)
        ax.legend(fontsize=6)
    fig.suptitle("One-step quality of the fine-tuned model's EMA against fine-tuning time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- CLI


def parse_config(argv: list[str] | None = None) -> tuple[FinetuneConfig, list[Path]]:
    """The preset named by ``--preset`` with command-line overrides, and the files of ``--merge``."""
    parser = preset_parser(__doc__, PRESETS, "full")
    parser.add_argument("--seeds", type=comma_list(int), help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--datasets", type=comma_list(), help="comma-separated, from " + ", ".join(DATASETS))
    parser.add_argument("--toy-budget-s", dest="toy_budget_s", type=float, help="B on the toys")
    parser.add_argument("--digits-budget-s", dest="digits_budget_s", type=float, help="B on the digits")
    parser.add_argument("--dit-budget-s", dest="dit_budget_s", type=float, help="B of digits_dit")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", help="file stem of the outputs")
    parser.add_argument("--out-dir", dest="out_dir", help="output folder; empty: runs/benchmarks")
    parser.add_argument("--merge", type=comma_list(), help="results files to merge into one table (no training)")
    args = parser.parse_args(argv)
    config = resolve_preset(args, PRESETS, ignore=("merge",))
    unknown = sorted(set(config.datasets) - set(DATASETS))
    if unknown or not config.datasets:
        parser.error(
            f"--datasets: unknown or empty {unknown or list(config.datasets)}; choose from {', '.join(DATASETS)}"
        )
    if not config.seeds:
        parser.error("--seeds: give at least one seed")
    for name in ("toy_budget_s", "digits_budget_s", "dit_budget_s"):
        if not getattr(config, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0; got {getattr(config, name)}")
    if config.threads < 1:
        parser.error(f"--threads must be >= 1; got {config.threads}")
    if any(d.startswith("digits") for d in config.datasets):
        try:
            import sklearn  # noqa: F401
        except ImportError:
            parser.error('the digits need scikit-learn: pip install -e ".[bench]", or leave them out of --datasets')
    merge = [Path(p) for p in (args.merge or [])]
    missing = [str(p) for p in merge if not p.is_file()]
    if missing:
        parser.error(f"--merge: no such file {', '.join(missing)}")
    return config, merge


def run(config: FinetuneConfig) -> list[dict]:
    """Train and evaluate the grid; return the rows (seed means included)."""
    torch.set_num_threads(config.threads)
    base = {**environment(torch.device("cpu")), "config": dataclasses.asdict(config)}
    qc = quality_config(config, 1.0)
    digits = classifier = None
    if any(d.startswith("digits") for d in config.datasets):
        digits = quality.load_digits(qc)
        classifier, accuracy = quality.train_classifier(digits, qc)
        print(f"digit classifier: held-out accuracy {accuracy:.4f}", flush=True)
    rows: list[dict] = []
    for dataset in config.datasets:
        for seed in config.dit_seeds if dataset == "digits_dit" else config.seeds:
            found, _ = run_dataset(dataset, seed, config, digits, classifier, base)
            rows += found
    return rows + seed_means(rows)


def main(argv: list[str] | None = None) -> int:
    config, merge = parse_config(argv)
    folder = Path(config.out_dir) if config.out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if merge:
        rows = [r for path in merge for r in json.loads(path.read_text()) if r.get("seed") != "mean"]
        saved = rows[0]["config"]
        config = dataclasses.replace(
            FinetuneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}),
            datasets=tuple(dict.fromkeys(r["dataset"] for r in rows)),
            out=config.out,
            out_dir=config.out_dir,
        )
        rows += seed_means(rows)
    else:
        rows = run(config)
    (folder / f"{config.out}-config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    table = markdown(rows, config)
    json_path, md_path = write_rows(config.out, rows, table, directory=folder)
    figure = draw_curves(rows, config, folder / f"{config.out}-curve.png")
    print(table)
    print(f"wrote {json_path}, {md_path} and {figure} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
