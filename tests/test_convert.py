"""from_velocity_model: a velocity network becomes a SoFlow backbone with F(x, t, s) = v(x, t) for every s.

The SiT sources are built by benchmarks/_sit.py, written from SiT's published description
(layer names, layouts, time and sign conventions) and not from soflow_core.nets, so the
comparison checks the converter against an independent network.
"""

import argparse
import dataclasses
import fractions
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from soflow_core.nets import DiT, MLPBackbone, SongUNet, load_backbone, read_state_dict
from soflow_core.nets.convert import (
    VELOCITY_CONVENTIONS,
    VelocityConvention,
    from_velocity_model,
    sinusoid_time_flip,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _helpers import shape_checks_off
from _nets import TINY_UNET
from _sit import SiT, save_sit_training_file, sit_flow_matching_loss

NUM_CLASSES = 10
SIT_TINY = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2}


def random_sit(seed=0, *, dtype=torch.float64, **overrides):
    """A tiny SiT with every parameter drawn at random (SiT starts its adaLN and output layers at zero)."""
    torch.manual_seed(seed)
    net = SiT(**{**SIT_TINY, "num_classes": NUM_CLASSES, **overrides})
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn_like(param) * (0.3 if param.ndim > 1 else 0.1))
    return net.to(dtype).eval()


def times_and_inputs(seed=0, b=6, channels=4, side=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, channels, side, side, generator=g, dtype=dtype)
    t = torch.cat([torch.tensor([0.0, 1.0], dtype=dtype), torch.rand(b - 2, generator=g, dtype=dtype)])
    s = t * torch.rand(b, generator=g, dtype=dtype)
    return x, t, s


def assert_sit_equivalent(converted, sit, dtype=torch.float64, atol=1e-10):
    """F(x, t, s, y) = −v_SiT(x, 1 − t, y) for labelled and null inputs, for any s."""
    x, t, s = times_and_inputs(dtype=dtype)
    labels = torch.tensor([0, 3, 9, 5, 10, 7])
    null = torch.full((6,), NUM_CLASSES)
    with torch.no_grad():
        for cond, sit_labels in ((labels, labels), (None, null), (null, null)):
            expected = -sit(x, 1.0 - t, sit_labels)
            assert expected.abs().mean() > 0.1  # a non-trivial source
            torch.testing.assert_close(converted(x, t, t, cond), expected, atol=atol, rtol=atol)
            torch.testing.assert_close(converted(x, t, s, cond), expected, atol=atol, rtol=atol)
            torch.testing.assert_close(converted(x, t, torch.zeros_like(t), cond), expected, atol=atol, rtol=atol)


# ------------------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("cos_first", [True, False])
def test_sinusoid_time_flip_maps_features_of_t_to_features_of_one_minus_t(cos_first):
    omega = torch.exp(-torch.arange(16, dtype=torch.float64) / 3.0) * 7.0

    def features(t):
        angles = t[:, None] * omega
        parts = [torch.cos(angles), torch.sin(angles)]
        return torch.cat(parts if cos_first else parts[::-1], dim=1)

    t = torch.rand(9, dtype=torch.float64)
    flip = sinusoid_time_flip(omega, cos_first=cos_first)
    torch.testing.assert_close(features(t) @ flip.T, features(1.0 - t), atol=1e-13, rtol=0)
    torch.testing.assert_close(flip @ flip, torch.eye(32, dtype=torch.float64), atol=1e-13, rtol=0)


# ------------------------------------------------------------------------------------------- SiT


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_sit_bare_state_dict_converts_exactly(learn_sigma, tmp_path):
    sit = random_sit(learn_sigma=learn_sigma)
    torch.save(sit.state_dict(), tmp_path / "SiT.pt")
    converted = from_velocity_model(tmp_path / "SiT.pt", convention="sit", num_classes=NUM_CLASSES, num_heads=2)
    assert isinstance(converted.model, DiT) and converted.model.null_class
    assert converted.metadata["converted_from"]["output_channels"] == (8 if learn_sigma else 4)
    assert converted.convention == VELOCITY_CONVENTIONS["sit"]
    assert_sit_equivalent(converted.model, sit)


