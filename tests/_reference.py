"""An independent, deliberately naive re-statement of the SoFlow objective from the spec's formulas.

It calls the network separately for every term (the reference code's structure) and writes the
consistency loss as the explicit weighted MSE, not the surrogate. Tests compare soflow_core's
batched, surrogate-based objective against it.
"""

import math

import torch

from soflow_core import ObjectiveOutput, SoFlowObjective, TrainingBatch


def coefficients(kind: str, t, s):
    if kind == "euler":
        return torch.ones_like(t), s - t, torch.zeros_like(t), torch.ones_like(t)
    half_pi = 0.5 * math.pi
    return (
        torch.cos(half_pi * (s - t)),
        torch.sin(half_pi * (s - t)),
        -half_pi * torch.sin(half_pi * (s - t)),
        half_pi * torch.cos(half_pi * (s - t)),
    )


def col(v, like):
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def velocity(model, kind, x, t, cond):
    _, _, d_a, d_b = coefficients(kind, t, t)
    return col(d_a, x) * x + col(d_b, x) * model(x, t, t, cond)


def decay(t, t_d):
    if t_d >= 1:
        return torch.ones_like(t)
    u = ((1 - t) / (1 - t_d)).clamp(0, 1 - 1e-6)
    return torch.where(t <= t_d, torch.ones_like(t), 1 - torch.exp(-0.025 * u / (1 - u)))


def explicit_objective(model, objective: SoFlowObjective, batch: TrainingBatch, kind: str) -> torch.Tensor:
    """L_FM·N_fm/B + L_eq·N_c/B with L_eq = mean w/(2|b|(t−ℓ))·mean_d (f_t − sg f_ℓ)²."""
    p, eps = objective.weighting.p, objective.weighting.eps
    cfg = objective.guidance if objective.guidance is not None and objective.guidance.scale > 1 else None
    fm, sc = batch.flow_matching, batch.consistency
    total = 0.0

    def target_velocity(part, v_model):
        if cfg is None:
            return part.v_t
        null = torch.full_like(part.cond, cfg.null_cond)
        with torch.no_grad():
            v_unc = velocity(model, kind, part.x_t, part.t, null)
        c = col(decay(part.t, cfg.decay_time), part.x_t)
        v_g = part.v_t + c * (cfg.scale - 1) * (part.v_t - v_unc)
        v_mix = cfg.mix * v_g + (1 - cfg.mix) * v_model.detach()
        return torch.where(col(part.drop_mask, part.x_t), part.v_t, v_mix)

    if fm is not None:
        v_pred = velocity(model, kind, fm.x_t, fm.t, fm.cond)
        target = target_velocity(fm, v_pred)
        mse = ((v_pred - target.detach()) ** 2).flatten(1).mean(1)
        _, _, _, d_b = coefficients(kind, fm.t, fm.t)
        w = (1 / (d_b.abs() * (mse.detach() + eps) ** p)).detach()
        total = total + (w * mse).mean() * fm.t.shape[0] / batch.batch_size
    if sc is not None:
        with torch.no_grad():
            v_model = velocity(model, kind, sc.x_t, sc.t, sc.cond) if cfg is not None else None
        v_tilde = target_velocity(sc, v_model) if cfg is not None else sc.v_t
        a_t, b_t, _, _ = coefficients(kind, sc.t, sc.s)
        f_t = col(a_t, sc.x_t) * sc.x_t + col(b_t, sc.x_t) * model(sc.x_t, sc.t, sc.s, sc.cond)
        with torch.no_grad():
            x_ell = sc.x_t + v_tilde * col(sc.ell - sc.t, sc.x_t)
            a_l, b_l, _, _ = coefficients(kind, sc.ell, sc.s)
            f_ell = col(a_l, x_ell) * x_ell + col(b_l, x_ell) * model(x_ell, sc.ell, sc.s, sc.cond)
        gap = sc.t - sc.ell
        sq = ((f_t - f_ell) ** 2).flatten(1).mean(1)
        w = (1 / (sq.detach() / gap**2 + eps) ** p).detach()
        loss_eq = w / (2 * b_t.abs() * gap) * sq
        total = total + loss_eq.mean() * sc.t.shape[0] / batch.batch_size
    return total


def flatten_per_sample(out: ObjectiveOutput) -> torch.Tensor:
    parts = [p.per_sample for p in (out.flow_matching, out.consistency) if p is not None]
    return torch.cat(parts)
