r"""FID, sFID, Inception Score, precision and recall as the ADM evaluator reports them, in PyTorch.

The ADM evaluator (openai/guided-diffusion, ``evaluations/evaluator.py``), which the SoFlow paper and the DiT
line of work report, runs the TensorFlow Inception-v3 graph of 2015-12-05 on uint8 images (any size; the graph
resizes them to 299 × 299 bilinearly) and reads two of its tensors:

* ``pool_3``: 2048 features per image, for FID, the Inception Score (through the graph's own logits layer,
  without its bias) and the k-NN precision and recall (k = 3);
* ``mixed_6/conv``: the 17 × 17 × 192 output of the first (1 × 1) branch of the block torchvision calls
  ``Mixed_6d``, of which the first 7 channels, flattened in height-width-channel order (2023 features),
  make sFID.

Here the network is torch-fidelity's ``FeatureExtractorInceptionV3``, a PyTorch port of that graph that
reproduces its TensorFlow 1.x resizing and pooling quirks and loads the graph's converted weights; it is an
optional dependency (the ``fid`` extra), imported only when an [`InceptionV3`][soflow_core.metrics.fid.InceptionV3]
is built. Everything else (statistics, distances, scores, file formats) is plain torch and numpy.

Statistics are built from mergeable sufficient statistics
([`FeatureSums`][soflow_core.metrics.fid.FeatureSums]: the count, the sum and the sum of outer products, in
float64), so the features of many batches or many ranks combine exactly, and an offline scoring of a sample
file and an in-loop scoring spread over ranks compute the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, UInt8
from torch import Tensor, nn

from soflow_core._files import atomic_write, sha256_file
from soflow_core._validation import check_finite, check_int
from soflow_core.metrics import gaussian_frechet_distance

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "POOL_DIM",
    "SPATIAL_DIM",
    "FIDReference",
    "FIDScores",
    "FeatureStatistics",
    "FeatureSums",
    "ImageSetFeatures",
    "InceptionOutput",
    "InceptionV3",
    "compute_image_features",
    "find_inception_weights",
    "inception_score",
    "load_reference",
    "npz_image_shape",
    "precision_recall",
    "read_npz_images",
    "save_reference",
    "score_features",
]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's conversion of the TensorFlow Inception-v3 graph of 2015-12-05 (the FID network)."""
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
"""Where torch-fidelity downloads [`INCEPTION_WEIGHTS_FILE`][soflow_core.metrics.fid.INCEPTION_WEIGHTS_FILE] from."""
INCEPTION_WEIGHTS_ENV = "SOFLOW_INCEPTION_WEIGHTS"
"""The environment variable that names a local copy of the Inception weights."""
POOL_DIM = 2048
"""Features per image of the ``pool_3`` layer (FID, Inception Score, precision and recall)."""
SPATIAL_DIM = 17 * 17 * 7
"""Features per image of the spatial layer (``mixed_6/conv``, first 7 of 192 channels): sFID."""

# The file name ends in the first 8 hex digits of the file's SHA-256, torch.hub's convention, which
# torch.hub.download_url_to_file checks while downloading; the same prefix is checked for local files.
_SHA256_PREFIX = "6726825d"
_SPATIAL_CHANNELS = 7
_LOGITS = 1008  # the graph's softmax layer: 1008 outputs (1000 ImageNet classes and 8 unused)
_REFERENCE_FORMAT = "soflow_core.fid_reference"
_NEIGHBOURS = 3  # k of ADM's k-NN precision and recall


# --------------------------------------------------------------------------------------------------------------
# Weights and network


def _hub_weights_path() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps a downloaded copy of the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _missing_weights_message(tried: list[str]) -> str:
    return (
        f"no Inception-v3 weights file found (looked at: {'; '.join(tried)}). FID needs torch-fidelity's "
        f"{INCEPTION_WEIGHTS_FILE} (about 91 MB): download it from {INCEPTION_WEIGHTS_URL} on a machine with a "
        f"network and either pass its path (--inception-weights in the example scripts), set {INCEPTION_WEIGHTS_ENV} "
        f"to its path, or put it at {_hub_weights_path()}, where torch-fidelity's own download would place it"
    )


