import dataclasses

import pytest
import torch
from _helpers import (
    ConvNet,
    MaskRecorder,
    RowByRow,
    grads,
    random_mlp,
    shape_checks_off,
    summation_error_bound,
    zero_grads,
)
from _reference import explicit_objective, flatten_per_sample
from hypothesis import given
from hypothesis import strategies as st

from soflow_core import (
    AdaptiveWeighting,
    ClassifierFreeGuidance,
    ConsistencyTimeSampler,
    EulerParam,
    ExponentSchedule,
    FlowMatchingLoss,
    LinearPath,
    LogitNormal,
    SoFlowObjective,
    TrigParam,
    TrigPath,
    Uniform,
)
from soflow_core.objective import split_sizes

CFG = ClassifierFreeGuidance(scale=3.0, mix=0.25, drop_rate=0.3, decay_time=0.8, null_cond=5)


def make_objective(*, kind="euler", guidance=None, fm_fraction=0.75, batching="auto"):
    extra = {"param": TrigParam(), "path": TrigPath()} if kind == "trig" else {}
    return SoFlowObjective(
        fm_fraction=fm_fraction,
        guidance=guidance,
        forward_batching=batching,
        weighting=AdaptiveWeighting(p=1.0, eps=0.01),
        **extra,
    )


def inputs(seed, n=12, dim=3, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("kind", ["euler", "trig"])
@pytest.mark.parametrize("guided", [False, True], ids=["no-cfg", "cfg"])
@given(seed=st.integers(0, 2**16), fm_fraction=st.sampled_from([0.0, 0.25, 0.75, 1.0]))
def test_objective_gradient_equals_explicit_separate_call_form(kind, guided, seed, fm_fraction):
    """Batched calls + surrogate give the gradient of the explicit, separately-evaluated objective (1e-10)."""
    objective = make_objective(kind=kind, guidance=CFG if guided else None, fm_fraction=fm_fraction)
    net = random_mlp(3, seed=seed, num_classes=5 if guided else None)
    data, labels = inputs(seed)
    batch = objective.sample_batch(
        data, labels if guided else None, step=3, total_steps=10, generator=torch.Generator().manual_seed(seed)
    )
    zero_grads(net)
    objective.loss(net, batch).backprop.backward()
    ours = grads(net)
    zero_grads(net)
    explicit_objective(net, objective, batch, kind).backward()
    for a, e in zip(ours, grads(net)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("guided", [False, True], ids=["no-cfg", "cfg"])
@given(seed=st.integers(0, 2**16))
def test_joint_and_split_calls_give_the_same_losses_and_gradients(guided, seed):
    """Joint and split calls apply the same maths to the same per-sample backbone outputs.

    A batched matmul may round a sample's row differently per batch size, so with an ordinary
    MLP the two groupings agree only up to that rounding. With a batch-invariant backbone
    (`RowByRow`) each backbone output is bit-identical under both groupings, so every per-sample
    loss and metric must be too: zero tolerance. The parameter gradient still sums the B
    per-sample gradients g_b in another order (one call over B samples, or two calls whose sums
    are added) of the same terms, so the two gradients may differ by the float64 rounding of that
    sum: each is within γ_{B−1}·Σ_b|g_b| of the exact sum, hence |Δ| ≤ 2·γ_{B−1}·Σ_b|g_b|
    elementwise. The g_b recomputed here (one backward per sample, batched) may differ from the terms
    the full backward added in their last bits; one extra rounding in γ covers that
    second-order change of the bound.
    """
    net = RowByRow(random_mlp(3, seed=seed, num_classes=5 if guided else None))
    data, labels = inputs(seed, n=11)
    results = {}
    for batching in ("joint", "split"):
        objective = make_objective(guidance=CFG if guided else None, batching=batching)
        batch = objective.sample_batch(
            data, labels if guided else None, step=1, total_steps=4, generator=torch.Generator().manual_seed(seed)
        )
        zero_grads(net)
        out = objective.loss(net, batch)
        per_sample = flatten_per_sample(out)
        if batching == "split":  # g_b, stacked: backprop = Σ_b per_sample_b / B
            size = per_sample.shape[0]
            per_sample_grads = torch.autograd.grad(
                per_sample,
                list(net.parameters()),
                grad_outputs=torch.eye(size, dtype=per_sample.dtype) / size,
                retain_graph=True,
                is_grads_batched=True,
            )
        out.backprop.backward()
        results[batching] = (per_sample.detach(), grads(net), out.metrics)
    (pa, ga, ma), (pb, gb, mb) = results["joint"], results["split"]
    assert torch.equal(pa, pb), (pa - pb).abs().max()
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key
    for a, b, terms in zip(ga, gb, per_sample_grads):
        bound = 2 * summation_error_bound(terms, extra_roundings=1)
        assert bool(((a - b).abs() <= bound).all()), ((a - b).abs() / bound).max()


def count_calls(objective, net, data, cond):
    calls = []

    def model(x, t, s, c):
        calls.append((torch.is_grad_enabled(), x.shape[0]))
        return net(x, t, s, c)

    objective(model, data, cond, step=0, total_steps=10, generator=torch.Generator().manual_seed(0))
    return calls


def test_network_calls_are_batched():
    data, labels = inputs(0, n=32)
    # with guidance: one no-grad call for all guidance velocities (24 + 8 + 8), one grad call (32), one teacher (8)
    calls = count_calls(make_objective(guidance=CFG), random_mlp(3, num_classes=5), data, labels)
    assert calls == [(False, 40), (True, 32), (False, 8)]
    calls = count_calls(make_objective(), random_mlp(3), data, None)
    assert calls == [(True, 32), (False, 8)]
    calls = count_calls(make_objective(guidance=CFG, batching="split"), random_mlp(3, num_classes=5), data, labels)
    assert calls == [(False, 24), (False, 8), (False, 8), (True, 24), (True, 8), (False, 8)]
    # mix = 1 needs no conditional velocity pass
    cfg_no_mix = dataclasses.replace(CFG, mix=1.0)
    calls = count_calls(make_objective(guidance=cfg_no_mix), random_mlp(3, num_classes=5), data, labels)
    assert calls == [(False, 32), (True, 32), (False, 8)]


def test_dropout_backbone_gets_split_calls_and_shared_masks():
    model = MaskRecorder().train()
    objective = make_objective()
    assert not objective.use_joint_forward(model)
    assert objective.use_joint_forward(model.eval())
    model.train()
    data, _ = inputs(0, n=16)
    objective(model, data, step=0, total_steps=10, generator=torch.Generator().manual_seed(0))
    (g1, fm_mask), (g2, sc_mask), (g3, teacher_mask) = model.masks
    assert (g1, g2, g3) == (True, True, False)
    assert fm_mask.shape[0] == 12 and sc_mask.shape[0] == 4
    assert torch.equal(sc_mask, teacher_mask)


def test_fm_fraction_one_is_pure_flow_matching():
    objective = make_objective(fm_fraction=1.0)
    net = random_mlp(3, seed=4)
    data, _ = inputs(4)
    batch = objective.sample_batch(data, step=0, total_steps=10, generator=torch.Generator().manual_seed(4))
    assert batch.consistency is None
    out = objective.loss(net, batch)
    fm = batch.flow_matching
    direct = FlowMatchingLoss(weighting=objective.weighting)(net, fm.x_t, fm.v_t, fm.t)
    torch.testing.assert_close(out.backprop, direct.backprop, rtol=0, atol=0)
    assert out.consistency is None and "consistency_mse" not in out.metrics


def test_fm_fraction_zero_is_pure_consistency():
    batch = make_objective(fm_fraction=0.0).sample_batch(torch.randn(8, 2), step=0, total_steps=5)
    assert batch.flow_matching is None and batch.consistency.t.shape == (8,)


@pytest.mark.parametrize(
    ("b", "lam", "expected"),
    [(32, 0.75, (24, 8)), (128, 0.0, (0, 128)), (10, 0.7, (7, 3)), (100, 0.29, (28, 72)), (1, 0.75, (0, 1))],
)
def test_split_sizes_use_int_rounding(b, lam, expected):
    assert split_sizes(b, lam) == expected


@given(seed=st.integers(0, 2**16))
def test_objective_is_permutation_equivariant(seed):
    """Permuting each sub-batch permutes every per-sample value, bit for bit.

    The backbone is batch-invariant (`RowByRow`): a batched matmul may round a row differently
    at another position in the batch, which is the backbone's doing, not the objective's. The
    scalar to backpropagate adds the same B per-sample values in another order, so the two differ
    by at most twice the rounding bound of that sum: each value x_b/B goes through at most B − 1
    additions and three more roundings (the division by its sub-batch size N, the scaling by
    N/B and the rounding of N/B itself).
    """
    objective = make_objective(guidance=CFG)
    net = RowByRow(random_mlp(3, seed=seed, num_classes=5))
    data, labels = inputs(seed, n=16)
    batch = objective.sample_batch(data, labels, step=2, total_steps=8, generator=torch.Generator().manual_seed(seed))
    out = objective.loss(net, batch)
    perms = {}

    def permute(part, n):
        if part is None:
            return None
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + n))
        perms[id(part)] = perm
        fields = {f.name: getattr(part, f.name) for f in dataclasses.fields(part)}
        return dataclasses.replace(part, **{k: v[perm] for k, v in fields.items() if v is not None})

    permuted = dataclasses.replace(
        batch, flow_matching=permute(batch.flow_matching, 12), consistency=permute(batch.consistency, 4)
    )
    out_p = objective.loss(net, permuted)
    for a, b, part in (
        (out.flow_matching, out_p.flow_matching, batch.flow_matching),
        (out.consistency, out_p.consistency, batch.consistency),
    ):
        assert torch.equal(a.per_sample[perms[id(part)]], b.per_sample)
    per_sample = flatten_per_sample(out).detach()
    bound = 2 * summation_error_bound(per_sample / per_sample.shape[0], extra_roundings=3)
    assert bool((out.backprop - out_p.backprop).abs() <= bound), ((out.backprop - out_p.backprop).abs(), bound)


