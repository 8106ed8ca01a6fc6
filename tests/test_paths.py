import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from soflow_core import LinearPath, TrigPath
from soflow_core.paths import make_path, path_name

PATHS = [LinearPath(), TrigPath()]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_endpoints_give_data_and_noise(path):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    at_data = path.sample(data, noise, torch.zeros(4, dtype=torch.float64))
    at_noise = path.sample(data, noise, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(at_data.x_t, data, rtol=0, atol=1e-15)
    torch.testing.assert_close(at_noise.x_t, noise, rtol=0, atol=1e-15)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert path.alpha(t).tolist() == pytest.approx([1.0, 0.0], abs=1e-15)
    assert path.beta(t).tolist() == pytest.approx([0.0, 1.0], abs=1e-15)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
@given(ts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_derivatives_equal_autograd(path, ts):
    t = torch.tensor(ts, dtype=torch.float64, requires_grad=True)
    (d_alpha,) = torch.autograd.grad(path.alpha(t).sum(), t)
    (d_beta,) = torch.autograd.grad(path.beta(t).sum(), t)
    torch.testing.assert_close(path.d_alpha(t.detach()), d_alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path.d_beta(t.detach()), d_beta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
@given(seed=st.integers(0, 2**16), t_value=st.floats(0.0, 1.0))
def test_velocity_is_time_derivative_of_x_t(path, seed, t_value):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(3, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = torch.full((3,), t_value, dtype=torch.float64)
    _, dx = torch.func.jvp(lambda tt: path.sample(data, noise, tt).x_t, (t,), (torch.ones_like(t),))
    torch.testing.assert_close(path.sample(data, noise, t).v_t, dx, rtol=1e-12, atol=1e-12)


def test_linear_velocity_points_from_data_to_noise():
    data, noise = torch.randn(2, 3), torch.randn(2, 3)
    out = LinearPath().sample(data, noise, torch.rand(2))
    torch.testing.assert_close(out.v_t, noise - data)


def test_trig_values():
    t = torch.tensor([0.5], dtype=torch.float64)
    assert TrigPath().alpha(t).item() == pytest.approx(math.cos(math.pi / 4))
    assert TrigPath().d_beta(t).item() == pytest.approx(math.pi / 2 * math.cos(math.pi / 4))


def test_make_path_names():
    assert isinstance(make_path("Linear"), LinearPath)
    assert isinstance(make_path("trig"), TrigPath)
    with pytest.raises(ValueError, match="path 'Triangular'"):
        make_path("Triangular")


def test_path_name_inverts_make_path():
    for name in ("linear", "trig"):
        assert path_name(make_path(name)) == name
    with pytest.raises(ValueError, match=r"path .* is not one of the named ones: 'linear', 'trig'"):
        path_name(type("CustomPath", (LinearPath,), {})())
