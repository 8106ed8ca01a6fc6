"""Guidance chosen at sampling: per-sample ω in the guided target, the objective, the samplers and the backbones."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from soflow_core import (
    ClassifierFreeGuidance,
    EulerParam,
    FlowMatchingLoss,
    LinearPath,
    LogitNormal,
    SoFlowObjective,
    SolutionConsistencyLoss,
    Uniform,
    sample_chain,
    sample_few_step,
    sample_one_step,
)
from soflow_core._validation import omega_range
from soflow_core.guidance import (
    GuidanceScaleDistribution,
    cfg_decay,
    guidance_coefficients,
    guidance_gain,
    guided_target,
    guided_velocity,
)
from soflow_core.losses import guided_target_from_outputs, guided_teacher_state
from soflow_core.nets import DiT, MLPBackbone, SongUNet, load_backbone, load_weights
from tests._helpers import random_mlp, shape_checks_off

DISTRIBUTIONS = [
    GuidanceScaleDistribution(low=1.0, high=4.0),
    GuidanceScaleDistribution(low=0.0, high=2.5, base=LogitNormal(mean=0.3, std=1.2)),
    GuidanceScaleDistribution(low=1.5, high=1.5),
]


def _draws(n: int, dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v_t, v_unc, v_mod = (torch.randn(n, dim, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.rand(n, generator=g) < 0.3
    t = torch.rand(n, generator=g, dtype=dtype)  # some above the decay time 0.8
    return v_t, v_unc, v_mod, mask, t


# ---------------------------------------------------------------------------------------- the target


def _target_before_per_sample_omega(v_t, v_unc, v_mod, mask, t, guidance):
    """guided_target as it was before ω could vary per sample (kept here verbatim as the reference)."""
    c = cfg_decay(t, guidance.decay_time)[:, None]
    v_g = v_t + c * (guidance.scale - 1.0) * (v_t - v_unc.detach())
    v_mix = guidance.mix * v_g + (1.0 - guidance.mix) * v_mod.detach()
    return torch.where(mask[:, None], v_t, v_mix).detach()


@pytest.mark.parametrize("distribution", DISTRIBUTIONS, ids=["uniform", "logit-normal", "one-value"])
@pytest.mark.parametrize("omega0", [1.7, 2.5, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sample_target_at_a_fixed_omega_is_the_fixed_scale_target_bit_for_bit(distribution, omega0, dtype):
    v_t, v_unc, v_mod, mask, t = _draws(13, 5, dtype)
    fixed = ClassifierFreeGuidance(scale=omega0, mix=0.25, drop_rate=0.1, decay_time=0.8, null_cond=4)
    conditioned = dataclasses.replace(fixed, scale=distribution)
    omega = torch.full((13,), omega0, dtype=torch.float64)
    expected = _target_before_per_sample_omega(v_t, v_unc, v_mod, mask, t, fixed)
    assert torch.equal(guided_target(v_t, v_unc, v_mod, mask, t, fixed), expected)
    assert torch.equal(guided_target(v_t, v_unc, v_mod, mask, t, conditioned, omega=omega), expected)
    assert torch.equal(guidance_coefficients(mask, t, conditioned, omega=omega), guidance_coefficients(mask, t, fixed))


@pytest.mark.parametrize("omega", [1.0, torch.ones(13, dtype=torch.float64)], ids=["float", "per-sample"])
def test_omega_one_is_the_plain_target_as_the_objective_trains_a_fixed_omega_of_one(omega):
    """No guidance terms at ω = 1, neither v_g nor the mix: what the objective does for a fixed scale of 1."""
    v_t, v_unc, v_mod, mask, t = _draws(13, 5, torch.float32)
    scale = 1.0 if isinstance(omega, float) else GuidanceScaleDistribution(low=1.0, high=2.0)
    guidance = ClassifierFreeGuidance(scale=scale, null_cond=4)
    extra = {} if isinstance(omega, float) else {"omega": omega}
    assert torch.equal(guided_target(v_t, v_unc, v_mod, mask, t, guidance, **extra), v_t)
    assert guidance_coefficients(mask, t, guidance, **extra).tolist() == [[1.0, 0.0, 0.0]] * 13
    # the fixed-ω objective at ω = 1 trains on v_t: its Flow Matching mse is that of v_t
    data = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(1))
    fixed_one = _objective(1.0)
    batch = fixed_one.sample_batch(data, labels, step=0, total_steps=10, generator=torch.Generator().manual_seed(2))
    net = random_mlp(3, num_classes=3)
    expected = fixed_one.loss(net, batch)
    sampled = dataclasses.replace(
        batch,
        flow_matching=dataclasses.replace(batch.flow_matching, omega=torch.ones(6, dtype=torch.float64)),
        consistency=dataclasses.replace(batch.consistency, omega=torch.ones(6, dtype=torch.float64)),
    )
    got = _objective(GuidanceScaleDistribution(low=1.0, high=2.0)).loss(OmegaBackbone(net), sampled)
    torch.testing.assert_close(got.flow_matching.per_sample, expected.flow_matching.per_sample, rtol=0, atol=0)
    torch.testing.assert_close(got.consistency.per_sample, expected.consistency.per_sample, rtol=0, atol=0)


def test_each_sample_gets_its_own_scale():
    v_t, v_unc, v_mod, mask, t = _draws(9, 3, torch.float32, seed=1)
    omega = torch.linspace(0.0, 4.0, 9)
    guidance = ClassifierFreeGuidance(scale=GuidanceScaleDistribution(low=0.0, high=4.0), null_cond=3, mix=0.4)
    got = guided_target(v_t, v_unc, v_mod, mask, t, guidance, omega=omega)
    for i, w in enumerate(omega.tolist()):
        fixed = dataclasses.replace(guidance, scale=w) if w >= 1.0 else None
        if fixed is None:  # below 1 only a distribution can ask for it: the formula, written out
            v_g = v_t[i] + float(guidance_gain(t[i : i + 1], w, 0.8)) * (v_t[i] - v_unc[i])
            row = v_t[i] if mask[i] else 0.4 * v_g + 0.6 * v_mod[i]
            torch.testing.assert_close(got[i], row)
        else:
            one = guided_target(
                v_t[i : i + 1], v_unc[i : i + 1], v_mod[i : i + 1], mask[i : i + 1], t[i : i + 1], fixed
            )
            assert torch.equal(got[i : i + 1], one)
    # ω = 1 is the plain conditional velocity, ω = 0 the unconditional one where c(t) = 1
    v_g = guided_velocity(v_t, v_unc, t, scale=omega, decay_time=0.8)
    early = t <= 0.8
    torch.testing.assert_close(v_g[(omega == 0) & early], v_unc[(omega == 0) & early])
    torch.testing.assert_close(v_g[omega == 1], v_t[omega == 1])


def test_the_fused_target_takes_per_sample_scales_as_the_reference():
    v_t, v_unc, v_mod, mask, t = _draws(11, 6, torch.float64, seed=2)
    x_t = torch.randn(11, 6, dtype=torch.float64)
    ell = t * 0.9
    omega = torch.rand(11, dtype=torch.float64) * 3 + 1
    guidance = ClassifierFreeGuidance(scale=GuidanceScaleDistribution(low=1.0, high=4.0), null_cond=3)
    options = {"param": EulerParam(), "guidance": guidance, "omega": omega, "backend": "torch"}
    fused = guided_target_from_outputs(v_t, x_t, v_unc, v_mod, mask, t, **options)
    torch.testing.assert_close(fused, guided_target(v_t, v_unc, v_mod, mask, t, guidance, omega=omega))
    x_ell = guided_teacher_state(x_t, v_t, v_unc, v_mod, mask, t, ell, **options)
    torch.testing.assert_close(x_ell, x_t + (ell - t)[:, None] * fused)


def test_scale_and_omega_must_agree():
    v_t, v_unc, v_mod, mask, t = _draws(4, 2, torch.float32)
    fixed = ClassifierFreeGuidance(scale=2.0, null_cond=3)
    conditioned = ClassifierFreeGuidance(scale=GuidanceScaleDistribution(), null_cond=3)
    with pytest.raises(ValueError, match=r"guidance\.scale is fixed at 2\.0"):
        guided_target(v_t, v_unc, v_mod, mask, t, fixed, omega=torch.ones(4))
    with pytest.raises(ValueError, match=r"omega .* is required"):
        guided_target(v_t, v_unc, v_mod, mask, t, conditioned)
    with shape_checks_off(), pytest.raises(ValueError, match=r"omega must have shape \(4,\)"):
        guided_target(v_t, v_unc, v_mod, mask, t, conditioned, omega=torch.ones(4, 1))


def test_distribution_draws_and_settings():
    omega = GuidanceScaleDistribution(low=1.0, high=3.0).sample(
        4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    assert omega.dtype == torch.float64 and float(omega.min()) >= 1.0 and float(omega.max()) <= 3.0
    assert abs(float(omega.mean()) - 2.0) < 0.05  # uniform: mean (low + high) / 2
    assert GuidanceScaleDistribution(low=2.0, high=2.0).sample(3).tolist() == [2.0, 2.0, 2.0]
    atom = GuidanceScaleDistribution(low=1.0, high=3.0, unguided_share=0.25).sample(
        4000, generator=torch.Generator().manual_seed(1)
    )
    assert abs(float((atom == 1.0).double().mean()) - 0.25) < 0.03 and float(atom.max()) <= 3.0
    with pytest.raises(ValueError, match=r"unguided_share draws ω = 1, which must lie in \[low, high\]"):
        GuidanceScaleDistribution(low=1.5, high=3.0, unguided_share=0.1)
    with pytest.raises(ValueError, match="unguided_share"):
        GuidanceScaleDistribution(unguided_share=1.0)
    with pytest.raises(ValueError, match="high"):
        GuidanceScaleDistribution(low=3.0, high=2.0)
    with pytest.raises(ValueError, match="low"):
        GuidanceScaleDistribution(low=-1.0, high=2.0)
    with pytest.raises(TypeError, match="base"):
        GuidanceScaleDistribution(base="uniform")  # type: ignore[arg-type]
    guidance = ClassifierFreeGuidance(scale=GuidanceScaleDistribution(low=1.0, high=1.0), drop_rate=0.0)
    assert not guidance.active and guidance.conditioned  # ω = 1 everywhere: no guided target, ω still an input
    with pytest.raises(ValueError, match="drop_rate must be > 0"):
        ClassifierFreeGuidance(scale=GuidanceScaleDistribution(low=1.0, high=2.0), drop_rate=0.0)


# -------------------------------------------------------------------------------------- the objective


class OmegaBackbone(nn.Module):
    """Declares omega_range; records every call's conditions and ω; ignores ω unless ``use`` is set."""

    def __init__(self, net: nn.Module, omega_range=(0.0, 5.0), use: bool = False) -> None:
        super().__init__()
        self.net = net
        self.omega_range = omega_range
        self.use = use
        self.calls: list[tuple] = []

    def forward(self, x, t, s, cond=None, *, omega):
        self.calls.append((x.shape[0], None if cond is None else cond.clone(), omega.clone(), torch.is_grad_enabled()))
        out = self.net(x, t, s, cond)
        return out * omega[:, None].to(out.dtype) if self.use else out


