"""The MeanFlow baseline of the benchmarks (benchmarks/meanflow.py): target, variants, CFG, sampling."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from _helpers import grads, random_mlp, zero_grads
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.meanflow import (  # noqa: E402
    MeanFlowObjective,
    average_velocity_and_derivative,
    meanflow_sample,
    meanflow_target,
    sample_meanflow_times,
)
from soflow_core.guidance import sample_drop_mask  # noqa: E402
from soflow_core.nets import DiT  # noqa: E402


def _u(model, z, r, t, cond=None):
    return model(z, t, r, cond)


@pytest.mark.parametrize("variant", ["shared_primal", "separate", "subset"])
def test_target_matches_central_differences_along_the_flow(variant):
    net = random_mlp(dim=3, seed=1)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    v = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.8 + 0.1
    r = t * torch.rand(6, generator=g, dtype=torch.float64)
    u, dudt = average_velocity_and_derivative(net, z, r, t, v, jvp_variant=variant)
    h = 1e-5
    fd = (_u(net, z + h * v, r, t + h) - _u(net, z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(dudt, fd, rtol=1e-7, atol=1e-8)
    assert fd.abs().max() > 1e-2  # the derivative is not trivially zero
    torch.testing.assert_close(u, _u(net, z, r, t))
    assert u.requires_grad and not dudt.requires_grad
    target = meanflow_target(v, dudt, r, t)
    torch.testing.assert_close(target, v - (t - r)[:, None] * fd, rtol=1e-7, atol=1e-8)
    assert not target.requires_grad


@pytest.mark.parametrize("variant", ["shared_primal", "subset"])
@pytest.mark.parametrize("guided", [False, True])
def test_every_jvp_variant_gives_the_loss_and_gradients_of_the_separate_one(guided, variant):
    net = random_mlp(dim=3, seed=2, num_classes=4)
    data = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = torch.arange(16) % 4
    cfg = {"guidance_scale": 2.0, "guidance_mix": 0.3} if guided else {}
    results = {}
    for name in (variant, "separate"):
        objective = MeanFlowObjective(jvp_variant=name, ratio_r_neq_t=0.5, null_cond=4, **cfg)
        zero_grads(net)
        out = objective(net, data, cond, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        results[name] = (out, grads(net))
    (a, grads_a), (b, grads_b) = results[variant], results["separate"]
    assert 0 < int(b.times.r_neq_t.sum()) < 16  # both kinds of samples are present
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.target, b.target, rtol=1e-12, atol=1e-14)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-14)


class _CallRecorder(nn.Module):
    """Records (grad enabled, batch size) of every call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[bool, int]] = []

    def forward(self, x, t, s, cond=None):
        self.calls.append((torch.is_grad_enabled(), x.shape[0]))
        return self.net(x, t, s, cond)


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_the_subset_variant_runs_the_jvp_on_the_samples_with_r_unequal_t_only(share):
    recorder = _CallRecorder(random_mlp(dim=3, seed=4))
    data = torch.randn(16, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    objective = MeanFlowObjective(jvp_variant="subset", ratio_r_neq_t=share)
    batch = objective.sample_batch(data, generator=torch.Generator().manual_seed(6))
    out = objective.loss(recorder, batch)
    kept = int(batch.times.r_neq_t.sum())
    assert recorder.calls == [(False, kept), (True, 16)]  # with no r != t sample, an empty JVP
    # Where r = t the target is v itself: the skipped JVP term is multiplied by t − r = 0.
    equal = ~batch.times.r_neq_t
    assert torch.equal(out.target[equal], batch.v[equal])


def test_sample_batch_then_loss_is_the_call():
    net = random_mlp(dim=3, seed=6, num_classes=4)
    data, cond = torch.randn(8, 3, dtype=torch.float64), torch.arange(8) % 4
    objective = MeanFlowObjective(guidance_scale=1.5, guidance_mix=0.2, null_cond=4)
    whole = objective(net, data, cond, generator=torch.Generator().manual_seed(7))
    parts = objective.loss(net, objective.sample_batch(data, cond, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(whole.loss, parts.loss) and torch.equal(whole.target, parts.target)
    assert parts.backprop is parts.loss


def test_loss_is_the_adaptively_weighted_summed_square_error():
    net = random_mlp(dim=3, seed=3)
    data = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    objective = MeanFlowObjective(p=0.75, eps=1e-3)
    out = objective(net, data, generator=torch.Generator().manual_seed(0))
    sq = (out.u - out.target).square().sum(dim=1)
    torch.testing.assert_close(out.per_sample, sq / (sq + 1e-3) ** 0.75)
    torch.testing.assert_close(out.loss, out.per_sample.mean())
    torch.testing.assert_close(out.metrics["sq_error"], sq.mean())


def test_r_equals_t_on_the_expected_share_of_samples():
    times = sample_meanflow_times(
        20_000, ratio_r_neq_t=0.25, t_mean=-0.4, t_std=1.0, r_mean=-0.4, r_std=1.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    equal = times.r == times.t
    assert abs(equal.float().mean().item() - 0.75) < 0.015
    assert torch.equal(equal, ~times.r_neq_t)
    assert bool((times.r <= times.t).all()) and bool((times.t < 1).all()) and bool((times.r > 0).all())
    # The kept r is the smaller of two logit-normal draws: its median is below the t median.
    assert times.r[times.r_neq_t].median() < times.t.median()


class _LinearLabelNet(nn.Module):
    """u(z, t, r | c) = w_c·z + β·(t − r): every derivative is known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64))
        self.beta = 0.7

    def forward(self, x, t, s, cond=None):
        return self.w[cond][:, None] * x + self.beta * (t - s)[:, None]


def test_cfg_target_equals_a_hand_computation():
    net = _LinearLabelNet()
    n, omega, kappa = 64, 1.5, 0.25
    gen = torch.Generator().manual_seed(4)
    data = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    cond = torch.arange(n) % 2
    objective = MeanFlowObjective(guidance_scale=omega, guidance_mix=kappa, cond_drop=0.3, null_cond=2)
    out = objective(net, data, cond, generator=torch.Generator().manual_seed(5), noise=noise)

    # Replay the draws: the times, then (noise given) the label-drop mask.
    replay = torch.Generator().manual_seed(5)
    times = objective.sample_times(n, device=torch.device("cpu"), dtype=torch.float64, generator=replay)
    dropped = sample_drop_mask(n, 0.3, generator=replay)
    assert 0 < int(dropped.sum()) < n
    t, r = times.t[:, None], times.r[:, None]
    z = (1 - t) * data + t * noise
    v = noise - data
    label = torch.where(dropped, 2, cond)
    w_c, w_null = net.w.detach()[label][:, None], net.w.detach()[2]
    v_tilde = torch.where(dropped[:, None], v, omega * v + kappa * w_c * z + (1 - omega - kappa) * w_null * z)
    expected = v_tilde - (t - r) * (w_c * v_tilde + net.beta)
    torch.testing.assert_close(out.target, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.u, w_c * z + net.beta * (t - r), rtol=1e-12, atol=1e-12)


def _tiny_dit(seed=0):
    torch.manual_seed(seed)
    net = DiT(input_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    for p in net.parameters():  # leave the zero-initialised adaLN: u would be 0 otherwise
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    return net


class _AttentionRecorder(nn.Module):
    """Records which SDPA backends were enabled at each call, then calls the DiT."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, x, t, s, cond=None):
        backends = torch.backends.cuda
        self.calls.append((torch.is_grad_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled()))
        return self.net(x, t, s, cond)


def test_jvp_through_a_dit_needs_math_attention():
    net = _tiny_dit()
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    t, r, cond = torch.full((3,), 0.7), torch.full((3,), 0.2), torch.tensor([0, 1, 2])
    # The fused attention kernel PyTorch picks by default (flash on CPU) has no forward-mode AD.
    with pytest.raises(NotImplementedError, match="forward AD"):
        average_velocity_and_derivative(net, z, r, t, v, cond, math_attention=False)
    u, dudt = average_velocity_and_derivative(net, z, r, t, v, cond, math_attention=True)
    assert u.shape == dudt.shape == z.shape and bool(torch.isfinite(dudt).all()) and dudt.abs().max() > 0


@pytest.mark.parametrize("variant", ["shared_primal", "separate", "subset"])
def test_only_the_jvp_runs_with_math_attention(variant):
    recorder = _AttentionRecorder(_tiny_dit())
    data = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    objective = MeanFlowObjective(jvp_variant=variant, guidance_scale=2.0, null_cond=3)
    out = objective(recorder, data, torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(2))
    out.loss.backward()
    # CFG call (no grad, any backend), the JVP (math only), then for "separate" the grad forward.
    expected = [(False, True, True), (True, False, False)]
    if variant != "shared_primal":
        expected = [(False, True, True), (False, False, False), (True, True, True)]
    assert recorder.calls == expected
    assert torch.backends.cuda.flash_sdp_enabled()  # restored afterwards


def test_meanflow_sample_one_and_two_steps():
    net = random_mlp(dim=3, seed=5)
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ones, zeros, halves = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), None
    one = meanflow_sample(net, noise, steps=1)
    with torch.no_grad():
        torch.testing.assert_close(one, noise - net(noise, ones, zeros, None))
        halves = torch.full((5,), 0.5, dtype=torch.float64)
        mid = noise - 0.5 * net(noise, ones, halves, None)
        two_expected = mid - 0.5 * net(mid, halves, zeros, None)
    two = meanflow_sample(net, noise, steps=2)
    assert one.shape == two.shape == noise.shape and not two.requires_grad
    torch.testing.assert_close(two, two_expected)
    images = meanflow_sample(_tiny_dit(), torch.randn(2, 2, 8, 8), steps=2, cond=torch.tensor([0, 3]))
    assert images.shape == (2, 2, 8, 8)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("jvp_variant", "double"),
        ("ratio_r_neq_t", 1.5),
        ("time_std", 0.0),
        ("r_std", -1.0),
        ("p", -0.5),
        ("eps", 0.0),
        ("guidance_scale", 0.0),
        ("guidance_mix", 1.0),
        ("cond_drop", 2.0),
    ],
)
def test_bad_fields_raise_value_errors_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        MeanFlowObjective(**{field: value})


def test_bad_call_arguments_raise_value_errors_naming_them():
    net = random_mlp(dim=3, num_classes=2)
    data = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="cond_drop"):
        MeanFlowObjective(guidance_scale=2.0, cond_drop=0.0)
    with pytest.raises(ValueError, match="cond"):
        MeanFlowObjective(guidance_scale=2.0)(net, data)
    with pytest.raises(ValueError, match="noise"):
        MeanFlowObjective()(net, data, noise=torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="data"):
        MeanFlowObjective()(net, data.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="steps"):
        meanflow_sample(net, data, steps=0)
    with pytest.raises(ValueError, match="jvp_variant"):
        average_velocity_and_derivative(net, data, torch.zeros(4), torch.ones(4), data, jvp_variant="both")
    assert dataclasses.replace(MeanFlowObjective(), jvp_variant="separate").jvp_variant == "separate"
