"""The fused linear combination (path build, teacher state, guided target) against its reference.

The strategies reach the edges: empty batches, and inputs and coefficients holding ±inf, NaN,
zeros, subnormals and values whose products overflow; where the float32 reference is NaN or inf
the kernel must give the same value (``assert_within_rule``).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from soflow_core.ops.fused import linear_combination, linear_combination_reference
from tests.kernels._support import (
    CASES,
    assert_within_rule,
    make_tensor,
    sample_shapes,
    soflow_kernels,
    to64,
    with_edges,
)

LAYOUTS = st.sampled_from(["contiguous", "sliced", "permuted"])


@pytest.mark.parametrize(("device", "dtype"), CASES)
@given(
    shape=sample_shapes(),
    n_in=st.integers(1, 4),
    n_out=st.integers(1, 4),
    layout=LAYOUTS,
    coefficient_grad=st.booleans(),
    edges=st.sampled_from([0, 0, 1, 3]),
    seed=st.integers(0, 2**16),
)
def test_forward_and_every_gradient_follow_the_reference(
    device, dtype, shape, n_in, n_out, layout, coefficient_grad, edges, seed
):
    inputs = [
        make_tensor(shape, seed=seed + k, device=device, dtype=dtype, layout=layout, edges=edges).requires_grad_()
        for k in range(n_in)
    ]
    generator = torch.Generator().manual_seed(seed)
    coefficients = with_edges(torch.randn(shape[0], n_out, n_in, generator=generator), seed=seed, count=edges)
    coefficients = coefficients.to(device)
    coefficients.requires_grad_(coefficient_grad)
    grads = [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(n_out)]

    kernel = soflow_kernels.linear_combination(inputs, coefficients)
    low = linear_combination_reference(inputs, coefficients)
    *inputs64, coefficients64 = to64(*inputs, coefficients)
    exact = linear_combination_reference(inputs64, coefficients64)
    for j in range(n_out):
        assert kernel[j].dtype == dtype and kernel[j].is_contiguous()
        assert_within_rule(f"out[{j}]", kernel[j], low[j], exact[j], dtype)

    wrt = [*inputs, coefficients] if coefficient_grad else inputs
    wrt64 = [*inputs64, coefficients64] if coefficient_grad else inputs64
    g_kernel = torch.autograd.grad(kernel, wrt, grads)
    g_low = torch.autograd.grad(low, wrt, grads)
    g_exact = torch.autograd.grad(exact, wrt64, [g.double().cpu() for g in grads])
    for k, (a, b, c) in enumerate(zip(g_kernel, g_low, g_exact)):
        assert a.dtype == wrt[k].dtype
        assert_within_rule(f"grad[{k}]", a, b, c, dtype)


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_mixed_input_dtypes_promote_and_gradients_keep_each_dtype(device, dtype):
    if dtype == torch.float32 and device == "cpu":
        pytest.skip("needs a second kernel dtype (CUDA)")
    low = torch.randn(3, 5, device=device, dtype=dtype, requires_grad=True)
    high = torch.randn(3, 5, device=device, dtype=torch.float32, requires_grad=True)
    coefficients = torch.randn(3, 1, 2, device=device)
    (out,) = soflow_kernels.linear_combination([low, high], coefficients)
    assert out.dtype == torch.float32
    g_low, g_high = torch.autograd.grad(out.sum(), [low, high])
    assert g_low.dtype == dtype and g_high.dtype == torch.float32


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_bad_arguments_are_named(device, dtype):
    x = torch.randn(4, 6, device=device, dtype=dtype)
    with pytest.raises(ValueError, match=r"inputs\[1\] must have the shape"):
        soflow_kernels.linear_combination([x, torch.randn(4, 7, device=device, dtype=dtype)], torch.ones(4, 1, 2))
    with pytest.raises(ValueError, match="coefficients must have shape"):
        soflow_kernels.linear_combination([x], torch.ones(4, 1, 2, device=device))
    with pytest.raises(ValueError, match="1 to 4"):
        linear_combination([x] * 5, torch.ones(4, 1, 5, device=device), backend="triton")


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_traced_by_torch_compile_without_graph_breaks(device, dtype):
    x = torch.randn(3, 2, 5, device=device, dtype=dtype, requires_grad=True)
    y = torch.randn(3, 2, 5, device=device, dtype=dtype)
    coefficients = torch.randn(3, 2, 2, device=device)

    def step(x, y, coefficients):
        a, b = soflow_kernels.linear_combination([x, y], coefficients)
        return (a * b).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    (g_compiled,) = torch.autograd.grad(compiled(x, y, coefficients), [x])
    (g_eager,) = torch.autograd.grad(step(x, y, coefficients), [x])
    torch.testing.assert_close(g_compiled, g_eager)