def _objective(scale, **kwargs):
    guidance = ClassifierFreeGuidance(scale=scale, mix=0.3, drop_rate=0.3, decay_time=0.8, null_cond=3)
    return SoFlowObjective.from_preset("imagenet", guidance=guidance, fm_fraction=0.5, **kwargs)


def test_objective_at_one_scale_matches_the_fixed_scale_objective_on_the_same_draws():
    data = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(1))
    fixed = _objective(2.5)
    batch = fixed.sample_batch(data, labels, step=3, total_steps=10, generator=torch.Generator().manual_seed(2))
    net = random_mlp(3, num_classes=3)
    expected = fixed.loss(net, batch)
    conditioned = _objective(GuidanceScaleDistribution(low=2.5, high=2.5))
    with_omega = dataclasses.replace(
        batch,
        flow_matching=dataclasses.replace(batch.flow_matching, omega=torch.full((6,), 2.5, dtype=torch.float64)),
        consistency=dataclasses.replace(batch.consistency, omega=torch.full((6,), 2.5, dtype=torch.float64)),
    )
    got = conditioned.loss(OmegaBackbone(net), with_omega)
    assert torch.equal(got.flow_matching.per_sample, expected.flow_matching.per_sample)
    assert torch.equal(got.consistency.per_sample, expected.consistency.per_sample)
    assert torch.equal(got.backprop, expected.backprop)


