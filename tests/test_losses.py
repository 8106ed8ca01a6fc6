import pytest
import torch
from _helpers import MaskRecorder, RowByRow, grads, random_mlp, summation_error_bound, zero_grads
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from soflow_core import (
    AdaptiveWeighting,
    ClassifierFreeGuidance,
    EulerParam,
    FlowMatchingLoss,
    LinearPath,
    SolutionConsistencyLoss,
    TrigParam,
    TrigPath,
    flow_matching_loss,
)
from soflow_core.losses import consistency_quotient

PARAMS = {"euler": EulerParam(), "trig": TrigParam()}


def draw(seed, n=6, dim=3, gap=None):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, dim, generator=g, dtype=torch.float64)
    noise = torch.randn(n, dim, generator=g, dtype=torch.float64)
    t = 0.05 + 0.95 * torch.rand(n, generator=g, dtype=torch.float64)
    s = (t - 1e-4) * torch.rand(n, generator=g, dtype=torch.float64)  # the sampler keeps s <= t - 1e-4
    frac = (
        torch.rand(n, generator=g, dtype=torch.float64) if gap is None else torch.full((n,), gap, dtype=torch.float64)
    )
    ell = torch.minimum(t + (s - t) * frac, t - 1e-4)
    return data, noise, t, s, ell


@pytest.mark.parametrize("kind", ["euler", "trig"])
@given(seed=st.integers(0, 2**16), p=st.sampled_from([0.0, 0.75, 1.0]), eps=st.sampled_from([1e-3, 1e-2]))
def test_surrogate_gradient_equals_explicit_weighted_mse(kind, seed, p, eps):
    """∇ surrogate = ∇ mean_i w/(2|b|(t−ℓ))·(1/n)‖f_t − sg f_ℓ‖² (the constant is 1/2), to 1e-10 in float64."""
    param = PARAMS[kind]
    net = random_mlp(3, seed=seed)
    data, noise, t, s, ell = draw(seed)
    x_t = LinearPath().sample(data, noise, t).x_t
    v = noise - data
    loss = SolutionConsistencyLoss(param=param, weighting=AdaptiveWeighting(p=p, eps=eps))
    out = loss(net, x_t, v, t, s, ell)
    zero_grads(net)
    out.backprop.backward()
    g_sur = grads(net)

    zero_grads(net)
    f_t = param.combine(x_t, net(x_t, t, s, None), t, s)
    with torch.no_grad():
        x_ell = x_t + v * (ell - t)[:, None]
        f_ell = param.combine(x_ell, net(x_ell, ell, s, None), ell, s)
        q = (f_t - f_ell) / (t - ell)[:, None]
        w = 1 / ((q**2).mean(1) + eps) ** p
    b = param.b(t, s)
    explicit = (w / (2 * b.abs() * (t - ell)) * ((f_t - f_ell) ** 2).mean(1)).mean()
    explicit.backward()
    for a, e in zip(g_sur, grads(net)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    # the reported equivalent loss is the value of that explicit form, the mse is mean q²
    torch.testing.assert_close(out.equivalent_loss.mean(), explicit.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.quotient_mse, (q**2).mean(1), rtol=1e-12, atol=1e-14)


def test_surrogate_value_is_not_the_loss():
    net = random_mlp(3, seed=1)
    data, noise, t, s, ell = draw(1, n=16)
    x_t = LinearPath().sample(data, noise, t).x_t
    out = SolutionConsistencyLoss()(net, x_t, noise - data, t, s, ell)
    assert not torch.allclose(out.backprop.detach(), out.equivalent_loss.mean())
    assert bool((out.equivalent_loss >= 0).all())
    assert not out.quotient_mse.requires_grad and not out.weight.requires_grad
    assert not out.equivalent_loss.requires_grad


@pytest.mark.parametrize("kind", ["euler", "trig"])
def test_flow_matching_loss_formula(kind):
    param = PARAMS[kind]
    g = torch.Generator().manual_seed(0)
    v_pred = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64)
    out = flow_matching_loss(v_pred, target, t, param=param, weighting=AdaptiveWeighting(p=1.0, eps=0.01))
    mse = ((v_pred - target) ** 2).mean(1)
    d_b = 1.0 if kind == "euler" else torch.pi / 2
    w = 1 / (d_b * (mse.detach() + 0.01))
    torch.testing.assert_close(out.backprop, (w * mse).mean())
    (grad,) = torch.autograd.grad(out.backprop, v_pred)
    # gradient is w·(2/n)·Δ / B: the factor 2 of the reference's FM loss
    torch.testing.assert_close(grad, (w[:, None] * 2 / 4 * (v_pred - target) / 5).detach())


