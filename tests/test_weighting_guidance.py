import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from soflow_core import AdaptiveWeighting, ClassifierFreeGuidance
from soflow_core.guidance import cfg_decay, drop_cond, guided_target, guided_velocity, mixed_velocity, sample_drop_mask
from soflow_core.weighting import adaptive_weight, flow_matching_weight


@given(mse=st.lists(st.floats(0, 100), min_size=1, max_size=8), p=st.floats(0, 2), eps=st.floats(1e-4, 1))
def test_adaptive_weight_formula_and_detached(mse, p, eps):
    m = torch.tensor(mse, dtype=torch.float64, requires_grad=True)
    w = adaptive_weight(m, p=p, eps=eps)
    assert not w.requires_grad
    torch.testing.assert_close(w, 1.0 / (m.detach() + eps) ** p, rtol=1e-12, atol=0)
    d_s_b = torch.full_like(m, torch.pi / 2)
    torch.testing.assert_close(flow_matching_weight(m, d_s_b, p=p, eps=eps), w / (torch.pi / 2), rtol=1e-12, atol=0)


def test_p_zero_is_plain_mse():
    assert torch.equal(adaptive_weight(torch.tensor([0.3, 7.0]), p=0.0, eps=0.01), torch.ones(2))


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0.5, 1.0),
        (0.8, 1.0),
        (0.801, 0.993),
        (0.805, 0.623),
        (0.81, 0.378),
        (0.82, 0.201),
        (0.85, 0.072),
        (0.9, 0.0247),
        (0.95, 0.0083),
        (1.0, 0.0),
    ],
)
def test_cfg_decay_matches_spec_table(t, expected):
    assert cfg_decay(torch.tensor([t], dtype=torch.float64), 0.8).item() == pytest.approx(expected, abs=6e-4)


def test_cfg_decay_off_when_decay_time_at_least_one():
    assert torch.equal(cfg_decay(torch.tensor([0.0, 0.99, 1.0]), 1.0), torch.ones(3))


def test_drop_mask_rate_and_convention():
    mask = sample_drop_mask(200_000, 0.1, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool
    assert float(mask.float().mean()) == pytest.approx(0.1, abs=3e-3)
    labels = torch.arange(6)
    mask = torch.tensor([True, False, True, False, False, False])
    assert drop_cond(labels, mask, 1000).tolist() == [1000, 1, 1000, 3, 4, 5]


def test_drop_cond_with_embedding_conditions():
    cond = torch.randn(3, 4)
    null = torch.zeros(4)
    out = drop_cond(cond, torch.tensor([False, True, False]), null)
    assert torch.equal(out[1], null) and torch.equal(out[0], cond[0]) and torch.equal(out[2], cond[2])


def test_guided_target_formula():
    g = torch.Generator().manual_seed(0)
    v_t, v_unc, v_mod = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.81, 0.95], dtype=torch.float64)
    mask = torch.tensor([False, True, False, False])
    cfg = ClassifierFreeGuidance(scale=3.0, mix=0.25, drop_rate=0.1, decay_time=0.8)
    got = guided_target(v_t, v_unc, v_mod, mask, t, cfg)
    c = cfg_decay(t, 0.8)[:, None]
    v_g = v_t + c * 2.0 * (v_t - v_unc)
    expected = 0.25 * v_g + 0.75 * v_mod
    expected[1] = v_t[1]  # dropped samples keep the plain conditional velocity
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(guided_velocity(v_t, v_unc, t, scale=3.0, decay_time=0.8), v_g)
    torch.testing.assert_close(mixed_velocity(v_g, v_mod, mix=0.25), 0.25 * v_g + 0.75 * v_mod)


def test_guided_target_is_detached():
    v_mod = torch.randn(2, 3, requires_grad=True)
    out = guided_target(
        torch.randn(2, 3),
        torch.randn(2, 3),
        v_mod,
        torch.tensor([False, False]),
        torch.rand(2),
        ClassifierFreeGuidance(),
    )
    assert not out.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"scale": 0.5}, "scale"),
        ({"mix": 1.5}, "mix"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"scale": 2.0, "drop_rate": 0.0}, "drop_rate"),
    ],
)
def test_guidance_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ClassifierFreeGuidance(**kwargs)


@pytest.mark.parametrize(("kwargs", "name"), [({"p": -1.0}, "p"), ({"eps": 0.0}, "eps"), ({"eps": -1e-3}, "eps")])
def test_weighting_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveWeighting(**kwargs)
