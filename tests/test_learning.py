"""SoFlowObjective really learns a one-step generator: 2-D toy data, a small MLP, a few hundred CPU steps."""

import contextlib
import copy

import pytest
import torch
from _helpers import shape_checks_off

from soflow_core import ClassifierFreeGuidance, EulerParam, SoFlowObjective, sample_one_step
from soflow_core.data import sample_toy_2d
from soflow_core.metrics import energy_distance
from soflow_core.nets import MLPBackbone

STEPS = 600
EVAL = 2000


def train_one_step_generator(objective: SoFlowObjective, *, seed: int, conditional: bool):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = MLPBackbone(dim=2, width=128, depth=2, num_classes=8 if conditional else None)
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    with contextlib.ExitStack() as stack:
        for step in range(STEPS):
            if step == 1:  # shapes and types were checked on the first step; the rest runs unchecked, for speed
                stack.enter_context(shape_checks_off())
            for group in optimizer.param_groups:  # linear decay over the last half
                group["lr"] = 2e-3 * min(1.0, 2 * (STEPS - step) / STEPS)
            data, labels = sample_toy_2d("eight_gaussians", 256, generator=generator)
            out = objective(
                model, data, labels if conditional else None, step=step, total_steps=STEPS, generator=generator
            )
            optimizer.zero_grad()
            out.backprop.backward()
            optimizer.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 0.02)
            assert out.metrics["finite"].item() == 1.0
    return ema


@pytest.mark.slow
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "cfg"])
def test_one_step_samples_approach_the_data(conditional):
    objective = SoFlowObjective()
    if conditional:
        objective = SoFlowObjective(guidance=ClassifierFreeGuidance(scale=1.5, mix=0.5, drop_rate=0.1, null_cond=8))
    model = train_one_step_generator(objective, seed=0, conditional=conditional)
    g = torch.Generator().manual_seed(123)
    real, labels = sample_toy_2d("eight_gaussians", EVAL, generator=g)
    real_again, _ = sample_toy_2d("eight_gaussians", EVAL, generator=g)
    noise = torch.randn(EVAL, 2, generator=g)
    untrained = energy_distance(noise, real)  # F ≡ 0 at initialisation, so the untrained sample is the noise
    floor = energy_distance(real_again, real)
    samples = sample_one_step(model, noise, param=EulerParam(), cond=labels if conditional else None)
    trained = energy_distance(samples, real)
    print(f"energy distance: untrained {untrained:.4f}, one-step {trained:.4f}, real-vs-real floor {floor:.4f}")
    assert trained < untrained / 10  # far below the untrained model
    assert trained < 10 * floor  # within 10x of the real-vs-real floor