def test_consistency_quotient():
    f_t, f_ell = torch.ones(2, 3), torch.zeros(2, 3)
    q = consistency_quotient(f_t, f_ell, torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.4]))
    torch.testing.assert_close(q[:, 0], torch.tensor([4.0, 10.0]))


@given(seed=st.integers(0, 2**16))
def test_losses_are_permutation_equivariant(seed):
    """Permuting the batch permutes every per-sample value, bit for bit.

    The backbone is batch-invariant (`RowByRow`): a batched matmul may round a row differently
    at another position in the batch, which is the backbone's doing, not the loss's. The batch
    mean adds the same n values in another order, so the two means differ by at most twice the
    rounding bound of that sum (one more rounding for the division by n).
    """
    g = torch.Generator().manual_seed(seed)
    n = 7
    perm = torch.randperm(n, generator=g)
    net = RowByRow(random_mlp(3, seed=seed))
    data, noise, t, s, ell = draw(seed, n=n)
    x_t = LinearPath().sample(data, noise, t).x_t
    v = noise - data
    sc = SolutionConsistencyLoss()
    a = sc(net, x_t, v, t, s, ell)
    b = sc(net, x_t[perm], v[perm], t[perm], s[perm], ell[perm])
    assert torch.equal(a.per_sample[perm], b.per_sample)
    assert torch.equal(a.quotient_mse[perm], b.quotient_mse)
    assert torch.equal(a.weight[perm], b.weight)
    assert torch.equal(a.equivalent_loss[perm], b.equivalent_loss)
    bound = 2 * summation_error_bound(a.per_sample.detach() / n, extra_roundings=1)
    assert bool((a.backprop - b.backprop).abs() <= bound), ((a.backprop - b.backprop).abs(), bound)
    fm = FlowMatchingLoss()
    a = fm(net, x_t, v, t)
    b = fm(net, x_t[perm], v[perm], t[perm])
    assert torch.equal(a.per_sample[perm], b.per_sample)
    assert torch.equal(a.mse[perm], b.mse)


def test_flow_matching_loss_with_guidance_uses_null_condition_for_dropped_samples():
    calls = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = random_mlp(2, num_classes=4)

        def forward(self, x, t, s, cond):
            calls.append((torch.is_grad_enabled(), cond.clone()))
            return self.net(x, t, s, cond)

    model = Recorder()
    x_t, v_t, t = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), torch.rand(4)
    labels = torch.tensor([0, 1, 2, 3])
    mask = torch.tensor([False, True, False, True])
    cfg = ClassifierFreeGuidance(scale=2.0, mix=0.5, drop_rate=0.2, decay_time=0.8, null_cond=4)
    out = FlowMatchingLoss()(model, x_t, v_t, t.double(), labels, guidance=cfg, drop_mask=mask)
    assert [grad for grad, _ in calls] == [False, True]
    assert calls[0][1].tolist() == [4, 4, 4, 4]  # unconditional velocity
    assert calls[1][1].tolist() == [0, 4, 2, 4]  # trained prediction with labels dropped
    out.backprop.backward()


def test_teacher_pass_replays_the_dropout_masks_of_the_grad_pass():
    model = MaskRecorder().train()
    data, noise, t, s, ell = draw(0, n=32)
    x_t = LinearPath().sample(data, noise, t).x_t
    out = SolutionConsistencyLoss()(model, x_t, noise - data, t, s, ell)
    (grad_on, student), (grad_off, teacher) = model.masks
    assert grad_on and not grad_off
    assert torch.equal(student, teacher)
    assert 0 < int(student.sum()) < student.numel()  # dropout really dropped something
    # without the replay, two calls draw different masks (so the check above can fail)
    model.masks.clear()
    model(x_t, t, s)
    model(x_t, t, s)
    assert not torch.equal(model.masks[0][1], model.masks[1][1])
    # and the random stream continues as if the teacher pass had not drawn anything
    assert torch.isfinite(out.backprop)


def test_shared_masks_keep_the_quotient_small():
    model = MaskRecorder(p=0.3).train()
    data, noise, t, s, _ = draw(3, n=64)
    ell = t - 1e-4
    x_t = TrigPath().sample(data, noise, t).x_t
    shared = SolutionConsistencyLoss()(model, x_t, noise - data, t, s, ell).quotient_mse.mean()
    # recompute with independent masks: the 1e-4 finite difference blows up
    with torch.no_grad():
        f_t = EulerParam().combine(x_t, model(x_t, t, s), t, s)
        x_ell = x_t + (noise - data) * (ell - t)[:, None]
        f_ell = EulerParam().combine(x_ell, model(x_ell, ell, s), ell, s)
    independent = (((f_t - f_ell) / 1e-4) ** 2).mean()
    assert float(independent) > 100 * float(shared)
