import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("h5py")
pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import extract_imagenet_latents as extract  # noqa: E402
from _data import LatentShards  # noqa: E402
from _vae import decode_latents, encode_posterior, load_vae  # noqa: E402


def _pattern(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_adm_center_crop_matches_hand_computed_cases():
    # 600x400: short side 400 < 512, so no BOX halving; bicubic to (384, 256); crop x in [64, 320)
    image = _pattern(600, 400)
    expected = image.resize((384, 256), resample=Image.BICUBIC).crop((64, 0, 320, 256))
    out = extract.adm_center_crop(image, 256)
    assert out.size == (256, 256)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    # 1100x1300: 1100 >= 512 -> BOX to (550, 650); 550 >= 512 -> BOX to (275, 325);
    # bicubic by 256/275 to (256, round(302.55) = 303); crop y from (303 - 256) // 2 = 23
    image = _pattern(1100, 1300, seed=1)
    halved = image.resize((550, 650), resample=Image.BOX).resize((275, 325), resample=Image.BOX)
    expected = halved.resize((256, 303), resample=Image.BICUBIC).crop((0, 23, 256, 279))
    np.testing.assert_array_equal(np.asarray(extract.adm_center_crop(image, 256)), np.asarray(expected))
    # an exact-size image passes through unchanged
    image = _pattern(256, 256, seed=2)
    np.testing.assert_array_equal(np.asarray(extract.adm_center_crop(image, 256)), np.asarray(image))


@pytest.fixture(scope="module")
def imagenet_and_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    data, vae = extract.make_synthetic(root, num_classes=2, per_class=3)
    (data / "n00000001" / "notes.txt").write_text("not an image")
    return data, vae


def test_extraction_writes_shards_with_the_right_labels_and_resumes(imagenet_and_vae, tmp_path, monkeypatch, capsys):
    data, vae_folder = imagenet_and_vae
    out = tmp_path / "latents"
    args = ["--preset", "tiny", "--data", str(data), "--vae", str(vae_folder), "--out", str(out), "--resolution", "32"]
    # two torchrun ranks, one after the other
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert extract.main([*args, "--batch-size", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "extract_config.json",
        "latents-00000-of-00002.h5",
        "latents-00001-of-00002.h5",
    ]
    shards = LatentShards(out)
    assert len(shards) == 6 and shards.latent_shape == (4, 16, 16)
    assert shards.attrs["resolution"] == 32 and shards.attrs["scale_factor"] == pytest.approx(0.18215)
    # rank 0 holds images 0, 2, 4 and rank 1 images 1, 3, 5; classes are the sorted folders (3 images each)
    assert shards.labels().tolist() == [0, 0, 1, 0, 1, 1]
    config = json.loads((out / "extract_config.json").read_text())
    assert config["world_size"] == 2 and config["num_images"] == 6 and config["num_classes"] == 2

    # the stored posterior is the VAE's posterior of the ADM-cropped image in [-1, 1]
    vae = load_vae(vae_folder)
    files, labels, _ = extract.list_images(data)
    image = np.asarray(extract.adm_center_crop(Image.open(files[3]).convert("RGB"), 32))
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    mean, std = encode_posterior(vae, x)
    got_mean, got_std, got_label = shards.read(np.array([4]))  # rank 1's second row is image 3
    torch.testing.assert_close(got_mean, mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_std, std, atol=1e-5, rtol=1e-4)
    assert got_label.tolist() == [labels[3]] == [1]

    # a rerun skips the complete shards
    stamp = (out / "latents-00001-of-00002.h5").stat().st_mtime_ns
    capsys.readouterr()
    assert extract.main(args) == 0
    assert "complete; skipping" in capsys.readouterr().out
    assert (out / "latents-00001-of-00002.h5").stat().st_mtime_ns == stamp


def test_list_file_input_and_float16_storage(imagenet_and_vae, tmp_path, monkeypatch):
    data, vae_folder = imagenet_and_vae
    files, _, _ = extract.list_images(data)
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join(f"{p} {7 if i % 2 else 3}" for i, p in enumerate(files[:4])) + "\n")
    out = tmp_path / "latents"
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--preset", "tiny", "--data", str(listing), "--vae", str(vae_folder), "--out", str(out)]
    assert extract.main([*argv, "--resolution", "16", "--storage", "float16", "--precision", "bf16"]) == 0
    shards = LatentShards(out)
    assert len(shards) == 4 and shards.labels().tolist() == [3, 7, 3, 7]
    mean, std, _ = shards.read(np.arange(4))
    assert mean.dtype == torch.float32 and torch.isfinite(mean).all() and (std > 0).all()


def test_missing_inputs_exit_with_instructions(imagenet_and_vae, tmp_path, capsys):
    data, _ = imagenet_and_vae
    assert extract.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "ImageNet folder" in capsys.readouterr().err
    assert extract.main(["--data", str(data), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "hf download stabilityai/sd-vae-ft-mse --local-dir" in err
    assert "diffusion_pytorch_model.safetensors" in err
    with pytest.raises(SystemExit):
        extract.parse_config(["--precision", "fp8"])


def test_load_vae_errors_and_decode(imagenet_and_vae, tmp_path):
    _, vae_folder = imagenet_and_vae
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((vae_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"has no diffusion_pytorch_model\.safetensors"):
        load_vae(tmp_path / "empty")
    vae = load_vae(vae_folder)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = decode_latents(vae, z)
    assert images.shape == (2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(images, vae.decode(z / 0.18215).sample)


def test_synthetic_mode_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "synthetic"
    assert extract.main(["--synthetic", "--preset", "tiny", "--resolution", "32", "--out", str(out)]) == 0
    shards = LatentShards(out)
    assert len(shards) == 6 and sorted(set(shards.labels().tolist())) == [0, 1]
    assert json.loads((out / "extract_config.json").read_text())["synthetic"] is True
