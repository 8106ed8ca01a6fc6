"""The Stable Diffusion VAE (``stabilityai/sd-vae-ft-mse``) for the ImageNet example scripts, loaded from disk only.

Nothing is downloaded at run time: fetch the VAE once on a machine with internet access,

    hf download stabilityai/sd-vae-ft-mse --local-dir checkpoints/sd-vae-ft-mse

and pass that folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) to the scripts.
"""

import os
from pathlib import Path

import torch
from _cli import optional_import

from soflow_core.train import SD_VAE_SCALE_FACTOR

__all__ = ["VAE_NAME", "decode_latents", "encode_posterior", "load_vae", "vae_missing_message"]

VAE_NAME = "stabilityai/sd-vae-ft-mse"
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def vae_missing_message(folder: str | os.PathLike, problem: str) -> str:
    """The error text for a missing or incomplete VAE folder: what to fetch and where to put it."""
    return (
        f"{problem}. The ImageNet scripts need the VAE {VAE_NAME} in diffusers format "
        f"(config.json + diffusion_pytorch_model.safetensors) in a local folder; nothing is downloaded "
        f"at run time. On a machine with internet access run\n"
        f"  hf download {VAE_NAME} --local-dir {folder}\n"
        f"(or hf download ...), copy the folder here if needed, and pass it with --vae {folder}."
    )


def load_vae(folder: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a diffusers ``AutoencoderKL`` from a local folder, frozen and in eval mode.

    Args:
        folder: Folder holding ``config.json`` and ``diffusion_pytorch_model.safetensors``.
        device: Where to put the VAE.
        dtype: Parameter dtype (float32, or bfloat16 for faster extraction).

    Returns:
        The VAE, with gradients off.

    Raises:
        FileNotFoundError: If the folder, its config or its weights are missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(vae_missing_message(folder, f"VAE folder {folder} does not exist"))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(vae_missing_message(folder, f"VAE folder {folder} has no config.json"))
    if not any((folder / name).is_file() for name in _WEIGHTS):
        raise FileNotFoundError(vae_missing_message(folder, f"VAE folder {folder} has no {_WEIGHTS[0]}"))
    vae = optional_import("diffusers", "the SD-VAE").AutoencoderKL.from_pretrained(
        folder, local_files_only=True, torch_dtype=dtype
    )
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior N(mean, std²) of images in [−1, 1] (unscaled: multiply samples by 0.18215).

    Args:
        vae: An ``AutoencoderKL``.
        images: (b, 3, H, W) images in [−1, 1]; cast to the VAE's dtype and device.

    Returns:
        (mean, std), each (b, 4, H/8, W/8) for SD-VAE, in float32.
    """
    param = next(vae.parameters())
    posterior = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, *, scale_factor: float = SD_VAE_SCALE_FACTOR) -> torch.Tensor:
    """Decode scaled latents z (as the network sees them) to images in about [−1, 1]: vae.decode(z / 0.18215).

    Args:
        vae: An ``AutoencoderKL``.
        z: (b, 4, h, w) scaled latents.
        scale_factor: The latent scale used when the latents were made.

    Returns:
        (b, 3, 8h, 8w) float32 images (not clamped).
    """
    param = next(vae.parameters())
    return vae.decode(z.to(device=param.device, dtype=param.dtype) / scale_factor).sample.float()
