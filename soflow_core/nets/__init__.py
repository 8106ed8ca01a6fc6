"""Backbones. The losses never import this package; any callable ``model(x, t, s, cond)`` works."""

from soflow_core.nets.dit import DIT_SIZES, DiT, DiTSize, load_dit_checkpoint, sincos_pos_embed_2d
from soflow_core.nets.mlp import MLPBackbone, fourier_features, sinusoidal_embedding
from soflow_core.nets.unet import SongUNet, positional_embedding

__all__ = [
    "DIT_SIZES",
    "DiT",
    "DiTSize",
    "MLPBackbone",
    "SongUNet",
    "fourier_features",
    "load_dit_checkpoint",
    "positional_embedding",
    "sincos_pos_embed_2d",
    "sinusoidal_embedding",
]