def test_sit_conversion_is_exact_to_float32_rounding():
    sit64 = random_sit()
    sit32 = random_sit().float()
    converted = from_velocity_model(sit32.state_dict(), convention="sit", num_classes=NUM_CLASSES, num_heads=2).model
    assert next(converted.parameters()).dtype == torch.float32
    x, t, s = times_and_inputs(dtype=torch.float32)
    y = torch.tensor([0, 3, 9, 5, 10, 7])
    with torch.no_grad():
        exact = -sit64(x.double(), 1.0 - t.double(), y)
        error = (converted(x, t, s, y).double() - exact).abs().max()
        rounding = (-sit32(x, 1.0 - t, y).double() - exact).abs().max()  # the source's own float32 error
    assert error <= 4 * rounding + 1e-6, (float(error), float(rounding))


@pytest.mark.parametrize("path_type, path", [("Linear", "linear"), ("GVP", "trig")])
def test_sit_training_file_uses_ema_and_its_args(path_type, path, tmp_path):
    raw, ema = random_sit(seed=1), random_sit(seed=2)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-4)
    file = save_sit_training_file(
        tmp_path / "0050000.pt", raw, ema, optimizer, model_name="SiT-S/2", num_classes=NUM_CLASSES,
        image_size=64, path_type=path_type,
    )  # fmt: skip
    # heads and classes come from args ("SiT-S/2": 6 heads would not divide 32, so give a SiT-B/2-like pair)
    converted = from_velocity_model(file, num_heads=2)
    assert converted.origin.entry == "ema" and converted.origin.location == str(file)
    assert converted.convention.name == ("sit" if path_type == "Linear" else "sit_gvp")
    assert type(converted.path).__name__.lower().startswith(path)
    assert converted.metadata["converted_from"]["sit_args"]["path_type"] == path_type
    assert_sit_equivalent(converted.model, ema)


def test_sit_training_file_args_give_the_heads_of_a_named_size(tmp_path):
    sit = random_sit(hidden_size=24, num_heads=6)
    file = save_sit_training_file(
        tmp_path / "ckpt.pt", sit, sit, torch.optim.SGD(sit.parameters(), lr=0.1), model_name="SiT-S/2",
        num_classes=NUM_CLASSES, image_size=64,
    )  # fmt: skip
    converted = from_velocity_model(file)
    assert converted.model.num_heads == 6
    assert_sit_equivalent(converted.model, sit)


def test_read_state_dict_reads_a_sit_training_file_safely(tmp_path):
    sit = random_sit()
    file = save_sit_training_file(
        tmp_path / "ckpt.pt", sit, sit, torch.optim.SGD(sit.parameters(), lr=0.1), model_name="SiT-XL/2",
        num_classes=NUM_CLASSES, image_size=256,
    )  # fmt: skip
    contents = read_state_dict(file)
    assert contents.origin.entry == "ema" and "s_embedder.mlp.0.weight" not in contents.state
    # weights_only stays on: anything beyond tensors, containers and argparse.Namespace is refused
    torch.save(
        {"ema": sit.state_dict(), "args": argparse.Namespace(when=fractions.Fraction(1, 3))}, tmp_path / "bad.pt"
    )
    with pytest.raises(ValueError, match=r"weights_only=True"):
        read_state_dict(tmp_path / "bad.pt")


def test_sit_files_that_cannot_convert_are_refused(tmp_path):
    sit = random_sit()
    optimizer = torch.optim.SGD(sit.parameters(), lr=0.1)
    noise = save_sit_training_file(
        tmp_path / "noise.pt", sit, sit, optimizer, model_name="SiT-XL/2", num_classes=NUM_CLASSES,
        image_size=256, prediction="noise",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"prediction='noise'"):
        from_velocity_model(noise, num_heads=2)
    vp = save_sit_training_file(
        tmp_path / "vp.pt", sit, sit, optimizer, model_name="SiT-XL/2", num_classes=NUM_CLASSES, image_size=256,
        path_type="VP",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"path_type='VP'"):
        from_velocity_model(vp, num_heads=2)
    linear = save_sit_training_file(
        tmp_path / "linear.pt", sit, sit, optimizer, model_name="SiT-XL/2", num_classes=NUM_CLASSES, image_size=256
    )
    with pytest.raises(ValueError, match=r"contradicts the SiT training file"):
        from_velocity_model(linear, convention="soflow", num_heads=2)
    # a bare DiT-layout state dict does not say whether it is SiT (velocity) or DiT (noise)
    with pytest.raises(ValueError, match=r"convention='sit'"):
        from_velocity_model(sit.state_dict(), num_classes=NUM_CLASSES, num_heads=2)
    # the label table needs num_classes to know its null row, as load_backbone does
    with pytest.raises(ValueError, match=r"num_classes=10 if the last row is the null class"):
        from_velocity_model(sit.state_dict(), convention="sit", num_heads=2)


