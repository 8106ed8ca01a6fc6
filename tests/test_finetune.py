"""Fine-tuning a converted velocity model: the pretrained-velocity step to x_ℓ and the "finetune" preset."""

import copy
import dataclasses

import pytest
import torch
from _helpers import shape_checks_off

from soflow_core import EulerParam, SoFlowObjective
from soflow_core.nets import MLPBackbone, from_velocity_model
from soflow_core.objective import with_pretrained_velocity
from soflow_core.time_samplers import ExponentSchedule


def trained_velocity_model(seed=0):
    """An MLP whose F(x, t, t) is a non-trivial velocity (random output layer), converted to F(x, t, s) = v(x, t)."""
    torch.manual_seed(seed)
    net = MLPBackbone(dim=2, width=32, depth=2, time_features=16)
    with torch.no_grad():
        net.output.weight.normal_(0.0, 0.5)
        net.output.bias.normal_(0.0, 0.2)
    return from_velocity_model(net).model.train()


def test_with_pretrained_velocity_replaces_the_consistency_velocity_only():
    objective = SoFlowObjective.from_preset("toy")
    model = trained_velocity_model()
    batch = objective.sample_batch(
        torch.randn(16, 2), step=0, total_steps=10, generator=torch.Generator().manual_seed(0)
    )
    replaced = with_pretrained_velocity(batch, model, param=objective.param)
    assert replaced.flow_matching is batch.flow_matching
    sc = batch.consistency
    with torch.no_grad():
        expected = model(sc.x_t, sc.t, sc.t, None)
    torch.testing.assert_close(replaced.consistency.v_t, expected)
    assert not replaced.consistency.v_t.requires_grad
    for name in ("x_t", "t", "s", "ell"):
        assert getattr(replaced.consistency, name) is getattr(sc, name)


def test_converted_model_with_its_own_velocity_is_a_fixed_point_at_r_one():
    """With r = 1, ℓ = s and f(x_ℓ, s, s) = x_t + v_pre·(s − t): what the converted network returns."""
    schedule = ExponentSchedule(r_init=1.0, r_end=0.002)
    base = SoFlowObjective.from_preset("toy", fm_fraction=0.0)
    base = dataclasses.replace(base, consistency_times=dataclasses.replace(base.consistency_times, schedule=schedule))
    model = trained_velocity_model()
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))

    def mse(objective, **kwargs):
        out = objective(model, data, step=0, total_steps=100, generator=torch.Generator().manual_seed(2), **kwargs)
        return float(out.metrics["consistency_mse"])

    pretrained = dataclasses.replace(base, consistency_velocity="pretrained")
    assert mse(pretrained, velocity_model=frozen) < 1e-10
    assert mse(base) > 1e-2  # the conditional velocity is not the model's: no fixed point


def test_pretrained_consistency_velocity_needs_its_model():
    model = trained_velocity_model()
    data = torch.randn(8, 2)
    pretrained = SoFlowObjective.from_preset("toy", consistency_velocity="pretrained")
    with pytest.raises(ValueError, match=r"velocity_model: consistency_velocity='pretrained'"):
        pretrained(model, data, step=0, total_steps=10)
    with pytest.raises(ValueError, match=r"velocity_model was given, but consistency_velocity='conditional'"):
        SoFlowObjective.from_preset("toy")(model, data, step=0, total_steps=10, velocity_model=model)
    with shape_checks_off(), pytest.raises(ValueError, match=r"unknown consistency_velocity 'teacher'"):
        SoFlowObjective(consistency_velocity="teacher")


def test_call_with_velocity_model_is_sample_batch_then_with_pretrained_velocity_then_loss():
    objective = SoFlowObjective.from_preset("toy", consistency_velocity="pretrained")
    model = trained_velocity_model()
    frozen = trained_velocity_model(seed=1).eval()
    data = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    out = objective(
        model, data, step=3, total_steps=10, generator=torch.Generator().manual_seed(4), velocity_model=frozen
    )
    batch = objective.sample_batch(data, step=3, total_steps=10, generator=torch.Generator().manual_seed(4))
    expected = objective.loss(model, with_pretrained_velocity(batch, frozen, param=EulerParam()))
    torch.testing.assert_close(out.backprop, expected.backprop)


def test_finetune_preset_is_the_toy_recipe_stepping_along_the_pretrained_velocity():
    toy, finetune = SoFlowObjective.from_preset("toy"), SoFlowObjective.from_preset("finetune")
    assert finetune.consistency_velocity == "pretrained" and toy.consistency_velocity == "conditional"
    assert dataclasses.replace(finetune, consistency_velocity="conditional") == toy
    # r starts at 1, where a converted network fine-tuned from its own weights is a fixed point
    assert finetune.consistency_times.schedule(0, 100) == 1.0


def test_pretrained_velocity_gets_each_samples_omega_only_when_it_is_omega_conditioned():
    from soflow_core import ClassifierFreeGuidance
    from soflow_core.guidance import GuidanceScaleDistribution

    guidance = ClassifierFreeGuidance(scale=GuidanceScaleDistribution(low=1.0, high=3.0), null_cond=4)
    objective = dataclasses.replace(SoFlowObjective.from_preset("toy"), guidance=guidance)
    generator = torch.Generator().manual_seed(0)
    batch = objective.sample_batch(
        torch.randn(16, 2), torch.randint(0, 4, (16,)), step=0, total_steps=10, generator=generator
    )
    sc = batch.consistency
    assert sc.omega is not None
    torch.manual_seed(0)
    conditioned = MLPBackbone(dim=2, num_classes=4, width=16, depth=1, omega_range=(1.0, 3.0)).eval()
    with torch.no_grad():
        conditioned.output.weight.normal_(0.0, 0.5)
        for p in conditioned.omega_embedding.parameters():
            p.normal_(0.0, 0.5)  # ω moves the output, so a missing or wrong ω would show
        expected = conditioned(sc.x_t, sc.t, sc.t, sc.cond, omega=sc.omega)
    replaced = with_pretrained_velocity(batch, conditioned, param=objective.param)
    torch.testing.assert_close(replaced.consistency.v_t, expected)
    # a plain velocity model (not ω-conditioned) is called without ω, though the batch draws it
    plain = MLPBackbone(dim=2, num_classes=4, width=16, depth=1).eval()
    with torch.no_grad():
        plain.output.weight.normal_(0.0, 0.5)
        expected = plain(sc.x_t, sc.t, sc.t, sc.cond)
    torch.testing.assert_close(with_pretrained_velocity(batch, plain, param=objective.param).consistency.v_t, expected)
