"""sample.py, export_pretrained.py and the trainers' --init on every checkpoint layout (tiny models, in-process)."""

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _nets import NUM_CLASSES, official_checkpoint, tiny_dit, tiny_unet

from soflow_core.nets import DiT, SongUNet
from soflow_core.train.checkpoint import checkpoint_path, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import export_pretrained  # noqa: E402
import sample  # noqa: E402
import train_dit_cifar10  # noqa: E402
import train_dit_imagenet  # noqa: E402

pytest.importorskip("safetensors")
DIT_SIZE = ["--model", "DiT-tiny/2", "--num-classes", str(NUM_CLASSES)]  # the size of _nets.tiny_dit


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as the example subprocesses get (OMP_NUM_THREADS=1): tiny convolutions run fastest so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw(ckpt, out: Path, *args: str) -> np.ndarray:
    """Five samples through sample.py (two batches); returns arr_0 and checks the files it writes."""
    written = sample.main(["--ckpt", str(ckpt), "--num-samples", "5", "--batch-size", "3", "--device", "cpu",
                           "--out", str(out), *args])  # fmt: skip
    arr = np.load(written)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape[0] == 5 and arr.shape[3] == 3 and arr.std() > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    return arr


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Official-layout files (raw and EMA weights differ), and pretrained folders of the EMA networks alone."""
    root = tmp_path_factory.mktemp("checkpoints")
    nets = {
        "dit": (tiny_dit(1), tiny_dit(2)),
        "dit-no-null": (tiny_dit(1, null_class=False), tiny_dit(2, null_class=False)),
        "dit-uncond": (tiny_dit(1, num_classes=None), tiny_dit(2, num_classes=None)),
        "unet": (tiny_unet(1), tiny_unet(2)),
    }
    out = {}
    for name, (raw, ema) in nets.items():
        out[name] = root / f"{name}.pt"
        torch.save(official_checkpoint(raw, ema), out[name])
        out[f"{name}-ema"] = ema.save_pretrained(root / f"{name}-ema")
    # A released model folder as the official repository ships it: config.yaml (its training config,
    # here with the trigonometric path and parameterization) and ckpts/ with one file per step.
    released = root / "SoFlow" / "UNet-uncond"
    (released / "ckpts").mkdir(parents=True)
    (released / "config.yaml").write_text("model:\n  noising_type: Trig\n  coefficient_type: Trig\nbatch_size: 1024\n")
    torch.save(official_checkpoint(*nets["unet"], step=400), released / "ckpts" / "0000400.pt")
    torch.save(official_checkpoint(*nets["unet"], step=800), released / "ckpts" / "0000800.pt")
    out["released"] = released
    # The EMA SongUNet as a bare state dict from a compiled DDP model, and as a converted .safetensors file.
    safetensors = pytest.importorskip("safetensors.torch")
    ema_state = nets["unet"][1].state_dict()
    out["unet-bare"] = root / "unet-bare.pth"
    torch.save({f"module._orig_mod.{k}": v for k, v in ema_state.items()}, out["unet-bare"])
    out["unet-safetensors"] = root / "unet.safetensors"
    safetensors.save_file({f"network.{k}": v.contiguous() for k, v in ema_state.items()}, str(out["unet-safetensors"]))
    out["unet-ema-trig"] = nets["unet"][1].save_pretrained(root / "unet-ema-trig", path="trig", param="trig")
    return out


@pytest.mark.parametrize(("name", "nfe"), [("dit", "1"), ("dit-no-null", "2"), ("dit-uncond", "1")])
def test_sample_draws_the_ema_network_of_an_official_dit_file(files, tmp_path, name, nfe):
    """With and without the null row, and without labels: the official file samples like its EMA network alone."""
    from_file = draw(files[name], tmp_path / "file.npz", *DIT_SIZE, "--nfe", nfe)
    assert from_file.shape == (5, 8, 8, 3)  # 4 latent channels without a VAE: the first three, 8x8
    assert np.array_equal(draw(files[f"{name}-ema"], tmp_path / "ema.npz", "--nfe", nfe), from_file)
    raw = draw(files[name], tmp_path / "raw.npz", *DIT_SIZE, "--nfe", nfe, "--entry", "model")
    assert not np.array_equal(raw, from_file)


def test_sample_draws_an_official_songunet_file_and_a_released_folder(files, tmp_path, capsys):
    for nfe in ("1", "2"):
        from_file = draw(files["unet"], tmp_path / f"file{nfe}.npz", "--nfe", nfe)
        assert from_file.shape == (5, 8, 8, 3)
        for layout in ("unet-ema", "unet-bare", "unet-safetensors"):
            assert np.array_equal(draw(files[layout], tmp_path / f"{layout}{nfe}.npz", "--nfe", nfe), from_file)
    # The released folder: the checkpoint of --ckpt-steps, the path and parameterization of its config.yaml.
    released = draw(files["released"], tmp_path / "released.npz", "--nfe", "2", "--ckpt-steps", "800")
    assert "0000800.pt, entry 'ema_model'" in capsys.readouterr().err
    assert np.array_equal(draw(files["unet-ema-trig"], tmp_path / "trig.npz", "--nfe", "2"), released)
    assert not np.array_equal(draw(files["unet"], tmp_path / "linear.npz", "--nfe", "2"), released)
    with pytest.raises(SystemExit, match=r"holds 0000400.pt, 0000800.pt; need a single one \(or pass --ckpt-steps N\)"):
        draw(files["released"], tmp_path / "x.npz")
    with pytest.raises(SystemExit, match="need one for step 5"):
        draw(files["released"], tmp_path / "x.npz", "--ckpt-steps", "5")


def test_sample_says_what_does_not_fit(files, tmp_path):
    with pytest.raises(SystemExit, match=r"holds a SongUNet, but --model DiT-tiny/2 names a DiT size"):
        draw(files["unet"], tmp_path / "x.npz", *DIT_SIZE)
    with pytest.raises(SystemExit, match=r"num_classes=1000 needs 1000 or 1001 label rows, but .* has 11"):
        draw(files["dit"], tmp_path / "x.npz", "--model", "DiT-tiny/2")
    with pytest.raises(SystemExit, match=r"num_heads is not stored in the weights"):
        draw(files["dit"], tmp_path / "x.npz", "--num-classes", str(NUM_CLASSES))
    with pytest.raises(SystemExit, match=r"hidden_size=64 \(the weights say 32\)"):
        draw(files["dit"], tmp_path / "x.npz", "--model", "DiT-tiny/4", "--num-classes", str(NUM_CLASSES))
    with pytest.raises(SystemExit, match="--ckpt-steps needs a released model folder"):
        draw(files["unet"], tmp_path / "x.npz", "--ckpt-steps", "800")


def test_export_pretrained_converts_an_official_file(files, tmp_path, capsys):
    folder = export_pretrained.main(["--ckpt", str(files["dit"]), *DIT_SIZE, "--out", str(tmp_path / "published")])
    assert "wrote" in capsys.readouterr().out
    net, ema = DiT.from_pretrained(folder), DiT.from_pretrained(files["dit-ema"])
    assert net.config == ema.config and net.null_class
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ema.state_dict().values()))
    document = json.loads((folder / "config.json").read_text())
    assert document["sampling"] == {"path": "linear", "param": "euler"}
    assert "entry 'ema_model'" in document["metadata"]["source"]


def test_a_run_exports_to_a_folder_that_samples_like_the_run(tmp_path):
    run = tmp_path / "run"
    train_dit_imagenet.main(
        ["--preset", "tiny", "--synthetic", "--no-progress", "--total-steps", "2", "--out", str(run)]
    )
    folder = export_pretrained.main(["--ckpt", str(run), "--out", str(tmp_path / "published")])
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):  # the ordinary mode, as the run's own files
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask, name
    document = json.loads((folder / "config.json").read_text())
    assert document["metadata"]["step"] == 2 and document["metadata"]["entry"] == "ema"
    assert document["metadata"]["run"]["model"] == "DiT-tiny/4"
    for nfe in ("1", "2"):
        expected = draw(run, tmp_path / f"run{nfe}.npz", "--nfe", nfe)
        assert expected.shape == (5, 32, 32, 3)
        assert np.array_equal(draw(folder, tmp_path / f"published{nfe}.npz", "--nfe", nfe), expected)


# ---------------------------------------------------------------------------- fine-tuning (--init)

TINY = ["--preset", "tiny", "--synthetic", "--no-progress", "--total-steps", "1", "--lr", "0"]


def started_from(out: Path, net, printed: str, source: str) -> dict:
    """With lr = 0 the step-1 weights are still the initial ones: they must be ``net``'s, as the log says."""
    assert f"initialised from {source}" in printed
    saved = load_checkpoint(checkpoint_path(out / "checkpoints", 1))
    for key, value in net.state_dict().items():
        assert torch.equal(saved["model"][key], value), key
        torch.testing.assert_close(saved["ema"][key].to(value.dtype), value, rtol=1e-6, atol=1e-7)  # d·θ + (1 − d)·θ
    return saved


