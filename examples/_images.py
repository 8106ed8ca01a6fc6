"""Images out of the examples: uint8 NHWC batches tiled into a PNG grid, and a look at latents without a VAE."""

import math
from pathlib import Path

import numpy as np
from _cli import optional_import
from torch import Tensor

from soflow_core._files import atomic_save


def save_grid(images: Tensor | np.ndarray, path: Path, columns: int | None = None) -> None:
    """Tile uint8 NHWC images into one PNG."""
    Image = optional_import("PIL.Image", "writing the sample grids")

    array = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    n, h, w, c = array.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = array[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))


def latent_preview(z: Tensor) -> Tensor:
    """The first three latent channels as uint8 NHWC pixels (a look at latents without a VAE)."""
    from soflow_core.train.latents import to_uint8_images

    return to_uint8_images((z[:, :3].float() / 2.0).clamp(-1, 1))
