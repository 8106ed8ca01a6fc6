"""Backbones and their checkpoint I/O.

The losses never import this package; any callable ``model(x, t, s, cond)`` works.
``from_velocity_model`` turns a pretrained velocity network (SiT, or a Flow Matching model of
this library) into a SoFlow backbone to fine-tune.
"""

from soflow_core.nets.checkpoints import (
    AbstractBackbone,
    CheckpointContents,
    CheckpointOrigin,
    LoadedBackbone,
    LoadReport,
    load_backbone,
    load_weights,
    read_state_dict,
)
from soflow_core.nets.convert import VELOCITY_CONVENTIONS, ConvertedBackbone, VelocityConvention, from_velocity_model
from soflow_core.nets.dit import DIT_SIZES, DiT, DiTSize, sincos_pos_embed_2d
from soflow_core.nets.mlp import MLPBackbone, fourier_features, sinusoidal_embedding
from soflow_core.nets.unet import SongUNet, positional_embedding

__all__ = [
    "DIT_SIZES",
    "VELOCITY_CONVENTIONS",
    "AbstractBackbone",
    "CheckpointContents",
    "CheckpointOrigin",
    "ConvertedBackbone",
    "DiT",
    "DiTSize",
    "LoadReport",
    "LoadedBackbone",
    "MLPBackbone",
    "SongUNet",
    "VelocityConvention",
    "fourier_features",
    "from_velocity_model",
    "load_backbone",
    "load_weights",
    "positional_embedding",
    "read_state_dict",
    "sincos_pos_embed_2d",
    "sinusoidal_embedding",
]