def test_converted_sit_saves_a_pretrained_folder_that_loads_the_same(tmp_path):
    sit = random_sit()
    converted = from_velocity_model(sit.state_dict(), convention="sit", num_classes=NUM_CLASSES, num_heads=2)
    folder = converted.save_pretrained(tmp_path / "converted", metadata={"note": "before fine-tuning"})
    loaded = load_backbone(folder)
    document = json.loads((folder / "config.json").read_text())
    assert document["sampling"] == {"path": "linear", "param": "euler"}
    assert document["metadata"]["note"] == "before fine-tuning"
    assert document["metadata"]["converted_from"]["convention"]["name"] == "sit"
    assert_sit_equivalent(loaded.model, sit)


def test_fine_tuning_the_converted_sit_moves_f_away_from_the_source_velocity():
    """The zeroed t − s embedder still learns: after a step F depends on s (s_embedder is trainable)."""
    from soflow_core import SoFlowObjective

    sit = random_sit(dtype=torch.float32)
    model = from_velocity_model(sit.state_dict(), convention="sit", num_classes=NUM_CLASSES, num_heads=2).model
    model.train()
    objective = SoFlowObjective.from_preset("imagenet", num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(8, 4, 8, 8, generator=g)
    out = objective(model, data, torch.randint(0, NUM_CLASSES, (8,), generator=g), step=0, total_steps=10, generator=g)
    out.backprop.backward()
    assert model.s_embedder.mlp[2].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------- this library's Flow Matching models


def random_mlp(**overrides):
    torch.manual_seed(0)
    net = MLPBackbone(dim=3, width=32, depth=2, time_features=16, **overrides).double()
    with torch.no_grad():
        net.output.weight.normal_(0.0, 0.3)
        net.output.bias.normal_(0.0, 0.1)
    return net.eval()


def random_soflow_dit():
    torch.manual_seed(0)
    net = DiT(**SIT_TINY, num_classes=NUM_CLASSES).double()
    with torch.no_grad():
        for param in net.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * (0.3 if param.ndim > 1 else 0.1))
    return net.eval()


def random_unet(**overrides):
    torch.manual_seed(0)
    net = SongUNet(**{**TINY_UNET, **overrides}).double()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                param.normal_(0.0, 0.05)
    return net.eval()


@pytest.mark.parametrize("kind", ["mlp", "mlp_labels", "dit", "unet"])
def test_flow_matching_models_convert_to_f_independent_of_s(kind):
    """F'(x, t, s) = F(x, t, t) for every s: the velocity the Flow Matching loss trained is kept."""
    net = {
        "mlp": random_mlp,
        "mlp_labels": lambda: random_mlp(num_classes=4),
        "dit": random_soflow_dit,
        "unet": random_unet,
    }[kind]()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hints = {"num_classes": NUM_CLASSES, "num_heads": 2} if kind == "dit" else {}
    converted = from_velocity_model(net, **hints)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the source is left as it was
    assert converted.convention.name == "soflow" and type(converted.model) is type(net)
    g = torch.Generator().manual_seed(1)
    b = 5
    if kind.startswith("mlp"):
        x = torch.randn(b, 3, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(b, 3 if kind == "unet" else 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    conds = {"mlp": [None], "mlp_labels": [None, torch.tensor([0, 1, 2, 3, 4])], "dit": [None, torch.arange(5)]}
    for cond in conds.get(kind, [None]):
        with torch.no_grad():
            expected = net(x, t, t, cond)
            for s in (t, t * 0.5, torch.zeros_like(t)):
                torch.testing.assert_close(converted.model(x, t, s, cond), expected, atol=1e-11, rtol=1e-11)
            assert (net(x, t, torch.zeros_like(t), cond) - expected).abs().max() > 1e-3  # the source did depend on s


def test_unet_converts_exactly_without_augment_labels_and_flips_them_with_the_time():
    net = random_unet()
    mine = VelocityConvention(name="flipped", data_time=1, velocity_towards="data")
    converted = from_velocity_model(net, convention=mine).model
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    s = t * 0.3
    with torch.no_grad():
        torch.testing.assert_close(converted(x, t, s), -net(x, 1 - t, 1 - t), atol=1e-11, rtol=1e-11)
        # augmentation labels that reach only the t features stay exact under the flip
        net.map_augment.weight[net.noise_channels :] = 0.0  # rows feeding the t − s features
        converted = from_velocity_model(net, convention=mine).model
        labels = torch.randn(4, 6, generator=g, dtype=torch.float64)
        torch.testing.assert_close(
            converted(x, t, s, augment_labels=labels),
            -net(x, 1 - t, 1 - t, augment_labels=labels),
            atol=1e-11,
            rtol=1e-11,
        )


def test_a_declared_convention_flips_time_sign_and_label_rows():
    """A source with data at t = 1, velocity towards the data and the null class first."""
    net = random_mlp(num_classes=4)
    mine = VelocityConvention(name="mine", data_time=1, velocity_towards="data", null_label="first")
    converted = from_velocity_model(net, convention=mine).model
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 2])  # soflow_core: 4 is the null class
    with torch.no_grad():
        expected = -net(x, 1 - t, 1 - t, (labels + 1) % 5)  # the source: 0 is the null class
        torch.testing.assert_close(converted(x, t, t * 0.2, labels), expected, atol=1e-11, rtol=1e-11)
        torch.testing.assert_close(
            converted(x, t, t, None), -net(x, 1 - t, 1 - t, torch.zeros(6, dtype=torch.long)), atol=1e-11, rtol=1e-11
        )


