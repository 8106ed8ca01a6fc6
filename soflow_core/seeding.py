r"""Counter-based generators: a fresh, independent ``torch.Generator`` per (seed, step, micro-batch, rank).

Every random draw of a SoFlow step (times, noise, label masks) comes from an explicit
``generator``. The easy way to make one that is right in data-parallel training and after a
resume is [`step_generator`][soflow_core.step_generator]: it derives the generator's seed
from the run seed, the optimizer step and the global micro-batch index m = j·world_size + rank,
so every rank and every accumulation step draws differently, and a resumed run draws exactly
what the uninterrupted run drew, with no generator state to save. Because m depends only on
the global micro-batch, 2 ranks without accumulation draw what 1 rank with 2 accumulation
steps draws.

A single ``torch.Generator().manual_seed(0)`` shared by all ranks is the classic mistake: every
rank then draws the same noise and times on every step, and the effective batch is one rank's.
"""

import numpy as np
import torch

from soflow_core._validation import check_generator, check_int

__all__ = ["check_distinct_draws", "derive_seed", "micro_batch_index", "seeded_generator", "step_generator"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (NumPy's ``SeedSequence`` hashing).

    Args:
        *keys: Non-negative integers, e.g. (run seed, step, micro-batch index).

    Returns:
        A seed in [0, 2⁶³).

    Raises:
        ValueError: If no key is given or a key is negative.

    Examples:
        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    if not keys:
        raise ValueError("derive_seed needs at least one key; got none")
    for i, key in enumerate(keys):
        check_int(f"keys[{i}]", key, low=0)
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seeded_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``derive_seed(*keys)``.

    Args:
        *keys: Non-negative integers, see [`derive_seed`][soflow_core.seeding.derive_seed].
        device: The generator's device.

    Returns:
        The generator.
    """
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def micro_batch_index(micro_step: int, rank: int, world_size: int) -> int:
    """The global index m = j·world_size + rank of ``rank``'s micro-batch at micro-step j.

    Args:
        micro_step: j, the accumulation step within the optimizer step.
        rank: This process's rank.
        world_size: Number of ranks.

    Returns:
        m.

    Raises:
        ValueError: If ``rank`` is not in [0, world_size).

    Examples:
        >>> micro_batch_index(1, 0, 2)
        2
    """
    check_int("world_size", world_size, low=1)
    if not 0 <= check_int("rank", rank, low=0) < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}); got {rank}")
    return check_int("micro_step", micro_step, low=0) * world_size + rank


def _process_group_layout() -> tuple[int, int] | None:
    """(rank, world size) of the default process group, or None when none is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def step_generator(
    seed: int,
    step: int,
    micro: int = 0,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    stream: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Generator:
    """The generator for one micro-batch of one optimizer step: distinct per rank, exact on resume.

    The seed is ``derive_seed(seed, step, m, stream)`` with m = micro·world_size + rank, the
    global micro-batch index. ``rank`` and ``world_size`` default to those of the initialised
    default process group (``torch.distributed``), and to 0 and 1 without one, so the same
    line is right in a single process, under torchrun DDP/FSDP, Lightning and Accelerate.
    Nothing needs saving: a resumed run that passes the same ``step`` draws the same numbers.

    Args:
        seed: The run seed, ≥ 0.
        step: Optimizer steps done so far, k ≥ 0 (the ``step`` the objective receives; count
            optimizer steps, not micro-batches).
        micro: j, the gradient-accumulation index within the step, ≥ 0.
        rank: This process's rank; None reads it from the process group.
        world_size: Number of ranks; None reads it from the process group.
        stream: Independent streams for the same micro-batch (e.g. 0 for the objective's
            draws, 1 for dropout masks).
        device: The generator's device (a CPU generator drives CUDA training reproducibly).

    Returns:
        A freshly seeded ``torch.Generator``.

    Raises:
        ValueError: If a count is negative, ``rank`` is outside [0, world_size), or exactly one
            of ``rank``/``world_size`` is given without a process group to supply the other.

    Examples:
        >>> import torch
        >>> a = torch.rand(2, generator=step_generator(0, step=5, rank=0, world_size=2))
        >>> b = torch.rand(2, generator=step_generator(0, step=5, rank=1, world_size=2))
        >>> torch.equal(a, b)
        False
    """
    check_int("seed", seed, low=0)
    check_int("step", step, low=0)
    check_int("micro", micro, low=0)
    check_int("stream", stream, low=0)
    layout = _process_group_layout()
    if rank is None and world_size is None:
        rank, world_size = layout if layout is not None else (0, 1)
    elif rank is None or world_size is None:
        if layout is None:
            raise ValueError(
                "step_generator needs both rank and world_size when no process group is initialised; "
                f"got rank={rank}, world_size={world_size}"
            )
        rank = layout[0] if rank is None else rank
        world_size = layout[1] if world_size is None else world_size
    m = micro_batch_index(micro, rank, world_size)
    return seeded_generator(seed, step, m, stream, device=device)


_FINGERPRINT_DRAWS = 4


def _fingerprint(generator: torch.Generator | None) -> tuple[int, ...]:
    """The next integers ``generator`` (None: the global CPU generator) would draw, without consuming them."""
    source = torch.Generator(device=generator.device if generator is not None else "cpu")
    source.set_state(generator.get_state() if generator is not None else torch.get_rng_state())
    draws = torch.randint(0, 2**62, (_FINGERPRINT_DRAWS,), generator=source, device=source.device)
    return tuple(int(v) for v in draws.cpu())


def check_distinct_draws(generator: torch.Generator | None, *, group: object = None) -> None:
    """Raise if two ranks of the process group would draw the same random numbers from ``generator``.

    An opt-in guard for data-parallel training: call it once, on the first step, with the
    generator the step passes to the objective. Each rank fingerprints the next draws of its
    generator (a copy of it: nothing is consumed) and the fingerprints are all-gathered, one
    small collective. A generator shared by all ranks (``torch.Generator().manual_seed(0)``),
    or ``generator=None`` after every rank was seeded alike (Lightning's ``seed_everything``,
    Accelerate's ``set_seed``), gives equal fingerprints and an error; a
    [`step_generator`][soflow_core.step_generator] passes. Without an initialised process
    group there is one rank and nothing to compare.

    Args:
        generator: The generator of this rank's draws; None checks the global CPU generator.
        group: The process group to compare over; None is the default group.

    Raises:
        RuntimeError: If two ranks' next draws coincide.

    Examples:
        >>> check_distinct_draws(step_generator(0, step=0))  # a single process: nothing to compare
    """
    check_generator("generator", generator)
    if _process_group_layout() is None:
        return
    mine = _fingerprint(generator)
    every = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(every, mine, group=group)
    first_rank: dict[tuple[int, ...], int] = {}
    for rank, fingerprint in enumerate(every):
        if fingerprint in first_rank:
            source = "the global RNG (generator=None)" if generator is None else "their generators"
            raise RuntimeError(
                f"ranks {first_rank[fingerprint]} and {rank} would draw identical noise and times from {source}: "
                "the effective batch is one rank's. Pass generator=soflow_core.step_generator(seed, step, micro), "
                "which differs per rank and per micro-batch, instead of one torch.Generator().manual_seed(seed) "
                "for all ranks or the global RNG after seed_everything/set_seed"
            )
        first_rank[fingerprint] = rank
