"""Sample-quality metrics against known answers (float64, CPU)."""

import math

import pytest
import torch

from soflow_core.metrics import (
    coverage,
    energy_distance,
    frechet_distance,
    gaussian_frechet_distance,
    knn_precision_recall,
    median_bandwidth,
    mmd,
    sliced_wasserstein,
)
from tests._helpers import shape_checks_off


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identical_samples_score_zero():
    x = torch.randn(300, 3, generator=_gen(), dtype=torch.float64)
    assert energy_distance(x, x) == 0.0
    assert mmd(x, x, bandwidths=[0.3, 1.0]) == pytest.approx(0.0, abs=1e-15)
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-15)
    assert sliced_wasserstein(x, x, generator=_gen(1)) == pytest.approx(0.0, abs=1e-12)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_independent_draws_sit_far_below_a_shifted_sample():
    x = torch.randn(2000, 2, generator=_gen(0), dtype=torch.float64)
    y = torch.randn(2000, 2, generator=_gen(1), dtype=torch.float64)
    shifted = y + torch.tensor([1.0, 0.0], dtype=torch.float64)
    for metric in (
        energy_distance,
        lambda a, b: mmd(a, b, bandwidths=[0.5, 1.0]),
        lambda a, b: sliced_wasserstein(a, b, generator=_gen(2)),
        frechet_distance,
    ):
        floor, far = metric(x, y), metric(x, shifted)
        assert 0 <= floor < far / 10


def test_mmd_of_two_points_matches_the_formula():
    # k(a,a) = 1, k(a,b) = exp(-|a-b|^2 / (2 sigma^2)); MMD^2 = 1 + 1 - 2 k(a,b).
    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    expected = 2 - 2 * 0.5 * (math.exp(-25 / 2) + math.exp(-25 / 50))
    assert mmd(x, y, bandwidths=[1.0, 5.0]) == pytest.approx(expected, rel=1e-12)
    # the median heuristic on two points is their distance
    assert median_bandwidth(x, y) == pytest.approx(5.0)
    assert mmd(x, y) == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-12)


def test_one_dimensional_sliced_wasserstein_is_the_exact_wasserstein_distance():
    # W1 between uniform masses on {0, 1, 2} and {0.5, 4}: quantile functions differ by
    # 0.5 on (0, 1/3], 0.5 on (1/3, 1/2], 3 on (1/2, 2/3], 2 on (2/3, 1] -> W1 = 1/6+1/12+1/2+2/3.
    x = torch.tensor([[2.0], [0.0], [1.0]])
    y = torch.tensor([[4.0], [0.5]])
    w1 = 0.5 / 3 + 0.5 / 6 + 3 / 6 + 2 / 3
    w2 = math.sqrt(0.25 / 3 + 0.25 / 6 + 9 / 6 + 4 / 3)
    assert sliced_wasserstein(x, y, p=1.0, num_projections=3, generator=_gen()) == pytest.approx(w1, rel=1e-12)
    assert sliced_wasserstein(x, y, p=2.0, num_projections=3, generator=_gen()) == pytest.approx(w2, rel=1e-12)
    # a shift by c moves every quantile by c
    z = torch.randn(500, 1, generator=_gen(), dtype=torch.float64)
    assert sliced_wasserstein(z, z - 0.7, p=1.0, num_projections=2) == pytest.approx(0.7, rel=1e-12)


def test_sliced_wasserstein_of_a_shift_averages_the_projected_shift():
    # SW_2^2(X, X + mu) = mean over directions of (theta . mu)^2 = |mu|^2 / d in expectation.
    x = torch.randn(400, 4, generator=_gen(), dtype=torch.float64)
    mu = torch.tensor([1.0, -2.0, 0.5, 2.0], dtype=torch.float64)
    value = sliced_wasserstein(x, x + mu, num_projections=20000, generator=_gen(3))
    assert value**2 == pytest.approx(float(mu.square().sum()) / 4, rel=0.03)
    # the directions come from the generator: same seed, same value
    a = sliced_wasserstein(x, x + mu, num_projections=8, generator=_gen(5))
    b = sliced_wasserstein(x, x + mu, num_projections=8, generator=_gen(5))
    assert a == b


