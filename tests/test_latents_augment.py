import dataclasses
import math

import pytest
import torch
from _helpers import shape_checks_off

from soflow_core.train import AugmentParams, EDMAugment, sample_latents, to_uint8_images
from soflow_core.train.augment import _resample, _rotation

# ----------------------------------------------------------------------------- latents


def test_sample_latents_is_mean_plus_std_noise_scaled():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    z = sample_latents(mean, std, noise=noise, scale_factor=0.5)
    torch.testing.assert_close(z, (mean + std * noise) * 0.5)
    # the default scale is SD-VAE's, and the draw uses the generator
    z1 = sample_latents(mean, std, generator=torch.Generator().manual_seed(1))
    z2 = sample_latents(mean, std, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z1, z2)
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z1, (mean + std * eps) * 0.18215)


def test_sample_latents_statistics_and_half_precision():
    mean = torch.full((4000, 4, 2, 2), 2.0)
    std = torch.full((4000, 4, 2, 2), 3.0)
    z = sample_latents(mean, std, generator=torch.Generator().manual_seed(0), scale_factor=1.0)
    assert abs(float(z.mean()) - 2.0) < 0.05 and abs(float(z.std()) - 3.0) < 0.05
    zh = sample_latents(mean.half(), std.half(), generator=torch.Generator().manual_seed(0), scale_factor=1.0)
    assert zh.dtype == torch.float16
    torch.testing.assert_close(zh.float(), z, atol=0.02, rtol=1e-3)


def test_sample_latents_rejects_bad_input():
    m = torch.zeros(2, 4, 4, 4)
    with shape_checks_off(), pytest.raises(ValueError, match="std must have the same shape"):
        sample_latents(m, torch.ones(2, 4, 4, 3))
    with pytest.raises(ValueError, match="std must be >= 0"):
        sample_latents(m, -torch.ones_like(m))
    with pytest.raises(ValueError, match="scale_factor"):
        sample_latents(m, torch.ones_like(m), scale_factor=0.0)
    with shape_checks_off(), pytest.raises(ValueError, match="noise must have the same shape"):
        sample_latents(m, torch.ones_like(m), noise=torch.zeros(2, 4))


def test_to_uint8_images_edge_values_and_layout():
    values = torch.tensor([-2.0, -1.0, -0.99, -0.5, 0.0, 0.5, 0.9921875, 1.0, 3.0])
    # pixel = floor(clamp(127.5 x + 128)): -1 -> floor(0.5), -0.99 -> floor(1.775), 0.5 -> floor(191.75),
    # 127/128 -> floor(254.504), 1 -> floor(255.5 clamped to 255)
    expected = [0, 0, 1, 64, 128, 191, 254, 255, 255]
    for dtype in (torch.float32, torch.float64):
        assert to_uint8_images(values.to(dtype).view(1, 1, 1, -1)).flatten().tolist() == expected
    # truncation, not rounding: 127.5 x + 128 = 128.9 gives 128
    assert to_uint8_images(torch.tensor(0.9 / 127.5, dtype=torch.float64).view(1, 1, 1, 1)).item() == 128
    # bfloat16 inputs are converted in float32, not rounded to bfloat16's 8-bit mantissa first
    xb = torch.linspace(-1, 1, 257).to(torch.bfloat16).view(1, 1, 1, -1)
    assert torch.equal(to_uint8_images(xb), to_uint8_images(xb.float()))
    x = torch.rand(2, 3, 4, 5) * 2 - 1
    out = to_uint8_images(x)
    assert out.dtype == torch.uint8 and out.shape == (2, 4, 5, 3)
    assert torch.equal(out[1, 2, 3], to_uint8_images(x[1:2, :, 2:3, 3:4]).flatten())
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8_images(torch.full((1, 1, 2, 2), float("nan")))
    with shape_checks_off(), pytest.raises(ValueError, match=r"\(b, c, h, w\)"):
        to_uint8_images(torch.zeros(2, 3, 4, 4, 1))


# ----------------------------------------------------------------------------- augmentation


