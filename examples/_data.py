"""Data-folder glue for the example scripts: HDF5 latent shards (ImageNet) and the CIFAR-10 python batches.

Imported by the scripts in ``examples/`` as ``from _data import ...``; nothing here is part of the
library API.

Latent shard format (one ``.h5`` file, or a folder of ``*.h5`` shards read in sorted name order):

* ``mean`` and ``std``: (N, 4, 32, 32) posterior mean and standard deviation of the VAE
  (float32, or float16 to halve the disk size; reads always return float32);
* ``label``: (N,) int64 class index (ImageNet classes = sorted WordNet ids);
* attributes: ``scale_factor`` (0.18215), ``vae`` (the VAE's name or folder), ``resolution`` (256),
  ``source`` (the image folder), plus any others the writer adds.
"""

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from _cli import optional_import

__all__ = [
    "CIFAR10_URL",
    "EXTRACT_COMMAND",
    "LatentShardWriter",
    "LatentShards",
    "read_cifar10",
    "write_latent_shard",
]

EXTRACT_COMMAND = (
    "python examples/extract_imagenet_latents.py --data /path/to/imagenet/train "
    "--vae /path/to/sd-vae-ft-mse --out {out}"
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_DATASETS = ("mean", "std", "label")


def _h5py():
    return optional_import("h5py", "reading and writing latent shards")


def _as_numpy(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor; got {type(x).__name__}")
    return x


class LatentShardWriter:
    """Write a latent shard in pieces into a temporary file; ``commit`` renames it into place.

    The shard appears under its final name only once complete, so a folder never holds a
    half-written shard and an interrupted extraction can skip the shards that exist.

    Args:
        path: The ``.h5`` file to create (its folder is created when missing).
        size: Number of rows N.
        latent_shape: (C, H, W) of one latent.
        dtype: Storage dtype of ``mean`` and ``std``: "float32" or "float16".
        **attrs: File attributes (``scale_factor``, ``vae``, ``resolution``, ``source``, ...).

    Raises:
        ValueError: If the dtype or sizes are invalid.
    """

    def __init__(self, path: str | os.PathLike, size: int, latent_shape, *, dtype: str = "float32", **attrs) -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16'; got {dtype!r}")
        latent_shape = tuple(int(v) for v in latent_shape)
        if size < 0 or len(latent_shape) != 3:
            raise ValueError(f"size must be >= 0 and latent_shape (C, H, W); got {size} and {latent_shape}")
        h5py = _h5py()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.size, self.latent_shape = size, latent_shape
        self.file = h5py.File(self.tmp, "w")
        # One image per chunk: random reads touch only the rows they need.
        chunks = (1, *latent_shape) if size else None
        for name in ("mean", "std"):
            self.file.create_dataset(name, shape=(size, *latent_shape), dtype=dtype, chunks=chunks)
        self.file.create_dataset("label", shape=(size,), dtype=np.int64)
        for key, value in attrs.items():
            self.file.attrs[key] = value

    def write(self, start: int, mean, std, labels, **extra) -> None:
        """Write rows [start, start + len(mean)); ``extra`` arrays go to (N,)-shaped int64 datasets."""
        mean, std, labels = _as_numpy("mean", mean), _as_numpy("std", std), _as_numpy("labels", labels)
        n = mean.shape[0]
        if mean.shape[1:] != self.latent_shape or std.shape != mean.shape:
            raise ValueError(
                f"mean and std must be (n, {', '.join(map(str, self.latent_shape))}); got {mean.shape} and {std.shape}"
            )
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be ({n},) integers; got {labels.shape} {labels.dtype}")
        if start < 0 or start + n > self.size:
            raise ValueError(f"rows [{start}, {start + n}) do not fit a shard of {self.size} rows")
        self.file["mean"][start : start + n] = mean
        self.file["std"][start : start + n] = std
        self.file["label"][start : start + n] = labels
        for name, values in extra.items():
            if name not in self.file:
                self.file.create_dataset(name, shape=(self.size,), dtype=np.int64)
            self.file[name][start : start + n] = _as_numpy(name, values)

    def commit(self) -> Path:
        """Close the file and move it to its final name (atomic on one file system)."""
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file."""
        if self.file.id.valid:
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "LatentShardWriter":
        return self

    def __exit__(self, kind, *rest) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def write_latent_shard(
    path: str | os.PathLike,
    mean,
    std,
    labels,
    *,
    dtype: str = "float32",
    **attrs,
) -> Path:
    """Write one latent shard atomically (a temporary file in the same folder, then a rename).

    Args:
        path: The ``.h5`` file to create (its folder is created when missing).
        mean: Posterior means, (N, C, H, W) array or tensor.
        std: Posterior standard deviations, same shape.
        labels: Class indices, (N,) integers.
        dtype: Storage dtype of ``mean`` and ``std``: "float32" or "float16".
        **attrs: File attributes (``scale_factor``, ``vae``, ``resolution``, ``source``, ...).

    Returns:
        The path written.

    Raises:
        ValueError: If shapes or the dtype are invalid.
    """
    mean, std, labels = _as_numpy("mean", mean), _as_numpy("std", std), _as_numpy("labels", labels)
    if mean.ndim != 4:
        raise ValueError(f"mean must have shape (N, C, H, W); got {mean.shape}")
    if std.shape != mean.shape:
        raise ValueError(f"std must have the shape of mean {mean.shape}; got {std.shape}")
    if labels.shape != (mean.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ({mean.shape[0]},) integers; got {labels.shape} {labels.dtype}")
    with LatentShardWriter(path, mean.shape[0], mean.shape[1:], dtype=dtype, **attrs) as writer:
        writer.write(0, mean, std, labels)
    return writer.path


class LatentShards:
    """Random access to the latents of one ``.h5`` shard or a folder of shards (sorted by name).

    File handles open lazily in each process (so DataLoader workers each get their own).

    Args:
        path: A ``.h5`` file or a folder holding ``*.h5`` shards.

    Raises:
        FileNotFoundError: If the path or its shards are missing (the message says how to make them).
        ValueError: If a shard lacks a dataset or the shards disagree in shape.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        h5py = _h5py()
        self.path = Path(path)
        how = "Extract them first with:\n  " + EXTRACT_COMMAND.format(out=self.path)
        if self.path.is_dir():
            files = sorted(p for p in self.path.glob("*.h5") if not p.name.startswith("."))
            if not files:
                raise FileNotFoundError(f"no latent shards (*.h5) in {self.path}. {how}")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise FileNotFoundError(
                f"latent path {self.path} does not exist. It holds the VAE latents of the ImageNet train "
                f"images, made from the ImageNet train folder (train/<wnid>/*.JPEG) and the sd-vae-ft-mse VAE "
                f"folder. {how}"
            )
        self.files = files
        sizes, shape, self.attrs = [], None, {}
        for file in files:
            with h5py.File(file, "r") as f:
                missing = [name for name in _DATASETS if name not in f]
                if missing:
                    raise ValueError(f"latent shard {file} lacks dataset(s) {missing}; expected {list(_DATASETS)}")
                n = f["mean"].shape[0]
                if f["std"].shape != f["mean"].shape or f["label"].shape != (n,):
                    raise ValueError(
                        f"latent shard {file}: mean {f['mean'].shape}, std {f['std'].shape} and label "
                        f"{f['label'].shape} must be (N, C, H, W), (N, C, H, W) and (N,)"
                    )
                if shape is None:
                    shape, self.attrs = tuple(f["mean"].shape[1:]), _plain(f.attrs)
                elif tuple(f["mean"].shape[1:]) != shape:
                    raise ValueError(
                        f"latent shard {file} holds latents of shape {tuple(f['mean'].shape[1:])}, "
                        f"but {files[0]} holds {shape}"
                    )
                sizes.append(n)
        self.latent_shape: tuple[int, ...] = shape
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._handles: dict[int, list] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"LatentShards({str(self.path)!r}, shards={len(self.files)}, len={len(self)}, shape={self.latent_shape})"

    def _open(self) -> list:
        pid = os.getpid()
        if pid not in self._handles:
            h5py = _h5py()
            self._handles = {pid: [h5py.File(file, "r") for file in self.files]}
        return self._handles[pid]

    def close(self) -> None:
        """Close the file handles this process opened."""
        for handle in self._handles.get(os.getpid(), []):
            handle.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        # Handles never travel to worker processes; each opens its own.
        return {**self.__dict__, "_handles": {}}

    def labels(self) -> torch.Tensor:
        """All class labels, (N,) int64."""
        return torch.from_numpy(np.concatenate([f["label"][:] for f in self._open()]).astype(np.int64))

    def read(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read the latents at global ``indices``, returned in the order asked (repeats allowed).

        Reads are grouped per shard, sorted and de-duplicated (a contiguous slice when the
        indices are dense), then put back in the requested order.

        Args:
            indices: 1-D integer array of indices in [0, len).

        Returns:
            (mean float32, std float32, labels int64) tensors with len(indices) rows.

        Raises:
            IndexError: If an index is out of range.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"indices must be a 1-D integer array; got shape {idx.shape} and dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent indices must lie in [0, {len(self)}); got [{idx.min()}, {idx.max()}]")
        n = idx.size
        mean = np.empty((n, *self.latent_shape), np.float32)
        std = np.empty((n, *self.latent_shape), np.float32)
        labels = np.empty((n,), np.int64)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        handles = self._open()
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            local = idx[where] - self.offsets[shard]
            unique, inverse = np.unique(local, return_inverse=True)
            f = handles[shard]
            lo, hi = int(unique[0]), int(unique[-1]) + 1
            if hi - lo <= 4 * unique.size:  # dense: one slice read beats a point selection
                take = unique - lo
                m, s, y = f["mean"][lo:hi][take], f["std"][lo:hi][take], f["label"][lo:hi][take]
            else:
                m, s, y = f["mean"][unique], f["std"][unique], f["label"][unique]
            mean[where], std[where], labels[where] = m[inverse], s[inverse], y[inverse]
        return torch.from_numpy(mean), torch.from_numpy(std), torch.from_numpy(labels)


def _plain(attrs: Mapping) -> dict:
    """HDF5 attributes as plain Python values."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, bytes):
            value = value.decode()
        out[key] = value
    return out


def _numpy_rebuilders() -> dict[tuple[str, str], object]:
    """The functions numpy pickles arrays with (``_reconstruct``, ``_frombuffer``), under numpy 1.x and 2.x names."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    found = {}
    for module in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x
        found[(f"{module}.multiarray", "_reconstruct")] = reconstruct
        found[(f"{module}.numeric", "_frombuffer")] = frombuffer
    return found


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, restricted to that one use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is admitted for latin1 text only; got {encoding!r}")
    return text.encode("latin1")


_CIFAR_ADMITTED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **_numpy_rebuilders(),
}


class _CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 python batch without running code from the file.

    Dicts, lists, strings, bytes and numbers come from pickle opcodes; of the importable names a
    pickle may call, only numpy arrays and dtypes (and ``_codecs.encode`` for bytes written by
    Python 3 at protocol 2) are admitted. Anything else, such as ``os.system`` or ``builtins.open``
    in a crafted file, raises before it is called.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _CIFAR_ADMITTED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a CIFAR-10 batch (only numpy arrays, lists and strings are read)"
            ) from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 3, 32, 32), int64 labels (N,)) of one python batch, read without executing code."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {error}") from error
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch: it holds a {type(batch).__name__}, not a dict")
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected b'data' (N, 3072) uint8; got {got}")
    if not isinstance(labels, list) or len(labels) != data.shape[0]:
        got = f"{len(labels)} entries" if isinstance(labels, list) else type(labels).__name__
        expected = f"b'labels', a list of {data.shape[0]}"
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected {expected}; got {got}")
    if not all(type(y) is int and 0 <= y < 10 for y in labels):
        raise ValueError(f"{path} is not a CIFAR-10 python batch: b'labels' must be class indices 0..9")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _cifar_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() or (candidate / "test_batch").is_file():
            return candidate
    return None


