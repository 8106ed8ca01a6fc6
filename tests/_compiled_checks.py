"""Checks of compiled steps that must run without the test-time jaxtyping/beartype import hook.

Dynamo cannot trace the hook's wrappers around soflow_core's classes (it fails on their
``inspect.Signature``), so a step that builds a dataclass inside a ``fullgraph=True`` graph
only compiles in an interpreter where the hook is off, as in production. ``tests/test_compile.py``
runs this file in such an interpreter: ``python tests/_compiled_checks.py`` runs every
``check_*`` function and prints one JSON object, check name to ``"ok"`` or the traceback.
"""

import copy
import json
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _helpers import MaskRecorder, random_mlp

from soflow_core import ClassifierFreeGuidance, SoFlowObjective, SolutionConsistencyLoss
from soflow_core._rng import PassReplay
from soflow_core.train import make_training_step

CFG = ClassifierFreeGuidance(scale=3.0, mix=0.25, drop_rate=0.3, decay_time=0.8, null_cond=5)


def two_passes(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    replay = PassReplay(x.device, enabled=True)
    with replay.record():
        first = layer(x)
    with torch.no_grad(), replay.replay():
        second = layer(2 * x)
    return first, second


def check_replay_shares_the_mask_tensors() -> None:
    layer = nn.Dropout(0.5)
    replay_fn = torch.compile(lambda x: two_passes(layer, x), backend="aot_eager", fullgraph=True)
    first, second = replay_fn(torch.ones(256))
    assert torch.equal(2 * first, second) and 0 < int((first == 0).sum()) < 256
    again, _ = replay_fn(torch.ones(256))
    assert not torch.equal(first, again)  # new masks every call


def check_objective_replays_the_consistency_masks_in_the_teacher() -> None:
    model = MaskRecorder().train()
    objective = SoFlowObjective(check_inputs=False)
    data = torch.randn(16, 3, dtype=torch.float64)
    batch = objective.sample_batch(data, step=0, total_steps=10, generator=torch.Generator().manual_seed(0))
    torch.compile(lambda b: objective.loss(model, b).backprop, backend="aot_eager", fullgraph=True)(batch)
    (g1, fm_mask), (g2, sc_mask), (g3, teacher_mask) = model.masks
    assert (g1, g2, g3) == (True, True, False)
    assert fm_mask.shape[0] == 12 and torch.equal(sc_mask, teacher_mask)
    assert 0 < int(sc_mask.sum()) < sc_mask.numel()


def check_consistency_loss_replays_the_masks_in_the_teacher() -> None:
    model = MaskRecorder(p=0.3).train()
    x, t = torch.randn(32, 3, dtype=torch.float64), torch.full((32,), 0.8, dtype=torch.float64)
    s, ell = t - 0.6, t - 1e-4
    consistency = SolutionConsistencyLoss()

    def loss(x):
        return consistency(model, x, -x, t, s, ell)

    out = torch.compile(loss, backend="aot_eager", fullgraph=True)(x)
    (_, student), (_, teacher) = model.masks
    assert torch.equal(student, teacher)
    # Shared masks keep the 1e-4 finite difference small; independent ones would blow it up.
    assert float(out.quotient_mse.mean()) < 100.0


def check_replay_refuses_draws_it_cannot_share() -> None:
    class NoisyDropout(nn.Module):
        def forward(self, x):
            return nn.functional.dropout(x, 0.5) + torch.bernoulli(torch.full_like(x, 0.5))

    layer = NoisyDropout()
    # fullgraph=True surfaces the refusal; without it dynamo runs the frame eagerly, where the
    # generator state is rewound instead.
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"NotImplementedError.*bernoulli"):
        torch.compile(lambda x: two_passes(layer, x), backend="eager", fullgraph=True)(torch.ones(8))
    first, second = torch.compile(lambda x: two_passes(layer, x), backend="eager")(torch.ones(8))
    assert first.shape == second.shape == (8,)


def check_replay_refuses_a_pass_of_another_shape() -> None:
    """A joint grad call (Flow Matching + consistency samples) cannot hand its masks to the teacher."""
    objective = SoFlowObjective(check_inputs=False, forward_batching="joint")
    model = random_mlp(3, dropout=0.3).train()
    batch = objective.sample_batch(torch.randn(16, 3, dtype=torch.float64), step=0, total_steps=4)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"ValueError.*same batch"):
        torch.compile(lambda b: objective.loss(model, b).backprop, backend="eager", fullgraph=True)(batch)


