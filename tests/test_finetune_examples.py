"""The DiT trainers fine-tune velocity models: --init takes SiT files and Flow Matching models (converted), and
--consistency-velocity pretrained steps along the --init network's velocity (tiny models, in-process)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from soflow_core.nets import DiT, load_backbone
from soflow_core.train.checkpoint import checkpoint_path, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_dit_imagenet  # noqa: E402
from _sit import SiT, save_sit_training_file  # noqa: E402

pytest.importorskip("safetensors")
NUM_CLASSES = 10
TINY4 = {
    "input_size": 32,
    "in_channels": 4,
    "patch_size": 4,
    "hidden_size": 64,
    "depth": 2,
    "num_heads": 2,
}  # DiT-tiny/4
TINY = ["--preset", "tiny", "--synthetic", "--no-progress", "--total-steps", "1", "--lr", "0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(net, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn_like(param) * (0.2 if param.ndim > 1 else 0.05))
    return net.eval()


def first_checkpoint(out: Path) -> dict:
    return load_checkpoint(checkpoint_path(out / "checkpoints", 1))


def test_imagenet_trainer_starts_from_a_sit_training_file(tmp_path, capsys):
    """SiT's {"model", "ema", "opt", "args"}: its EMA weights, converted so that F(x, t, s, y) = −v_SiT(x, 1 − t, y)."""
    raw = randomised(SiT(**TINY4, num_classes=NUM_CLASSES), 1)
    ema = randomised(SiT(**TINY4, num_classes=NUM_CLASSES), 2)
    source = save_sit_training_file(
        tmp_path / "0100000.pt", raw, ema, torch.optim.AdamW(raw.parameters()), model_name="SiT-custom",
        num_classes=NUM_CLASSES, image_size=256,
    )  # fmt: skip
    out = tmp_path / "run"
    train_dit_imagenet.main([*TINY, "--init", str(source), "--out", str(out)])
    assert "converted from a velocity model (convention 'sit')" in capsys.readouterr().out
    net = DiT(**TINY4, num_classes=NUM_CLASSES)
    net.load_state_dict(first_checkpoint(out)["model"])  # lr = 0: the initial weights
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 32, 32, generator=g), torch.rand(4, generator=g)
    labels = torch.tensor([0, 4, 9, NUM_CLASSES])
    with torch.no_grad():
        expected = -ema(x, 1.0 - t, labels)
        error = (net.eval()(x, t, t * 0.3, labels) - expected).abs().max()
    assert error <= 1e-5 * expected.abs().max()  # float32 rounding

    # A bare SiT state dict does not say its convention: the flag does.
    torch.save(ema.state_dict(), tmp_path / "SiT.pt")
    with pytest.raises(SystemExit, match=r"convention='sit'.*--init-convention"):
        train_dit_imagenet.main([*TINY, "--init", str(tmp_path / "SiT.pt"), "--out", str(tmp_path / "bare")])
    train_dit_imagenet.main(
        [*TINY, "--init", str(tmp_path / "SiT.pt"), "--init-convention", "sit", "--out", str(tmp_path / "bare")]
    )
    assert torch.equal(first_checkpoint(tmp_path / "bare")["model"]["final_layer.linear.weight"],
                       net.state_dict()["final_layer.linear.weight"])  # fmt: skip


