"""Latent sampling from stored VAE posteriors, and the uint8 conversion used for evaluation.

ImageNet training stores the VAE posterior of every image (its mean and standard deviation)
once, and draws a fresh latent from it at every step; generated images leave the model in
[−1, 1] and are turned into uint8 pixels with the evaluator's exact rounding.
"""

import torch
from jaxtyping import Float, UInt8
from torch import Tensor

from soflow_core._rng import randn
from soflow_core._validation import check_finite, check_real, check_same_shape, check_tensor, is_tracing
from soflow_core.typing import Data

__all__ = ["SD_VAE_SCALE_FACTOR", "sample_latents", "to_uint8_images"]

SD_VAE_SCALE_FACTOR: float = 0.18215
"""The latent scale of ``stabilityai/sd-vae-ft-mse``: the network sees z = 0.18215 · (VAE latent)."""


def sample_latents(
    mean: Data,
    std: Data,
    *,
    generator: torch.Generator | None = None,
    scale_factor: float = SD_VAE_SCALE_FACTOR,
    noise: Data | None = None,
) -> Data:
    r"""Draw a scaled latent from a diagonal Gaussian VAE posterior.

    $$z = (\mu + \sigma \odot \varepsilon)\, c, \qquad \varepsilon \sim \mathcal{N}(0, I),$$

    with $\mu$, $\sigma$ the stored posterior mean and standard deviation of one image and
    $c$ the VAE's scale factor (0.18215 for SD-VAE-ft-MSE). A fresh $\varepsilon$ every step is
    the data augmentation of latent training; decoding divides by $c$ again.

    Args:
        mean: Posterior means μ (any float dtype; the result has this dtype).
        std: Posterior standard deviations σ ≥ 0, same shape as ``mean``.
        generator: Source of ε, or None for the global RNG of ``mean``'s device.
        scale_factor: The scale c > 0.
        noise: An explicit ε of the same shape (then ``generator`` is unused).

    Returns:
        The latents z, same shape and dtype as ``mean``.

    Raises:
        ValueError: If the shapes differ, ``std`` is negative or non-finite, or ``scale_factor`` ≤ 0.

    Examples:
        >>> import torch
        >>> mean, std = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
        >>> z = sample_latents(mean, std, generator=torch.Generator().manual_seed(0))
        >>> z.shape, round(float(sample_latents(mean + 1, 0 * std)[0, 0, 0, 0]), 5)
        (torch.Size([2, 4, 8, 8]), 0.18215)
    """
    check_tensor("mean", mean)
    check_tensor("std", std)
    check_same_shape("std", std, "mean", mean)
    c = check_real("scale_factor", scale_factor, low=0.0, low_open=True)
    if noise is not None:
        check_tensor("noise", noise)
        check_same_shape("noise", noise, "mean", mean)
    if not is_tracing():
        check_finite("std", std)
        if bool((std < 0).any()):
            raise ValueError(f"std must be >= 0 everywhere; got a minimum of {float(std.min())!r}")
    # Sum in at least float32: half-precision storage must not round the sum μ + σε.
    work = torch.promote_types(mean.dtype, torch.float32)
    if noise is None:
        noise = randn(tuple(mean.shape), device=mean.device, dtype=work, generator=generator)
    z = (mean.to(work) + std.to(work) * noise.to(device=mean.device, dtype=work)) * c
    return z.to(mean.dtype)


def to_uint8_images(x: Float[Tensor, "b c h w"]) -> UInt8[Tensor, "b h w c"]:
    r"""Convert images in [−1, 1] to uint8 pixels, channels last, as the FID evaluator reads them.

    $$\mathrm{pixel} = \big\lfloor \operatorname{clamp}(127.5\,x + 128,\; 0,\; 255) \big\rfloor,$$

    the clamp-then-truncate of the reference code (a float-to-uint8 cast truncates). The +128
    with truncation equals rounding $127.5\,(x + 1)$ to the nearest integer (halves up), so
    −1 ↦ 0, 0 ↦ 128 and 1 ↦ 255. The arithmetic runs in at least float32, since bfloat16 cannot
    hold 255.5.

    Args:
        x: Images in [−1, 1] (values outside are clamped), channels first.

    Returns:
        A uint8 tensor of shape (b, h, w, c) on ``x``'s device.

    Raises:
        ValueError: If ``x`` is not 4-D or holds NaN/Inf.

    Examples:
        >>> import torch
        >>> x = torch.tensor([-1.0, -0.996, 0.0, 1.0]).view(1, 1, 1, 4)
        >>> to_uint8_images(x).flatten().tolist()
        [0, 1, 128, 255]
    """
    check_tensor("x", x, min_ndim=4)
    if x.ndim != 4:
        raise ValueError(f"x must be images of shape (b, c, h, w); got shape {tuple(x.shape)}")
    check_finite("x", x)
    work = torch.promote_types(x.dtype, torch.float32)
    pixels = (x.detach().to(work) * 127.5 + 128.0).clamp(0.0, 255.0)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
