import pytest
import torch
from _helpers import spawn_gloo_ranks

from soflow_core import check_distinct_draws, step_generator
from soflow_core.seeding import derive_seed, seeded_generator


def draw(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(4, generator=generator)


def test_ranks_and_micro_batches_draw_differently():
    draws = [draw(step_generator(0, 3, j, rank=r, world_size=2)) for j in range(2) for r in range(2)]
    for i in range(len(draws)):
        for k in range(i + 1, len(draws)):
            assert not torch.equal(draws[i], draws[k])


def test_steps_and_streams_draw_differently():
    assert not torch.equal(draw(step_generator(0, 1)), draw(step_generator(0, 2)))
    assert not torch.equal(draw(step_generator(0, 1)), draw(step_generator(0, 1, stream=1)))
    assert not torch.equal(draw(step_generator(0, 1)), draw(step_generator(1, 1)))


def test_same_arguments_give_the_same_draws_so_resume_needs_no_state():
    assert torch.equal(
        draw(step_generator(7, 11, 1, rank=1, world_size=4)), draw(step_generator(7, 11, 1, rank=1, world_size=4))
    )


def test_keyed_on_the_global_micro_batch_index():
    # micro-batch m = j·world_size + rank: 2 ranks without accumulation draw what 1 rank with 2 accumulation steps draws
    for m in range(2):
        two_ranks = draw(step_generator(5, 9, 0, rank=m, world_size=2))
        one_rank = draw(step_generator(5, 9, m, rank=0, world_size=1))
        assert torch.equal(two_ranks, one_rank)
        assert torch.equal(two_ranks, draw(seeded_generator(5, 9, m, 0)))
        assert torch.equal(two_ranks, draw(torch.Generator().manual_seed(derive_seed(5, 9, m, 0))))


def test_defaults_to_a_single_process_without_a_process_group():
    assert not torch.distributed.is_initialized()
    assert torch.equal(draw(step_generator(0, 4)), draw(step_generator(0, 4, rank=0, world_size=1)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1, "step": 0}, "seed"),
        ({"seed": 0, "step": -2}, "step"),
        ({"seed": 0, "step": 0, "micro": -1}, "micro"),
        ({"seed": 0, "step": 0, "rank": 2, "world_size": 2}, "rank"),
        ({"seed": 0, "step": 0, "rank": 1}, "world_size"),
        ({"seed": 0, "step": 0, "world_size": 2}, "rank"),
        ({"seed": 0, "step": 1.5}, "step"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        step_generator(**kwargs)


# ---------------------------------------------------------------------------- the cross-rank guard


def guard_worker(rank: int, world: int, result_file: str) -> None:
    """Each way of making a generator, checked across the ranks; what raised is saved by rank 0."""
    torch.manual_seed(0)  # every rank seeded alike, as seed_everything / set_seed do
    outcomes = {}
    cases = {
        "shared": lambda: torch.Generator().manual_seed(0),
        "global": lambda: None,
        "step_generator": lambda: step_generator(0, 3, 1),
    }
    for name, make in cases.items():
        generator = make()
        before = None if generator is None else generator.get_state()
        try:
            check_distinct_draws(generator)
            outcomes[name] = "passed"
        except RuntimeError as error:
            outcomes[name] = str(error)
        if generator is not None:  # nothing was consumed
            assert torch.equal(generator.get_state(), before)
    # rank and world size come from the process group
    outcomes["default_layout"] = torch.equal(
        draw(step_generator(0, 3, 1)), draw(step_generator(0, 3, 1, rank=rank, world_size=world))
    )
    # dropout is seen through a DDP wrapper (FSDP2 shards the module in place, so it is the module)
    from soflow_core._rng import has_active_dropout
    from soflow_core.nets import MLPBackbone

    ddp = torch.nn.parallel.DistributedDataParallel(MLPBackbone(dim=2, width=8, depth=1, dropout=0.2))
    outcomes["ddp_dropout"] = has_active_dropout(ddp) and not has_active_dropout(ddp.eval())
    if rank == 0:
        torch.save(outcomes, result_file)


def test_the_guard_catches_ranks_that_draw_alike(tmp_path):
    result_file = str(tmp_path / "outcomes.pt")
    spawn_gloo_ranks(guard_worker, result_file, world=2, tmp_path=tmp_path)
    outcomes = torch.load(result_file)
    assert outcomes["step_generator"] == "passed"
    assert outcomes["default_layout"] is True
    assert outcomes["ddp_dropout"] is True
    assert "ranks 0 and 1" in outcomes["shared"] and "step_generator" in outcomes["shared"]
    assert "ranks 0 and 1" in outcomes["global"] and "global RNG" in outcomes["global"]


def test_the_guard_is_a_no_op_in_a_single_process():
    generator = torch.Generator().manual_seed(0)
    check_distinct_draws(generator)
    check_distinct_draws(None)
    assert torch.equal(draw(generator), draw(torch.Generator().manual_seed(0)))
    with pytest.raises(TypeError, match="generator"):
        check_distinct_draws(0)