def test_imagenet_trainer_converts_a_flow_matching_model_and_follows_its_velocity(tmp_path):
    """--init-convention soflow, --consistency-velocity pretrained: with r = 1 the start is a fixed point."""
    fm = randomised(DiT(**TINY4, num_classes=NUM_CLASSES, null_class=False), 3)  # trained with Flow Matching
    source = tmp_path / "fm.pt"
    torch.save(fm.state_dict(), source)
    recipe = ["--cfg-scale", "1", "--fm-fraction", "0", "--r-init", "1", "--log-every", "1"]
    common = [*TINY, *recipe, "--init", str(source), "--init-convention", "soflow"]

    def consistency_mse(out: Path) -> float:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return next(row["consistency_mse"] for row in rows if "consistency_mse" in row)

    out = tmp_path / "pretrained"
    train_dit_imagenet.main([*common, "--consistency-velocity", "pretrained", "--out", str(out)])
    assert consistency_mse(out) < 1e-6
    conditional = tmp_path / "conditional"
    train_dit_imagenet.main([*common, "--out", str(conditional)])
    assert consistency_mse(conditional) > 1e-2  # the paper's velocity: no fixed point

    # The frozen velocity model is kept in the run folder, F independent of s, and a resume reads it.
    kept = load_backbone(out / "velocity_model").model
    assert torch.count_nonzero(kept.s_embedder.mlp[2].weight) == 0
    x, t = torch.randn(3, 4, 32, 32), torch.rand(3)
    with torch.no_grad():
        expected = fm(x, t, t, torch.arange(3))
        assert (kept(x, t, t * 0.5, torch.arange(3)) - expected).abs().max() <= 1e-5 * expected.abs().max()
    train_dit_imagenet.main([*TINY, *recipe, "--consistency-velocity", "pretrained", "--total-steps", "2",
                             "--out", str(out)])  # fmt: skip
    assert load_checkpoint(checkpoint_path(out / "checkpoints", 2))["step"] == 2


def test_pretrained_consistency_velocity_needs_init(tmp_path):
    with pytest.raises(SystemExit):
        train_dit_imagenet.main([*TINY, "--consistency-velocity", "pretrained", "--out", str(tmp_path / "run")])


def test_toy_trainer_fine_tunes_a_pretraining_stage_or_an_init(tmp_path, capsys):
    import train_toy_2d

    from soflow_core.nets import MLPBackbone

    metrics = train_toy_2d.main(
        [
            "--preset",
            "tiny",
            "--recipe",
            "finetune",
            "--pretrain-steps",
            "5",
            "--no-progress",
            "--out",
            str(tmp_path / "a"),
        ]
    )
    assert 0 < metrics["pretrain_cpu_seconds"] < metrics["train_cpu_seconds"]
    assert "Flow Matching step" in capsys.readouterr().out
    torch.manual_seed(0)
    folder = MLPBackbone(dim=2, width=16, depth=1).save_pretrained(tmp_path / "fm")  # a velocity model of its own size
    metrics = train_toy_2d.main(
        [
            "--preset",
            "tiny",
            "--recipe",
            "finetune",
            "--init",
            str(folder),
            "--no-progress",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert "pretrain_cpu_seconds" not in metrics and metrics["energy_distance_1_step"] > 0
    for argv, message in (
        (["--recipe", "finetune"], "--recipe finetune fine-tunes a velocity model: give --init or --pretrain-steps"),
        (["--init", str(folder), "--pretrain-steps", "3"], "--init and --pretrain-steps both give"),
        (["--init-convention", "sit"], "--init-convention sit converts the --init network: give --init"),
    ):
        with pytest.raises(SystemExit):
            train_toy_2d.parse_config(["--preset", "tiny", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"num_classes=None; recipe imagenet on checkerboard needs 8"):
        train_toy_2d.main(
            ["--preset", "tiny", "--recipe", "imagenet", "--init", str(folder), "--out", str(tmp_path / "c")]
        )


def test_cifar_trainer_converts_a_flow_matching_songunet(tmp_path, capsys):
    import train_dit_cifar10

    from soflow_core.nets import SongUNet

    torch.manual_seed(4)
    fm = SongUNet(model_channels=16, channel_mult=[1, 2], num_blocks=1)  # the tiny preset's network
    with torch.no_grad():
        for name, param in fm.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                param.normal_(0.0, 0.05)
    folder = fm.save_pretrained(tmp_path / "fm")
    out = tmp_path / "run"
    train_dit_cifar10.main([*TINY, "--init", str(folder), "--init-convention", "soflow", "--out", str(out)])
    assert "converted from a velocity model (convention 'soflow')" in capsys.readouterr().out
    net = SongUNet(model_channels=16, channel_mult=[1, 2], num_blocks=1)
    net.load_state_dict(first_checkpoint(out)["model"])
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        expected = fm.eval()(x, t, t)
        assert (net.eval()(x, t, torch.zeros(2)) - expected).abs().max() <= 1e-5 * expected.abs().max()
