import pytest
import torch

from soflow_core import step_generator
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
