import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _data import LatentShards, read_cifar10, write_latent_shard

h5py = pytest.importorskip("h5py")


def _latents(n, seed):
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    std = rng.random((n, 4, 8, 8)).astype(np.float32)
    return mean, std, rng.integers(0, 10, n)


def _attrs():
    return {"scale_factor": 0.18215, "vae": "stabilityai/sd-vae-ft-mse", "resolution": 256, "source": "test"}


def test_latent_shards_read_any_indices_across_shards_in_order(tmp_path):
    parts = [_latents(n, seed) for seed, n in enumerate((5, 7, 3))]
    for i, (m, s, y) in enumerate(parts):
        write_latent_shard(tmp_path / f"latents-{i:05d}-of-00003.h5", m, s, y, **_attrs())
    mean = np.concatenate([p[0] for p in parts])
    std = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    shards = LatentShards(tmp_path)
    assert len(shards) == 15 and shards.latent_shape == (4, 8, 8) and shards.attrs["resolution"] == 256
    assert shards.attrs["vae"] == "stabilityai/sd-vae-ft-mse"
    for idx in (np.array([14, 0, 6, 5, 4, 12, 6]), np.arange(15), np.array([3]), np.array([11, 2, 9, 1, 13])):
        m, s, y = shards.read(idx)
        assert m.dtype == torch.float32 and s.dtype == torch.float32 and y.dtype == torch.int64
        np.testing.assert_array_equal(m.numpy(), mean[idx])
        np.testing.assert_array_equal(s.numpy(), std[idx])
        np.testing.assert_array_equal(y.numpy(), labels[idx])
    np.testing.assert_array_equal(shards.labels().numpy(), labels)
    with pytest.raises(IndexError, match=r"\[0, 15\)"):
        shards.read(np.array([15]))
    shards.close()


def test_single_file_float16_storage_and_atomic_write(tmp_path):
    m, s, y = _latents(6, 0)
    path = write_latent_shard(tmp_path / "one.h5", torch.from_numpy(m), s, y, dtype="float16", **_attrs())
    assert [p.name for p in tmp_path.iterdir()] == ["one.h5"]  # no temporary file left behind
    with h5py.File(path) as f:
        assert f["mean"].dtype == np.float16 and f["label"].dtype == np.int64
    shards = LatentShards(path)
    mean, std, labels = shards.read(np.array([5, 1]))
    assert mean.dtype == torch.float32
    np.testing.assert_allclose(mean.numpy(), m[[5, 1]], atol=2e-3)
    np.testing.assert_allclose(std.numpy(), s[[5, 1]], atol=1e-3)
    np.testing.assert_array_equal(labels.numpy(), y[[5, 1]])


def test_latent_shards_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"extract_imagenet_latents\.py") as info:
        LatentShards(tmp_path / "nowhere")
    assert "ImageNet train folder" in str(info.value) and "--vae" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"no latent shards"):
        LatentShards(tmp_path)
    m, s, y = _latents(4, 0)
    write_latent_shard(tmp_path / "a.h5", m, s, y)
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f["mean"] = m
        f["label"] = y
    with pytest.raises(ValueError, match=r"lacks dataset\(s\) \['std'\]"):
        LatentShards(tmp_path)
    (tmp_path / "b.h5").unlink()
    write_latent_shard(tmp_path / "b.h5", m[:, :, :4], s[:, :, :4], y)
    with pytest.raises(ValueError, match="holds latents of shape"):
        LatentShards(tmp_path)
    with pytest.raises(ValueError, match="std must have the shape"):
        write_latent_shard(tmp_path / "c.h5", m, s[:2], y)
    with pytest.raises(ValueError, match="labels must be"):
        write_latent_shard(tmp_path / "c.h5", m, s, y[:3])


def test_latent_shards_survive_pickling_for_worker_processes(tmp_path):
    m, s, y = _latents(4, 1)
    write_latent_shard(tmp_path / "a.h5", m, s, y)
    shards = LatentShards(tmp_path)
    shards.read(np.array([0]))  # opens handles in this process
    clone = pickle.loads(pickle.dumps(shards))
    np.testing.assert_array_equal(clone.read(np.array([2, 3]))[0].numpy(), m[[2, 3]])


def _fake_cifar(root: Path, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        expected[name] = (data, labels)
    return folder, expected


def test_read_cifar10_from_the_folder_or_its_parent(tmp_path):
    folder, expected = _fake_cifar(tmp_path)
    for where in (folder, tmp_path):
        images, labels = read_cifar10(where)
        assert images.shape == (20, 3, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images[4:8].reshape(4, -1), expected["data_batch_2"][0])
        # channels first: the first 1024 bytes of a row are the red plane
        np.testing.assert_array_equal(images[0, 0].reshape(-1), expected["data_batch_1"][0][0, :1024])
        np.testing.assert_array_equal(labels[16:], expected["data_batch_5"][1])
    images, labels = read_cifar10(tmp_path, split="test")
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == expected["test_batch"][1]


def test_read_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz") as info:
        read_cifar10(tmp_path / "cifar")
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(info.value)
    assert "tar -xzf" in str(info.value)
    with pytest.raises(ValueError, match="split must be"):
        read_cifar10(tmp_path, split="val")
    folder, _ = _fake_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        read_cifar10(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        read_cifar10(tmp_path)


def _python2_batch(data: bytes, labels: list[int]) -> bytes:
    """A batch exactly as the CIFAR-10 release pickles it (Python 2, protocol 2, numpy.core names, str opcodes)."""
    rows = len(data) // 3072
    label_ops = b"".join(b"K" + bytes([y]) for y in labels)
    return (
        b"\x80\x02}q\x01(U\x04dataq\x02cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04"
        b"K\x00\x85U\x01b\x87Rq\x05(K\x01K" + bytes([rows]) + b"M\x00\x0c\x86cnumpy\ndtype\nq\x06U\x02u1K\x00K\x01"
        b"\x87Rq\x07(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
        + struct.pack("<I", len(data))
        + data
        + b"tbU\x06labelsq\x08]q\t(" + label_ops + b"eu."
    )  # fmt: skip


def test_read_cifar10_reads_the_release_format_and_every_pickle_protocol(tmp_path):
    folder, _ = _fake_cifar(tmp_path)
    data = bytes(range(256)) * 24  # two images
    (folder / "test_batch").write_bytes(_python2_batch(data, [3, 9]))
    images, labels = read_cifar10(folder, split="test")
    assert images.tobytes() == data and labels.tolist() == [3, 9]
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        batch = {b"data": np.full((2, 3072), protocol, np.uint8), b"labels": [1, 2], b"batch_label": b"x"}
        (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
        images, labels = read_cifar10(folder, split="test")
        assert (images == protocol).all() and labels.tolist() == [1, 2]


class _CreatesAFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_read_cifar10_runs_no_code_from_a_crafted_batch(tmp_path):
    folder, _ = _fake_cifar(tmp_path)
    target = tmp_path / "created-by-the-pickle"
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"payload": _CreatesAFile(target)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1 is not a CIFAR-10 python batch: io\.open is not allowed"):
        read_cifar10(folder)
    assert not target.exists()
    # Out-of-range labels and non-list labels are malformed batches too.
    for labels in ([0, 10], np.array([0, 1])):
        (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}))
        with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
            read_cifar10(folder)
