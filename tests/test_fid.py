"""FID as the ADM evaluator computes it (soflow_core.metrics.fid), on data and weights the tests make.

The Inception is torch-fidelity's own class with random weights saved in the layout of its released file
(``_fidelity.py``), so loading, checking and the feature path run as they do with the real weights; the
statistics, distances and scores are checked on features with known answers.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _fidelity import import_torch_fidelity, random_inception_state, write_random_inception
from _helpers import shape_checks_off, spawn_gloo_ranks

from soflow_core._files import sha256_file
from soflow_core.metrics import fid, gaussian_frechet_distance


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _exact_moments(n: int, mean: torch.Tensor, root: torch.Tensor, seed: int) -> torch.Tensor:
    """n points whose sample mean is exactly ``mean`` and sample covariance exactly ``root @ root.T``."""
    z = torch.randn(n, mean.shape[0], generator=_gen(seed), dtype=torch.float64)
    z = z - z.mean(dim=0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # identity sample covariance
    return mean + z @ root.T


# ---------------------------------------------------------------------------------------------------- statistics


def _pool_like_features(n: int, d: int, seed: int) -> torch.Tensor:
    """Features like pool_3's: non-negative, correlated, with a spread of variances (float32, as Inception gives)."""
    mix = torch.randn(d, d, generator=_gen(seed), dtype=torch.float64) / d**0.5
    scales = torch.logspace(0, -3, d, dtype=torch.float64)
    return torch.relu(torch.randn(n, d, generator=_gen(seed + 1), dtype=torch.float64) * scales @ mix + 0.3).float()


@pytest.mark.parametrize("n", [4096, 256])  # more samples than dimensions, and fewer (a singular covariance)
def test_fid_of_a_sample_set_against_itself_is_zero(n):
    # 512 dimensions keep it fast; the same check at Inception's 2048 is in docs/fid.md. FID is clamped at 0,
    # so a shift of the mean by delta (FID exactly |delta|^2) also catches an error below 0.
    stats = fid.FeatureSums.from_features(_pool_like_features(n, 512, seed=0)).statistics()
    assert stats.frechet_distance(stats) < 1e-4
    delta = torch.zeros(512, dtype=torch.float64)
    delta[0] = 0.01
    shifted = fid.FeatureStatistics(mean=stats.mean + delta, covariance=stats.covariance)
    assert shifted.frechet_distance(stats) == pytest.approx(1e-4, abs=1e-5)


