"""Backbones. The losses never import this package; any callable ``model(x, t, s, cond)`` works."""

from soflow_core.nets.mlp import MLPBackbone, sinusoidal_embedding

__all__ = ["MLPBackbone", "sinusoidal_embedding"]
