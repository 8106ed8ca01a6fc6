import copy
import math

import numpy as np
import pytest
import torch
from _helpers import grads, zero_grads
from _nets import NUM_CLASSES, TINY, TINY_LAYOUT, TINY_UNET, image_batch, labels, tiny_dit, tiny_unet
from torch import nn

from soflow_core import ClassifierFreeGuidance, SoFlowObjective
from soflow_core.nets import DIT_SIZES, DiT, SongUNet
from soflow_core.nets.unet import positional_embedding
from soflow_core.objective import has_active_dropout

# ---------------------------------------------------------------------------- DiT


def test_dit_output_shape_dtype_and_zero_at_init():
    net = tiny_dit(randomise=False)
    x, t, s = image_batch()
    out = net(x, t, s, labels())
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(x))  # adaLN-Zero: F_θ ≡ 0 at init
    net64 = tiny_dit().double()
    out64 = net64(x.double(), t.double(), s.double(), labels())
    assert out64.dtype == torch.float64 and out64.abs().max() > 0


def test_dit_init_follows_the_reference():
    torch.manual_seed(0)
    net = DiT(**{**TINY, "hidden_size": 64, "num_heads": 4}, num_classes=500)
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
            bound = math.sqrt(6 / (module.in_features + module.out_features))
            if "t_embedder" not in name:
                assert module.weight.abs().max() <= bound, name  # xavier_uniform (or zero)
    zeros = [b.adaLN_modulation[-1].weight for b in net.blocks]
    zeros += [net.final_layer.adaLN_modulation[-1].weight, net.final_layer.linear.weight]
    assert all(torch.equal(w, torch.zeros_like(w)) for w in zeros)
    for w in (net.t_embedder.mlp[0].weight, net.t_embedder.mlp[2].weight, net.y_embedder.embedding_table.weight):
        assert abs(w.std().item() - 0.02) < 0.003  # N(0, 0.02²)
    # The s-embedder keeps xavier_uniform: std = bound/√3 = √(2 / (fan_in + fan_out)).
    s_first = net.s_embedder.mlp[0].weight
    assert abs(s_first.std().item() / math.sqrt(2 / (256 + 64)) - 1) < 0.05
    proj = net.x_embedder.proj.weight  # xavier on the flattened kernel: fan_in = C·p·p
    assert proj.abs().max() <= math.sqrt(6 / (64 + 4 * 2 * 2))
    assert abs(proj.std().item() / math.sqrt(2 / (64 + 16)) - 1) < 0.1
    assert torch.equal(net.x_embedder.proj.bias, torch.zeros(64))


def test_dit_pos_embed_is_the_fixed_2d_sincos_table():
    net = tiny_dit(randomise=False, hidden_size=16, num_heads=2)
    assert net.pos_embed.shape == (1, 16, 16) and not net.pos_embed.requires_grad
    # Independent numpy transcription of the MAE/DiT formula: token k = 4·row + col; the first half
    # of the channels encodes the column, the second the row, each [sin(p ω), cos(p ω)], ω_j = 1e4^(−j/4).
    omega = 1.0 / 10_000 ** (np.arange(4) / 4)
    rows, cols = np.divmod(np.arange(16), 4)

    def table(pos):
        return np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], axis=1)

    expected = np.concatenate([table(cols), table(rows)], axis=1)
    np.testing.assert_allclose(net.pos_embed[0].numpy(), expected, rtol=0, atol=1e-6)


def test_dit_unpatchify_matches_the_reference_token_layout():
    """Each output token holds its p×p patch as (row, column, channel): einsum nhwpqc -> nchpwq."""
    net = tiny_dit(randomise=False)
    tokens = torch.randn(2, 16, 2 * 2 * 4)
    expected = torch.einsum("nhwpqc->nchpwq", tokens.reshape(2, 4, 4, 2, 2, 4)).reshape(2, 4, 8, 8)
    assert torch.equal(net._unpatchify(tokens), expected)


def test_dit_sees_t_and_t_minus_s():
    net = tiny_dit(seed=1)
    x, t, s = image_batch(1)
    seen = []
    net.s_embedder.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    out = net(x, t, s, labels())
    torch.testing.assert_close(seen[0], t - s, rtol=0, atol=0)  # the second embedder gets t − s, not s
    assert not torch.allclose(out, net(x, t, s * 0.5, labels()))  # and it matters
    assert not torch.allclose(out, net(x, t * 0.5, s * 0.5, labels()))  # t on its own too