def test_fid_of_two_gaussian_feature_sets_matches_the_closed_form():
    # covariances that share eigenvectors: Tr(Σ1 + Σ2 - 2(Σ1Σ2)^½) = Σ_i (√a_i - √b_i)², written out here
    d, n = 64, 4096
    basis = torch.linalg.qr(torch.randn(d, d, generator=_gen(3), dtype=torch.float64)).Q
    a = torch.linspace(0.05, 3.0, d, dtype=torch.float64)
    b = torch.linspace(2.0, 0.1, d, dtype=torch.float64)
    mean_a = torch.randn(d, generator=_gen(4), dtype=torch.float64)
    mean_b = mean_a + 0.3 * torch.randn(d, generator=_gen(5), dtype=torch.float64)
    x = _exact_moments(n, mean_a, basis * a.sqrt(), seed=6)
    y = _exact_moments(n, mean_b, basis * b.sqrt(), seed=7)
    expected = float((mean_a - mean_b).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = fid.FeatureSums.from_features(x).statistics().frechet_distance(fid.FeatureSums.from_features(y).statistics())
    assert got == pytest.approx(expected, rel=1e-4)
    assert got == pytest.approx(expected, rel=1e-9)  # float64 statistics do far better than the target


def test_fid_agrees_with_the_adm_formula_through_scipy_sqrtm():
    # the ADM evaluator: |μ1 - μ2|² + Tr(Σ1) + Tr(Σ2) - 2 Tr(sqrtm(Σ1 Σ2)), on covariances that do not commute
    d = 48
    x = torch.randn(400, d, generator=_gen(8), dtype=torch.float64) @ torch.randn(d, d, generator=_gen(9)).double()
    y = torch.randn(500, d, generator=_gen(10), dtype=torch.float64) @ torch.randn(d, d, generator=_gen(11)).double()
    y = y + 0.5
    sx, sy = fid.FeatureSums.from_features(x).statistics(), fid.FeatureSums.from_features(y).statistics()
    s1, s2 = sx.covariance.numpy(), sy.covariance.numpy()
    root = scipy.linalg.sqrtm(s1 @ s2).real
    diff = (sx.mean - sy.mean).numpy()
    adm = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert sx.frechet_distance(sy) == pytest.approx(adm, rel=1e-8)
    assert gaussian_frechet_distance(sx.mean, sx.covariance, sy.mean, sy.covariance) == sx.frechet_distance(sy)


def test_statistics_equal_numpy_mean_and_cov_as_adm_computes_them():
    features = torch.rand(300, 20, generator=_gen(12)) * 3
    stats = fid.FeatureSums.from_features(features).statistics()
    array = features.numpy()
    # ADM's np.mean of float32 activations stays float32; the sums here are float64 (the closer mean)
    np.testing.assert_allclose(stats.mean.numpy(), array.astype(np.float64).mean(axis=0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(array, rowvar=False), rtol=1e-10, atol=1e-13)
    assert stats.count == 300


def test_sums_merged_from_parts_equal_the_sums_of_the_whole():
    features = torch.randn(103, 16, generator=_gen(13)) + 1.0
    whole = fid.FeatureSums.from_features(features)
    parts = [fid.FeatureSums.from_features(p) for p in features.split([50, 1, 0, 52])]
    merged = sum(parts[1:], parts[0])
    assert merged.count == whole.count == 103
    torch.testing.assert_close(merged.total, whole.total, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(merged.outer, whole.outer, rtol=1e-13, atol=1e-12)
    a, b = merged.statistics(), whole.statistics()
    torch.testing.assert_close(a.covariance, b.covariance, rtol=1e-12, atol=1e-13)
    assert a.frechet_distance(b) < 1e-12


def _all_reduce_worker(rank: int, world: int, features: torch.Tensor, out: str) -> None:
    mine = features[rank::world]  # an interleaved share: what each rank sees of samples spread over ranks
    merged = fid.FeatureSums.from_features(mine).all_reduce()
    torch.save({"count": merged.count, "total": merged.total, "outer": merged.outer}, f"{out}.{rank}")


def test_sums_all_reduced_over_two_gloo_ranks_equal_single_process_sums(tmp_path):
    features = torch.randn(37, 8, generator=_gen(14)) + 0.5
    spawn_gloo_ranks(_all_reduce_worker, features, str(tmp_path / "sums"), world=2, tmp_path=tmp_path)
    whole = fid.FeatureSums.from_features(features)
    for rank in range(2):
        got = torch.load(tmp_path / f"sums.{rank}")
        assert got["count"] == 37
        torch.testing.assert_close(got["total"], whole.total, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(got["outer"], whole.outer, rtol=1e-13, atol=1e-12)


def test_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        fid.FeatureSums.from_features(torch.ones(1, 3)).statistics()
    with shape_checks_off(), pytest.raises(ValueError, match=r"\(n, d\)"):
        fid.FeatureSums.from_features(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        fid.FeatureSums.from_features(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="dimension"):
        fid.FeatureSums.zeros(3) + fid.FeatureSums.zeros(4)
    stats = fid.FeatureSums.from_features(torch.randn(5, 3, generator=_gen(15))).statistics()
    other = fid.FeatureSums.from_features(torch.randn(5, 4, generator=_gen(16))).statistics()
    with pytest.raises(ValueError, match="dimension 3 with ones of dimension 4"):
        stats.frechet_distance(other)


# ---------------------------------------------------------------------------------------------------- scores


def _adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """The ADM evaluator's loop, written out in numpy."""
    preds = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds /= preds.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_known_answers():
    assert fid.inception_score(torch.zeros(10, 7)) == pytest.approx(1.0, abs=1e-12)  # one uniform output
    assert fid.inception_score(60.0 * torch.eye(5)) == pytest.approx(5.0, rel=1e-9)  # five certain classes
    # each chunk of 2 holds two certain classes: IS 2 per chunk, whatever the classes are
    assert fid.inception_score(60.0 * torch.eye(6), split_size=2) == pytest.approx(2.0, rel=1e-9)


def test_inception_score_equals_the_adm_loop_with_a_short_last_chunk():
    logits = 3 * torch.randn(23, 11, generator=_gen(17), dtype=torch.float64)
    expected = _adm_inception_score(logits.numpy(), split_size=5)
    assert fid.inception_score(logits, split_size=5) == pytest.approx(expected, rel=1e-10)


def _brute_precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int) -> tuple[float, float]:
    """The definition, one point at a time, in float64."""
    ref, sam = reference.double(), samples.double()

    def radius(x, i):
        return torch.sort(((x - x[i]) ** 2).sum(dim=1)).values[k]

    ref_radii = [radius(ref, i) for i in range(len(ref))]
    sam_radii = [radius(sam, j) for j in range(len(sam))]
    precision = np.mean([any(((s - r) ** 2).sum() <= ref_radii[i] for i, r in enumerate(ref)) for s in sam])
    recall = np.mean([any(((r - s) ** 2).sum() <= sam_radii[j] for j, s in enumerate(sam)) for r in ref])
    return float(precision), float(recall)


def test_precision_recall_by_hand_in_one_dimension():
    # k = 1: every reference point's ball has squared radius 1; sample balls reach the nearest other sample
    reference = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    samples = torch.tensor([[0.5], [2.9], [5.0], [100.0]])
    # 0.5 and 2.9 lie in reference balls, 5 and 100 do not -> precision 1/2; 0, 1 lie in 0.5's ball (5.76),
    # 2, 3 in 2.9's (4.41), 100's ball (9025) reaches none of them -> recall 1
    for float16 in (False, True):
        assert fid.precision_recall(reference, samples, k=1, float16_distances=float16) == (0.5, 1.0)


def test_precision_recall_equal_the_definition_and_a_set_covers_itself():
    reference = torch.randn(60, 5, generator=_gen(18))
    samples = 1.3 * torch.randn(45, 5, generator=_gen(19)) + 0.4
    got = fid.precision_recall(reference, samples, k=3, float16_distances=False)
    assert got == pytest.approx(_brute_precision_recall(reference, samples, k=3), abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert fid.precision_recall(reference, reference) == (1.0, 1.0)


def test_precision_recall_float16_distances_are_rounded_as_the_adm_graph_rounds_them():
    # ADM computes |u|² - 2u·v + |v|² from float16 inputs with float16 outputs per op: distances are float16
    # numbers, and moving a point by less than float16 resolves leaves the verdict where float32 flips it
    u = torch.tensor([[10.0, 0.0]])
    v = torch.tensor([[10.0, 2.0], [10.0, 2.001]])
    d16 = fid._squared_distances(u, v, float16=True)
    d32 = fid._squared_distances(u, v, float16=False)
    assert torch.equal(d16, d16.half().float())
    assert d16[0, 0] == d16[0, 1] and d32[0, 0] < d32[0, 1]
    # an overflowing float16 block falls back to float32 as ADM's does
    big = torch.tensor([[300.0, 0.0]])
    assert torch.isfinite(fid._squared_distances(big, -big, float16=True)).all()
    assert fid._squared_distances(big, -big, float16=True).item() == pytest.approx(360_000.0)


def test_precision_recall_reject_bad_input():
    with shape_checks_off(), pytest.raises(ValueError, match="more than k = 3"):
        fid.precision_recall(torch.randn(3, 2), torch.randn(10, 2))
    with shape_checks_off(), pytest.raises(ValueError, match="one d"):
        fid.precision_recall(torch.randn(10, 2), torch.randn(10, 3))


# ---------------------------------------------------------------------------------------------------- files


def _adm_reference_batch(path: Path, images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """A file in the layout of ADM's VIRTUAL_imagenet256_labeled.npz: images and precomputed statistics."""
    rng = np.random.default_rng(seed)
    arrays = {"arr_0": images}
    for name, d in (("", fid.POOL_DIM), ("_s", fid.SPATIAL_DIM)):
        root = rng.standard_normal((d, 8)) * 0.1
        arrays[f"mu{name}"] = rng.random(d)
        arrays[f"sigma{name}"] = root @ root.T + 0.01 * np.eye(d)
    np.savez(path, **arrays)
    return arrays


def test_an_adm_reference_batch_is_read_as_the_adm_evaluator_reads_it(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    arrays = _adm_reference_batch(tmp_path / "VIRTUAL_ref.npz", images)
    reference = fid.load_reference(tmp_path / "VIRTUAL_ref.npz")
    np.testing.assert_array_equal(reference.pool.mean.numpy(), arrays["mu"])
    np.testing.assert_array_equal(reference.pool.covariance.numpy(), arrays["sigma"])
    np.testing.assert_array_equal(reference.spatial.mean.numpy(), arrays["mu_s"])
    np.testing.assert_array_equal(reference.spatial.covariance.numpy(), arrays["sigma_s"])
    assert reference.pool_features is None and reference.metadata["images_in_file"] == 5
    assert fid.npz_image_shape(tmp_path / "VIRTUAL_ref.npz") == (5, 8, 8)


def test_a_saved_reference_reads_back_and_opens_as_an_adm_reference(tmp_path):
    features = torch.rand(10, fid.POOL_DIM, generator=_gen(20))
    spatial = torch.rand(10, fid.SPATIAL_DIM, generator=_gen(21))
    image_features = fid.ImageSetFeatures(
        pool=fid.FeatureSums.from_features(features),
        spatial=fid.FeatureSums.from_features(spatial),
        pool_features=features,
    )
    reference = fid.FIDReference.from_features(image_features, source="test", image_size=[8, 8])
    path = fid.save_reference(tmp_path / "refs" / "ref.npz", reference)
    back = fid.load_reference(path)
    assert torch.equal(back.pool.mean, reference.pool.mean) and torch.equal(
        back.spatial.covariance, reference.spatial.covariance
    )
    assert torch.equal(back.pool_features, features) and back.pool.count == 10
    assert back.metadata == {
        "format": "soflow_core.fid_reference",
        "images": 10,
        "source": "test",
        "image_size": [8, 8],
    }
    with np.load(path) as arrays:  # what the ADM evaluator's read_statistics takes
        assert arrays["mu"].shape == (fid.POOL_DIM,) and arrays["sigma_s"].shape == (fid.SPATIAL_DIM,) * 2
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temporary file left


def test_load_reference_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.npz"):
        fid.load_reference(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"not an .npz"):
        fid.load_reference(tmp_path / "text.npz")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"holds images .* but no statistics"):
        fid.load_reference(tmp_path / "images.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="dimension 2048"):
        fid.load_reference(tmp_path / "small.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(fid.POOL_DIM), sigma=np.zeros(fid.POOL_DIM))
    with pytest.raises(ValueError, match="'mu'/'sigma' are not a mean and a covariance"):
        fid.load_reference(tmp_path / "bad.npz")


def test_npz_images_stream_in_batches_from_stored_and_compressed_files(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images, arr_1=np.arange(7))
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)
    for name in ("plain.npz", "packed.npz"):
        batches = list(fid.read_npz_images(tmp_path / name, batch_size=3))
        assert [len(b) for b in batches] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_image_errors_say_what_is_wrong(tmp_path):
    np.savez(tmp_path / "chw.npz", arr_0=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 images of shape \(n, h, w, 3\).*\(2, 3, 4, 4\)"):
        fid.npz_image_shape(tmp_path / "chw.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="float32"):
        list(fid.read_npz_images(tmp_path / "float.npz", 2))
    np.savez(tmp_path / "other.npz", samples=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no array 'arr_0' \(it holds \['samples'\]\)"):
        fid.npz_image_shape(tmp_path / "other.npz")
    # a file cut short: the header promises more images than the member holds
    np.savez(tmp_path / "whole.npz", arr_0=np.zeros((4, 4, 4, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "whole.npz") as source, zipfile.ZipFile(tmp_path / "cut.npz", "w") as target:
        target.writestr("arr_0.npy", source.read("arr_0.npy")[:-60])
    with pytest.raises(ValueError, match="ends after 2 of 4 images"):
        list(fid.read_npz_images(tmp_path / "cut.npz", 1))
    with pytest.raises(ValueError, match="batch_size"):
        list(fid.read_npz_images(tmp_path / "whole.npz", 0))


# ---------------------------------------------------------------------------------------------------- weights


def test_weights_are_found_where_named_else_in_the_environment_else_in_torch_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(fid.INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as missing:
        fid.find_inception_weights()
    message = str(missing.value)
    hub_file = tmp_path / "torch_home" / "hub" / "checkpoints" / fid.INCEPTION_WEIGHTS_FILE
    for part in (fid.INCEPTION_WEIGHTS_FILE, fid.INCEPTION_WEIGHTS_URL, fid.INCEPTION_WEIGHTS_ENV, str(hub_file)):
        assert part in message
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"x")
    assert fid.find_inception_weights() == hub_file
    named = tmp_path / "env.pth"
    named.write_bytes(b"x")
    monkeypatch.setenv(fid.INCEPTION_WEIGHTS_ENV, str(named))
    assert fid.find_inception_weights() == named
    given = tmp_path / "given.pth"
    given.write_bytes(b"x")
    assert fid.find_inception_weights(given) == given
    with pytest.raises(FileNotFoundError, match="weights '.*nope.pth' is not a file.*" + fid.INCEPTION_WEIGHTS_URL):
        fid.find_inception_weights(tmp_path / "nope.pth")
    monkeypatch.setenv(fid.INCEPTION_WEIGHTS_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(FileNotFoundError, match=f"{fid.INCEPTION_WEIGHTS_ENV}=.*gone.pth' is not a file"):
        fid.find_inception_weights()


# ---------------------------------------------------------------------------------------------------- the network


@pytest.fixture(scope="module")
def torch_fidelity(tmp_path_factory):
    return import_torch_fidelity(tmp_path_factory.mktemp("placeholder"))


@pytest.fixture(scope="module")
def random_weights(torch_fidelity, tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("weights") / "random-inception.pth")


@pytest.fixture(scope="module")
def inception(random_weights):
    return fid.InceptionV3(random_weights, verify_sha256=False)


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), generator=_gen(seed), dtype=torch.uint8)


def test_the_download_address_is_torch_fidelitys(torch_fidelity):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert fid.INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3
    assert URL_INCEPTION_V3.endswith("/" + fid.INCEPTION_WEIGHTS_FILE)


def test_features_are_torch_fidelitys_pool_and_adms_spatial_layout(inception):
    images = _images(2, 24, seed=22)
    out = inception(images)
    assert out.pool.shape == (2, fid.POOL_DIM) and out.spatial.shape == (2, fid.SPATIAL_DIM)
    assert out.logits.shape == (2, 1008)
    # the same network called directly, with the spatial tensor read the way ADM reads mixed_6/conv:0
    net, captured = inception.net, []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        pool, _ = net(images.permute(0, 3, 1, 2).contiguous())
    hook.remove()
    nhwc = captured[0].permute(0, 2, 3, 1).numpy()  # TensorFlow's layout: (n, 17, 17, 192)
    assert nhwc.shape == (2, 17, 17, 192)
    np.testing.assert_array_equal(out.spatial.numpy(), nhwc[..., :7].reshape(2, -1))
    torch.testing.assert_close(out.pool, pool, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, pool @ net.fc.weight.T, rtol=1e-5, atol=1e-5)  # no bias, as ADM
    assert out.pool.std(dim=0).mean() > 1e-3  # the random weights tell images apart
    # one batch or several, numpy or torch: the same sums; autocast around the calls changes nothing (the
    # Inception runs in float32, where bfloat16 would move features by ~1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        split = fid.compute_image_features(inception, [images[:1].numpy(), images[1:]])
    assert split.count == 2
    torch.testing.assert_close(split.pool_features, out.pool, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.pool.outer, fid.FeatureSums.from_features(out.pool).outer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.spatial.total, out.spatial.double().sum(dim=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.logits, out.logits, rtol=1e-5, atol=1e-5)


def test_inception_input_errors(inception):
    with shape_checks_off(), pytest.raises(TypeError, match="uint8"):
        inception(torch.zeros(1, 8, 8, 3))
    with shape_checks_off(), pytest.raises(ValueError, match=r"\(n, h, w, 3\).*\(1, 3, 8, 8\)"):
        inception(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_weights_files_are_checked_before_use(random_weights, tmp_path):
    with pytest.raises(ValueError, match=r"SHA-256 begins [0-9a-f]{8}, not 6726825d"):
        fid.InceptionV3(random_weights)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(random_weights.read_bytes()[: 1 << 20])
    with pytest.raises(ValueError, match="cannot be read as a PyTorch state dict"):
        fid.InceptionV3(damaged, verify_sha256=False)
    state = random_inception_state()
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"do not fit torch-fidelity's Inception-v3.*Mixed_7c.branch_pool.conv.weight"):
        fid.InceptionV3(tmp_path / "partial.pth", verify_sha256=False)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        fid.InceptionV3(tmp_path / "tensor.pth", verify_sha256=False)
    (tmp_path / "code.pth").write_bytes(
        pickle.dumps(print, protocol=2)
    )  # a pickle that would run code is never unpickled
    with pytest.raises(ValueError, match="cannot be read"):
        fid.InceptionV3(tmp_path / "code.pth", verify_sha256=False)
    with pytest.raises(FileNotFoundError, match=fid.INCEPTION_WEIGHTS_FILE):
        fid.InceptionV3(tmp_path / "none.pth")


# ---------------------------------------------------------------------------------------------------- the scripts


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"fid_script_{name}", Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fid_scripts_score_a_folder_end_to_end(random_weights, inception, tmp_path, capsys):
    reference_images = _images(4, 16, seed=24)
    _adm_reference_batch(tmp_path / "adm_ref.npz", reference_images.numpy())
    samples = tmp_path / "samples"
    samples.mkdir()
    sample_images = {"a_nfe1.npz": _images(4, 16, seed=25), "b_nfe2.npz": _images(2, 16, seed=26)}
    for name, images in sample_images.items():
        np.savez(samples / name, arr_0=images.numpy())
    weights = ["--inception-weights", str(random_weights), "--allow-other-weights", "--no-download", "--device", "cpu"]

    # the reference tool keeps ADM's stored statistics and adds the images' pool features
    out = str(tmp_path / "ref.npz")
    ref_file = _load_script("fid_reference").main(["--images", str(tmp_path / "adm_ref.npz"), "--out", out, *weights])
    assert "stored statistics vs this Inception's: fid" in capsys.readouterr().out
    reference = fid.load_reference(ref_file)
    with np.load(tmp_path / "adm_ref.npz") as adm:
        np.testing.assert_array_equal(reference.pool.covariance.numpy(), adm["sigma"])
        np.testing.assert_array_equal(reference.spatial.mean.numpy(), adm["mu_s"])
    expected = fid.compute_image_features(inception, [reference_images])
    torch.testing.assert_close(reference.pool_features, expected.pool_features, rtol=1e-5, atol=1e-6)
    assert math.isfinite(reference.metadata["check_fid"]) and reference.metadata["images"] == 4

    scores_file = str(tmp_path / "scores.json")
    args = [str(samples), "--reference", str(ref_file), "--out", scores_file, "--batch-size", "3", *weights]
    rows = _load_script("fid").main(args)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[0].split()[:3] == ["file", "images", "FID"]
    report = json.loads((tmp_path / "scores.json").read_text())
    assert [Path(row["file"]).name for row in report["rows"]] == ["a_nfe1.npz", "b_nfe2.npz"]
    assert report["rows"] == rows and report["inception_weights_sha256"] == sha256_file(random_weights)
    assert [row["images"] for row in rows] == [4, 2]
    # the library on the same images, one batch, gives the same scores
    scores = fid.score_features(fid.compute_image_features(inception, [sample_images["a_nfe1.npz"]]), reference)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert rows[0][key] == pytest.approx(getattr(scores, key), rel=1e-6), key
    assert rows[0]["precision"] is not None and rows[1]["precision"] is None  # 2 images: no k = 3 neighbourhood


def test_fid_reference_from_cifar10_and_script_errors(random_weights, tmp_path, capsys):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for k in range(1, 6):
        with open(folder / f"data_batch_{k}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (1, 3072), dtype=np.uint8), b"labels": [k]}, f)
    weights = ["--inception-weights", str(random_weights), "--allow-other-weights", "--device", "cpu"]
    out = _load_script("fid_reference").main(
        ["--cifar10", str(tmp_path / "cifar"), "--out", str(tmp_path / "c.npz"), *weights]
    )
    reference = fid.load_reference(out)
    assert reference.pool.count == 5 and reference.metadata["image_size"] == [32, 32]
    assert reference.pool_features.shape == (5, fid.POOL_DIM)

    script = _load_script("fid")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match=r"folder .* holds no .npz"):
        script.main([str(tmp_path / "cifar"), "--reference", str(out), *weights])
    with pytest.raises(SystemExit, match=r"reference .*nothing.npz' is not a file"):
        script.main([str(tmp_path / "s.npz"), "--reference", str(tmp_path / "nothing.npz"), *weights])
    with pytest.raises(SystemExit, match="SHA-256"):
        script.main([str(tmp_path / "s.npz"), "--reference", str(out), "--inception-weights", str(random_weights)])
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path / "s.npz"), "--reference", str(out), "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size must be >= 1" in capsys.readouterr().err
