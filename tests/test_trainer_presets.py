"""The trainers' presets are the released SoFlow runs, and every recipe setting is a flag (in process).

The official values are written out here, independently of the presets: zlab-princeton/SoFlow's imagenet.yaml and
cifar.yaml, its train.py (optimizers, EMA, the label table), its README (the released models: B/4 cond and uncond at
80 epochs, B/2, M/2, L/2, XL/2 at 240 epochs = 1.2M steps at batch 256, the CIFAR-10 UNet at 800k steps) and, for
the guidance scale of B/2 to XL/2, the paper's text (not confirmed against the released per-model configs).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from soflow_core import ClassifierFreeGuidance, SoFlowObjective
from soflow_core.parameterizations import EulerParam, TrigParam
from soflow_core.paths import LinearPath, TrigPath
from soflow_core.time_samplers import ConsistencyTimeSampler, CosineSchedule, ExponentSchedule, LogitNormal
from soflow_core.weighting import AdaptiveWeighting

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _training as T  # noqa: E402
import train_dit_cifar10 as cifar  # noqa: E402
import train_dit_imagenet as imagenet  # noqa: E402

# preset: (model, K = total steps, ω, label-drop rate, null row in the label table)
IMAGENET_RUNS = {
    "B-4-cond": ("DiT-B/4", 400_000, 3.0, 0.1, True),
    "B-4-uncond": ("DiT-B/4", 400_000, 1.0, 0.0, False),  # labels still fed
    "B-2-cond": ("DiT-B/2", 1_200_000, 2.5, 0.1, True),
    "M-2-cond": ("DiT-M/2", 1_200_000, 2.25, 0.1, True),
    "L-2-cond": ("DiT-L/2", 1_200_000, 2.0, 0.1, True),
    "XL-2-cond": ("DiT-XL/2", 1_200_000, 2.0, 0.1, True),
}
# model: (patch, hidden, depth, heads)
DIT_SIZES = {
    "DiT-B/4": (4, 768, 12, 12),
    "DiT-B/2": (2, 768, 12, 12),
    "DiT-M/2": (2, 1024, 16, 16),
    "DiT-L/2": (2, 1024, 24, 16),
    "DiT-XL/2": (2, 1152, 28, 16),
}
IMAGENET_TRAINING = {
    "batch_size": 256,
    "lr": 1e-4,
    "seed": 42,
    "ema_decay": 0.9999,
    "ema_every": 1,
    "ema_float64": False,
    "ema_warmup": False,
    "ckpt_every": 25_000,
    "log_every": 100,
    "precision": "fp32",
    "tf32": True,
    "num_classes": 1000,
}
CIFAR_TRAINING = {**IMAGENET_TRAINING, "batch_size": 1024, "ema_every": 16, "ema_float64": True, "total_steps": 800_000}
del CIFAR_TRAINING["num_classes"]


def imagenet_objective(scale: float, drop: float) -> SoFlowObjective:
    """imagenet.yaml's recipe, written out."""
    return SoFlowObjective(
        path=LinearPath(),
        param=EulerParam(),
        fm_fraction=0.75,
        fm_time=LogitNormal(mean=-0.2, std=1.0),
        consistency_times=ConsistencyTimeSampler(
            t_distribution=LogitNormal(mean=0.2, std=0.8),
            s_distribution=LogitNormal(mean=-1.0, std=0.8),
            schedule=ExponentSchedule(r_init=0.1, r_end=0.002),
        ),
        weighting=AdaptiveWeighting(p=1.0, eps=0.01),
        guidance=ClassifierFreeGuidance(scale=scale, mix=0.25, drop_rate=drop, decay_time=0.8, null_cond=1000),
    )


CIFAR_OBJECTIVE = SoFlowObjective(  # cifar.yaml, written out
    path=LinearPath(),
    param=EulerParam(),
    fm_fraction=0.0,
    fm_time=LogitNormal(mean=-0.9, std=1.6),
    consistency_times=ConsistencyTimeSampler(
        t_distribution=LogitNormal(mean=-0.9, std=1.6),
        s_distribution=LogitNormal(mean=-4.0, std=1.6),
        schedule=ExponentSchedule(r_init=1.0, r_end=0.0003125),
    ),
    weighting=AdaptiveWeighting(p=0.75, eps=1e-3),
    guidance=None,
)


def printed(module, argv: list[str], capsys) -> dict:
    """The configuration ``--print-config`` prints (exit status 0)."""
    with pytest.raises(SystemExit) as info:
        module.main([*argv, "--print-config"])
    assert info.value.code == 0
    return json.loads(capsys.readouterr().out)