def test_dit_state_dict_follows_the_reference_layout():
    net = tiny_dit(randomise=False)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == TINY_LAYOUT
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == ["pos_embed"]
    unconditional = DiT(**TINY, num_classes=None)
    assert set(unconditional.state_dict()) == set(TINY_LAYOUT) - {"y_embedder.embedding_table.weight"}
    no_null = DiT(**TINY, num_classes=NUM_CLASSES, null_class=False)
    assert no_null.y_embedder.embedding_table.weight.shape == (NUM_CLASSES, 32)


@pytest.mark.parametrize(("name", "millions"), [("DiT-B/2", 131), ("DiT-XL/2", 676)])
def test_dit_named_sizes_have_the_reference_parameter_counts(name, millions):
    with torch.device("meta"):
        net = DiT.from_name(name, input_size=32, in_channels=4, num_classes=1000)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / (millions * 1e6) - 1) < 0.01, count
    size = DIT_SIZES[name]
    assert (net.patch_size, net.hidden_size, net.depth, net.num_heads) == (
        size.patch_size,
        size.hidden_size,
        size.depth,
        size.num_heads,
    )


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-S/4"])
def test_dit_small_sizes_have_the_counted_parameters(name):
    with torch.device("meta"):
        net = DiT.from_name(name, input_size=32, in_channels=4, num_classes=1000)
    h, p, c = 384, int(name[-1]), 4
    tokens = (32 // p) ** 2
    embed_time = 256 * h + h + h * h + h  # Linear(256, H), Linear(H, H)
    block = 18 * h * h + 15 * h  # qkv, proj, fc1, fc2 (4H), adaLN (6H)
    final = h * p * p * c + p * p * c + 2 * h * h + 2 * h
    expected = (c * p * p * h + h) + 2 * embed_time + 1001 * h + tokens * h + 12 * block + final
    assert sum(p.numel() for p in net.parameters()) == expected
    assert (net.hidden_size, net.depth, net.num_heads, net.patch_size) == (384, 12, 6, p)
    # DiT-S is "33M" in the DiT paper (learned sigma, no second time embedder); ours is within 1M of it.
    assert abs(expected - 33e6) < 1e6, expected


def test_dit_unknown_size_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"DiT-S/8.*'DiT-S/4', 'DiT-S/2', 'DiT-B/4', 'DiT-B/2', 'DiT-M/2'"):
        DiT.from_name("DiT-S/8")
    with pytest.raises(ValueError, match="fixes depth"):
        DiT.from_name("DiT-B/4", depth=2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(**{**TINY, "input_size": 9})


def test_dit_null_class():
    net = tiny_dit(seed=2)
    x, t, s = image_batch(2)
    null = torch.full((3,), NUM_CLASSES)
    torch.testing.assert_close(net(x, t, s, None), net(x, t, s, null), rtol=0, atol=0)
    assert not torch.allclose(net(x, t, s, None), net(x, t, s, labels()))
    no_null = tiny_dit(null_class=False)
    with pytest.raises(ValueError, match="no null row"):
        no_null(x, t, s, None)
    unconditional = tiny_dit(num_classes=None)
    assert unconditional.y_embedder is None and unconditional(x, t, s, None).shape == x.shape
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, s, labels())
    with pytest.raises(ValueError, match=r"x must be a batch of images of shape \(4, 8, 8\)"):
        net(torch.randn(3, 4, 16, 16), t, s, None)


# ---------------------------------------------------------------------------- DiT training


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, s = image_batch(4)
    results = []
    for flag in (False, True):
        net = tiny_dit(seed=4, gradient_checkpointing=flag)
        zero_grads(net)
        net(x, t, s, labels()).square().mean().backward()
        results.append(grads(net))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_objective_step_with_tiny_dit_and_guidance():
    guidance = ClassifierFreeGuidance(scale=3.0, mix=0.25, drop_rate=0.1, decay_time=0.8, null_cond=NUM_CLASSES)
    objective = SoFlowObjective.from_preset("imagenet", guidance=guidance)
    net = tiny_dit(seed=5, randomise=False)
    g = torch.Generator().manual_seed(5)
    data, cond = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g)
    out = objective(net, data, cond, step=0, total_steps=10, generator=g)
    out.backprop.backward()
    assert out.metrics["finite"].item() == 1.0
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.requires_grad)
    assert net.final_layer.linear.weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------- SongUNet


