"""Resume planning: which checkpoint a start resumes, whether this command line may resume it, and ``--init``.

Rank 0 picks the newest usable checkpoint of the run folder (verified against its manifest,
loadable with ``weights_only``, complete and finite; the others are reported and skipped) and
compares its recorded settings with the command line's (``APPLIED_ON_RESUME``,
``IGNORED_ON_RESUME``); every rank learns the resulting ``ResumePlan`` before anything is
written. ``Resumed`` is what the loop starts from: the step, the data position and the
averaging window of the log.
"""

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _runtime import Runtime, broadcast_object
from torch import nn

from soflow_core import SoFlowObjective
from soflow_core.nets import DiT, from_velocity_model, load_weights, read_state_dict
from soflow_core.parameterizations import param_name
from soflow_core.paths import path_name
from soflow_core.train.checkpoint import (
    CheckpointError,
    latest_loadable_checkpoint,
    list_checkpoints,
    load_checkpoint,
    non_finite_entries,
    remove_stale_temporaries,
)

RUN_ENTRIES = ("step", "model", "ema", "optimizer", "config", "rng", "data")
VELOCITY_MODEL = "velocity_model"  # <out>/velocity_model: the frozen --init network of a pretrained-velocity run


def check_run_payload(path: Path, payload: dict[str, Any]) -> None:
    """Raise CheckpointError unless ``payload`` is a complete checkpoint of these trainers with finite state.

    A checkpoint that fails here is reported and skipped like a damaged one: its manifest may
    match, but it cannot resume a run (another writer's file, a truncated dict, or non-finite
    weights written by an older version of these trainers).
    """
    missing = [key for key in RUN_ENTRIES if key not in payload]
    if missing:
        raise CheckpointError(path, f"not a checkpoint of these trainers: no {', '.join(map(repr, missing))} entry")
    kinds = {"model": Mapping, "ema": Mapping, "optimizer": Mapping, "config": Mapping, "data": Mapping, "rng": list}
    wrong = [f"{k!r} is a {type(payload[k]).__name__}" for k, kind in kinds.items() if not isinstance(payload[k], kind)]
    if not isinstance(payload["step"], int) or payload["step"] < 0:
        wrong.append(f"'step' is {payload['step']!r}")
    if isinstance(payload["data"], Mapping) and not isinstance(payload["data"].get("position"), int):
        wrong.append("'data' has no integer 'position'")
    if isinstance(payload["rng"], list) and not payload["rng"]:
        wrong.append("'rng' is empty")
    if wrong:
        raise CheckpointError(path, f"malformed checkpoint of these trainers: {'; '.join(wrong)}")
    bad = non_finite_entries({key: payload[key] for key in ("model", "ema", "optimizer")})
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(path, f"non-finite values in {', '.join(bad[:3])}{more}")


def load_run_checkpoint(source: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest usable checkpoint of the run that ``source`` names, with its payload; None if it names no run.

    A run folder gives its newest checkpoint (in ``checkpoints/`` or the folder itself) that
    verifies against its manifest, loads with ``weights_only`` and passes ``check_run_payload``;
    every one skipped is reported. A ``step-*.pt`` file with its manifest is loaded and checked
    as it is. Raises SystemExit when nothing usable is found.
    """
    if source.is_file():
        if not (source.name.startswith("step-") and source.with_suffix(".json").is_file()):
            return None
        try:
            payload = load_checkpoint(source)
            check_run_payload(source, payload)
        except CheckpointError as error:
            raise SystemExit(str(error)) from error
        return source, payload
    if not source.is_dir() or not ((source / "checkpoints").is_dir() or list_checkpoints(source)):
        return None
    for folder in (source / "checkpoints", source):
        found = latest_loadable_checkpoint(folder, check=check_run_payload)
        if found is not None:
            return found
    raise SystemExit(f"no usable checkpoint in {source} (looked in {source / 'checkpoints'} and {source})")


def initialize_from(net: nn.Module, source: str, objective: SoFlowObjective, convention: str = "") -> str:
    """Load ``--init`` weights into ``net`` (EMA weights when the source has them); returns what was loaded.

    ``source`` is a run of these trainers (its newest usable checkpoint, verified), a pretrained
    folder, an official SoFlow training file, a state dict or a .safetensors file. Every key and
    shape is checked first; a mismatch names the network the weights would fit.

    A velocity model is converted first (``soflow_core.nets.from_velocity_model``), so that
    F(x, t, s) starts as its velocity for every s: with ``convention`` (``--init-convention``:
    ``"soflow"`` for a Flow Matching model of this library, ``"sit"``, ``"sit_gvp"``), and
    without it for a DiT-layout checkpoint that lacks SoFlow's s_embedder (a SiT training file
    says its convention in its args; a bare SiT state dict needs the flag).
    """
    run = load_run_checkpoint(Path(source))
    try:
        if run is not None:
            if convention:
                return _convert_into(net, run[1], convention, objective, f"run checkpoint {run[0]}")
            report = load_weights(net, run[1])
            return f"run checkpoint {run[0]}, entry {report.origin.entry!r}"
        if convention:
            return _convert_into(net, source, convention, objective)
        contents = read_state_dict(source)
        if "x_embedder.proj.weight" in contents.state and "s_embedder.mlp.0.weight" not in contents.state:
            return _convert_into(net, source, None, objective)  # SiT's layout: a velocity model
        _warn_sampling(source, (contents.pretrained or {}).get("sampling", {}), objective)
        return str(load_weights(net, contents).origin)
    except ValueError as error:
        hint = " (the flag --init-convention)" if "convention=" in str(error) else ""
        raise SystemExit(f"--init {source} cannot start this run: {error}{hint}") from error


def _warn_sampling(source: object, saved: Mapping[str, str], objective: SoFlowObjective) -> None:
    ours = {"path": path_name(objective.path), "param": param_name(objective.param)}
    if any(k in ours and v != ours[k] for k, v in saved.items()):
        warnings.warn(f"{source} was saved for sampling with {dict(saved)}; this objective trains {ours}", stacklevel=2)


def _convert_into(
    net: nn.Module, source: object, convention: str | None, objective: SoFlowObjective, name: str | None = None
) -> str:
    """Convert a velocity model with the trainer's class count and heads, then load it into ``net``."""
    hints = {"num_classes": net.num_classes, "num_heads": net.num_heads} if isinstance(net, DiT) else {}
    converted = from_velocity_model(source, convention=convention, param=objective.param, **hints)
    _warn_sampling(source, {"path": path_name(converted.path)}, objective)
    load_weights(net, converted.model.state_dict())
    return f"{name or converted.origin}, converted from a velocity model (convention {converted.convention.name!r})"


