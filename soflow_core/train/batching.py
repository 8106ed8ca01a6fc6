"""A resumable, deterministic batch order for distributed training.

The data stream is the concatenation of epoch permutations: epoch e is a permutation of
``range(num_samples)`` drawn from ``derive_seed(seed, e)``. A run consumes the stream in order,
so its whole state is one integer, the global ``position`` (samples consumed), which a
checkpoint stores. Each optimizer step takes the next ``global_batch`` positions, cut into
``world_size × grad_accum`` micro-batches of equal size; micro-batch m = j·world_size + rank
goes to ``rank`` at micro-step j. Which sample lands in which micro-batch therefore depends on
the global batch and the micro-batch size only, not on how micro-batches are spread over
ranks: 2 ranks without accumulation and 1 rank with 2 accumulation steps see the same data.

The micro-batch index m is the one [`step_generator`][soflow_core.step_generator] keys the
random draws on, so data order and draws follow the same global micro-batch.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from soflow_core._validation import check_bool, check_int
from soflow_core.seeding import micro_batch_index, seeded_generator

__all__ = ["EpochStream"]


@lru_cache(maxsize=4)
def _permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of one epoch, cached and read-only (every stream with these arguments shares it)."""
    generator = seeded_generator(seed, epoch)
    order = torch.randperm(num_samples, generator=generator).numpy()
    order.flags.writeable = False
    return order


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
        check_bool("shuffle", self.shuffle)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample indices of one epoch, in stream order.

        Args:
            epoch: e ≥ 0.

        Returns:
            A new int64 array (the caller's to modify), a permutation of ``range(num_samples)``.
        """
        return self._epoch_order(epoch).copy()

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """``epoch_order`` without the copy: the shared read-only cached array."""
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
            parts.append(self._epoch_order(epoch)[offset : offset + take])
            position += take
        # concatenate copies, so the result never aliases the cached permutation
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, dtype=np.int64)

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