@pytest.mark.parametrize("forward_batching", ["joint", "split"])
def test_every_pass_gets_the_students_omega(forward_batching):
    data = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(1))
    objective = _objective(GuidanceScaleDistribution(low=1.0, high=4.0), forward_batching=forward_batching)
    batch = objective.sample_batch(data, labels, step=0, total_steps=10, generator=torch.Generator().manual_seed(3))
    fm, sc = batch.flow_matching, batch.consistency
    assert fm.omega.shape == (5,) and sc.omega.shape == (5,) and fm.omega.dtype == torch.float64
    assert float(torch.cat([fm.omega, sc.omega]).min()) >= 1.0 and float(torch.cat([fm.omega, sc.omega]).max()) <= 4.0
    model = OmegaBackbone(random_mlp(3, num_classes=3), use=True)
    objective.loss(model, batch)
    seen = torch.cat([omega for *_, omega, _ in model.calls])
    conds = torch.cat([cond for _, cond, *_ in model.calls])
    # no-grad guidance passes: null class (FM, SC) and the mixed-in conditional SC pass; then the
    # students (FM, SC) with gradient; then the teacher (SC): every one at the samples' own ω
    assert torch.equal(seen, torch.cat([fm.omega, sc.omega, sc.omega, fm.omega, sc.omega, sc.omega]))
    assert bool((conds[:10] == 3).all())
    grad = torch.cat([torch.full((n,), enabled) for n, _, _, enabled in model.calls])
    assert grad.tolist() == [False] * 15 + [True] * 10 + [False] * 5


