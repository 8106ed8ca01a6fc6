"""PassReplay: the teacher pass sees the student pass's dropout masks (eagerly; compiled: tests/test_compile.py)."""

import functools

import pytest
import torch
from _helpers import random_mlp
from torch import nn

from soflow_core import SoFlowObjective, SolutionConsistencyLoss
from soflow_core._rng import PassReplay, has_active_dropout, may_use_dropout, reachable_modules


def two_passes(layer: nn.Module, x: torch.Tensor, replay: PassReplay) -> tuple[torch.Tensor, torch.Tensor]:
    with replay.record():
        first = layer(x)
    with torch.no_grad(), replay.replay():
        second = layer(2 * x)
    return first, second


def test_eager_replay_repeats_the_masks_and_keeps_the_stream():
    layer = nn.Dropout(0.5)
    torch.manual_seed(0)
    first, second = two_passes(layer, torch.ones(64), PassReplay("cpu", enabled=True))
    after = torch.rand(4)
    assert torch.equal(2 * first, second) and 0 < int((first == 0).sum()) < 64
    # The stream goes on as if the second pass had drawn nothing.
    torch.manual_seed(0)
    layer(torch.ones(64))
    assert torch.equal(torch.rand(4), after)


def test_disabled_replay_reads_no_generator_state(monkeypatch):
    reads = []
    monkeypatch.setattr(torch, "get_rng_state", lambda: reads.append(1) or torch.ByteTensor(0))
    first, second = two_passes(nn.Identity(), torch.ones(4), PassReplay("cpu", enabled=False))
    assert reads == [] and torch.equal(2 * first, second)


def test_replay_without_record_is_refused():
    replay = PassReplay("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="record"), replay.replay():
        pass


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_the_objective_reads_the_generator_state_only_for_dropout(monkeypatch, dropout):
    """No snapshot (a host sync on CUDA) unless the backbone has active dropout."""
    reads = []
    get_state = torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: reads.append(1) or get_state())
    net = random_mlp(3, dropout=dropout).train()
    assert may_use_dropout(net) == (dropout > 0) == has_active_dropout(net)
    data = torch.randn(8, 3, dtype=torch.float64)
    SoFlowObjective()(net, data, step=0, total_steps=4, generator=torch.Generator().manual_seed(0))
    SolutionConsistencyLoss()(net, data, data, torch.full((8,), 0.5), torch.full((8,), 0.1), torch.full((8,), 0.4))
    assert (len(reads) > 0) == (dropout > 0)


def test_a_callable_that_is_not_a_module_is_always_replayed():
    assert may_use_dropout(lambda x, t, s, cond: x)
    assert not may_use_dropout(random_mlp(3))


def dropout_net(dropout: float) -> nn.Module:
    return random_mlp(3, dropout=dropout).train()


def call_functionally(module: nn.Module, params: dict, x, t, s, cond=None):
    return torch.func.functional_call(module, params, (x, t, s, cond))


class HoldsTheNetwork:
    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, x, t, s, cond=None):
        return self.net(x, t, s, cond)


WRAPPERS = {
    "compiled-module": lambda net: torch.compile(net),
    "compiled-function": lambda net: torch.compile(lambda x, t, s, cond=None: net(x, t, s, cond)),
    "partial-functional_call": lambda net: functools.partial(call_functionally, net, dict(net.named_parameters())),
    "closure-functional_call": lambda net: (
        lambda x, t, s, cond=None: torch.func.functional_call(net, dict(net.named_parameters()), (x, t, s, cond))
    ),
    "bound-method": lambda net: net.forward,
    "callable-object": HoldsTheNetwork,
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_dropout_is_seen_through_wrappers(wrapper, dropout):
    net = dropout_net(dropout)
    wrapped = WRAPPERS[wrapper](net)
    assert has_active_dropout(wrapped) == (dropout > 0) == may_use_dropout(wrapped)
    objective = SoFlowObjective()
    assert objective.use_joint_forward(wrapped) == (dropout == 0)
    assert objective.replays_dropout(wrapped) == (dropout > 0)
    net.eval()
    assert not has_active_dropout(wrapped)


def test_dropout_masks_are_shared_through_a_functional_call_wrapper():
    """A partial(functional_call, ...) backbone shares the student's masks with the teacher, as the module does."""
    net = dropout_net(0.3)
    wrapped = WRAPPERS["partial-functional_call"](net)
    data = torch.randn(8, 3, dtype=torch.float64)
    losses = []
    for backbone in (net, wrapped):
        torch.manual_seed(5)
        out = SoFlowObjective()(backbone, data, step=0, total_steps=4, generator=torch.Generator().manual_seed(0))
        losses.append(out.metrics["consistency_mse"])
    assert torch.equal(losses[0], losses[1])


def test_a_callable_reaching_no_module_is_split_and_replayed():
    opaque = lambda x, t, s, cond=None: torch.nn.functional.dropout(x, 0.2)  # noqa: E731
    assert reachable_modules(opaque) == []
    assert not SoFlowObjective().use_joint_forward(opaque)
    assert SoFlowObjective().replays_dropout(opaque)