def read_cifar10(folder: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 from its python batches (``cifar-10-batches-py``).

    The batches are pickles; they are read with a restricted unpickler that admits numpy arrays,
    lists, strings and numbers only, so a crafted file cannot run code (it is reported as not a
    CIFAR-10 batch).

    Args:
        folder: The ``cifar-10-batches-py`` folder or the folder that holds it.
        split: "train" (``data_batch_1`` … ``data_batch_5``, 50 000 images) or "test" (``test_batch``).

    Returns:
        (uint8 images of shape (N, 3, 32, 32), int64 labels of shape (N,)).

    Raises:
        FileNotFoundError: If the batches are missing (the message says what to download).
        ValueError: If ``split`` is unknown or a batch is malformed.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    folder = Path(folder)
    root = _cifar_folder(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = names if root is None else [name for name in names if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 python batches {missing} not found in {folder} or {folder / 'cifar-10-batches-py'}. "
            f"Download {CIFAR10_URL} and extract it into {folder} "
            f"(e.g. `mkdir -p {folder} && tar -xzf cifar-10-python.tar.gz -C {folder}`), "
            f"which creates {folder / 'cifar-10-batches-py'}/data_batch_1 … test_batch."
        )
    batches = [_read_cifar_batch(root / name) for name in names]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
