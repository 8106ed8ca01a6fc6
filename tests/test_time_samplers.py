import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from soflow_core import (
    ConsistencyTimeSampler,
    ConstSchedule,
    CosineSchedule,
    ExponentSchedule,
    LinearSchedule,
    LogitNormal,
    Uniform,
)
from soflow_core.objective import PRESETS
from soflow_core.time_samplers import MIN_TIME_GAP, consistency_times, make_schedule

SCHEDULES = [ConstSchedule, LinearSchedule, CosineSchedule, ExponentSchedule]
ratios = st.floats(1e-4, 1.0)


@pytest.mark.parametrize("cls", SCHEDULES, ids=lambda c: c.__name__)
@given(r_init=ratios, r_end=ratios, total=st.integers(1, 10_000))
def test_schedules_hit_endpoints_and_are_monotone(cls, r_init, r_end, total):
    sched = cls(r_init=r_init, r_end=r_end)
    start = r_end if cls is ConstSchedule else r_init
    assert sched(0, total) == pytest.approx(start, rel=1e-12)
    assert sched(total, total) == pytest.approx(r_end, rel=1e-12)
    values = [sched(k, total) for k in range(0, total + 1, max(1, total // 50))]
    diffs = [b - a for a, b in itertools.pairwise(values)]
    tol = 1e-12
    if r_init >= r_end or cls is ConstSchedule:
        assert all(d <= tol for d in diffs)
    else:
        assert all(d >= -tol for d in diffs)
    # past the planned end the schedule holds its final value
    assert sched(2 * total, total) == pytest.approx(r_end, rel=1e-12)


@pytest.mark.parametrize(
    ("r_init", "r_end", "expected"),
    [
        (0.1, 0.002, [0.1, 0.0376, 0.0141, 0.00532, 0.002]),  # ImageNet (the official config)
        (1.0, 0.0003125, [1.0, 0.133, 0.0177, 0.00235, 0.000313]),  # CIFAR-10
    ],
)
def test_exponent_schedule_matches_reference_values(r_init, r_end, expected):
    sched = make_schedule("Exponent", r_init=r_init, r_end=r_end)
    got = [sched(k, 400) for k in (0, 100, 200, 300, 400)]
    assert got == pytest.approx(expected, rel=5e-3)


def test_linear_and_cosine_midpoints():
    assert LinearSchedule(r_init=0.5, r_end=0.1)(5, 10) == pytest.approx(0.3)
    assert CosineSchedule(r_init=0.5, r_end=0.1)(5, 10) == pytest.approx(0.3)
    assert CosineSchedule(r_init=0.5, r_end=0.1)(1, 4) == pytest.approx(0.1 + 0.4 * 0.5 * (1 + 2**-0.5))


@given(
    seed=st.integers(0, 2**16),
    r=st.floats(1e-4, 1.0),
    n=st.integers(1, 64),
    mu_t=st.floats(-3, 3),
    mu_s=st.floats(-5, 3),
)
def test_consistency_sampler_orders_times(seed, r, n, mu_t, mu_s):
    sampler = ConsistencyTimeSampler(
        t_distribution=LogitNormal(mean=mu_t, std=1.6),
        s_distribution=LogitNormal(mean=mu_s, std=1.6),
        schedule=ConstSchedule(r_end=r),
    )
    tr = sampler.sample(n, step=0, total_steps=1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert bool((tr.s >= 0).all() and (tr.s <= tr.ell).all() and (tr.ell < tr.t).all() and (tr.t <= 1).all())
    assert bool((tr.t - tr.ell >= MIN_TIME_GAP * (1 - 1e-9)).all())
    assert bool((tr.t >= MIN_TIME_GAP).all())


@given(t=st.floats(0.0, 1.0), s=st.floats(0.0, 1.0), r=st.floats(1e-3, 0.999))
def test_consistency_times_clamps_exactly(t, s, r):
    tt, ss = torch.tensor([t], dtype=torch.float64), torch.tensor([s], dtype=torch.float64)
    out = consistency_times(tt, ss, r)
    t_exp = max(t, 1e-4)
    s_exp = min(s, t_exp - 1e-4)
    ell_exp = min(t_exp + (s_exp - t_exp) * r, t_exp - 1e-4)
    assert out.t.item() == t_exp
    assert out.s.item() == s_exp
    assert out.ell.item() == pytest.approx(ell_exp, rel=0, abs=1e-15)
    if s < t_exp - 1e-4:  # s not pinned and r < 1: ℓ lies strictly between s and t
        assert out.s.item() < out.ell.item() < out.t.item()


def test_consistency_times_no_swap_pins_s():
    out = consistency_times(torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64), 0.5)
    assert out.s.item() == pytest.approx(0.3 - 1e-4)
    assert out.ell.item() == pytest.approx(0.3 - 1e-4)


@pytest.mark.parametrize(("preset", "expected"), [("imagenet", 0.144), ("cifar10", 0.085)])
def test_fraction_of_pinned_s_matches_spec(preset, expected):
    sampler = PRESETS[preset].consistency_times
    g = torch.Generator().manual_seed(0)
    n = 400_000
    s_draw = sampler.s_distribution.sample(n, dtype=torch.float64, generator=g)
    t_draw = sampler.t_distribution.sample(n, dtype=torch.float64, generator=g)
    t = t_draw.clamp(min=1e-4)
    assert float((s_draw >= t - 1e-4).double().mean()) == pytest.approx(expected, abs=0.003)


@pytest.mark.parametrize(
    ("mean", "std", "exp_mean", "exp_median"),
    [(-0.2, 1.0, 0.459, 0.450), (-1.0, 0.8, 0.293, 0.269), (0.2, 0.8, 0.544, 0.549), (-4.0, 1.6, 0.048, 0.018)],
)
def test_logit_normal_summaries_match_spec(mean, std, exp_mean, exp_median):
    t = LogitNormal(mean=mean, std=std).sample(400_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert float(t.mean()) == pytest.approx(exp_mean, abs=2e-3)
    assert float(t.median()) == pytest.approx(exp_median, abs=2e-3)


def test_uniform_range_and_generator_reproducibility():
    a = Uniform(low=0.2, high=0.6).sample(1000, generator=torch.Generator().manual_seed(3))
    b = Uniform(low=0.2, high=0.6).sample(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert float(a.min()) >= 0.2 and float(a.max()) < 0.6


def test_sampler_uses_explicit_step():
    sampler = ConsistencyTimeSampler(schedule=LinearSchedule(r_init=0.5, r_end=0.1))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    early = sampler.sample(16, step=0, total_steps=10, dtype=torch.float64, generator=g1)
    late = sampler.sample(16, step=10, total_steps=10, dtype=torch.float64, generator=g2)
    torch.testing.assert_close(early.t, late.t)
    assert bool((late.t - late.ell <= early.t - early.ell + 1e-12).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", [1.0, 0.9999999, 0.5])
def test_rounding_never_puts_ell_below_s(dtype, r):
    g = torch.Generator().manual_seed(0)
    t_draw = torch.rand(100_000, generator=g, dtype=torch.float64).to(dtype)
    s_draw = torch.rand(100_000, generator=g, dtype=torch.float64).to(dtype)
    out = consistency_times(t_draw, s_draw, r)
    assert bool((out.s <= out.ell).all() and (out.ell < out.t).all())
    if r == 1.0:  # the whole interval: ℓ = s
        assert torch.equal(out.ell, out.s)
