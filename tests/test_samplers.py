import pytest
import torch
from _helpers import random_mlp

from soflow_core import EulerParam, LinearPath, TrigParam, TrigPath, sample_chain, sample_few_step, sample_one_step
from soflow_core.samplers import renoise_times, uniform_time_grid


def test_one_step_is_solution_from_one_to_zero():
    net = random_mlp(3, seed=1)
    noise = torch.randn(5, 3, dtype=torch.float64)
    ones, zeros = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for param in (EulerParam(), TrigParam()):
        expected = param.combine(noise, net(noise, ones, zeros, None), ones, zeros)
        torch.testing.assert_close(sample_one_step(net, noise, param=param), expected, rtol=0, atol=0)
    # Euler: x̂ = noise − F(noise, 1, 0)
    torch.testing.assert_close(sample_one_step(net, noise, param=EulerParam()), noise - net(noise, ones, zeros, None))


def test_few_step_follows_the_reference_renoise_schedule():
    net = random_mlp(3, seed=2)
    noise = torch.randn(4, 3, dtype=torch.float64)
    param, path = TrigParam(), TrigPath()
    got = sample_few_step(net, noise, param=param, path=path, num_steps=3, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    x = noise
    zeros = torch.zeros(4, dtype=torch.float64)
    for i, tau in enumerate([1.0, 2 / 3, 1 / 3]):
        t = torch.full((4,), tau, dtype=torch.float64)
        x0 = param.combine(x, net(x, t, zeros, None), t, zeros)  # always jump to s = 0
        if i < 2:
            nxt = torch.full((4, 1), [2 / 3, 1 / 3][i], dtype=torch.float64)
            eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
            x = path.alpha(nxt) * x0 + path.beta(nxt) * eps  # fresh noise at the next grid time
    torch.testing.assert_close(got, x0, rtol=1e-14, atol=1e-14)


def test_one_step_special_cases_agree():
    net = random_mlp(3, seed=3)
    noise = torch.randn(6, 3, dtype=torch.float64)
    one = sample_one_step(net, noise, param=EulerParam())
    few = sample_few_step(net, noise, param=EulerParam(), path=LinearPath(), num_steps=1)
    chain = sample_chain(net, noise, [1.0, 0.0], param=EulerParam())
    torch.testing.assert_close(one, few, rtol=0, atol=0)
    torch.testing.assert_close(one, chain, rtol=0, atol=0)


def test_chain_composes_solutions_and_is_deterministic():
    net = random_mlp(3, seed=4)
    noise = torch.randn(6, 3, dtype=torch.float64)
    grid = uniform_time_grid(4)
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    x = noise
    for t_value, s_value in zip(grid[:-1].tolist(), grid[1:].tolist()):
        t, s = torch.full((6,), t_value, dtype=torch.float64), torch.full((6,), s_value, dtype=torch.float64)
        x = x + (s - t)[:, None] * net(x, t, s, None)
    got = sample_chain(net, noise, grid, param=EulerParam())
    torch.testing.assert_close(got, x, rtol=1e-14, atol=1e-14)
    assert torch.equal(got, sample_chain(net, noise, grid, param=EulerParam()))


def test_generator_controls_few_step_noise_and_conditioning_is_passed():
    net = random_mlp(2, seed=5, num_classes=3)
    noise = torch.randn(4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    kwargs = {"param": EulerParam(), "path": LinearPath(), "num_steps": 2, "cond": labels}
    a = sample_few_step(net, noise, generator=torch.Generator().manual_seed(0), **kwargs)
    b = sample_few_step(net, noise, generator=torch.Generator().manual_seed(0), **kwargs)
    c = sample_few_step(net, noise, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    other = sample_few_step(
        net, noise, generator=torch.Generator().manual_seed(0), **{**kwargs, "cond": labels.flip(0)}
    )
    assert not torch.equal(a, other)


def test_samplers_run_without_grad():
    net = random_mlp(3)
    out = sample_one_step(net, torch.randn(2, 3, dtype=torch.float64), param=EulerParam())
    assert not out.requires_grad


def test_few_step_renoises_to_the_given_times():
    net = random_mlp(3, seed=6)
    noise = torch.randn(4, 3, dtype=torch.float64)
    param, path = EulerParam(), LinearPath()
    got = sample_few_step(
        net, noise, param=param, path=path, times=[1.0, 0.3], generator=torch.Generator().manual_seed(2)
    )
    g = torch.Generator().manual_seed(2)
    ones, zeros = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    x0 = noise - net(noise, ones, zeros, None)
    x = 0.7 * x0 + 0.3 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    expected = x - 0.3 * net(x, torch.full((4,), 0.3, dtype=torch.float64), zeros, None)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    # the uniform grid is the default, with or without num_steps beside matching times
    same = {"param": param, "path": path}
    uniform = sample_few_step(net, noise, num_steps=3, generator=torch.Generator().manual_seed(0), **same)
    explicit = sample_few_step(
        net, noise, num_steps=3, times=uniform_time_grid(3)[:3], generator=torch.Generator().manual_seed(0), **same
    )
    torch.testing.assert_close(uniform, explicit, rtol=0, atol=0)


def test_renoise_times():
    assert renoise_times(1) == [1.0]
    assert renoise_times(4) == [1.0, 0.75, 0.5, 0.25]
    assert renoise_times(times=torch.tensor([1.0, 0.5, 0.2])) == pytest.approx([1.0, 0.5, 0.2])
    for times, words in [
        ([0.9, 0.3], "start at 1.0"),
        ([1.0, 0.3, 0.4], "decrease strictly"),
        ([1.0, 0.0], "above 0"),
        ([], "start at 1.0"),
    ]:
        with pytest.raises(ValueError, match=words):
            renoise_times(times=times)
    with pytest.raises(ValueError, match="num_steps must equal"):
        renoise_times(3, [1.0, 0.3])
    with pytest.raises(ValueError, match="num_steps or times"):
        renoise_times()