def test_fixed_scale_draws_are_unchanged_and_conditioned_draws_add_omega_after_each_mask():
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    fixed = _objective(2.0).sample_batch(
        data, labels, step=0, total_steps=5, generator=torch.Generator().manual_seed(4)
    )
    conditioned = _objective(GuidanceScaleDistribution(low=1.0, high=3.0)).sample_batch(
        data, labels, step=0, total_steps=5, generator=torch.Generator().manual_seed(4)
    )
    assert fixed.flow_matching.omega is None and fixed.consistency.omega is None
    for name in ("x_t", "t", "cond", "drop_mask"):
        assert torch.equal(getattr(fixed.flow_matching, name), getattr(conditioned.flow_matching, name))
    assert conditioned.flow_matching.omega.dtype == torch.float32


def test_objective_trains_an_omega_conditioned_mlp_whose_embedding_learns():
    data = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    net = MLPBackbone(dim=2, width=32, depth=1, time_features=16, num_classes=3, omega_range=(1.0, 4.0))
    nn.init.normal_(net.output.weight, std=0.1)  # as after some training: gradients reach the layers below
    out = _objective(GuidanceScaleDistribution(low=1.0, high=4.0))(
        net, data, labels, step=0, total_steps=10, generator=torch.Generator().manual_seed(0)
    )
    out.backprop.backward()
    assert bool(out.metrics["finite"])
    assert float(net.omega_embedding[2].weight.grad.abs().sum()) > 0  # the zero layer gets a gradient