def pretrained_velocity(net: nn.Module, out: Path, *, fresh: bool, init: str | None, is_main: bool) -> nn.Module:
    """The frozen network whose velocity steps the consistency samples to x_ℓ (``--consistency-velocity pretrained``).

    A fresh run takes ``net`` as ``--init`` made it and writes it to ``<out>/velocity_model`` (a
    pretrained folder, on the main rank) before the first step; a resumed run reads it back, so
    every step of a run, resumed or not, follows the same velocity.
    """
    folder = out / VELOCITY_MODEL
    if fresh:
        if init is None:
            raise SystemExit(
                "--consistency-velocity pretrained steps along the --init network's velocity: a fresh run needs --init"
            )
        frozen = copy.deepcopy(net)
        if is_main:
            frozen.save_pretrained(folder, metadata={"init": init})
    else:
        if not folder.is_dir():
            raise SystemExit(f"{folder} is missing: this pretrained-velocity run cannot resume without it")
        frozen = copy.deepcopy(net)
        load_weights(frozen, folder)
    return frozen.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- resuming with other settings

# What a resumed run does with a setting that differs from the checkpoint's. APPLIED: the new
# value holds from the resumed step on, is written to config.json and to later checkpoints, and
# reaches the restored state (optimizer hyperparameters such as --lr and --beta2 are written into
# the restored optimizer). IGNORED: only meaningful for a fresh run; the run keeps its recorded
# value. Every other setting (the network, the objective's recipe, the data, the seed, the global
# batch, the EMA rule) must match: a resume with another value is refused before anything is
# written. The recipe (path, parameterization, λ, times, r schedule, p, ε, ω, m, t_d, label drop)
# defines what the network learns, so changing it midway would train another model under the
# run's name; of the objective's settings only --backend (where the same maths runs) and
# --total-steps (K: a longer run, the schedule's documented dependence on it) are applied.
APPLIED_ON_RESUME = frozenset(
    {
        "out", "data", "max_steps", "total_steps", "grad_accum", "lr", "beta2", "ckpt_every", "keep", "keep_every",
        "log_every", "sample_every", "sample_grid", "precision", "tf32", "compile", "compile_mode", "compile_backend",
        "tensorboard", "device", "progress", "vae", "gradient_checkpointing", "backend", "fid_every", "fid_samples",
        "fid_nfe", "fid_batch_size", "fid_reference", "inception_weights", "allow_other_inception_weights", "omega",
    }
)  # fmt: skip
IGNORED_ON_RESUME = frozenset({"init", "init_convention"})


@dataclass(frozen=True)
class ResumePlan:
    """What rank 0 decided about the start: the checkpoint to resume (or None), the config to record, why not."""

    checkpoint: str | None
    config: dict[str, Any]  # what config.json and later checkpoints record
    applied: dict[str, tuple[Any, Any]]  # setting: (the checkpoint's value, the value now used)
    refusal: str | None = None
    step: int = 0  # the checkpoint's step
    # a new process layout: {"world_size": [old, new]} when the world size changed, and {"micro_batches": [old,
    # new]} when the micro-batches per step (world size × --grad-accum) changed, so that they hold other samples
    layout: dict[str, list[int]] = field(default_factory=dict)

    def layout_lines(self) -> list[str]:
        """What the new layout changes, in words (empty when nothing changed)."""
        lines = []
        if "world_size" in self.layout:
            old, new = self.layout["world_size"]
            lines.append(f"world size {old} -> {new}: the metrics.jsonl averaging window restarts at step {self.step}")
        if "micro_batches" in self.layout:
            old, new = self.layout["micro_batches"]
            lines.append(
                f"micro-batches per step (world size × --grad-accum) {old} -> {new}: from step {self.step} on, each "
                "holds other samples and draws from other seeds, so the run no longer repeats an uninterrupted "
                f"run with {old} micro-batches bit for bit"
            )
        elif "world_size" in self.layout:
            lines.append("the micro-batches per step are the same, so the draws equal an uninterrupted run's")
        return lines


