"""The objective works unchanged on DDP- and FSDP2-wrapped models, and compiled under DDP (2 CPU processes, gloo)."""

import pytest
import torch
from _helpers import spawn_gloo_ranks

from soflow_core import ClassifierFreeGuidance, SoFlowObjective
from soflow_core.nets import MLPBackbone
from soflow_core.train import make_training_step

CFG = ClassifierFreeGuidance(scale=2.0, mix=0.5, drop_rate=0.2, null_cond=4)


def make_model(dropout: float) -> MLPBackbone:
    torch.manual_seed(0)
    model = MLPBackbone(dim=3, width=16, depth=2, num_classes=4, dropout=dropout).double()
    torch.nn.init.normal_(model.output.weight, std=0.3)
    return model


def rank_inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)


def backward_one_step(model, rank: int, *, compiled: bool = False) -> None:
    """One objective step on this rank's data; dropout draws from a per-rank seed.

    ``compiled``: the step of ``make_training_step(compile=True)``, whose ``backward="auto"``
    runs the compiled backward through autograd for a DDP model, so DDP's hooks still average.
    """
    data, labels = rank_inputs(rank)
    torch.manual_seed(7 + rank)
    objective = SoFlowObjective(guidance=CFG)
    generator = torch.Generator().manual_seed(rank)
    if compiled:
        batch = objective.sample_batch(data, labels, step=1, total_steps=5, generator=generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        make_training_step(objective, model, optimizer, compile=True, backend="aot_eager").accumulate(batch)
        return
    out = objective(model, data, labels, step=1, total_steps=5, generator=generator)
    out.backprop.backward()


def local_gradients(rank: int, dropout: float) -> list[torch.Tensor]:
    """What one rank's gradient is without any wrapper (same seeds as the wrapped run)."""
    model = make_model(dropout)
    backward_one_step(model, rank)
    return [p.grad.detach().clone() for p in model.parameters()]


def worker(rank: int, world: int, wrapper: str, dropout: float, result_file: str) -> None:
    model = make_model(dropout)
    if wrapper.startswith("ddp"):
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        wrapped = fully_shard(model)
    backward_one_step(wrapped, rank, compiled=wrapper.endswith("-compiled"))
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
    if rank == 0:
        torch.save([g.detach().clone() for g in grads], result_file)


def check_rank_average(wrapper: str, dropout: float, tmp_path) -> None:
    result_file = str(tmp_path / "grads.pt")
    spawn_gloo_ranks(worker, wrapper, dropout, result_file, world=2, tmp_path=tmp_path)
    got = torch.load(result_file)
    expected = [(a + b) / 2 for a, b in zip(local_gradients(0, dropout), local_gradients(1, dropout))]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["joint-call", "split-calls"])
def test_wrapped_model_gradients_are_the_rank_average(wrapper, dropout, tmp_path):
    check_rank_average(wrapper, dropout, tmp_path)


@pytest.mark.parametrize("wrapper", ["ddp-compiled", "fsdp2-compiled"])
def test_compiled_step_gradients_are_the_rank_average(wrapper, tmp_path):
    """make_training_step(compile=True) leaves the wrapper's gradient averaging in place (dropout, split calls)."""
    check_rank_average(wrapper, 0.2, tmp_path)
