"""PassReplay: the teacher pass sees the student pass's dropout masks (eagerly; compiled: tests/test_compile.py)."""

import pytest
import torch
from _helpers import random_mlp
from torch import nn

from soflow_core import SoFlowObjective, SolutionConsistencyLoss
from soflow_core._rng import PassReplay, has_active_dropout, may_use_dropout


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