def plan_resume(
    now: Mapping[str, Any], num_samples: int, path: Path, payload: Mapping[str, Any], world_size: int = 1
) -> ResumePlan:
    """Compare the checkpoint's settings with the command line's, per ``APPLIED_ON_RESUME``/``IGNORED_ON_RESUME``.

    ``now`` is the command line's resolved configuration, ``num_samples`` the size of its data set
    and ``world_size`` the number of processes that train now.
    """
    saved = payload["config"]
    applied, ignored, refused = {}, {}, {}
    for key in sorted(set(saved) & set(now)):  # a key only one side knows comes from another version
        if saved[key] == now[key]:
            continue
        kind = applied if key in APPLIED_ON_RESUME else ignored if key in IGNORED_ON_RESUME else refused
        kind[key] = (saved[key], now[key])
    problems = [f"--{key.replace('_', '-')} {new!r} (the run has {old!r})" for key, (old, new) in refused.items()]
    data = payload["data"]
    if data.get("num_samples") not in (None, num_samples):
        problems.append(f"a data set of {num_samples} samples (the run has {data.get('num_samples')})")
    parallel = "fsdp" if now.get("fsdp") else "ddp"
    if payload.get("parallel", "ddp") != parallel:
        problems.append(f"--{'no-' if parallel == 'ddp' else ''}fsdp (the run was written with {payload['parallel']})")
    step = int(payload["step"])
    if now["total_steps"] < step:
        problems.append(f"--total-steps {now['total_steps']}, below step {step} where the run resumes")
    layout = {}
    saved_world = payload.get("world_size")
    if isinstance(saved_world, int):  # a checkpoint that does not record it is taken as it comes
        if saved_world != world_size:
            layout["world_size"] = [saved_world, world_size]
        before, after = saved_world * saved.get("grad_accum", 1), world_size * now["grad_accum"]
        if before != after:
            layout["micro_batches"] = [before, after]
    record = {**now, **{key: old for key, (old, _) in ignored.items()}}
    if ignored:
        warnings.warn(f"{', '.join(ignored)} only apply to a fresh run; resuming {path} ignores them", stacklevel=2)
    refusal = None
    if problems:
        refusal = (
            f"cannot resume {path} with {'; '.join(problems)}: these settings must match the run's. Pass the run's "
            "values, or start a new run in another --out (with --init to start from this run's weights)"
        )
    return ResumePlan(checkpoint=str(path), config=record, applied=applied, refusal=refusal, step=step, layout=layout)


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, wanted: list[dict[str, Any]]) -> None:
    """Write the command line's hyperparameters (lr, betas, ...) into the param groups of a restored optimizer."""
    for group, settings in zip(optimizer.param_groups, wanted):
        group.update(settings)


# The files a run writes whole through temporary files (see remove_stale_temporaries), by folder.
WHOLE_FILES = {".": (r"config\.json", r"metrics\.jsonl"), "samples": (r"step-\d{9,}\.png",)}


def plan_start(
    runtime: Runtime, out: Path, config: Mapping[str, Any], num_samples: int
) -> tuple[ResumePlan, dict[str, Any] | None]:
    """Decide on rank 0 where this start begins, and tell every rank; SystemExit if the resume is refused.

    Rank 0 first removes the temporary files of interrupted writes (it holds the folder's lock,
    so no other writer can be mid-write), then picks the newest usable checkpoint. Returns the
    plan and, on rank 0, the checkpoint's payload (None elsewhere and for a fresh run).

    Args:
        runtime: This process.
        out: The run folder.
        config: The command line's resolved configuration.
        num_samples: The size of this command line's data set.
    """
    payload: dict[str, Any] | None = None
    plan = None
    if runtime.is_main:
        removed = remove_stale_temporaries(out / "checkpoints")
        for where, names in WHOLE_FILES.items():
            removed += remove_stale_temporaries(out / where, names)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of interrupted checkpoint writes", flush=True)
        found = latest_loadable_checkpoint(out / "checkpoints", check=check_run_payload)
        if found is None:
            plan = ResumePlan(checkpoint=None, config=dict(config), applied={})
        else:
            path, payload = found
            plan = plan_resume(config, num_samples, path, payload, runtime.world_size)
    plan = broadcast_object(runtime, plan)
    if plan.refusal is not None:
        raise SystemExit(plan.refusal)
    return plan, payload


@dataclass(frozen=True)
class Resumed:
    """Where the loop starts: the step, the data position (in samples) and this rank's averaging window."""

    step: int = 0
    position: int = 0
    window: dict[str, Any] | None = None  # {"sums": {metric: tensor}, "steps": n}, or None for a fresh window