def test_objective_and_backbone_must_agree_on_omega():
    data, labels = torch.randn(8, 2), torch.randint(0, 3, (8,))
    plain = MLPBackbone(dim=2, width=16, depth=1, num_classes=3)
    conditioned = MLPBackbone(dim=2, width=16, depth=1, num_classes=3, omega_range=(1.0, 3.0))
    distribution = GuidanceScaleDistribution(low=1.0, high=3.0)
    with pytest.raises(ValueError, match="declares no omega_range"):
        _objective(distribution)(plain, data, labels, step=0, total_steps=5)
    with pytest.raises(ValueError, match=r"set guidance\.scale to a GuidanceScaleDistribution"):
        _objective(2.0)(conditioned, data, labels, step=0, total_steps=5)
    with pytest.raises(ValueError, match=r"draws ω in \[1, 4\], outside the backbone's omega_range \[1, 3\]"):
        _objective(GuidanceScaleDistribution(low=1.0, high=4.0))(conditioned, data, labels, step=0, total_steps=5)
    # the check does not depend on check_inputs: it reads attributes only
    with pytest.raises(ValueError, match="declares no omega_range"):
        _objective(distribution, check_inputs=False)(plain, data, labels, step=0, total_steps=5)
    objective = _objective(distribution)
    batch = objective.sample_batch(data, labels, step=0, total_steps=5)
    bad = dataclasses.replace(
        batch, consistency=dataclasses.replace(batch.consistency, omega=batch.consistency.omega + 5)
    )
    with pytest.raises(ValueError, match=r"consistency.omega must lie in the backbone's omega_range \[1, 3\]"):
        objective.loss(conditioned, bad)


def test_omega_range_is_found_through_wrappers():
    net = MLPBackbone(dim=2, width=8, depth=1, omega_range=(0.5, 2.0))

    class Wrapper(nn.Module):  # a DDP-like wrapper
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert omega_range(Wrapper(net)) == (0.5, 2.0)
    assert omega_range(torch.compile(net)) == (0.5, 2.0)
    assert omega_range(Wrapper(MLPBackbone(dim=2, width=8, depth=1))) is None
    assert omega_range(lambda x, t, s, c: x) is None
    net.omega_range = (3.0, 1.0)
    with pytest.raises(TypeError, match=r"omega_range must be None or a pair"):
        omega_range(net)


def test_the_loss_objects_pass_omega_through():
    net = OmegaBackbone(random_mlp(2, num_classes=3, dtype=torch.float32))
    x_t, v_t, t = torch.randn(6, 2), torch.randn(6, 2), torch.rand(6)
    cond, mask, omega = torch.randint(0, 3, (6,)), torch.rand(6) < 0.3, torch.rand(6) + 1
    guidance = ClassifierFreeGuidance(scale=GuidanceScaleDistribution(low=1.0, high=2.0), null_cond=3)
    FlowMatchingLoss()(net, x_t, v_t, t, cond, guidance=guidance, drop_mask=mask, omega=omega)
    SolutionConsistencyLoss()(net, x_t, v_t, t, t * 0.5, t * 0.9, cond, omega=omega)
    assert len(net.calls) == 4 and all(torch.equal(c[2], omega) for c in net.calls)
    with pytest.raises(ValueError, match="needs a guidance scale per sample, but the loss gives none"):
        SolutionConsistencyLoss()(net, x_t, v_t, t, t * 0.5, t * 0.9, cond)


# --------------------------------------------------------------------------------------- the samplers


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.omega_range, self.calls = net, net.omega_range, 0

    def forward(self, x, t, s, cond=None, *, omega):
        self.calls += 1
        return self.net(x, t, s, cond, omega=omega)