def test_imagenet_trainer_starts_from_an_official_file(tmp_path, capsys):
    """The EMA entry of an official file, into the trainer's DiT-tiny/4."""
    torch.manual_seed(1)
    size = {"input_size": 32, "in_channels": 4, "patch_size": 4, "hidden_size": 64, "depth": 2, "num_heads": 2}
    raw, ema = DiT(**size, num_classes=NUM_CLASSES), DiT(**size, num_classes=NUM_CLASSES)  # DiT-tiny/4
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    source = tmp_path / "official.pt"
    torch.save(official_checkpoint(raw, ema), source)
    out = tmp_path / "run"
    train_dit_imagenet.main([*TINY, "--init", str(source), "--out", str(out)])
    started_from(out, ema, capsys.readouterr().out, f"training checkpoint {source}, entry 'ema_model'")
    assert json.loads((out / "config.json").read_text())["init"] == str(source)

    # A file of another network is refused before training, naming what it would fit.
    torch.save(tiny_unet().state_dict(), tmp_path / "unet.pt")
    with pytest.raises(
        SystemExit, match=r"(?s)--init .* cannot start this run: checkpoint does not fit this DiT.*looks like: SongUNet"
    ):
        train_dit_imagenet.main([*TINY, "--init", str(tmp_path / "unet.pt"), "--out", str(tmp_path / "bad")])


