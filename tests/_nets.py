"""Tiny DiTs and SongUNets with non-trivial outputs, and checkpoints in the official SoFlow training layout.

The official training code (github.com/zlab-princeton/SoFlow) saves the state dict of its
wrapper object, whose network lives under the attribute ``network``, as entries ``model`` (raw
weights) and ``ema_model`` (EMA weights), beside the optimizer state and the step.
"""

import torch
from torch import nn

from soflow_core.nets import DiT, SongUNet

NUM_CLASSES = 10
TINY = {"input_size": 8, "in_channels": 4, "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2}
# The reference DiT layout (facebookresearch/DiT with timm's PatchEmbed, Attention and Mlp) plus
# SoFlow's s_embedder, for TINY with 10 classes and a null row. LayerNorms have no affine
# parameters (norm1, norm2, norm_final hold nothing), and the adaLN linears sit at index 1
# after a SiLU. Token count T = (8 / 2)² = 16; final linear 2·2·4 = 16 outputs.
TINY_LAYOUT = {
    "pos_embed": (1, 16, 32),
    "x_embedder.proj.weight": (32, 4, 2, 2),
    "x_embedder.proj.bias": (32,),
    "t_embedder.mlp.0.weight": (32, 256),
    "t_embedder.mlp.0.bias": (32,),
    "t_embedder.mlp.2.weight": (32, 32),
    "t_embedder.mlp.2.bias": (32,),
    "s_embedder.mlp.0.weight": (32, 256),
    "s_embedder.mlp.0.bias": (32,),
    "s_embedder.mlp.2.weight": (32, 32),
    "s_embedder.mlp.2.bias": (32,),
    "y_embedder.embedding_table.weight": (11, 32),
    **{
        f"blocks.{i}.{name}": shape
        for i in range(2)
        for name, shape in {
            "attn.qkv.weight": (96, 32),
            "attn.qkv.bias": (96,),
            "attn.proj.weight": (32, 32),
            "attn.proj.bias": (32,),
            "mlp.fc1.weight": (128, 32),
            "mlp.fc1.bias": (128,),
            "mlp.fc2.weight": (32, 128),
            "mlp.fc2.bias": (32,),
            "adaLN_modulation.1.weight": (192, 32),
            "adaLN_modulation.1.bias": (192,),
        }.items()
    },
    "final_layer.linear.weight": (16, 32),
    "final_layer.linear.bias": (16,),
    "final_layer.adaLN_modulation.1.weight": (64, 32),
    "final_layer.adaLN_modulation.1.bias": (64,),
}
TINY_UNET = {
    "img_resolution": 8,
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
}


def tiny_dit(seed=0, *, randomise=True, **overrides):
    """A tiny DiT; with ``randomise`` its zero-initialised layers are redrawn so F_θ is not ≡ 0."""
    torch.manual_seed(seed)
    net = DiT(**{**TINY, "num_classes": NUM_CLASSES, **overrides})
    if randomise:
        zero_init = [block.adaLN_modulation[-1] for block in net.blocks]
        zero_init += [net.final_layer.adaLN_modulation[-1], net.final_layer.linear]
        for layer in zero_init:
            nn.init.normal_(layer.weight, std=0.1)
            nn.init.normal_(layer.bias, std=0.1)
    return net


def tiny_unet(seed=0, *, randomise=True, **overrides):
    """A tiny SongUNet; with ``randomise`` the layers EDM starts at 1e-5 × xavier are redrawn."""
    torch.manual_seed(seed)
    net = SongUNet(**{**TINY_UNET, **overrides})
    if randomise:
        for name, param in net.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                nn.init.normal_(param, std=0.05)
    return net


def image_batch(seed=0, b=3, c=4, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, size, size, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.1
    s = t * torch.rand(b, generator=g)
    return x, t, s


def labels(b=3, seed=0):
    return torch.randint(0, NUM_CLASSES, (b,), generator=torch.Generator().manual_seed(seed))


def official_checkpoint(raw: nn.Module, ema: nn.Module, *, step: int = 1000) -> dict:
    """A checkpoint as the official trainer saves it: wrapper state dicts (``network.`` keys), optimizer, step.

    The optimizer state is a real AdamW state after one step on ``raw`` (which is left unchanged).
    """
    params = [p.detach().clone().requires_grad_(True) for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    sum(p.square().sum() for p in params).backward()
    optimizer.step()

    def wrapped(net: nn.Module) -> dict:
        return {f"network.{k}": v.detach().clone() for k, v in net.state_dict().items()}

    return {"model": wrapped(raw), "ema_model": wrapped(ema), "optimizer": optimizer.state_dict(), "step": step}