def _trained_like_mlp():
    torch.manual_seed(0)
    net = MLPBackbone(dim=2, width=16, depth=1, time_features=8, num_classes=3, omega_range=(1.0, 4.0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.eval()


def test_samplers_take_a_float_or_per_sample_omega_with_one_evaluation_per_step():
    net = Counting(_trained_like_mlp())
    noise, cond = torch.randn(4, 2), torch.tensor([0, 1, 2, 3])
    one = sample_one_step(net, noise, param=EulerParam(), cond=cond, omega=2.0)
    assert net.calls == 1
    assert torch.equal(one, sample_one_step(net, noise, param=EulerParam(), cond=cond, omega=torch.full((4,), 2.0)))
    omega = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mixed = sample_one_step(net, noise, param=EulerParam(), cond=cond, omega=omega)
    for i, w in enumerate(omega.tolist()):  # per-sample ω = each sample at its own float ω
        alone = sample_one_step(net, noise[i : i + 1], param=EulerParam(), cond=cond[i : i + 1], omega=w)
        torch.testing.assert_close(mixed[i : i + 1], alone)
    assert not torch.allclose(mixed[0], sample_one_step(net, noise, param=EulerParam(), cond=cond, omega=4.0)[0])
    net.calls = 0
    sample_few_step(net, noise, param=EulerParam(), path=LinearPath(), num_steps=3, cond=cond, omega=omega)
    assert net.calls == 3
    net.calls = 0
    sample_chain(net, noise, [1.0, 0.5, 0.0], param=EulerParam(), cond=cond, omega=1.5)
    assert net.calls == 2


@pytest.mark.parametrize(
    ("omega", "error", "match"),
    [
        (4.5, ValueError, r"omega must lie in the backbone's omega_range \[1, 4\].*omega\[0\] = 4.5"),
        (math.nan, ValueError, "omega must lie in"),
        (torch.tensor([1.0, math.inf, 2.0]), ValueError, "omega holds 1 non-finite"),
        (torch.ones(2), ValueError, r"omega must have shape \(3,\)"),
        (torch.ones(3, dtype=torch.long), TypeError, "omega must be a floating-point tensor"),
        ("2", TypeError, "omega must be a real number"),
    ],
)
def test_samplers_check_omega(omega, error, match):
    with shape_checks_off(), pytest.raises(error, match=match):
        sample_one_step(_trained_like_mlp(), torch.randn(3, 2), param=EulerParam(), omega=omega)


def test_samplers_refuse_omega_for_models_without_it_and_ask_for_it_otherwise():
    plain = MLPBackbone(dim=2, width=8, depth=1)
    with pytest.raises(ValueError, match="the sampler gives the backbone a guidance scale"):
        sample_one_step(plain, torch.randn(3, 2), param=EulerParam(), omega=2.0)
    with pytest.raises(ValueError, match=r"needs a guidance scale per sample, but the sampler gives none: pass omega="):
        sample_few_step(_trained_like_mlp(), torch.randn(3, 2), param=EulerParam(), path=LinearPath(), num_steps=2)


# -------------------------------------------------------------------------------------- the backbones

SMALL_DIT = {"input_size": 8, "in_channels": 4, "patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2}
SMALL_UNET = {
    "img_resolution": 8,
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
}
BACKBONES = {
    "mlp": (lambda **kw: MLPBackbone(dim=3, width=16, depth=2, time_features=8, num_classes=3, **kw), (5, 3), True),
    "dit": (lambda **kw: DiT(**SMALL_DIT, num_classes=3, **kw), (5, 4, 8, 8), True),
    "unet": (lambda **kw: SongUNet(**SMALL_UNET, dropout=0.0, **kw), (5, 3, 8, 8), False),
}


def _randomize(net: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return net.eval()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_an_omega_embedding_at_initialisation_changes_nothing(name):
    build, shape, labelled = BACKBONES[name]
    torch.manual_seed(0)
    plain = build()
    torch.manual_seed(0)
    conditioned = build(omega_range=(1.0, 4.0))
    state = conditioned.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())  # same seed, same weights
    # a converted model: any trained weights without ω, then the ω embedding at its initial zero output
    trained = _randomize(plain, seed=1)
    report = load_weights(conditioned, trained.state_dict(), strict=False)
    assert report.missing and all("omega" in k for k in report.missing)
    conditioned.eval()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(shape, generator=g), torch.rand(shape[0], generator=g)
    cond = torch.tensor([0, 1, 2, 3, 0]) if labelled else None
    expected = trained(x, t, t * 0.3, cond)
    assert expected.abs().sum() > 0
    for omega in (torch.ones(5), torch.linspace(0.0, 9.0, 5)):
        assert torch.equal(conditioned(x, t, t * 0.3, cond, omega=omega), expected)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_a_trained_omega_embedding_makes_outputs_depend_on_omega(name):
    build, shape, labelled = BACKBONES[name]
    torch.manual_seed(0)
    net = _randomize(build(omega_range=(1.0, 4.0)), seed=3)
    x, t = torch.randn(shape), torch.rand(shape[0])
    cond = torch.tensor([0, 1, 2, 3, 0]) if labelled else None
    a = net(x, t, t * 0.3, cond, omega=torch.full((5,), 1.0))
    b = net(x, t, t * 0.3, cond, omega=torch.full((5,), 3.0))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_forward_checks_omega_against_how_the_backbone_was_built(name):
    build, shape, labelled = BACKBONES[name]
    x, t = torch.randn(shape), torch.rand(shape[0])
    cond = torch.zeros(5, dtype=torch.long) if labelled else None
    with pytest.raises(ValueError, match="built without omega_range"):
        build()(x, t, t, cond, omega=torch.ones(5))
    conditioned = build(omega_range=(1.0, 4.0))
    with pytest.raises(ValueError, match=r"is ω-conditioned .* pass omega"):
        conditioned(x, t, t, cond)
    with shape_checks_off(), pytest.raises(ValueError, match=r"one floating-point guidance scale per sample \(5\)"):
        conditioned(x, t, t, cond, omega=torch.ones(4))
    with pytest.raises(ValueError, match=r"omega_range\[1\] must lie in"):
        build(omega_range=(2.0, 1.0))
    with shape_checks_off(), pytest.raises(TypeError, match="omega_range must be None or a pair"):
        build(omega_range=2.0)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_pretrained_folders_record_omega_range_and_old_folders_still_load(name, tmp_path):
    pytest.importorskip("safetensors")
    build, shape, labelled = BACKBONES[name]
    torch.manual_seed(0)
    conditioned = _randomize(build(omega_range=(1.0, 3.0)), seed=4)
    folder = conditioned.save_pretrained(tmp_path / "omega")
    config = json.loads((folder / "config.json").read_text())
    assert config["config"]["omega_range"] == [1.0, 3.0]
    loaded = type(conditioned).from_pretrained(folder)
    assert loaded.omega_range == (1.0, 3.0)
    x, t = torch.randn(shape), torch.rand(shape[0])
    cond = torch.tensor([0, 1, 2, 3, 0]) if labelled else None
    omega = torch.full((5,), 2.0)
    assert torch.equal(loaded(x, t, t * 0.5, cond, omega=omega), conditioned(x, t, t * 0.5, cond, omega=omega))
    # a raw state dict: the range is not in the weights, so it is asked for
    hints = {"num_classes": 3, "num_heads": 2} if name == "dit" else {}
    with pytest.raises(ValueError, match="pass omega_range"):
        load_backbone(conditioned.state_dict(), **hints)
    assert load_backbone(conditioned.state_dict(), omega_range=(1.0, 3.0), **hints).model.omega_range == (1.0, 3.0)
    # a folder written before ω existed has no omega_range in its config: it loads as before
    plain = _randomize(build(), seed=5)
    old = plain.save_pretrained(tmp_path / "old")
    document = json.loads((old / "config.json").read_text())
    del document["config"]["omega_range"]
    (old / "config.json").write_text(json.dumps(document))
    again = type(plain).from_pretrained(old)
    assert again.omega_range is None
    assert torch.equal(again(x, t, t * 0.5, cond), plain(x, t, t * 0.5, cond))
    with pytest.raises(ValueError, match="has no guidance-scale embedding"):
        load_backbone(plain.state_dict(), omega_range=(1.0, 3.0), **hints)


def test_the_uniform_base_is_the_default():
    assert GuidanceScaleDistribution().base == Uniform()
