"""A resumable, deterministic batch order for distributed training, and counter-based seeds.

The data stream is the concatenation of epoch permutations: epoch e is a permutation of
``range(num_samples)`` drawn from ``derive_seed(seed, e)``. A run consumes the stream in order,
so its whole state is one integer, the global ``position`` (samples consumed), which a
checkpoint stores. Each optimizer step takes the next ``global_batch`` positions, cut into
``world_size × grad_accum`` micro-batches of equal size; micro-batch m = j·world_size + rank
goes to ``rank`` at micro-step j. Which sample lands in which micro-batch therefore depends on
the global batch and the micro-batch size only, not on how micro-batches are spread over
ranks: 2 ranks without accumulation and 1 rank with 2 accumulation steps see the same data.

[`derive_seed`][soflow_core.batching.derive_seed] turns (seed, step, micro-batch, ...) into
an independent seed, so the random draws of a micro-batch need no generator carried across
steps, which makes resuming exact and the draws independent of the number of ranks.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from soflow_core._validation import check_int

__all__ = ["EpochStream", "derive_seed", "micro_batch_index", "seeded_generator"]


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
        *keys: Non-negative integers, see [`derive_seed`][soflow_core.batching.derive_seed].
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


@lru_cache(maxsize=4)
def _permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    generator = seeded_generator(seed, epoch)
    return torch.randperm(num_samples, generator=generator).numpy()


@dataclass(frozen=True, kw_only=True)
class EpochStream:
    """The infinite sample order: epoch permutations of ``range(num_samples)``, one after another.

    Attributes:
        num_samples: N, the dataset size.
        seed: Seed of the permutations.
        shuffle: Permute each epoch (False: 0, 1, ..., N − 1 every epoch).

    Examples:
        >>> stream = EpochStream(num_samples=10, seed=0)
        >>> sorted(stream.indices(0, 10).tolist()) == list(range(10))
        True
        >>> stream.micro_batch(position=20, micro_batch_size=2, micro_step=0, rank=1, world_size=2).shape
        (2,)
    """

    num_samples: int
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        check_int("num_samples", self.num_samples, low=1)
        check_int("seed", self.seed, low=0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample indices of one epoch, in stream order.

        Args:
            epoch: e ≥ 0.

        Returns:
            An int64 array, a permutation of ``range(num_samples)``.
        """
        check_int("epoch", epoch, low=0)
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return _permutation(self.num_samples, self.seed, epoch)

    def indices(self, start: int, count: int) -> np.ndarray:
        """The sample indices at stream positions [start, start + count), crossing epochs as needed.

        Args:
            start: First position, ≥ 0.
            count: Number of positions, ≥ 0.

        Returns:
            An int64 array of ``count`` indices.
        """
        check_int("start", start, low=0)
        check_int("count", count, low=0)
        parts, position, end = [], start, start + count
        while position < end:
            epoch, offset = divmod(position, self.num_samples)
            take = min(end - position, self.num_samples - offset)
            parts.append(self.epoch_order(epoch)[offset : offset + take])
            position += take
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def micro_batch(
        self, *, position: int, micro_batch_size: int, micro_step: int, rank: int, world_size: int
    ) -> np.ndarray:
        """The indices of ``rank``'s micro-batch at micro-step j of the step that starts at ``position``.

        Args:
            position: Samples consumed before this optimizer step.
            micro_batch_size: Samples per micro-batch (per-rank batch / accumulation steps).
            micro_step: j, the accumulation step.
            rank: This process's rank.
            world_size: Number of ranks.

        Returns:
            An int64 array of ``micro_batch_size`` indices.
        """
        m = micro_batch_index(micro_step, rank, world_size)
        size = check_int("micro_batch_size", micro_batch_size, low=1)
        return self.indices(position + m * size, size)