def find_inception_weights(weights: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """The local file of the Inception-v3 weights: the one named, else found, else downloaded.

    Looked for in this order: ``weights`` (when given, it must exist); the file that the environment variable
    ``SOFLOW_INCEPTION_WEIGHTS`` names (when set, it must exist); torch.hub's checkpoint folder
    (``$TORCH_HOME/hub/checkpoints/``), where torch-fidelity's own download puts the file. With none of them
    and ``download=True``, the file is downloaded there by torch.hub, as torch-fidelity does, which checks the
    SHA-256 prefix in its name.

    Args:
        weights: A path to the weights file, or None to look for it.
        download: Whether to download the file when no local copy is found (needs a network).

    Returns:
        The path of the weights file.

    Raises:
        FileNotFoundError: If the named file is missing, or no file is found (and none could be downloaded);
            the message says which file to get, from where, and where to put it.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights {str(weights)!r} is not a file. {_missing_weights_message([str(path)])}")
        return path
    tried = []
    named = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{INCEPTION_WEIGHTS_ENV}={named!r} is not a file. {_missing_weights_message([str(path)])}"
            )
        return path
    tried.append(f"${INCEPTION_WEIGHTS_ENV} (not set)")
    cached = _hub_weights_path()
    if cached.is_file():
        return cached
    tried.append(str(cached))
    if not download:
        return _raise_missing([*tried, "no download (download=False)"])
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(cached), hash_prefix=_SHA256_PREFIX)
    except (OSError, RuntimeError) as error:  # no network (URLError is an OSError), or a damaged download
        return _raise_missing([*tried, f"download from {INCEPTION_WEIGHTS_URL} failed: {error}"])
    return cached


def _raise_missing(tried: list[str]) -> Path:
    raise FileNotFoundError(_missing_weights_message(tried))


def _import_inception_class() -> type:
    """torch-fidelity's TF-matching Inception-v3 class, or an error that says how to install it."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ModuleNotFoundError as error:
        if error.name == "torchvision":
            raise ModuleNotFoundError(
                "torch-fidelity imports torchvision when it is imported (for extractors FID does not use). Install "
                "the torchvision build that matches your torch, e.g. on a CPU-only machine: pip install torchvision "
                "--index-url https://download.pytorch.org/whl/cpu",
                name=error.name,
            ) from error
        if error.name == "torch_fidelity":
            raise ModuleNotFoundError(
                'FID needs torch-fidelity, from the "fid" extra: pip install -e ".[fid]"; where pip would replace '
                'your torch build, pip install --no-deps "torch-fidelity==0.4.0" and install torchvision for your '
                "torch yourself",
                name=error.name,
            ) from error
        raise
    return FeatureExtractorInceptionV3


@contextlib.contextmanager
def _exact_float32(device_type: str) -> Iterator[None]:
    """Full float32 convolutions and matmuls (no TF32, no autocast) while the Inception runs."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionOutput:
    """The features of one batch of images, as the ADM evaluator reads them (float32).

    Attributes:
        pool: ``pool_3`` features, (n, 2048).
        spatial: ``mixed_6/conv`` features, first 7 channels in height-width-channel order, (n, 2023).
        logits: The softmax layer's logits without its bias, (n, 1008), as the ADM Inception Score uses them.
    """

    pool: Float[Tensor, "n 2048"]
    spatial: Float[Tensor, "n 2023"]
    logits: Float[Tensor, "n 1008"]


class InceptionV3(nn.Module):
    """The FID Inception-v3 (TensorFlow graph of 2015-12-05) through torch-fidelity, with ADM's three outputs.

    It wraps torch-fidelity's ``FeatureExtractorInceptionV3``, which resizes uint8 images to 299 × 299 as
    TensorFlow 1.x does, scales them to [−1, 1] and runs the graph's layers with its quirks (average pools
    that skip padding, a max pool in the last block). The spatial features are read from the output of its
    ``Mixed_6d.branch1x1`` (the graph's ``mixed_6/conv``) for the length of one call.

    The weights file is checked before use: its SHA-256 must start with the 8 hex digits in its name
    (``verify_sha256``), and it must load as a state dict (``weights_only``) with exactly the network's keys
    and shapes. The network runs in float32 without TF32 or autocast, whatever the caller has enabled, so
    features do not depend on the training loop's precision settings.

    Args:
        weights: The weights file (see [`find_inception_weights`][soflow_core.metrics.fid.find_inception_weights]).
        verify_sha256: Refuse a file whose SHA-256 does not start with ``6726825d``. Turn off only for other
            weights (tests use random ones): their scores are not comparable with published numbers.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is damaged, not a state dict, or not these weights.
        ModuleNotFoundError: If torch-fidelity (or the torchvision it imports) is not installed.
    """

    def __init__(self, weights: str | os.PathLike, *, verify_sha256: bool = True) -> None:
        super().__init__()
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights {str(weights)!r} is not a file. {_missing_weights_message([str(path)])}")
        extractor_class = _import_inception_class()
        self.sha256 = sha256_file(path)
        if verify_sha256 and not self.sha256.startswith(_SHA256_PREFIX):
            raise ValueError(
                f"weights {str(path)!r} is not torch-fidelity's {INCEPTION_WEIGHTS_FILE}: its SHA-256 begins "
                f"{self.sha256[:8]}, not {_SHA256_PREFIX} (a damaged or different file). Download it again from "
                f"{INCEPTION_WEIGHTS_URL}; other weights need verify_sha256=False and give scores that are not "
                "comparable with published ones"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated zip, a non-torch file or a pickle that is not plain tensors
            raise ValueError(f"weights {str(path)!r} cannot be read as a PyTorch state dict: {error}") from error
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"weights {str(path)!r} is not a state dict (a mapping of names to tensors)")
        try:
            net = extractor_class(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
            )
        except RuntimeError as error:  # load_state_dict's missing / unexpected keys or wrong shapes
            raise ValueError(
                f"weights {str(path)!r} do not fit torch-fidelity's Inception-v3: {str(error).splitlines()[0]} "
                f"{' '.join(str(error).split())[:600]}"
            ) from error
        self.net = net
        self.weights_path = path

    @torch.no_grad()
    def forward(self, images: UInt8[Tensor, "n h w 3"]) -> InceptionOutput:
        """The pool, spatial and logit features of uint8 images, channels last (the ADM ``.npz`` layout).

        Args:
            images: (n, h, w, 3) uint8 pixels, any size (resized to 299 × 299 inside), on any device.

        Returns:
            The three feature sets, float32, on the network's device.

        Raises:
            TypeError: If ``images`` is not a uint8 tensor.
            ValueError: If it is not (n, h, w, 3) with n ≥ 1.
        """
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            got = f"{images.dtype} tensor" if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"images must be a uint8 tensor of shape (n, h, w, 3); got a {got}")
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1 or min(images.shape[1:3]) < 1:
            raise ValueError(f"images must be (n, h, w, 3) uint8 pixels with n >= 1; got shape {tuple(images.shape)}")
        device = next(self.net.parameters()).device
        x = images.to(device).permute(0, 3, 1, 2).contiguous()
        captured: list[Tensor] = []
        hook = self.net.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            with _exact_float32(device.type):
                pool, logits = self.net(x)
        finally:
            hook.remove()
        spatial = captured[0][:, :_SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1).float()
        return InceptionOutput(pool=pool.float(), spatial=spatial, logits=logits.float())


# --------------------------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStatistics:
    r"""The mean and covariance of a feature set: what FID compares.

    Attributes:
        mean: $\hat\mu$, (d,) float64.
        covariance: $\hat\Sigma$ with divisor n − 1 (``numpy.cov``'s), (d, d) float64.
        count: How many features they summarize (None where a file does not say, e.g. ADM's).
    """

    mean: Float[Tensor, " d"]
    covariance: Float[Tensor, "d d"]
    count: int | None = None

    def __post_init__(self) -> None:
        mean, cov = self.mean, self.covariance
        if not isinstance(mean, Tensor) or not isinstance(cov, Tensor):
            raise TypeError(f"mean and covariance must be tensors; got {type(mean).__name__}, {type(cov).__name__}")
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"mean must be (d,) and covariance (d, d); got {tuple(mean.shape)}, {tuple(cov.shape)}")
        check_finite("mean", mean)
        check_finite("covariance", cov)
        object.__setattr__(self, "mean", mean.detach().to("cpu", torch.float64))
        object.__setattr__(self, "covariance", cov.detach().to("cpu", torch.float64))

    @property
    def dim(self) -> int:
        """The feature dimension d."""
        return self.mean.shape[0]

    def frechet_distance(self, other: FeatureStatistics) -> float:
        r"""The Fréchet distance to another feature set's statistics: FID on pool features, sFID on spatial ones.

        $$\mathrm{FID} = \lVert\mu_1 - \mu_2\rVert^2 + \operatorname{Tr}\big(\Sigma_1 + \Sigma_2
          - 2(\Sigma_1\Sigma_2)^{1/2}\big),$$

        computed by [`gaussian_frechet_distance`][soflow_core.metrics.gaussian_frechet_distance] in float64.

        Args:
            other: Statistics of the same feature dimension.

        Returns:
            The distance as a Python float (≥ 0).

        Raises:
            ValueError: If the dimensions differ.
        """
        if other.dim != self.dim:
            raise ValueError(f"cannot compare statistics of dimension {self.dim} with ones of dimension {other.dim}")
        return gaussian_frechet_distance(self.mean, self.covariance, other.mean, other.covariance)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSums:
    r"""Sufficient statistics of a feature set, mergeable across batches and ranks: $n$, $\sum x$, $\sum x x^\top$.

    Sums of float64 values merge by addition (``a + b``, or
    [`all_reduce`][soflow_core.metrics.fid.FeatureSums.all_reduce] across ranks), so features scored in any
    split give the statistics of the whole set, up to the order of float64 additions. The covariance
    $(\sum xx^\top - n\hat\mu\hat\mu^\top)/(n-1)$ loses about $\log_{10}(1 + \lVert\mu\rVert^2/\sigma^2)$ of
    float64's 16 digits to cancellation, which for Inception features (means and standard deviations of the
    same order) leaves more than 13.

    Attributes:
        count: n, the number of feature vectors.
        total: $\sum x$, (d,) float64.
        outer: $\sum x x^\top$, (d, d) float64.

    Examples:
        >>> import torch
        >>> x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
        >>> merged = FeatureSums.from_features(x[:4]) + FeatureSums.from_features(x[4:])
        >>> torch.allclose(merged.statistics().covariance, torch.cov(x.T.double()))
        True
    """

    count: int
    total: Float[Tensor, " d"]
    outer: Float[Tensor, "d d"]

    def __post_init__(self) -> None:
        check_int("count", self.count, low=0)
        if self.total.ndim != 1 or self.outer.shape != (self.total.shape[0], self.total.shape[0]):
            raise ValueError(
                f"total must be (d,) and outer (d, d); got {tuple(self.total.shape)}, {tuple(self.outer.shape)}"
            )
        if self.total.dtype != torch.float64 or self.outer.dtype != torch.float64:
            raise TypeError(f"total and outer must be float64; got {self.total.dtype}, {self.outer.dtype}")

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str | None = None) -> FeatureSums:
        """The sums of an empty set of ``dim``-dimensional features.

        Args:
            dim: The feature dimension d ≥ 1.
            device: Where the sums live.

        Returns:
            Zero sums.
        """
        dim = check_int("dim", dim, low=1)
        zeros = torch.zeros(dim, dtype=torch.float64, device=device)
        return cls(count=0, total=zeros, outer=torch.zeros(dim, dim, dtype=torch.float64, device=device))

    @classmethod
    def from_features(cls, features: Float[Tensor, "n d"]) -> FeatureSums:
        """The sums of a batch of feature vectors, accumulated in float64 on their device.

        Args:
            features: (n, d) features (any float dtype; n may be 0).

        Returns:
            The batch's sums.

        Raises:
            ValueError: If ``features`` is not 2-D or holds NaN/Inf.
        """
        if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must be a floating-point (n, d) tensor; got {got}")
        check_finite("features", features)
        x = features.detach().to(torch.float64)
        return cls(count=x.shape[0], total=x.sum(dim=0), outer=x.T @ x)

    @property
    def dim(self) -> int:
        """The feature dimension d."""
        return self.total.shape[0]

    def __add__(self, other: FeatureSums) -> FeatureSums:
        if not isinstance(other, FeatureSums):
            return NotImplemented
        if other.dim != self.dim:
            raise ValueError(f"cannot add sums of dimension {self.dim} and {other.dim}")
        device = self.total.device
        return FeatureSums(
            count=self.count + other.count,
            total=self.total + other.total.to(device),
            outer=self.outer + other.outer.to(device),
        )

    def all_reduce(self, group: Any = None) -> FeatureSums:
        """The sums over every rank of a ``torch.distributed`` process group (each rank gets them).

        Every rank must call it with sums of the same dimension, on a device its backend handles (CPU for
        gloo, CUDA for NCCL). Without an initialised process group it returns the sums unchanged.

        Args:
            group: The process group, or None for the default one.

        Returns:
            The merged sums.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        packed = torch.cat([self.total.new_tensor([float(self.count)]), self.total, self.outer.flatten()])
        torch.distributed.all_reduce(packed, group=group)
        d = self.dim
        return FeatureSums(count=round(packed[0].item()), total=packed[1 : d + 1], outer=packed[d + 1 :].view(d, d))

    def statistics(self) -> FeatureStatistics:
        r"""The mean and the covariance with divisor n − 1 (``numpy.cov``'s).

        $$\hat\mu = \frac{1}{n}\sum x,\qquad \hat\Sigma = \frac{\sum xx^\top - n\hat\mu\hat\mu^\top}{n-1}.$$

        Returns:
            The statistics, float64 on the CPU.

        Raises:
            ValueError: If fewer than two features were summed.
        """
        if self.count < 2:
            raise ValueError(f"a covariance needs at least two feature vectors; these sums hold {self.count}")
        n = self.count
        total, outer = self.total.cpu(), self.outer.cpu()
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        return FeatureStatistics(mean=mean, covariance=(cov + cov.T) / 2, count=n)


# --------------------------------------------------------------------------------------------------------------
# Scores


def inception_score(logits: Float[Tensor, "n classes"], *, split_size: int = 5000) -> float:
    r"""The Inception Score as the ADM evaluator computes it, from the logits of its Inception.

    $$\mathrm{IS} = \frac{1}{S}\sum_{s=1}^{S} \exp\Big(\frac{1}{|B_s|}\sum_{i \in B_s}
      \mathrm{KL}\big(p(y\mid x_i)\,\big\|\,\bar p_s(y)\big)\Big),\quad
      \bar p_s = \frac{1}{|B_s|}\sum_{i\in B_s} p(y \mid x_i),$$

    with $p(y\mid x) = \operatorname{softmax}$ of the logits and the samples split, in order, into chunks
    $B_s$ of ``split_size`` (the last one may be shorter). Computed in float64.

    Args:
        logits: (n, classes) logits, e.g. [`InceptionOutput.logits`][soflow_core.metrics.fid.InceptionOutput].
        split_size: Samples per chunk (ADM: 5000).

    Returns:
        The score as a Python float (1 for a uniform classifier output, up to the number of classes).

    Raises:
        ValueError: If ``logits`` is not (n, classes) with n ≥ 1 or holds NaN/Inf.

    Examples:
        >>> import torch
        >>> round(inception_score(100.0 * torch.eye(4)), 6)  # four confident, distinct classes
        4.0
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] < 1:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be an (n, classes) tensor with n >= 1; got {got}")
    check_finite("logits", logits)
    split_size = check_int("split_size", split_size, low=1)
    log_p = torch.log_softmax(logits.detach().double().cpu(), dim=1)
    scores = []
    for chunk in log_p.split(split_size):
        log_marginal = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores))


def _round_half(x: Tensor) -> Tensor:
    return x.half().float()


def _squared_distances(u: Tensor, v: Tensor, float16: bool) -> Tensor:
    """Pairwise squared Euclidean distances as ADM's DistanceBlock computes them: |u|² − 2u·v + |v|², ≥ 0."""
    if float16:
        # Each TensorFlow op of ADM's float16 graph rounds its output to float16; its float32 accumulation
        # inside the sums and the matmul is kept. A block with an overflow falls back to float32, as ADM's does.
        u16, v16 = _round_half(u), _round_half(v)
        norm_u = _round_half(_round_half(u16.square()).sum(dim=1))[:, None]
        norm_v = _round_half(_round_half(v16.square()).sum(dim=1))[None, :]
        dot = _round_half(u16 @ v16.T)
        distances = _round_half(_round_half(norm_u - 2 * dot) + norm_v).clamp_min(0.0)
        if torch.isfinite(distances).all():
            return distances
    norm_u = u.square().sum(dim=1)[:, None]
    norm_v = v.square().sum(dim=1)[None, :]
    return (norm_u - 2 * (u @ v.T) + norm_v).clamp_min(0.0)


def _rows_per_block(columns: int) -> int:
    return max(1, min(10_000, (1 << 25) // max(columns, 1)))


def _knn_radii(features: Tensor, k: int, float16: bool) -> Tensor:
    """Squared distance from each row to its k-th nearest other row (the row itself is the 0-th)."""
    n = features.shape[0]
    radii = []
    for rows in features.split(_rows_per_block(n)):
        radii.append(torch.kthvalue(_squared_distances(rows, features, float16), k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(
    reference: Float[Tensor, "n d"],
    samples: Float[Tensor, "m d"],
    *,
    k: int = 3,
    float16_distances: bool = True,
) -> tuple[float, float]:
    r"""Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds, as ADM computes them.

    Each feature set's manifold is the union of balls around its points, each ball reaching the point's k-th
    nearest neighbour in its own set. Precision is the share of samples inside the reference manifold,
    recall the share of reference points inside the sample manifold:

    $$\mathrm{precision} = \frac{1}{m}\sum_j \big[\exists i:\ \lVert s_j - r_i\rVert^2 \le \rho_k(r_i)\big],\quad
      \mathrm{recall} = \frac{1}{n}\sum_i \big[\exists j:\ \lVert r_i - s_j\rVert^2 \le \rho_k(s_j)\big].$$

    ADM's evaluator compares squared distances computed in float16 (falling back to float32 for a block that
    overflows); ``float16_distances=True`` reproduces that rounding op by op, so ties at a ball's edge fall as
    they do there. Computed in blocks on the features' device.

    Args:
        reference: (n, d) reference features (pool features of real images), n > k.
        samples: (m, d) sample features, m > k.
        k: The neighbourhood size (ADM: 3).
        float16_distances: Round distances as ADM's float16 graph does (True) or compute them in float32.

    Returns:
        (precision, recall), each in [0, 1].

    Raises:
        ValueError: If the shapes do not match, a set has no more than k points, or a value is NaN/Inf.
    """
    k = check_int("k", k, low=1)
    for name, x in (("reference", reference), ("samples", samples)):
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(f"{name} must be an (n, d) tensor; got {type(x).__name__}")
        if x.shape[0] <= k:
            raise ValueError(f"{name} needs more than k = {k} points for a k-NN radius; got {x.shape[0]}")
        check_finite(name, x)
    if reference.shape[1] != samples.shape[1]:
        raise ValueError(f"reference and samples must have one d; got {tuple(reference.shape)}, {tuple(samples.shape)}")
    ref, sam = reference.detach().float(), samples.detach().float().to(reference.device)
    radii_ref, radii_sam = _knn_radii(ref, k, float16_distances), _knn_radii(sam, k, float16_distances)
    sample_inside = torch.zeros(sam.shape[0], dtype=torch.bool, device=ref.device)
    reference_inside = []
    step = _rows_per_block(sam.shape[0])
    for rows, radii in zip(ref.split(step), radii_ref.split(step)):
        distances = _squared_distances(rows, sam, float16_distances)
        sample_inside |= (distances <= radii[:, None]).any(dim=0)
        reference_inside.append((distances <= radii_sam[None, :]).any(dim=1))
    return float(sample_inside.double().mean()), float(torch.cat(reference_inside).double().mean())


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSetFeatures:
    """What one pass of the Inception over a set of images gives.

    Attributes:
        pool: Sums of the pool features (FID).
        spatial: Sums of the spatial features (sFID).
        pool_features: The pool features themselves, (n, 2048) float32 on the CPU, for precision and recall
            (None when not kept).
        logits: The logits, (n, 1008) float32 on the CPU, for the Inception Score (None when not kept).
    """

    pool: FeatureSums
    spatial: FeatureSums
    pool_features: Tensor | None = None
    logits: Tensor | None = None

    @property
    def count(self) -> int:
        """The number of images."""
        return self.pool.count


def compute_image_features(
    inception: InceptionV3, batches: Iterable[Tensor | np.ndarray], *, keep_features: bool = True
) -> ImageSetFeatures:
    """Run the Inception over batches of uint8 images (n, h, w, 3) and sum their features.

    The sums stay on the network's device; with ``keep_features`` the pool features and logits are also
    gathered on the CPU (8 KB and 4 KB per image) for precision, recall and the Inception Score. The sums of
    several calls (or ranks) add up to those of one call over all the images.

    Args:
        inception: The network.
        batches: Iterable of uint8 image batches, channels last (numpy arrays or tensors).
        keep_features: Keep the per-image pool features and logits.

    Returns:
        The summed features (and the kept ones).
    """
    device = next(inception.parameters()).device
    pool, spatial = FeatureSums.zeros(POOL_DIM, device), FeatureSums.zeros(SPATIAL_DIM, device)
    kept_pool, kept_logits = [], []
    for batch in batches:
        images = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        out = inception(images)
        pool = pool + FeatureSums.from_features(out.pool)
        spatial = spatial + FeatureSums.from_features(out.spatial)
        if keep_features:
            kept_pool.append(out.pool.cpu())
            kept_logits.append(out.logits.cpu())
    if not keep_features:
        return ImageSetFeatures(pool=pool, spatial=spatial)
    empty = torch.zeros(0, POOL_DIM), torch.zeros(0, _LOGITS)
    return ImageSetFeatures(
        pool=pool,
        spatial=spatial,
        pool_features=torch.cat(kept_pool) if kept_pool else empty[0],
        logits=torch.cat(kept_logits) if kept_logits else empty[1],
    )


@dataclasses.dataclass(frozen=True, eq=False)
class FIDReference:
    """The reference side of FID: statistics of real images, and their pool features for precision and recall.

    Attributes:
        pool: Statistics of the pool features (FID).
        spatial: Statistics of the spatial features (sFID), or None.
        pool_features: (n, 2048) pool features of the reference images (precision and recall), or None.
        metadata: What made it (source, image count and size, weights), a JSON-able dict.
    """

    pool: FeatureStatistics
    spatial: FeatureStatistics | None = None
    pool_features: Tensor | None = None
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pool.dim != POOL_DIM:
            raise ValueError(f"pool statistics must have dimension {POOL_DIM}; got {self.pool.dim}")
        if self.spatial is not None and self.spatial.dim != SPATIAL_DIM:
            raise ValueError(f"spatial statistics must have dimension {SPATIAL_DIM}; got {self.spatial.dim}")
        if self.pool_features is not None and (self.pool_features.ndim != 2 or self.pool_features.shape[1] != POOL_DIM):
            raise ValueError(f"pool_features must be (n, {POOL_DIM}); got {tuple(self.pool_features.shape)}")

    @classmethod
    def from_features(cls, features: ImageSetFeatures, **metadata: Any) -> FIDReference:
        """A reference from the features of real images.

        Args:
            features: From [`compute_image_features`][soflow_core.metrics.fid.compute_image_features].
            **metadata: What to record with it (source, image size, ...).

        Returns:
            The reference (keeping the pool features when they were kept).
        """
        return cls(
            pool=features.pool.statistics(),
            spatial=features.spatial.statistics(),
            pool_features=features.pool_features,
            metadata={"images": features.count, **metadata},
        )


@dataclasses.dataclass(frozen=True)
class FIDScores:
    """The scores of one sample set against a reference (None where not computed or not computable).

    Attributes:
        images: The number of sample images.
        fid: FID on pool features.
        sfid: sFID on spatial features (None when the reference has no spatial statistics).
        inception_score: The Inception Score (None without the logits).
        precision: k-NN precision (None without the pool features of both sides).
        recall: k-NN recall (same).
    """

    images: int
    fid: float
    sfid: float | None = None
    inception_score: float | None = None
    precision: float | None = None
    recall: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        """The scores as a plain dict (for JSON)."""
        return dataclasses.asdict(self)


def score_features(
    samples: ImageSetFeatures, reference: FIDReference, *, precision_and_recall: bool = True
) -> FIDScores:
    """Score a sample set's features against a reference: FID, sFID, IS and (optionally) precision and recall.

    Args:
        samples: The samples' features.
        reference: The reference.
        precision_and_recall: Compute precision and recall where both sides kept their pool features (costs
            O(n² d) work: seconds on a GPU for 50k samples, minutes on a CPU). Left out (None) where either
            side lacks its pool features or holds no more than k = 3 of them.

    Returns:
        The scores.

    Raises:
        ValueError: If the samples hold fewer than two images.
    """
    stats = samples.pool.statistics()
    precision = recall = None
    ref_features, sample_features = reference.pool_features, samples.pool_features
    if (
        precision_and_recall
        and sample_features is not None
        and ref_features is not None
        and min(sample_features.shape[0], ref_features.shape[0]) > _NEIGHBOURS
    ):
        device = samples.pool.total.device
        precision, recall = precision_recall(reference.pool_features.to(device), samples.pool_features.to(device))
    return FIDScores(
        images=samples.count,
        fid=stats.frechet_distance(reference.pool),
        sfid=samples.spatial.statistics().frechet_distance(reference.spatial) if reference.spatial else None,
        inception_score=inception_score(samples.logits) if samples.logits is not None else None,
        precision=precision,
        recall=recall,
    )


# --------------------------------------------------------------------------------------------------------------
# Files: ADM image batches and reference statistics


def _open_npz_member(path: Path, key: str) -> tuple[zipfile.ZipFile, Any]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{str(path)!r} is not an .npz file (a zip of .npy arrays): {error}") from error
    name = f"{key}.npy"
    if name not in archive.namelist():
        held = sorted(n.removesuffix(".npy") for n in archive.namelist())
        archive.close()
        raise ValueError(f"{str(path)!r} has no array {key!r} (it holds {held})")
    return archive, archive.open(name)


def _read_npy_header(member: Any, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as error:
        raise ValueError(f"{str(path)!r}: {key!r} is not a valid .npy array: {error}") from error
    if fortran or dtype.hasobject:
        raise ValueError(f"{str(path)!r}: {key!r} must be a C-ordered numeric array; got fortran={fortran}, {dtype}")
    return shape, dtype


def npz_image_shape(path: str | os.PathLike, key: str = "arr_0") -> tuple[int, int, int]:
    """The (count, height, width) of the uint8 images (n, h, w, 3) in an ``.npz``, read from its header only.

    Args:
        path: The ``.npz`` file (what ``examples/sample.py`` and the ADM evaluator write and read).
        key: The array holding the images (ADM: ``arr_0``).

    Returns:
        (n, h, w).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not an ``.npz``, lacks ``key``, or ``key`` is not (n, h, w, 3) uint8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a file")
    archive, member = _open_npz_member(path, key)
    with archive, member:
        shape, dtype = _read_npy_header(member, path, key)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise ValueError(
            f"{str(path)!r}: {key!r} must hold uint8 images of shape (n, h, w, 3), channels last as the ADM "
            f"evaluator reads them; got {dtype} of shape {shape}"
        )
    return shape[0], shape[1], shape[2]


def read_npz_images(path: str | os.PathLike, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Stream the uint8 images of an ``.npz`` in batches, without loading the whole array.

    A 50k-sample file at 256 px holds 9.8 GB; this reads ``batch_size`` images at a time from the zip member
    (stored or compressed), as the ADM evaluator does.

    Args:
        path: The ``.npz`` file.
        batch_size: Images per batch (≥ 1); the last batch may be shorter.
        key: The array holding the images (ADM: ``arr_0``).

    Yields:
        (b, h, w, 3) uint8 arrays, in file order.

    Raises:
        ValueError: If the file is not an ``.npz`` of (n, h, w, 3) uint8 images or is truncated.
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    count, height, width = npz_image_shape(path, key)
    path = Path(path)
    archive, member = _open_npz_member(path, key)
    with archive, member:
        _read_npy_header(member, path, key)
        image_bytes = height * width * 3
        for start in range(0, count, batch_size):
            b = min(batch_size, count - start)
            data = member.read(b * image_bytes)
            if len(data) != b * image_bytes:
                raise ValueError(f"{str(path)!r}: {key!r} ends after {start} of {count} images (a truncated file)")
            yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(b, height, width, 3)  # writable


def _statistics_from_npz(arrays: Any, mean_key: str, cov_key: str, path: Path, count: int | None) -> FeatureStatistics:
    mean, cov = np.asarray(arrays[mean_key]), np.asarray(arrays[cov_key])
    try:
        mean, cov = torch.from_numpy(mean.astype(np.float64)), torch.from_numpy(cov.astype(np.float64))
        return FeatureStatistics(mean=mean, covariance=cov, count=count)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(path)!r}: {mean_key!r}/{cov_key!r} are not a mean and a covariance: {error}") from error


def load_reference(path: str | os.PathLike) -> FIDReference:
    """Read reference statistics: an ADM reference batch or a file that `save_reference` wrote.

    Both are ``.npz`` files with the ADM evaluator's keys: ``mu`` and ``sigma`` (pool features), ``mu_s`` and
    ``sigma_s`` (spatial features, optional). ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``)
    also hold their images in ``arr_0``; as in the ADM evaluator, the stored statistics are used, not
    recomputed. Files of ``save_reference`` may add ``pool_features`` (precision and recall), ``count`` and
    ``metadata``. The file is read without unpickling anything.

    Args:
        path: The ``.npz`` file.

    Returns:
        The reference (``metadata["images_in_file"]`` is the length of ``arr_0`` where the file has images).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not an ``.npz`` or holds no statistics (only images: compute the statistics from
            them with [`compute_image_features`][soflow_core.metrics.fid.compute_image_features] first).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference {str(path)!r} is not a file")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"reference {str(path)!r} is not an .npz file: {error}") from error
    with arrays:
        keys = set(arrays.files)
        if not {"mu", "sigma"} <= keys:
            hint = (
                " It holds images (arr_0) but no statistics: compute them from the images first "
                "(compute_image_features and FIDReference.from_features, or examples/fid_reference.py)."
                if "arr_0" in keys
                else ""
            )
            raise ValueError(
                f"reference {str(path)!r} holds no FID statistics: expected arrays 'mu' and 'sigma' (and "
                f"optionally 'mu_s', 'sigma_s'); got {sorted(keys)}.{hint}"
            )
        metadata = {}
        if "metadata" in keys:
            try:
                metadata = dict(json.loads(str(arrays["metadata"])))
            except (ValueError, TypeError) as error:
                raise ValueError(f"reference {str(path)!r}: 'metadata' is not a JSON object: {error}") from error
        count = int(arrays["count"]) if "count" in keys else None
        pool = _statistics_from_npz(arrays, "mu", "sigma", path, count)
        spatial = _statistics_from_npz(arrays, "mu_s", "sigma_s", path, count) if {"mu_s", "sigma_s"} <= keys else None
        features = None
        if "pool_features" in keys:
            features = torch.from_numpy(np.asarray(arrays["pool_features"], dtype=np.float32))
    if "arr_0" in keys:
        metadata["images_in_file"] = npz_image_shape(path)[0]
    try:
        return FIDReference(pool=pool, spatial=spatial, pool_features=features, metadata=metadata)
    except ValueError as error:
        raise ValueError(f"reference {str(path)!r}: {error}") from error


def save_reference(path: str | os.PathLike, reference: FIDReference) -> Path:
    """Write reference statistics to an ``.npz`` that both this module and the ADM evaluator's reader accept.

    Keys: ``mu``, ``sigma`` (float64), ``mu_s``, ``sigma_s`` (when there are spatial statistics),
    ``pool_features`` (float32, when kept), ``count`` and ``metadata`` (a JSON string). The file is written
    atomically (a temporary file renamed into place).

    Args:
        path: The file to write (``.npz`` is not appended; name it so).
        reference: The reference.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"mu": reference.pool.mean.numpy(), "sigma": reference.pool.covariance.numpy()}
    if reference.spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = reference.spatial.mean.numpy(), reference.spatial.covariance.numpy()
    if reference.pool_features is not None:
        arrays["pool_features"] = reference.pool_features.detach().cpu().float().numpy()
    if reference.pool.count is not None:
        arrays["count"] = np.asarray(reference.pool.count, dtype=np.int64)
    arrays["metadata"] = np.asarray(json.dumps({"format": _REFERENCE_FORMAT, **reference.metadata}))

    atomic_write(path, lambda file: np.savez(file, **arrays))
    return path