def test_cifar_trainer_starts_from_a_pretrained_folder_and_resumes_over_it(tmp_path, capsys):
    torch.manual_seed(2)
    unet = SongUNet(model_channels=16, channel_mult=[1, 2], num_blocks=1)  # the tiny preset's network
    folder = unet.save_pretrained(tmp_path / "unet")
    out = tmp_path / "run"
    train_dit_cifar10.main([*TINY, "--init", str(folder), "--out", str(out)])
    started_from(out, unet, capsys.readouterr().out, f"pretrained folder {folder}")
    # Starting again resumes from the run's checkpoint; --init no longer applies, a longer run does.
    train_dit_cifar10.main([*TINY, "--total-steps", "2", "--init", str(folder), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "initialised" not in printed
    assert "--total-steps: 1 -> 2 (applied from step 1 on)" in printed


def test_samples_go_under_runs_without_out(files: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default is relative to where the command runs, as runs/ of the other scripts
    written = sample.main(
        ["--ckpt", str(files["dit"]), *DIT_SIZE, "--num-samples", "2", "--device", "cpu", "--nfe", "2"]
    )
    assert written == Path("runs/samples/dit-nfe2.npz") and written.is_file()
    assert sample.default_out("SoFlow/XL-2-cond/", 1200000, 1) == "runs/samples/XL-2-cond-1200000-nfe1.npz"
    assert (
        sample.default_out("runs/dit_b4/checkpoints/step-0000400.pt", None, 1) == "runs/samples/step-0000400-nfe1.npz"
    )
