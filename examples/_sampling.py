"""Numbered samples: sample i of a (seed, i) stream, the same in ``sample.py`` and in the trainers' in-loop FID.

Sample i draws its noise (and, for a class-conditional network, its label, uniform over the classes) from
``seeded_generator(seed, i)``; the fresh noise of 2-NFE re-noising comes from
``seeded_generator(seed, RENOISE, first)``, ``first`` the index of the batch's first sample. So a set of
samples depends on the seed, the sample indices and the batch boundaries only, not on the number of ranks or
on which rank draws which batch: the in-loop FID of step k scores exactly the samples
``examples/sample.py --ckpt <run>/checkpoints/step-k.pt --seed <run seed> --batch-size <fid batch>``
writes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from soflow_core import sample_few_step, sample_one_step
from soflow_core.parameterizations import AbstractParam
from soflow_core.paths import AbstractPath
from soflow_core.seeding import seeded_generator

RENOISE = 1  # key that separates the re-noising seeds from the per-sample seeds


@torch.no_grad()
def draw_samples(
    net: nn.Module,
    *,
    first: int,
    count: int,
    nfe: int,
    seed: int,
    shape: tuple[int, int, int],
    num_classes: int | None,
    param: AbstractParam,
    path: AbstractPath,
    device: torch.device,
    to_images: Callable[[Tensor], Tensor],
) -> Tensor:
    """Samples ``first`` … ``first + count − 1`` at ``nfe`` network evaluations, as images.

    Args:
        net: The network (EMA weights), on ``device``.
        first: Index of the first sample.
        count: Number of samples.
        nfe: Network evaluations per sample (1: one step; more: the few-step sampler with re-noising).
        seed: The stream's seed.
        shape: (channels, height, width) of the network's inputs.
        num_classes: Classes to draw labels from (uniform), or None for an unconditional network.
        param: The solution parameterization.
        path: The noising path (for the re-noising of NFE > 1).
        device: Where the network runs.
        to_images: The network's output → uint8 NHWC images (VAE decoding of latents, or pixels).

    Returns:
        What ``to_images`` returns for the batch.
    """
    noises, labels = [], []
    for i in range(first, first + count):
        generator = seeded_generator(seed, i)
        noises.append(torch.randn(shape, generator=generator))
        if num_classes:
            labels.append(torch.randint(0, num_classes, (), generator=generator))
    noise = torch.stack(noises).to(device)
    cond = torch.stack(labels).to(device) if num_classes else None
    if nfe == 1:
        x = sample_one_step(net, noise, param=param, cond=cond)
    else:
        renoise = seeded_generator(seed, RENOISE, first)
        x = sample_few_step(net, noise, param=param, path=path, num_steps=nfe, cond=cond, generator=renoise)
    return to_images(x)