def test_presets_reproduce_reference_recipes():
    imagenet = SoFlowObjective.from_preset("imagenet")
    assert imagenet.fm_fraction == 0.75
    assert imagenet.weighting == AdaptiveWeighting(p=1.0, eps=0.01)
    assert imagenet.fm_time == LogitNormal(mean=-0.2, std=1.0)
    assert imagenet.consistency_times == ConsistencyTimeSampler(
        t_distribution=LogitNormal(mean=0.2, std=0.8),
        s_distribution=LogitNormal(mean=-1.0, std=0.8),
        schedule=ExponentSchedule(r_init=0.1, r_end=0.002),
    )
    assert imagenet.guidance == ClassifierFreeGuidance(
        scale=3.0, mix=0.25, drop_rate=0.1, decay_time=0.8, null_cond=1000
    )
    assert isinstance(imagenet.path, LinearPath)
    cifar = SoFlowObjective.from_preset("CIFAR10")
    assert cifar.fm_fraction == 0.0 and cifar.guidance is None
    assert cifar.weighting == AdaptiveWeighting(p=0.75, eps=1e-3)
    assert cifar.consistency_times == ConsistencyTimeSampler(
        t_distribution=LogitNormal(mean=-0.9, std=1.6),
        s_distribution=LogitNormal(mean=-4.0, std=1.6),
        schedule=ExponentSchedule(r_init=1.0, r_end=0.0003125),
    )
    assert SoFlowObjective.from_preset("cifar10", fm_fraction=0.5).fm_fraction == 0.5


