"""Checkpoint I/O of the backbones: every file layout, networks rebuilt from their shapes, pretrained folders."""

import argparse
import fractions
import json
import logging
import sys

import pytest
import torch
from _nets import NUM_CLASSES, TINY, TINY_LAYOUT, image_batch, labels, official_checkpoint, tiny_dit, tiny_unet
from torch import nn

from soflow_core import EulerParam, LinearPath, TrigParam, TrigPath
from soflow_core.nets import (
    DIT_SIZES,
    AbstractBackbone,
    DiT,
    MLPBackbone,
    SongUNet,
    load_backbone,
    load_weights,
    read_state_dict,
)
from soflow_core.nets.checkpoints import CONFIG_FILE, PRETRAINED_FORMAT, WEIGHTS_FILE


def reference_state(seed=0, layout=TINY_LAYOUT):
    """A state dict in the reference layout, built from the names alone, with random values."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 0.1 for name, shape in layout.items()}


def outputs(net, seed=3):
    """F_θ on a fixed batch: labels for a conditional DiT, none for the others; eval mode."""
    net.eval()
    if isinstance(net, SongUNet):
        x, t, s = image_batch(seed, c=3)
        return net(x, t, s)
    x, t, s = image_batch(seed)
    return net(x, t, s, labels() if net.num_classes else None)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def prefixed(state, prefix):
    return {f"{prefix}{k}": v for k, v in state.items()}


# ---------------------------------------------------------------------------- the official training layout

OFFICIAL = {
    # name: (builder, hints load_backbone needs for it)
    "dit with null row": (lambda seed: tiny_dit(seed), {"num_classes": NUM_CLASSES, "num_heads": 2}),
    "dit without null row": (
        lambda seed: tiny_dit(seed, null_class=False),
        {"num_classes": NUM_CLASSES, "num_heads": 2},
    ),
    "unconditional dit": (lambda seed: tiny_dit(seed, num_classes=None), {"num_heads": 2}),
    "songunet": (lambda seed: tiny_unet(seed), {}),
}


@pytest.mark.parametrize("kind", sorted(OFFICIAL))
def test_official_training_file_gives_the_ema_network(tmp_path, kind, caplog):
    build, hints = OFFICIAL[kind]
    raw, ema = build(1), build(2)
    path = tmp_path / "official.pt"
    torch.save(official_checkpoint(raw, ema), path)

    with caplog.at_level(logging.INFO, logger="soflow_core.nets.checkpoints"):
        loaded = load_backbone(path, **hints)
    assert (loaded.origin.layout, loaded.origin.entry, loaded.origin.prefix) == (
        "training checkpoint",
        "ema_model",
        "network.",
    )
    assert loaded.origin.ema and "entry 'ema_model' (EMA weights), key prefix 'network.' stripped" in caplog.text
    assert type(loaded.model) is type(ema) and loaded.model.config == ema.config  # the null row, or none, is read
    assert same_state(loaded.model, ema) and not loaded.model.training
    expected = outputs(ema)
    assert torch.equal(outputs(loaded.model), expected)
    assert not torch.allclose(outputs(raw), expected)

    # Into an existing network: EMA weights again, and the raw ones when asked for.
    fresh = build(3)
    report = load_weights(fresh, path)
    assert report.origin.entry == "ema_model" and report.missing == ()
    assert torch.equal(outputs(fresh), expected)
    report = load_weights(fresh, path, entry="model")
    assert report.origin.entry == "model" and not report.origin.ema
    assert torch.equal(outputs(fresh), outputs(raw))


def test_dit_label_table_needs_num_classes_and_names_what_fits(tmp_path):
    no_null = official_checkpoint(tiny_dit(1, null_class=False), tiny_dit(2, null_class=False))
    with pytest.raises(
        ValueError, match=r"has 10 rows: pass num_classes=9 if the last row is the null class, num_classes=10 if"
    ):
        load_backbone(no_null, num_heads=2)
    with pytest.raises(ValueError, match=r"num_classes=5 needs 5 or 6 label rows, but .* has 10: pass num_classes=9"):
        load_backbone(no_null, num_classes=5, num_heads=2)
    with pytest.raises(ValueError, match="num_classes=10 was given, but the state dict has no label table"):
        load_backbone(tiny_dit(num_classes=None).state_dict(), num_classes=10, num_heads=2)
    # Into a DiT built with the null row: the mismatch names the key, both shapes and what would fit.
    with_null = tiny_dit(3)
    before = {k: v.clone() for k, v in with_null.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_weights(with_null, no_null)
    message = str(info.value)
    assert "y_embedder.embedding_table.weight (10, 32) vs model (11, 32)" in message
    assert "10 label rows (num_classes=9 with a null row, or 10 without)" in message
    assert all(torch.equal(v, before[k]) for k, v in with_null.state_dict().items()), "a failed load changed weights"


def test_reference_layout_loads_from_every_wrapping(tmp_path):
    state = reference_state()
    net = tiny_dit(randomise=False)
    report = load_weights(net, state)
    assert (report.origin.layout, report.origin.entry, report.origin.prefix) == ("state dict", None, "")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    expected = outputs(net)
    assert expected.abs().max() > 0

    ours = tmp_path / "run-step.pt"  # this project's trainers: model, ema, optimizer, config
    torch.save({"model": reference_state(seed=1), "ema": prefixed(state, "module."), "optimizer": {}, "step": 7}, ours)
    sources = {
        ours: ("ema", "module."),
        str(ours): ("ema", "module."),
        "bare": (None, ""),
        "nested": ("ema/state_dict", "module._orig_mod."),
        "compiled": ("state_dict", "_orig_mod."),
    }
    mappings = {
        "bare": state,
        "nested": {"ema": {"state_dict": prefixed(state, "module._orig_mod.")}},
        "compiled": {"state_dict": prefixed(state, "_orig_mod.")},
    }
    for source, (entry, prefix) in sources.items():
        fresh = tiny_dit(seed=5)
        report = load_weights(fresh, mappings.get(source, source))
        assert (report.origin.entry, report.origin.prefix) == (entry, prefix), source
        assert torch.equal(outputs(fresh), expected), source


def test_safetensors_files_and_folders_are_told_apart(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    ema = tiny_unet(2)
    path = tmp_path / "converted.safetensors"
    safetensors.save_file(prefixed(ema.state_dict(), "network."), str(path))
    loaded = load_backbone(path)
    assert (loaded.origin.layout, loaded.origin.prefix) == ("safetensors file", "network.")
    assert same_state(loaded.model, ema)
    with pytest.raises(ValueError, match="holds a single state dict"):
        read_state_dict(path, entry="ema")


def test_reading_rejects_what_it_cannot_trust(tmp_path):
    pickled = tmp_path / "pickled.pt"
    # argparse.Namespace is allowed (SiT's training files keep their args in one), not what it holds
    torch.save({"model": tiny_dit().state_dict(), "args": argparse.Namespace(lr=fractions.Fraction(1, 3))}, pickled)
    with pytest.raises(ValueError, match=r"cannot be read with torch.load\(weights_only=True\)"):
        read_state_dict(pickled)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="neither a state dict nor a container"):
        read_state_dict({"weights": {"a": 1}, "step": 3})
    with pytest.raises(ValueError, match=r"entry 'ema' is not in the checkpoint"):
        read_state_dict({"model": tiny_dit().state_dict()}, entry="ema")
    with pytest.raises(ValueError, match="non-tensor values"):
        read_state_dict({"ema": {"w": torch.zeros(1), "note": "x"}})
    with pytest.raises(TypeError, match=r"path or a mapping|parameter 'source'"):  # ours, or the test-time type hook
        read_state_dict(42)
    with pytest.raises(ValueError, match=r"fits none of the backbones \(DiT, MLPBackbone, SongUNet\)"):
        load_backbone({"w": torch.zeros(2)})


def test_mismatch_lists_keys_shapes_and_the_fitting_size():
    net = tiny_dit(randomise=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    missing = reference_state()
    del missing["s_embedder.mlp.0.weight"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\): s_embedder\.mlp\.0\.weight"):
        load_weights(net, missing)
    wrong = reference_state()
    wrong["blocks.1.mlp.fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=r"1 shape mismatch\(es\): blocks\.1\.mlp\.fc1\.weight \(64, 32\) vs model"):
        load_weights(net, wrong, strict=False)
    extra = {**reference_state(), "blocks.2.attn.qkv.weight": torch.zeros(96, 32)}
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): blocks\.2\.attn\.qkv\.weight"):
        load_weights(net, extra)

    # A real size (shapes only, on the meta device), in the official layout, into the tiny model.
    with torch.device("meta"):
        big = DiT.from_name("DiT-B/4", input_size=32, in_channels=4, num_classes=1000).state_dict()
    with pytest.raises(ValueError) as info:
        load_weights(net, {"ema_model": prefixed(big, "network.")})
    message = str(info.value)
    assert "looks like: DiT-B/4" in message and "input_size=32" in message
    assert "1001 label rows (num_classes=1000 with a null row, or 1001 without)" in message
    assert "missing key(s)" not in message and "unexpected key(s): blocks.2." in message
    assert "(95 more)" in message  # long listings are cut to the first few, with a count

    # A learned-sigma DiT checkpoint (no s_embedder, 8 output channels) is recognised as such.
    original = {k: v for k, v in reference_state().items() if not k.startswith("s_embedder")}
    original["final_layer.linear.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match=r"(?s)out_channels=8 \(a learned-sigma checkpoint\).*no s_embedder"):
        load_weights(net, original)
    with pytest.raises(ValueError, match="a learned-sigma DiT"):
        load_backbone(original, num_classes=NUM_CLASSES, num_heads=2)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a failed load"


def test_non_strict_loading_reports_missing_keys_and_wrappers_are_unwrapped():
    class Wrapper(nn.Module):  # stands in for DDP: the real model is `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    net = tiny_dit(randomise=False)
    partial = {k: v for k, v in reference_state().items() if k != "pos_embed"}
    with pytest.raises(ValueError, match=r"missing key.*pos_embed"):
        load_weights(net, partial)
    assert load_weights(Wrapper(net), partial, strict=False).missing == ("pos_embed",)
    assert torch.equal(net.x_embedder.proj.weight, partial["x_embedder.proj.weight"])
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module|parameter 'model'"):
        load_weights("net", partial)


# ---------------------------------------------------------------------------- sizes read from shapes


@pytest.mark.parametrize("name", sorted(DIT_SIZES))
def test_dit_sizes_are_read_from_the_shapes(name):
    with torch.device("meta"):
        net = DiT.from_name(name, input_size=32, in_channels=4, num_classes=1000)
        rebuilt = DiT(**DiT.config_from_state(net.state_dict(), num_classes=1000))
    assert rebuilt.config == net.config


def test_what_shapes_cannot_tell_is_asked_for_by_name():
    state = tiny_dit().state_dict()
    with pytest.raises(
        ValueError, match=r"num_heads is not stored .* \(patch_size=2, hidden_size=32, depth=2\): pass it"
    ):
        DiT.config_from_state(state, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"patch_size=4 \(the weights say 2\)"):
        DiT.config_from_state(state, num_classes=NUM_CLASSES, num_heads=2, patch_size=4)
    with pytest.raises(ValueError, match="DiT has no argument dropout"):
        DiT.config_from_state(state, num_classes=NUM_CLASSES, num_heads=2, dropout=0.1)
    # Dropout leaves no trace in the weights: the reference value unless given.
    unet = tiny_unet(dropout=0.1)
    assert load_backbone(unet.state_dict()).model.dropout == 0.3
    assert load_backbone(unet.state_dict(), dropout=0.1).model.config == unet.config
    with pytest.raises(ValueError, match=r"augment_dim=3 \(the weights say 6\)"):
        load_backbone(unet.state_dict(), augment_dim=3)


def test_songunet_configuration_is_read_from_the_shapes():
    with torch.device("meta"):
        reference = SongUNet()  # the CIFAR-10 network (its FIR taps cannot be read on the meta device)
        assert SongUNet(**SongUNet.config_from_state(reference.state_dict())).config == reference.config
    variant = SongUNet(
        img_resolution=16,
        in_channels=1,
        out_channels=2,
        augment_dim=0,
        model_channels=8,
        channel_mult=[1, 3, 2],
        channel_mult_emb=2,
        channel_mult_noise=1,
        num_blocks=2,
        attn_resolutions=[8, 4],
        resample_filter=[1, 1],
        adaptive_scale=True,
    )
    assert SongUNet(**SongUNet.config_from_state(variant.state_dict())).config == variant.config


def test_mlp_with_fourier_features_is_rebuilt_from_its_state_dict():
    net = MLPBackbone(dim=3, width=16, depth=2, time_features=8, fourier_features=5, fourier_scale=0.7, fourier_seed=3)
    nn.init.normal_(net.output.weight)
    config = MLPBackbone.config_from_state(net.state_dict())
    assert config["dim"] == 3 and config["fourier_features"] == 5  # read from input_frequencies, not input.weight
    loaded = load_backbone(net.state_dict()).model
    assert isinstance(loaded, MLPBackbone) and torch.equal(loaded.input_frequencies, net.input_frequencies)
    x, t, s = torch.randn(4, 3), torch.rand(4), torch.zeros(4)
    assert torch.equal(loaded.eval()(x, t, s), net.eval()(x, t, s))
    with pytest.raises(ValueError, match=r"fourier_features=2 \(the weights say 5\)"):
        load_backbone(net.state_dict(), fourier_features=2)


# ---------------------------------------------------------------------------- pretrained folders


def pretrained_cases():
    dit = tiny_dit(4)
    uncond64 = tiny_dit(5, num_classes=None).double()
    unet = tiny_unet(6, dropout=0.2)
    mlp = MLPBackbone(dim=3, width=16, depth=2, time_features=8, num_classes=4, dropout=0.1)
    nn.init.normal_(mlp.output.weight)
    fourier = MLPBackbone(dim=3, width=16, depth=1, time_features=8, fourier_features=4, fourier_scale=0.5)
    nn.init.normal_(fourier.output.weight)
    return {"dit": dit, "unconditional dit float64": uncond64, "songunet": unet, "mlp": mlp, "mlp fourier": fourier}


@pytest.mark.parametrize("name", sorted(pretrained_cases()))
def test_save_pretrained_and_from_pretrained_round_trip_bit_exactly(tmp_path, name):
    safetensors = pytest.importorskip("safetensors.torch")
    net = pretrained_cases()[name]
    folder = net.save_pretrained(
        tmp_path / "published", path=TrigPath(), param="trig", metadata={"step": 7, "fid": 2.5}
    )
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]

    same = type(net).from_pretrained(folder)
    assert type(same) is type(net) and same.config == net.config and same_state(same, net)
    assert not same.training
    if isinstance(net, MLPBackbone):
        x, t, s = torch.randn(4, 3), torch.rand(4), torch.zeros(4)
        assert torch.equal(same(x, t, s, None), net.eval()(x, t, s, None))
    else:
        dtype = next(net.parameters()).dtype
        x, t, s = (v.to(dtype) for v in image_batch(3, c=3 if isinstance(net, SongUNet) else 4))
        cond = labels() if isinstance(net, DiT) and net.num_classes else None
        assert torch.equal(same.eval()(x, t, s, cond), net.eval()(x, t, s, cond))

    loaded = load_backbone(folder)
    assert isinstance(loaded.path, TrigPath) and isinstance(loaded.param, TrigParam)
    assert loaded.metadata == {"step": 7, "fid": 2.5} and loaded.origin.layout == "pretrained folder"
    assert type(AbstractBackbone.from_pretrained(folder)) is type(net)

    # The folder is usable without this project: plain JSON and a plain safetensors file.
    document = json.loads((folder / CONFIG_FILE).read_text())
    assert document["format"] == PRETRAINED_FORMAT and document["class"] == type(net).__name__
    assert document["sampling"] == {"path": "trig", "param": "trig"}
    raw = safetensors.load_file(str(folder / WEIGHTS_FILE))
    assert raw.keys() == net.state_dict().keys()


def test_from_pretrained_overrides_and_default_sampling(tmp_path):
    pytest.importorskip("safetensors")
    unet = tiny_unet(7)
    folder = unet.save_pretrained(tmp_path / "unet")
    loaded = load_backbone(folder)
    assert isinstance(loaded.path, LinearPath) and isinstance(loaded.param, EulerParam)
    assert SongUNet.from_pretrained(folder, dropout=0.0).dropout == 0.0
    assert DiT.from_pretrained(
        tiny_dit().save_pretrained(tmp_path / "dit"), gradient_checkpointing=True
    ).gradient_checkpointing
    half = SongUNet.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.map_layer0.weight.dtype == torch.bfloat16


def test_pretrained_folders_are_validated(tmp_path):
    pytest.importorskip("safetensors")
    folder = tiny_dit(8).save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match=r"holds a DiT, not a SongUNet"):
        SongUNet.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiT.from_pretrained(tmp_path / "absent")

    def edited(name, change):
        copy = tmp_path / name
        copy.mkdir()
        (copy / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes())
        document = json.loads((folder / CONFIG_FILE).read_text())
        change(document)
        (copy / CONFIG_FILE).write_text(json.dumps(document))
        return copy

    cases = [
        (edited("unknown", lambda d: d.update({"class": "Nope"})), r"unknown backbone class 'Nope'; known: DiT, "),
        (edited("format", lambda d: d.update({"format": "v0"})), r"has format 'v0', not 'soflow-pretrained-v1'"),
        (edited("argument", lambda d: d["config"].update({"width": 3})), r"DiT has no argument width"),
        (edited("size", lambda d: d["config"].update({"hidden_size": 64, "num_heads": 4})), r"shape mismatch"),
        (edited("sha", lambda d: d["weights"].update({"sha256": "0" * 64})), r"does not match the SHA-256"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            DiT.from_pretrained(path)
    (tmp_path / "unknown" / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"not a pretrained folder: config.json is missing"):
        DiT.from_pretrained(tmp_path / "unknown")
    (tmp_path / "sha" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing"):
        load_backbone(tmp_path / "sha")


def test_save_pretrained_checks_before_writing_and_is_atomic(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        tiny_dit().save_pretrained(tmp_path / "bad", metadata={"when": object()})
    with torch.device("meta"):
        ghost = tiny_dit(randomise=False)
    with pytest.raises(ValueError, match="pos_embed is not a materialised tensor"):
        ghost.save_pretrained(tmp_path / "ghost")
    with pytest.raises(ValueError, match=r"path .* is not one of the named ones"):
        tiny_dit().save_pretrained(tmp_path / "custom", path=type("Custom", (LinearPath,), {})())
    assert not any(tmp_path.iterdir()), "a rejected save wrote something"

    # A crash after the new weights and before the new config: the pair no longer loads.
    folder = tiny_dit(1).save_pretrained(tmp_path / "dit")
    import soflow_core.nets.checkpoints as checkpoints

    def crash(path, write):
        raise RuntimeError("power cut")

    monkeypatch.setattr(checkpoints, "atomic_write", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        tiny_dit(2).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temporary files left
    with pytest.raises(ValueError, match="its two files come from different saves"):
        DiT.from_pretrained(folder)


def test_safetensors_is_optional(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r'pip install "soflow-core\[pretrained\]"'):
        tiny_dit().save_pretrained(tmp_path / "dit")
    path = tmp_path / "plain.pt"
    torch.save(official_checkpoint(tiny_dit(1), tiny_dit(2)), path)
    assert load_backbone(path, num_classes=NUM_CLASSES, **{"num_heads": TINY["num_heads"]}).origin.entry == "ema_model"
