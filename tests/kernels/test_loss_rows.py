"""The fused Flow Matching and consistency rows against their references: values and gradients."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from soflow_core.ops.fused import consistency_rows_reference, flow_matching_rows_reference
from tests.kernels._support import CASES, assert_within_rule, make_tensor, sample_shapes, soflow_kernels, to64

LAYOUTS = st.sampled_from(["contiguous", "sliced", "permuted"])
WEIGHTS = st.sampled_from([(1.0, 0.01), (0.75, 1e-3), (0.5, 0.1), (0.0, 0.01)])


def _upstream(batch: int, kind: str, device: str, seed: int) -> torch.Tensor:
    """The gradient arriving at the per-sample loss: random, or the stride-0 one of a .mean()."""
    if kind == "mean":
        return torch.full((1,), 1.0 / batch, device=device).expand(batch)
    return torch.randn(batch, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@given(
    shape=sample_shapes(),
    with_state=st.booleans(),
    state_grad=st.booleans(),
    layout=LAYOUTS,
    weighting=WEIGHTS,
    upstream=st.sampled_from(["random", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_flow_matching_rows(device, dtype, shape, with_state, state_grad, layout, weighting, upstream, seed):
    p, eps = weighting
    output = make_tensor(shape, seed=seed, device=device, dtype=dtype, layout=layout).requires_grad_()
    state = make_tensor(shape, seed=seed + 1, device=device, dtype=dtype, layout="contiguous") if with_state else None
    if state is not None:
        state.requires_grad_(state_grad)
    target = make_tensor(shape, seed=seed + 2, device=device, dtype=dtype, layout=layout)
    generator = torch.Generator().manual_seed(seed + 3)
    coefficients = torch.stack(
        [
            torch.randn(shape[0], generator=generator),
            1 + torch.rand(shape[0], generator=generator),
            torch.rand(shape[0], generator=generator) + 0.5,
        ],
        dim=1,
    ).to(device)
    g = _upstream(shape[0], upstream, device, seed)

    kernel = soflow_kernels.flow_matching_rows(output, state, target, coefficients, p, eps)
    low = flow_matching_rows_reference(output, state, target, coefficients, p, eps)
    output64, state64, target64, coefficients64 = to64(output, state, target, coefficients)
    exact = flow_matching_rows_reference(output64, state64, target64, coefficients64, p, eps)
    for name, a, b, c in zip(("per_sample", "mse", "weight"), kernel, low, exact):
        assert a.dtype == torch.float32 and a.shape == (shape[0],)
        assert_within_rule(name, a, b, c, dtype)
    assert not kernel[1].requires_grad and not kernel[2].requires_grad

    wrt = [output] + ([state] if state is not None and state_grad else [])
    wrt64 = [output64] + ([state64] if state is not None and state_grad else [])
    g_kernel = torch.autograd.grad(kernel[0], wrt, g)
    g_low = torch.autograd.grad(low[0], wrt, g)
    g_exact = torch.autograd.grad(exact[0], wrt64, g.double().cpu())
    for k, (a, b, c) in enumerate(zip(g_kernel, g_low, g_exact)):
        assert a.dtype == dtype and a.shape == shape
        assert_within_rule(f"grad[{k}]", a, b, c, dtype)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@given(
    shape=sample_shapes(),
    with_teacher_output=st.booleans(),
    layout=LAYOUTS,
    weighting=WEIGHTS,
    gap=st.sampled_from([1e-4, 1e-3, 0.05, 0.5]),
    upstream=st.sampled_from(["random", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_consistency_rows(device, dtype, shape, with_teacher_output, layout, weighting, gap, upstream, seed):
    p, eps = weighting
    batch = shape[0]
    output = make_tensor(shape, seed=seed, device=device, dtype=dtype, layout=layout).requires_grad_()
    x_t = make_tensor(shape, seed=seed + 1, device=device, dtype=dtype, layout="contiguous")
    # The teacher sits close to the student, as it does in training (t − ℓ is small).
    teacher_state = (
        x_t.double() + gap * make_tensor(shape, seed=seed + 2, device=device, dtype=torch.float64, layout=layout)
    ).to(dtype)
    teacher_output = None
    if with_teacher_output:
        teacher_output = (output.detach().double() + gap * torch.randn(shape, dtype=torch.float64).to(device)).to(dtype)
    generator = torch.Generator().manual_seed(seed + 3)
    s_minus_t = -torch.rand(batch, generator=generator) - 0.05
    sign = torch.sign(s_minus_t)
    coefficients = torch.stack(
        [
            torch.ones(batch),
            s_minus_t,
            torch.ones(batch),
            s_minus_t + gap,
            torch.full((batch,), gap),
            sign,
            gap / (2 * s_minus_t.abs()),
        ],
        dim=1,
    ).to(device)
    g = _upstream(batch, upstream, device, seed)

    kernel = soflow_kernels.consistency_rows(output, x_t, teacher_state, teacher_output, coefficients, p, eps)
    low = consistency_rows_reference(output, x_t, teacher_state, teacher_output, coefficients, p, eps)
    exact64 = to64(output, x_t, teacher_state, teacher_output, coefficients)
    exact = consistency_rows_reference(*exact64, p, eps)
    for name, a, b, c in zip(("surrogate", "quotient_mse", "weight", "equivalent"), kernel, low, exact):
        assert a.dtype == torch.float32 and a.shape == (batch,)
        assert_within_rule(name, a, b, c, dtype)
    assert not any(x.requires_grad for x in kernel[1:])

    (g_kernel,) = torch.autograd.grad(kernel[0], [output], g)
    (g_low,) = torch.autograd.grad(low[0], [output], g)
    (g_exact,) = torch.autograd.grad(exact[0], [exact64[0]], g.double().cpu())
    assert g_kernel.dtype == dtype and g_kernel.shape == shape
    assert_within_rule("grad_output", g_kernel, g_low, g_exact, dtype)


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_rows_traced_by_torch_compile_without_graph_breaks(device, dtype):
    output = torch.randn(4, 3, 5, device=device, dtype=dtype, requires_grad=True)
    other = torch.randn(4, 3, 5, device=device, dtype=dtype)
    fm_coefficients = torch.tensor([[0.0, 1.0, 1.0]] * 4, device=device)
    sc_coefficients = torch.tensor([[1.0, -0.5, 1.0, -0.4, 0.1, -1.0, 0.1]] * 4, device=device)

    def step(output, other):
        fm = soflow_kernels.flow_matching_rows(output, None, other, fm_coefficients, 1.0, 0.01)[0]
        sc = soflow_kernels.consistency_rows(output, other, other, other, sc_coefficients, 0.5, 0.01)[0]
        return fm.mean() + sc.mean()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    (g_compiled,) = torch.autograd.grad(compiled(output, other), [output])
    (g_eager,) = torch.autograd.grad(step(output, other), [output])
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_rows_reject_bad_arguments_by_name(device, dtype):
    x = torch.randn(3, 4, device=device, dtype=dtype)
    with pytest.raises(ValueError, match="target must have the shape of output"):
        soflow_kernels.flow_matching_rows(x, None, x[:, :3], torch.ones(3, 3, device=device), 1.0, 0.01)
    with pytest.raises(ValueError, match=r"coefficients must have shape \(3, 7\)"):
        soflow_kernels.consistency_rows(x, x, x, None, torch.ones(3, 3, device=device), 1.0, 0.01)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        soflow_kernels.flow_matching_rows(x.double(), None, x.double(), torch.ones(3, 3, device=device), 1.0, 0.01)
