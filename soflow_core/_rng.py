"""Explicit random draws and the RNG fork that lets two passes share dropout masks.

Every draw takes an explicit ``generator`` (or None for the global one) and is made on the
generator's device, then moved to ``device``, so a CPU generator drives CUDA training
reproducibly. Nothing here keeps state between calls.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RngSnapshot", "rand", "randn", "replay_rng", "snapshot_rng"]


def _draw(
    sampler, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, generator: torch.Generator | None
) -> Tensor:
    """Draw on the generator's device (so a CPU generator drives any device), then move to ``device``."""
    draw_device = generator.device if generator is not None else device
    return sampler(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def randn(
    shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None
) -> Tensor:
    """Standard normal draws of ``shape`` from ``generator`` (or the global RNG), placed on ``device``.

    Args:
        shape: Output shape.
        device: Where the result lives.
        dtype: Result dtype.
        generator: Source of randomness; None uses the default generator of ``device``.

    Returns:
        A tensor of N(0, 1) draws.
    """
    return _draw(torch.randn, shape, device, dtype, generator)


def rand(
    shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform [0, 1) draws of ``shape`` from ``generator`` (or the global RNG), placed on ``device``.

    Args:
        shape: Output shape.
        device: Where the result lives.
        dtype: Result dtype.
        generator: Source of randomness; None uses the default generator of ``device``.

    Returns:
        A tensor of U[0, 1) draws.
    """
    return _draw(torch.rand, shape, device, dtype, generator)


@dataclass(frozen=True)
class RngSnapshot:
    """The state of the default generator that stochastic layers on ``device`` draw from.

    Attributes:
        device: The device whose default generator was captured.
        state: The captured generator state (a CPU byte tensor).
    """

    device: torch.device
    state: Tensor


def _device_module(device: torch.device):
    return torch.get_device_module(device.type)


def snapshot_rng(device: torch.device | str) -> RngSnapshot:
    """Capture the default generator state that dropout on ``device`` will use next.

    Works for CPU and any accelerator with a default generator (CUDA, MPS, XPU, ...):
    stochastic layers draw from the CPU generator for CPU tensors and from the current
    device's generator otherwise.

    Args:
        device: The device the network computes on.

    Returns:
        The snapshot to hand to `replay_rng`.

    Examples:
        >>> import torch
        >>> snap = snapshot_rng("cpu")
        >>> a = torch.rand(3)
        >>> with replay_rng(snap):
        ...     b = torch.rand(3)
        >>> torch.equal(a, b)
        True
    """
    device = torch.device(device)
    if device.type == "cpu":
        return RngSnapshot(device, torch.get_rng_state())
    module = _device_module(device)
    index = device.index if device.index is not None else module.current_device()
    return RngSnapshot(torch.device(device.type, index), module.get_rng_state(index))


def _restore(snapshot: RngSnapshot) -> None:
    if snapshot.device.type == "cpu":
        torch.set_rng_state(snapshot.state)
    else:
        _device_module(snapshot.device).set_rng_state(snapshot.state, snapshot.device.index)


@contextmanager
def replay_rng(snapshot: RngSnapshot) -> Iterator[None]:
    """Run a block with the generator rewound to ``snapshot``, then put the stream back.

    Inside the block, stochastic layers draw exactly what they drew right after the
    snapshot was taken (same shapes give the same dropout masks). On exit the generator
    returns to the state it had on entry, so the replayed pass consumes no randomness from
    the caller's point of view.

    Args:
        snapshot: A state captured by `snapshot_rng`.

    Yields:
        Nothing; the block runs with the rewound generator.
    """
    current = snapshot_rng(snapshot.device)
    _restore(snapshot)
    try:
        yield
    finally:
        _restore(current)