def test_preset_for_a_model_with_fewer_classes():
    from soflow_core.nets import DiT

    net = DiT(input_size=8, in_channels=2, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=10)
    objective = SoFlowObjective.from_preset("imagenet", num_classes=10)
    assert objective.guidance.null_cond == 10 and objective.guidance.scale == 3.0
    labels = torch.arange(8) % 10
    out = objective(
        net, torch.randn(8, 2, 8, 8), labels, step=0, total_steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(out.backprop)
    with pytest.raises(ValueError, match="num_classes: preset 'cifar10' has no guidance"):
        SoFlowObjective.from_preset("cifar10", num_classes=10)
    with pytest.raises(ValueError, match="num_classes must be >= 1; got 0"):
        SoFlowObjective.from_preset("imagenet", num_classes=0)


def test_toy_preset_is_the_documented_recipe():
    toy = SoFlowObjective.from_preset("toy")
    assert toy.fm_fraction == 0.25 and toy.guidance is None
    assert toy.weighting == AdaptiveWeighting(p=0.35, eps=1.0)
    assert toy.fm_time == LogitNormal(mean=-0.2, std=1.0)
    assert toy.consistency_times == ConsistencyTimeSampler(
        t_distribution=Uniform(low=0.0, high=1.0),
        s_distribution=LogitNormal(mean=-3.0, std=1.5),
        schedule=ExponentSchedule(r_init=1.0, r_end=0.002),
    )
    assert isinstance(toy.path, LinearPath) and isinstance(toy.param, EulerParam)


def test_image_shaped_data_and_float32():
    net = ConvNet(channels=2)
    data = torch.randn(6, 2, 5, 7)
    out = make_objective(fm_fraction=0.5)(net, data, step=0, total_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.backprop.dtype == torch.float32
    out.backprop.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_same_generator_seed_same_step():
    net = random_mlp(3, seed=0)
    data, _ = inputs(0)
    objective = make_objective()
    a = objective(net, data, step=5, total_steps=9, generator=torch.Generator().manual_seed(7))
    b = objective(net, data, step=5, total_steps=9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.backprop, b.backprop)


def test_explicit_noise_is_used():
    objective = make_objective(fm_fraction=1.0)
    data = torch.randn(4, 3, dtype=torch.float64)
    noise = torch.randn(4, 3, dtype=torch.float64)
    batch = objective.sample_batch(data, step=0, total_steps=1, noise=noise)
    t = batch.flow_matching.t[:, None]
    torch.testing.assert_close(batch.flow_matching.x_t, (1 - t) * data + t * noise)


def test_nonfinite_loss_is_visible_in_metrics():
    def exploding(x, t, s, cond):
        return x * float("inf")

    out = make_objective()(exploding, torch.randn(8, 2), step=0, total_steps=2)
    assert out.metrics["finite"].item() == 0.0
    out = make_objective()(random_mlp(2).float(), torch.randn(8, 2), step=0, total_steps=2)
    assert out.metrics["finite"].item() == 1.0


def test_path_and_param_by_name():
    objective = SoFlowObjective(path="Trig", param="trig")
    assert isinstance(objective.path, TrigPath) and isinstance(objective.param, TrigParam)


def test_bf16_autocast_keeps_loss_math_in_float32():
    net = random_mlp(3, seed=0, dtype=torch.float32)
    data = torch.randn(16, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = make_objective()(net, data, step=0, total_steps=4, generator=torch.Generator().manual_seed(0))
    assert out.backprop.dtype == torch.float32
    assert out.consistency.quotient_mse.dtype == torch.float32
    out.backprop.backward()
    assert out.metrics["finite"].item() == 1.0
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


def test_objective_traces_under_torch_compile():
    """Dynamo traces the whole call (value checks are skipped while compiling); results match eager.

    The test-time jaxtyping/beartype wrappers cannot be traced (that is why the library has no
    decorators on hot paths), so they are off here, as they are in production.
    """
    torch._dynamo.reset()
    net = random_mlp(3, seed=0, dtype=torch.float32)
    data = torch.randn(16, 3)
    objective = make_objective()
    eager = objective(net, data, step=2, total_steps=8, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(objective, backend="eager")
    with shape_checks_off():
        out = compiled(net, data, step=2, total_steps=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.backprop, eager.backprop)
    out.backprop.backward()
