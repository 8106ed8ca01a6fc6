import math

import pytest
import torch
from _helpers import random_mlp
from hypothesis import given
from hypothesis import strategies as st

from soflow_core import EulerParam, TrigParam
from soflow_core.parameterizations import make_param, param_name

PARAMS = [EulerParam(), TrigParam()]
times = st.floats(0.0, 1.0)


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: type(p).__name__)
@given(seed=st.integers(0, 2**16), t_value=times)
def test_solution_at_s_equals_t_is_identity(param, seed, t_value):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.full((4,), t_value, dtype=torch.float64)
    net = random_mlp(3, seed=seed)
    assert torch.equal(param.solution(net, x, t, t), x)
    assert torch.equal(param.a(t, t), torch.ones_like(t))
    assert torch.equal(param.b(t, t), torch.zeros_like(t))


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: type(p).__name__)
@given(pairs=st.lists(st.tuples(times, times), min_size=1, max_size=6))
def test_s_derivatives_equal_autograd(param, pairs):
    t = torch.tensor([max(a, b) for a, b in pairs], dtype=torch.float64)
    s = torch.tensor([min(a, b) for a, b in pairs], dtype=torch.float64, requires_grad=True)
    # "+ 0 * s" keeps constant coefficients (Euler's a = 1) in the graph
    (d_a,) = torch.autograd.grad((param.a(t, s) + 0 * s).sum(), s)
    (d_b,) = torch.autograd.grad(param.b(t, s).sum(), s)
    torch.testing.assert_close(param.d_s_a(t, s.detach()), d_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(param.d_s_b(t, s.detach()), d_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("param", PARAMS, ids=lambda p: type(p).__name__)
@given(seed=st.integers(0, 2**16), t_value=st.floats(0.0, 1.0))
def test_model_velocity_equals_s_derivative_of_solution_at_s_equals_t(param, seed, t_value):
    net = random_mlp(3, seed=seed)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = torch.full((5,), t_value, dtype=torch.float64)
    # the network depends on s, so this also checks that b(t, t) = 0 kills the ∂ₛF term
    _, d_f = torch.func.jvp(lambda s: param.combine(x, net(x, t, s, None), t, s), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(param.velocity(net, x, t), d_f, rtol=1e-10, atol=1e-10)


def test_sign_convention_b_is_s_minus_t():
    t, s = torch.tensor([0.9]), torch.tensor([0.2])
    assert EulerParam().b(t, s).item() == pytest.approx(-0.7)
    assert TrigParam().b(t, s).item() == pytest.approx(math.sin(-0.35 * math.pi))
    assert TrigParam().d_s_b(t, t).item() == pytest.approx(math.pi / 2)


def test_euler_one_step_is_noise_minus_network():
    net = random_mlp(3)
    noise = torch.randn(4, 3, dtype=torch.float64)
    ones, zeros = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    expected = noise - net(noise, ones, zeros, None)
    torch.testing.assert_close(EulerParam().solution(net, noise, ones, zeros), expected, rtol=0, atol=1e-15)


def test_make_param_names():
    assert isinstance(make_param("Euler"), EulerParam)
    assert isinstance(make_param("TRIG"), TrigParam)
    with pytest.raises(ValueError, match="parameterization 'heun'"):
        make_param("heun")


def test_param_name_inverts_make_param():
    for name in ("euler", "trig"):
        assert param_name(make_param(name)) == name
    with pytest.raises(ValueError, match=r"parameterization .* is not one of the named ones: 'euler', 'trig'"):
        param_name(type("CustomParam", (EulerParam,), {})())