def test_gaussian_frechet_distance_closed_form():
    # diagonal covariances: |mu_x - mu_y|^2 + sum (sigma_x - sigma_y)^2
    mean_x, mean_y = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    sd_x, sd_y = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 1.5])
    expected = 1 + 0 + 4 + (2**2 + 0 + 1)
    got = gaussian_frechet_distance(mean_x, torch.diag(sd_x**2), mean_y, torch.diag(sd_y**2))
    assert got == pytest.approx(expected, rel=1e-12)
    # a rotated pair of equal covariances differs only by the means
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=_gen(), dtype=torch.float64))
    cov = q @ torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)) @ q.T
    assert gaussian_frechet_distance(mean_x, cov, mean_y, cov) == pytest.approx(5.0, rel=1e-9)


def test_frechet_distance_of_a_shifted_sample_is_the_squared_shift():
    x = torch.randn(300, 5, generator=_gen(), dtype=torch.float64) @ torch.randn(5, 5, generator=_gen(1)).double()
    mu = torch.tensor([1.0, 0.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert frechet_distance(x, x + mu) == pytest.approx(float(mu.square().sum()), rel=1e-8)
    # large samples from two Gaussians approach the closed form
    a = torch.randn(100_000, 2, generator=_gen(2), dtype=torch.float64)
    b = torch.randn(100_000, 2, generator=_gen(3), dtype=torch.float64) * 2 + 1
    assert frechet_distance(a, b) == pytest.approx(2 + 2 * 1.0, rel=0.02)


def test_metrics_reject_bad_input():
    x = torch.randn(10, 2)
    with shape_checks_off(), pytest.raises(ValueError, match="same d"):
        mmd(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="non-finite"):
        sliced_wasserstein(x, torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein(x, x, num_projections=0)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, x, bandwidths=[0.0])
    with pytest.raises(ValueError, match="two rows"):
        frechet_distance(x[:1], x)
    with shape_checks_off(), pytest.raises(ValueError, match="means must be"):
        gaussian_frechet_distance(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2))


def test_precision_recall_and_coverage_on_points_worked_by_hand():
    # real points on a line at 0, 1, 2, 10; with k = 1 their radii are 1, 1, 1, 8
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    generated = torch.tensor([[0.5], [5.0], [20.0]])  # radii (k = 1): 4.5, 4.5, 15
    precision, recall = knn_precision_recall(generated, real, k=1)
    assert precision == 2 / 3  # 0.5 is within 1 of 0; 5.0 is within 8 of 10; 20.0 is 10 from 10 > 8
    assert recall == 1.0  # every real point lies within some generated point's radius
    # 0 and 1 have 0.5 within their radius 1, 10 has 5.0 within its radius 8; 2 is 1.5 from 0.5
    assert coverage(generated, real, k=1) == 0.75


def test_a_model_that_drops_a_mode_keeps_precision_and_loses_coverage():
    g = _gen(3)
    modes = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    real = modes[torch.arange(2000) % 2] + 0.3 * torch.randn(2000, 2, generator=g)
    one_mode = modes[0] + 0.3 * torch.randn(1000, 2, generator=g)
    precision, recall = knn_precision_recall(one_mode, real)
    assert precision > 0.95 and abs(recall - 0.5) < 0.05
    assert abs(coverage(one_mode, real) - 0.5) < 0.05
    both = modes[torch.arange(2000) % 2] + 0.3 * torch.randn(2000, 2, generator=g)
    assert coverage(both, real) > 0.9 and min(knn_precision_recall(both, real)) > 0.9
    with pytest.raises(ValueError, match="more than k = 5 points"):
        coverage(both, real[:5])