def network(record: dict) -> torch.nn.Module:
    with torch.device("meta"):  # the architecture without allocating it
        return T.build_net(record)


@pytest.mark.parametrize("preset", list(IMAGENET_RUNS))
def test_imagenet_presets_are_the_released_runs(preset, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --print-config creates nothing, not even the default run folder
    model, total_steps, scale, drop, null_row = IMAGENET_RUNS[preset]
    record = printed(imagenet, ["--preset", preset], capsys)
    assert {k: record[k] for k in IMAGENET_TRAINING} == IMAGENET_TRAINING
    assert (record["model"], record["total_steps"], record["cfg_scale"]) == (model, total_steps, scale)
    assert (record["cfg_drop_rate"], record["null_class"]) == (drop, null_row)
    assert record["out"] == f"runs/{preset}" and list(tmp_path.iterdir()) == []
    assert T.build_objective(record) == imagenet_objective(scale, drop)

    net = network(record)
    assert (net.patch_size, net.hidden_size, net.depth, net.num_heads) == DIT_SIZES[model]
    assert net.y_embedder.embedding_table.weight.shape[0] == 1000 + null_row  # the null row only with dropped labels
    optimizer = imagenet.make_optimizer(imagenet.resolve(imagenet.PRESETS[preset]), [torch.nn.Parameter(torch.ones(1))])
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.99), 0.0)


def test_the_model_size_brings_its_released_schedule(capsys):
    """--model alone is the released run of that size: K and ω cannot silently stay those of another size."""
    for preset, (model, *_) in IMAGENET_RUNS.items():
        if preset.endswith("-cond"):
            assert printed(imagenet, ["--model", model], capsys) == printed(imagenet, ["--preset", preset], capsys)
    # ω = 1 alone is the unconditional run: no label drop, no null row
    assert printed(imagenet, ["--cfg-scale", "1"], capsys) == printed(imagenet, ["--preset", "B-4-uncond"], capsys)
    # explicit values win
    record = printed(imagenet, ["--model", "DiT-XL/2", "--total-steps", "1000", "--cfg-scale", "1.5"], capsys)
    assert (record["total_steps"], record["cfg_scale"], record["cfg_drop_rate"]) == (1000, 1.5, 0.1)
    # a size without a released run must say its schedule
    with pytest.raises(SystemExit) as info:
        imagenet.main(["--model", "DiT-S/2", "--print-config"])
    assert info.value.code == 2
    assert "--model DiT-S/2 has no released run to take --total-steps and --cfg-scale from" in capsys.readouterr().err
    record = printed(imagenet, ["--model", "DiT-S/2", "--total-steps", "5000", "--cfg-scale", "2"], capsys)
    assert record["out"] == "runs/S-2-cond" and record["total_steps"] == 5000


def test_the_cifar10_preset_is_the_released_unet_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = printed(cifar, [], capsys)
    assert {k: record[k] for k in CIFAR_TRAINING} == CIFAR_TRAINING and list(tmp_path.iterdir()) == []
    assert record["out"] == "runs/UNet-uncond" and (record["augment"], record["augment_p"]) == (True, 0.12)
    assert T.build_objective(record) == CIFAR_OBJECTIVE
    net = network(record)
    expected = {"model_channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16]}
    assert {k: net.config[k] for k in expected} == expected
    assert (net.config["dropout"], net.config["augment_dim"]) == (0.3, 6)
    optimizer = cifar.make_optimizer(cifar.resolve(cifar.PRESETS["UNet-uncond"]), [torch.nn.Parameter(torch.ones(1))])
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.RAdam
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.999), 0.0)


def test_the_trainers_recipe_defaults_are_the_library_presets():
    """One recipe, two places that must agree: the trainers' defaults and SoFlowObjective.PRESETS."""
    assert T.build_objective(imagenet.record(imagenet.resolve(imagenet.PRESETS["B-4-cond"]))) == (
        SoFlowObjective.from_preset("imagenet")
    )
    assert T.build_objective(cifar.record(cifar.resolve(cifar.PRESETS["UNet-uncond"]))) == (
        SoFlowObjective.from_preset("cifar10")
    )