def test_trig_parameterization_scales_f_so_its_velocity_is_the_source_velocity():
    from soflow_core import TrigParam

    net = random_mlp()
    converted = from_velocity_model(net, param="trig")
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(TrigParam().velocity(converted.model, x, t), net(x, t, t), atol=1e-11, rtol=1e-11)
    assert converted.metadata["converted_from"]["param"] == "trig"


def test_pretrained_folders_and_trainer_checkpoints_convert(tmp_path):
    net = random_mlp().float()
    folder = net.save_pretrained(tmp_path / "fm")
    converted = from_velocity_model(folder)
    assert converted.origin.layout == "pretrained folder"
    torch.save({"model": {}, "ema": net.state_dict(), "optimizer": {}, "config": {}}, tmp_path / "run.pt")
    converted_run = from_velocity_model(tmp_path / "run.pt")
    assert converted_run.origin.entry == "ema"
    wrapper = nn.Module()
    wrapper.module = net  # a DDP-like wrapper: every key starts with "module."
    converted_wrapped = from_velocity_model(wrapper)
    assert converted_wrapped.origin.prefix == "module."
    x, t = torch.randn(4, 3), torch.rand(4)
    with torch.no_grad():
        for model in (converted.model, converted_run.model, converted_wrapped.model):
            torch.testing.assert_close(model(x, t, torch.zeros(4)), net(x, t, t), atol=1e-6, rtol=1e-5)


def test_bad_conventions_and_sources_are_refused():
    with shape_checks_off():  # the runtime checks, not the test-time type hints
        with pytest.raises(ValueError, match=r"data_time must be 0 or 1"):
            VelocityConvention(name="x", data_time=2)
        with pytest.raises(ValueError, match=r"unknown velocity_towards 'up'"):
            VelocityConvention(name="x", velocity_towards="up")
        with pytest.raises(TypeError, match=r"convention must be"):
            from_velocity_model(random_mlp(), convention=3)
    with pytest.raises(ValueError, match=r"unknown convention 'dit'"):
        from_velocity_model(random_mlp(), convention="dit")
    sit = random_sit(learn_sigma=True)
    all_channels = dataclasses.replace(VELOCITY_CONVENTIONS["sit"], velocity_channels="all")
    with pytest.raises(ValueError, match=r"returns 8 channels for 4 input channels"):
        from_velocity_model(sit.state_dict(), convention=all_channels, num_classes=NUM_CLASSES, num_heads=2)
    with pytest.raises(ValueError, match=r"fits none of the backbones"):
        from_velocity_model({"w": torch.zeros(2)})


def test_sit_flow_matching_loss_trains_the_sit_convention():
    """The benchmark's SiT loss: a linear path from noise at τ = 0 to data at τ = 1, target data − noise."""
    sit = random_sit(dtype=torch.float32)
    data = torch.randn(16, 4, 8, 8)
    loss = sit_flow_matching_loss(sit, data, torch.randint(0, NUM_CLASSES, (16,)), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)

    class Exact(nn.Module):  # the exact velocity for a single data point d: (d − x_τ)/(1 − τ) = d − noise
        class_dropout_prob, num_classes = 0.0, NUM_CLASSES

        def forward(self, x, tau, y):
            return (data[:1] - x) / (1.0 - tau).view(-1, 1, 1, 1)

    one = data[:1].expand(16, -1, -1, -1)
    assert sit_flow_matching_loss(Exact(), one, torch.zeros(16, dtype=torch.long)) < 1e-6