def check_accumulation_steps_compile_once_and_equal_eager() -> None:
    """Two micro-batches per optimizer step: three graphs at most (the first micro-batch finds no .grad)."""
    objective = SoFlowObjective(guidance=CFG, check_inputs=False)
    net = random_mlp(3, num_classes=5, dtype=torch.float32)
    twin = copy.deepcopy(net)
    counter = CompileCounterWithBackend("aot_eager")
    options = {"accumulation_steps": 2}
    compiled = make_training_step(
        objective, net, torch.optim.AdamW(net.parameters(), lr=1e-2), compile=True, backend=counter, **options
    )
    eager = make_training_step(objective, twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), **options)
    generator = torch.Generator().manual_seed(0)
    data, labels = torch.randn(16, 3), torch.randint(0, 5, (16,))
    frames = []
    for step in range(4):
        for _ in range(2):
            batch = objective.sample_batch(data, labels, step=step, total_steps=4, generator=generator)
            got, want = compiled.accumulate(batch), eager.accumulate(batch)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4)
        for a, b in zip(net.parameters(), twin.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)
        compiled.update()
        eager.update()
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1] <= 3, frames
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def check_autograd_backward_compiles_the_forward_only() -> None:
    objective = SoFlowObjective(check_inputs=False)
    net = random_mlp(3, dtype=torch.float32)
    twin = copy.deepcopy(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    compiled = make_training_step(objective, net, optimizer, compile=True, backward="autograd", backend="aot_eager")
    eager = make_training_step(objective, twin, torch.optim.SGD(twin.parameters(), lr=0.1))
    batch = objective.sample_batch(torch.randn(8, 3), step=0, total_steps=4, generator=torch.Generator().manual_seed(1))
    compiled(batch)
    eager(batch)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def check_traced_step_reproduces_eager_bit_for_bit() -> None:
    """The whole step traced into graphs (no code generation) runs the eager step's ATen ops: equal for 20 steps."""
    objective = SoFlowObjective.from_preset("imagenet", guidance=CFG, check_inputs=False)
    net = random_mlp(3, num_classes=5, dtype=torch.float32)
    twin = copy.deepcopy(net)
    compiled = make_training_step(
        objective, net, torch.optim.SGD(net.parameters(), lr=1e-2), compile=True, backend="aot_eager"
    )
    eager = make_training_step(objective, twin, torch.optim.SGD(twin.parameters(), lr=1e-2))
    generator = torch.Generator().manual_seed(2)
    data, labels = torch.randn(16, 3), torch.randint(0, 5, (16,))
    for step in range(20):
        batch = objective.sample_batch(data, labels, step=step, total_steps=20, generator=generator)
        got, want = compiled(batch), eager(batch)
        assert all(torch.equal(got[key], want[key]) for key in want), step
        assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters())), step


def check_users_compile_of_the_objective_never_recompiles() -> None:
    """torch.compile around objective(...) over a moving r(k, K): no recompile, eager results, one warning.

    Both with dynamo's automatic dynamic shapes and with ``dynamic=False`` (which ``mode=
    "max-autotune"`` users often pass), where every value that moves used to recompile the step
    until the recompile limit.
    """
    import warnings

    objective = SoFlowObjective.from_preset("imagenet", guidance=CFG)
    net = random_mlp(3, num_classes=5, dtype=torch.float32)
    data, labels = torch.randn(16, 3), torch.randint(0, 5, (16,))

    def step(data, k, generator):
        return objective(net, data, labels, step=k, total_steps=10, generator=generator).backprop

    for dynamic in (None, False):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(step, backend=counter, dynamic=dynamic)
        frames = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for k in range(6):  # r(k, 10) moves at every step
                got = compiled(data, k, torch.Generator().manual_seed(k))
                want = step(data, k, torch.Generator().manual_seed(k))
                assert torch.equal(got, want), (dynamic, k, got, want)
                frames.append(counter.frame_count)
        assert frames == [frames[0]] * len(frames), (dynamic, frames)
        if dynamic is None:  # warned once per process: the first loop
            messages = [str(w.message) for w in caught if "make_training_step" in str(w.message)]
            assert len(messages) == 1, messages


def main() -> int:
    torch.set_num_threads(1)
    checks = {name: fn for name, fn in globals().items() if name.startswith("check_")}
    results = {}
    for name, check in checks.items():
        torch._dynamo.reset()
        try:
            check()
            results[name] = "ok"
        except BaseException:  # pytest.raises failures are BaseExceptions
            results[name] = traceback.format_exc()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