RECIPE_FLAGS = [
    "--path", "trig", "--param", "trig", "--fm-fraction", "0.5", "--fm-time-mean", "0.1", "--fm-time-std", "1.1",
    "--s-time-mean", "-2", "--s-time-std", "0.7", "--t-time-mean", "0.3", "--t-time-std", "0.9",
    "--schedule", "cosine", "--r-init", "0.5", "--r-end", "0.01", "--p", "0.5", "--eps", "0.1",
    "--backend", "torch",
]  # fmt: skip


def expected_recipe(guidance: ClassifierFreeGuidance | None) -> SoFlowObjective:
    return SoFlowObjective(
        path=TrigPath(),
        param=TrigParam(),
        fm_fraction=0.5,
        fm_time=LogitNormal(mean=0.1, std=1.1),
        consistency_times=ConsistencyTimeSampler(
            t_distribution=LogitNormal(mean=0.3, std=0.9),
            s_distribution=LogitNormal(mean=-2.0, std=0.7),
            schedule=CosineSchedule(r_init=0.5, r_end=0.01),
        ),
        weighting=AdaptiveWeighting(p=0.5, eps=0.1),
        guidance=guidance,
        backend="torch",
    )


def test_every_recipe_setting_is_a_flag_that_reaches_the_objective(capsys):
    guidance = ["--cfg-scale", "2", "--cfg-mix", "0.5", "--cfg-decay-time", "0.9", "--cfg-drop-rate", "0.2"]
    record = printed(imagenet, ["--preset", "tiny", *RECIPE_FLAGS, *guidance], capsys)
    cfg = ClassifierFreeGuidance(scale=2.0, mix=0.5, drop_rate=0.2, decay_time=0.9, null_cond=10)
    assert T.build_objective(record) == expected_recipe(cfg)
    assert printed(imagenet, ["--preset", "tiny", "--cfg-scale", "1"], capsys)["null_class"] is False
    record = printed(cifar, ["--preset", "tiny", *RECIPE_FLAGS], capsys)
    assert T.build_objective(record) == expected_recipe(None)
    # the flags' help comes from the same field documentation as the others
    with pytest.raises(SystemExit):
        imagenet.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "μ of the logit-normal consistency target time s (official time_mean[1]); default: -1.0" in text
    assert "--schedule {const,linear,cosine,exponent}" in text and "--print-config" in text


@pytest.mark.parametrize(
    ("module", "flags", "message"),
    [
        (imagenet, ["--cfg-scale", "3", "--cfg-drop-rate", "0"], "--cfg-scale, --cfg-mix, --cfg-drop-rate, "),
        (imagenet, ["--cfg-mix", "1.5"], "--cfg-scale, --cfg-mix, --cfg-drop-rate, --cfg-decay-time: mix must lie"),
        (imagenet, ["--t-time-std", "0"], "--t-time-mean, --t-time-std: std must lie in (0.0, inf]; got 0.0"),
        (cifar, ["--r-end", "2"], "--schedule, --r-init, --r-end: r_end must lie in (0.0, 1.0]; got 2.0"),
        (cifar, ["--fm-fraction", "-0.1"], "--path, --param, --fm-fraction: fm_fraction must lie in [0.0, 1.0]"),
        (cifar, ["--eps", "0"], "--p, --eps: eps must lie in (0.0, inf]; got 0.0"),
        (imagenet, ["--keep-every", "3"], "--keep-every 3 must be a multiple of --ckpt-every 2"),
    ],
)
def test_a_recipe_that_makes_no_objective_is_refused_naming_its_flags(module, flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        module.main(["--preset", "tiny", *flags, "--out", str(tmp_path / "run")])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_unconditional_recipe_feeds_labels_to_a_table_without_the_null_row(tmp_path, capsys):
    """B-4-uncond's recipe on the tiny model: ω = 1, no drop, 10 label rows, and the labels still train."""
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--synthetic", "--no-progress", "--cfg-scale", "1", "--total-steps", "3"]
    imagenet.main([*argv, "--out", str(out), "--ckpt-every", "1", "--keep", "3", "--lr", "1e-2"])
    from soflow_core.train.checkpoint import checkpoint_path, load_checkpoint

    # adaLN-Zero: the conditioning gets gradients from the third step on (final layer, then the blocks' modulation)
    first, last = (load_checkpoint(checkpoint_path(out / "checkpoints", k))["model"] for k in (1, 3))
    table = "y_embedder.embedding_table.weight"
    assert first[table].shape[0] == last[table].shape[0] == 10  # no null row
    assert not torch.equal(first[table], last[table])  # the rows of the labels fed moved
    assert json.loads((out / "config.json").read_text())["null_class"] is False