def test_unet_shape_and_conditioning_inputs():
    x, t, s = image_batch(6, c=3)
    fresh = tiny_unet(randomise=False).eval()(x, t, s)
    assert 0 < fresh.abs().max() < 1e-3  # EDM init: last layers at 1e-5 × xavier, small but not zero
    net = tiny_unet().eval()
    out = net(x, t, s)
    assert out.shape == x.shape and out.dtype == torch.float32
    aug = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(net(x, t, s, augment_labels=aug), out, rtol=0, atol=1e-4)
    assert not torch.allclose(net(x, t, s * 0.5), out, rtol=0, atol=1e-4)  # t − s is embedded
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, s, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="augment_labels must have shape"):
        net(x, t, s, augment_labels=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="img_resolution must be divisible"):
        SongUNet(**{**TINY_UNET, "img_resolution": 7})


def test_unet_time_features_match_edm_positional_embedding():
    x = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    got = positional_embedding(x, 8)
    freqs = 1e-4 ** (np.arange(4) / 3)  # endpoint=True: the last frequency is exactly 1/max_positions
    angles = np.outer(x.numpy(), freqs)
    np.testing.assert_allclose(got.numpy(), np.concatenate([np.sin(angles), np.cos(angles)], axis=1), rtol=1e-14)


def test_unet_dropout_active_in_train_mode_only():
    net = tiny_unet(dropout=0.3)
    x, t, s = image_batch(7, c=3)
    assert has_active_dropout(net)
    assert not torch.equal(net(x, t, s), net(x, t, s))
    net.eval()
    assert not has_active_dropout(net)
    assert torch.equal(net(x, t, s), net(x, t, s))


class _ContiguousDropout(nn.Module):
    """Dropout as the official network applies it: the mask is drawn over the contiguous (NCHW) tensor."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return nn.functional.dropout(x.contiguous(), self.p, self.training)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_unet_dropout_masks_follow_the_reference_layout(memory_format):
    """Same seed, train mode: the same output as a network that makes each dropout input contiguous first.

    nn.Dropout draws its mask in memory order, so a channels-last input (such as the view a
    reshape of the attention output leaves) would get other masks than the reference network's.
    """
    net = tiny_unet(seed=10, dropout=0.3).train()
    reference = copy.deepcopy(net)
    for block in reference.modules():
        if isinstance(getattr(block, "drop", None), nn.Dropout):
            block.drop = _ContiguousDropout(block.drop.p)
    x, t, s = image_batch(10, c=3)
    x = x.contiguous(memory_format=memory_format)
    torch.manual_seed(123)
    out = net(x, t, s)
    torch.manual_seed(123)
    torch.testing.assert_close(out, reference(x, t, s), rtol=0, atol=0)
    torch.manual_seed(124)
    assert not torch.allclose(net(x, t, s), out, rtol=0, atol=1e-4)  # the masks do change the output


def test_unet_reference_defaults():
    net = SongUNet()
    assert net.map_layer0.weight.shape == (512, 512) and net.map_augment.weight.shape == (512, 6)
    assert net.map_augment.bias is None
    assert [k for k in net.enc if "down" in k] == ["16x16_down", "8x8_down"]
    assert all(m.drop.p == 0.3 for m in net.modules() if hasattr(m, "drop"))
    with_attention = sorted(k for k, m in [*net.enc.items(), *net.dec.items()] if getattr(m, "attention", False))
    assert with_attention == ["16x16_block0", "16x16_block1", "16x16_block2", "16x16_block3", "16x16_block4", "8x8_in0"]
    assert net.enc["16x16_down"].conv0.resample_filter.flatten().tolist() == pytest.approx(
        (np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64).flatten().tolist()
    )


def test_unet_objective_step_with_augment_labels_as_cond():
    net = tiny_unet(seed=8)
    objective = SoFlowObjective.from_preset("cifar10")
    g = torch.Generator().manual_seed(8)
    data, aug = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 6, generator=g)
    out = objective(
        lambda x, t, s, cond: net(x, t, s, augment_labels=cond), data, aug, step=0, total_steps=10, generator=g
    )
    out.backprop.backward()
    assert out.metrics["finite"].item() == 1.0
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


# ---------------------------------------------------------------------------- both


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_bf16_autocast(kind):
    net = tiny_dit(seed=9) if kind == "dit" else tiny_unet(seed=9)
    x, t, s = image_batch(9, c=4 if kind == "dit" else 3)
    cond = labels() if kind == "dit" else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, s, cond)
    assert out.shape == x.shape and out.dtype in (torch.bfloat16, torch.float32)
    assert bool(torch.isfinite(out).all())
    out.float().square().mean().backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in net.parameters())
