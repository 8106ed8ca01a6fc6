"""The MLP backbone's random Fourier features of the input."""

import math

import pytest
import torch

from soflow_core.nets import MLPBackbone, fourier_features


def test_fourier_features_match_the_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, 4, generator=g, dtype=torch.float64)
    got = fourier_features(x, b)
    assert got.shape == (5, 3 + 2 * 4)
    torch.testing.assert_close(got[:, :3], x, rtol=0, atol=0)
    for j in range(4):
        angle = 2 * math.pi * sum(x[:, i] * b[i, j] for i in range(3))
        torch.testing.assert_close(got[:, 3 + j], torch.sin(angle), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[:, 7 + j], torch.cos(angle), rtol=1e-12, atol=1e-12)


def test_input_frequencies_are_seeded_saved_and_scaled():
    a = MLPBackbone(dim=2, width=16, fourier_features=8, fourier_scale=0.5, fourier_seed=3)
    b = MLPBackbone(dim=2, width=16, fourier_features=8, fourier_scale=0.5, fourier_seed=3)
    c = MLPBackbone(dim=2, width=16, fourier_features=8, fourier_scale=0.5, fourier_seed=4)
    assert a.input_frequencies.shape == (2, 8)
    assert torch.equal(a.input_frequencies, b.input_frequencies)
    assert not torch.equal(a.input_frequencies, c.input_frequencies)
    expected = 0.5 * torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.input_frequencies, expected, rtol=0, atol=0)
    assert a.input.in_features == 2 + 2 * 8
    # the frequencies travel with the weights: a model built with another seed loads them
    c.load_state_dict(a.state_dict())
    x, t = torch.randn(4, 2), torch.rand(4)
    torch.testing.assert_close(c(x, t, 0.5 * t), a(x, t, 0.5 * t), rtol=0, atol=0)


def test_without_features_the_state_dict_is_unchanged():
    torch.manual_seed(0)
    plain = MLPBackbone(dim=2, width=16)
    assert plain.input_frequencies is None
    assert "input_frequencies" not in plain.state_dict()
    assert plain.input.in_features == 2
    # the frequencies come from their own seeded generator, never from the global RNG
    torch.manual_seed(1)
    a = MLPBackbone(dim=2, width=16, fourier_features=4).input_frequencies
    torch.manual_seed(2)
    assert torch.equal(a, MLPBackbone(dim=2, width=16, fourier_features=4).input_frequencies)


def test_features_change_the_output_and_keep_the_zero_start():
    net = MLPBackbone(dim=2, width=16, fourier_features=4)
    x, t = torch.randn(3, 2), torch.rand(3)
    assert torch.equal(net(x, t, t), torch.zeros(3, 2))  # zero-initialised output layer


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fourier_features": -1}, "fourier_features"),
        ({"fourier_scale": 0.0}, "fourier_scale"),
        ({"fourier_seed": -2}, "fourier_seed"),
    ],
)
def test_bad_feature_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MLPBackbone(dim=2, fourier_features=kwargs.pop("fourier_features", 2), **kwargs)