def _images(b=4, c=3, h=16, w=16, dtype=torch.float64, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def _reflect_shift(img, tx, ty):
    """out[y, x] = img[y - ty, x - tx] with mirror ("reflect") borders."""
    h, w = img.shape[-2:]

    def mirror(i, n):
        return n - 1 - (n - 1 - i % (2 * n - 2)).abs()

    ys, xs = mirror(torch.arange(h) - ty, h), mirror(torch.arange(w) - tx, w)
    return img[..., ys, :][..., xs]


def test_default_pipeline_has_the_six_cifar_labels():
    augment = EDMAugment()
    assert augment.label_dim == 6
    assert EDMAugment(yflip=1.0, rotate_frac=1.0).label_dim == 9  # EDM's own CIFAR-10 setting
    assert EDMAugment(xflip=0.0, scale=0.0, aniso=0.0, translate_frac=0.0).label_dim == 0


def test_p_zero_leaves_images_and_labels_untouched():
    x = _images()
    for dtype in (torch.float32, torch.float64):
        out = EDMAugment(p=0.0)(x.to(dtype), generator=torch.Generator().manual_seed(0))
        assert out.images.dtype == dtype and torch.equal(out.images, x.to(dtype))
        assert out.labels.shape == (4, 6) and torch.equal(out.labels, torch.zeros(4, 6, dtype=dtype))


def test_xflip_alone_is_an_exact_flip_with_its_label():
    x = _images(b=64, h=8, w=8)
    augment = EDMAugment(p=1.0, scale=0.0, aniso=0.0, translate_frac=0.0)
    out = augment(x, generator=torch.Generator().manual_seed(3))
    flipped = out.labels[:, 0] == 1
    assert out.labels.shape == (64, 1) and 10 < int(flipped.sum()) < 54
    assert torch.equal(out.images[flipped], x[flipped].flip(3))
    assert torch.equal(out.images[~flipped], x[~flipped])
    # xflip = 1e8 makes p irrelevant for the flip: half of the images are mirrored even at p = 0.12
    labels = EDMAugment().sample_params(4000, generator=torch.Generator().manual_seed(0)).xflip
    assert abs(float(labels.mean()) - 0.5) < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integer_translations_move_pixels_exactly(dtype):
    x = _images(b=3, h=16, w=24, dtype=dtype)
    augment = EDMAugment()
    # shifts of (w_x W, w_y H) / 8 pixels: (1, 0), (0, -2), (3, 1)
    shifts = [(1, 0), (0, -2), (3, 1)]
    translate = torch.tensor([[tx * 8 / 24, ty * 8 / 16] for tx, ty in shifts], dtype=dtype)
    params = dataclasses.replace(AugmentParams.identity(3, dtype=dtype), translate=translate)
    out = augment.apply(x, params)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for i, (tx, ty) in enumerate(shifts):
        torch.testing.assert_close(out.images[i], _reflect_shift(x[i], tx, ty), atol=tol, rtol=0)
    torch.testing.assert_close(out.labels[:, 4:], translate)
    assert torch.equal(out.labels[:, :4], torch.zeros(3, 4, dtype=dtype))


def test_resampling_with_the_identity_map_is_exact():
    x = _images(b=2, h=12, w=20)
    out = _resample(x, torch.eye(2, dtype=x.dtype).expand(2, 2, 2), torch.zeros(2, 2, dtype=x.dtype))
    torch.testing.assert_close(out, x, atol=1e-10, rtol=0)


def test_geometric_maps_follow_the_documented_inverse_map():
    # On a smooth image the output at centred pixel p is the input at G^-1 p = L (p - t).
    d, h, w = torch.float64, 32, 32
    ys, xs = torch.meshgrid(torch.arange(h, dtype=d) - 15.5, torch.arange(w, dtype=d) - 15.5, indexing="ij")

    def image(x, y):
        return torch.cos(0.12 * x + 0.05 * y + 0.3) + 0.5 * torch.sin(0.07 * y - 0.03 * x)

    augment = EDMAugment(rotate_frac=1.0)
    one = lambda v: torch.tensor([v], dtype=d)  # noqa: E731
    params = dataclasses.replace(
        AugmentParams.identity(1, dtype=d),
        scale=one(-1.5),
        rotate=one(0.4),
        aniso=one(1.2),
        aniso_angle=one(0.7),
        translate=torch.tensor([[0.3, -0.2]], dtype=d),
    )
    out = augment.apply(image(xs, ys)[None, None], params).images[0, 0]
    s, a = 2 ** (0.2 * -1.5), 2 ** (0.2 * 1.2)
    lin = torch.diag(torch.tensor([1 / s, 1 / s], dtype=d)) @ _rotation(one(0.4))[0]
    lin = lin @ _rotation(one(-0.7))[0] @ torch.diag(torch.tensor([1 / a, a], dtype=d)) @ _rotation(one(0.7))[0]
    px, py = xs - 0.3 * 32 / 8, ys + 0.2 * 32 / 8
    qx, qy = lin[0, 0] * px + lin[0, 1] * py, lin[1, 0] * px + lin[1, 1] * py
    inside = (qx.abs() < 12) & (qy.abs() < 12) & (xs.abs() < 12) & (ys.abs() < 12)
    assert int(inside.sum()) > 150
    err = (out - image(qx, qy))[inside].abs().max()
    assert err < 0.01, err
    # the opposite rotation would be far off
    wrong = lin @ _rotation(one(-0.8))[0]
    wx, wy = wrong[0, 0] * px + wrong[0, 1] * py, wrong[1, 0] * px + wrong[1, 1] * py
    assert (out - image(wx, wy))[inside].abs().max() > 0.2


def test_label_statistics_match_p():
    n, p = 20000, 0.12
    params = EDMAugment().sample_params(n, generator=torch.Generator().manual_seed(1))
    labels = EDMAugment().labels(params)
    tol = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(float((labels[:, 1] != 0).float().mean()) - p) < tol  # scale
    assert abs(float((labels[:, 2:4] != 0).any(1).float().mean()) - p) < tol  # aniso
    assert abs(float((labels[:, 4:6] != 0).all(1).float().mean()) - p) < tol  # translate (both axes together)
    assert torch.equal(labels[:, 4] != 0, labels[:, 5] != 0)
    # half of the anisotropic scalings use a rotated axis: those have a nonzero sine label
    aniso = labels[:, 2] != 0
    assert abs(float((labels[aniso, 3] != 0).float().mean()) - 0.5) < 0.06
    # applied values are N(0, 1)
    applied = labels[:, 1][labels[:, 1] != 0]
    assert abs(float(applied.std()) - 1) < 0.1 and abs(float(applied.mean())) < 0.1
    # the three operations are independent: all three at once about p^3 of the time
    joint = ((labels[:, 1] != 0) & aniso & (labels[:, 4] != 0)).float().mean()
    assert float(joint) < 0.01


def test_augment_is_deterministic_under_a_generator_and_zero_labels_mean_untouched():
    x = _images(b=32, h=8, w=8, dtype=torch.float32)
    augment = EDMAugment(p=0.5)
    a = augment(x, generator=torch.Generator().manual_seed(7))
    b = augment(x, generator=torch.Generator().manual_seed(7))
    c = augment(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    untouched = (a.labels == 0).all(dim=1)
    assert 0 < int(untouched.sum()) < 32
    assert torch.equal(a.images[untouched], x[untouched])
    assert not torch.allclose(a.images[~untouched], x[~untouched])
    assert a.labels.dtype == torch.float32 and a.images.dtype == torch.float32


def test_augment_validates_settings_and_inputs():
    with pytest.raises(ValueError, match="p must lie in"):
        EDMAugment(p=1.5)
    with pytest.raises(ValueError, match="aniso must lie in"):
        EDMAugment(aniso=-1.0)
    with pytest.raises(ValueError, match="scale_std"):
        EDMAugment(scale_std=0.0)
    with shape_checks_off(), pytest.raises(ValueError, match=r"\(b, c, h, w\)"):
        EDMAugment()(torch.zeros(2, 3, 8, 8, 1))
    with pytest.raises(ValueError, match=r"params\.xflip must have shape \(2,\)"):
        EDMAugment().apply(_images(b=2), AugmentParams.identity(3, dtype=torch.float64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        EDMAugment().p = 0.5  # type: ignore[misc]
