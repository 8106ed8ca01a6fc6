"""``backprop`` is right to first order only; ``differentiable_loss`` has the loss's own second derivatives.

Hessian-vector products in float64 on a tiny MLP, against autograd of the explicit loss written out
here from the paper's equations (Flow Matching: mean_i sg(w_i)·mse_i; consistency: the weighted
MSE over (t − ℓ)² with the constant 1/2, with the teacher f_ℓ and the weights held constant).
"""

import torch
from _helpers import random_mlp

from soflow_core import SoFlowObjective, solution_consistency_loss
from soflow_core.losses import consistency_equivalent_loss, teacher_state


def explicit_loss(model, objective: SoFlowObjective, batch) -> torch.Tensor:
    param, p, eps = objective.param, objective.weighting.p, objective.weighting.eps
    fm, sc = batch.flow_matching, batch.consistency

    def col(x: torch.Tensor) -> torch.Tensor:
        return x[:, None]

    velocity = col(param.d_s_a(fm.t, fm.t)) * fm.x_t + col(param.d_s_b(fm.t, fm.t)) * model(fm.x_t, fm.t, fm.t)
    fm_mse = (velocity - fm.v_t).square().mean(dim=1)
    fm_loss = ((fm_mse.detach() + eps) ** -p * fm_mse).mean()

    f_t = col(param.a(sc.t, sc.s)) * sc.x_t + col(param.b(sc.t, sc.s)) * model(sc.x_t, sc.t, sc.s)
    with torch.no_grad():
        x_ell = sc.x_t + sc.v_t * col(sc.ell - sc.t)
        f_ell = col(param.a(sc.ell, sc.s)) * x_ell + col(param.b(sc.ell, sc.s)) * model(x_ell, sc.ell, sc.s)
    gap = sc.t - sc.ell
    quotient_mse = ((f_t - f_ell) / col(gap)).square().mean(dim=1)
    weight = (quotient_mse.detach() + eps) ** -p
    sc_loss = (weight / (2 * param.b(sc.t, sc.s).abs() * gap) * (f_t - f_ell).square().mean(dim=1)).mean()
    n_fm, n_c = fm.t.shape[0], sc.t.shape[0]
    return (fm_loss * n_fm + sc_loss * n_c) / (n_fm + n_c)


def gradient_and_hvp(loss: torch.Tensor, params: list, vector: list) -> tuple[list, list]:
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(grads, params, grad_outputs=vector)
    return [g.detach() for g in grads], list(hvp)


def test_differentiable_loss_gives_the_hessian_vector_product_of_the_explicit_loss():
    model = random_mlp(3)
    objective = SoFlowObjective(differentiable_loss=True)
    data = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batch = objective.sample_batch(data, step=2, total_steps=10, generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    vector = [torch.randn_like(q) for q in params]

    out = objective.loss(model, batch)
    grad_exp, hvp_exp = gradient_and_hvp(explicit_loss(model, objective, batch), params, vector)
    grad_diff, hvp_diff = gradient_and_hvp(objective.loss(model, batch).differentiable_loss, params, vector)
    grad_sur, hvp_sur = gradient_and_hvp(out.backprop, params, vector)

    for g_exp, g_diff, g_sur in zip(grad_exp, grad_diff, grad_sur):
        torch.testing.assert_close(g_diff, g_exp, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_sur, g_exp, rtol=1e-10, atol=1e-12)  # the surrogate is right to first order
    for h_exp, h_diff in zip(hvp_exp, hvp_diff):
        torch.testing.assert_close(h_diff, h_exp, rtol=1e-10, atol=1e-12)
    differs = max(float((h_sur - h_exp).abs().max()) for h_sur, h_exp in zip(hvp_sur, hvp_exp))
    assert differs > 1e-6, "the surrogate's second derivatives are not the loss's"
    torch.testing.assert_close(out.differentiable_loss.detach(), explicit_loss(model, objective, batch).detach())


def test_differentiable_loss_is_off_by_default():
    out = SoFlowObjective()(random_mlp(3), torch.randn(8, 3, dtype=torch.float64), step=0, total_steps=4)
    assert out.differentiable_loss is None


def test_equivalent_loss_has_the_value_the_fused_rows_report():
    model = random_mlp(3)
    objective = SoFlowObjective(fm_fraction=0.0)
    data = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sc = objective.sample_batch(data, step=1, total_steps=4, generator=torch.Generator().manual_seed(4)).consistency
    param = objective.param
    with torch.no_grad():
        x_ell = teacher_state(sc.x_t, sc.v_t, sc.t, sc.ell)
        f_ell = param.combine(x_ell, model(x_ell, sc.ell, sc.s), sc.ell, sc.s)
    output = model(sc.x_t, sc.t, sc.s)
    fused = solution_consistency_loss(
        output, sc.x_t, f_ell, sc.t, sc.s, sc.ell, param=param, weighting=objective.weighting, backend="torch"
    )
    explicit = consistency_equivalent_loss(output, sc.x_t, f_ell, sc.t, sc.s, sc.ell, fused.weight, param=param)
    assert explicit.requires_grad
    torch.testing.assert_close(explicit.detach(), fused.equivalent_loss, rtol=1e-12, atol=1e-14)
