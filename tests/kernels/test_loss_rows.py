"""The fused Flow Matching and consistency rows against their references: values and gradients.

The strategies reach the edges: empty batches, inputs holding ±inf, NaN, zeros, subnormals and
values whose square overflows, p = 0, and consistency gaps t − ℓ of 1e-30, 1e-45 and 0; where the
float32 reference is NaN or inf the kernel must give the same value (``assert_within_rule``).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from soflow_core.ops.fused import consistency_rows_reference, flow_matching_rows_reference
from tests.kernels._support import CASES, assert_within_rule, make_tensor, sample_shapes, soflow_kernels, to64

LAYOUTS = st.sampled_from(["contiguous", "sliced", "permuted"])
WEIGHTS = st.sampled_from([(1.0, 0.01), (0.75, 1e-3), (0.5, 0.1), (0.0, 0.01), (1.0, 1e-45)])
EDGES = st.sampled_from([0, 0, 1, 3])  # elements of each input set to an edge value
EDGE_GAPS = (1e-30, 1e-45, 0.0)


def _upstream(batch: int, kind: str, device: str, seed: int) -> torch.Tensor:
    """The gradient arriving at the per-sample loss: random, or the stride-0 one of a .mean()."""
    if kind == "mean":
        return torch.full((1,), 1.0 / max(batch, 1), device=device).expand(batch)
    return torch.randn(batch, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@given(
    shape=sample_shapes(),
    with_state=st.booleans(),
    state_grad=st.booleans(),
    layout=LAYOUTS,
    weighting=WEIGHTS,
    upstream=st.sampled_from(["random", "mean"]),
    edges=EDGES,
    seed=st.integers(0, 2**16),
)
def test_flow_matching_rows(device, dtype, shape, with_state, state_grad, layout, weighting, upstream, edges, seed):
    p, eps = weighting
    output = make_tensor(shape, seed=seed, device=device, dtype=dtype, layout=layout, edges=edges).requires_grad_()
    state = make_tensor(shape, seed=seed + 1, device=device, dtype=dtype, layout="contiguous") if with_state else None
    if state is not None:
        state.requires_grad_(state_grad)
    target = make_tensor(shape, seed=seed + 2, device=device, dtype=dtype, layout=layout, edges=edges)
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
    gap=st.sampled_from([1e-4, 1e-3, 0.05, 0.5, *EDGE_GAPS]),
    upstream=st.sampled_from(["random", "mean"]),
    edges=EDGES,
    seed=st.integers(0, 2**16),
)
def test_consistency_rows(device, dtype, shape, with_teacher_output, layout, weighting, gap, upstream, edges, seed):
    p, eps = weighting
    batch = shape[0]
    output = make_tensor(shape, seed=seed, device=device, dtype=dtype, layout=layout, edges=edges).requires_grad_()
    x_t = make_tensor(shape, seed=seed + 1, device=device, dtype=dtype, layout="contiguous", edges=edges)
    generator = torch.Generator().manual_seed(seed + 3)
    s_minus_t = -torch.rand(batch, generator=generator) - 0.05
    sign = torch.sign(s_minus_t)
    teacher_output = None
    if gap in EDGE_GAPS:
        # The teacher is the student exactly (b_ℓ = b_t), but for the first element of each row moved by 1:
        # f_t − f_ℓ is exactly 0 or about 1 in any rounding, so q is 0, NaN (0/0) or beyond the float32 range.
        teacher_state = x_t.detach().clone()
        if teacher_state.numel():
            teacher_state.view(batch, -1)[:, :1] -= 1
        if with_teacher_output:
            teacher_output = output.detach().clone()
        b_ell = s_minus_t
    else:
        # The teacher sits close to the student, as it does in training (t − ℓ is small).
        noise = make_tensor(shape, seed=seed + 2, device=device, dtype=torch.float64, layout=layout)
        teacher_state = (x_t.double() + gap * noise).to(dtype)
        if with_teacher_output:
            noise = torch.randn(shape, dtype=torch.float64).to(device)
            teacher_output = (output.detach().double() + gap * noise).to(dtype)
        b_ell = s_minus_t + gap
    coefficients = torch.stack(
        [
            torch.ones(batch),
            s_minus_t,
            torch.ones(batch),
            b_ell,
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


def _same(kernel: torch.Tensor, reference: torch.Tensor) -> bool:
    """The same inf and NaN as the float32 reference (the specification at the edges), close elsewhere."""
    close = torch.isclose(kernel.float(), reference.float(), rtol=1e-5, atol=0.0, equal_nan=True)
    return bool(close.all())


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("p", [0.0, 1.0])
@pytest.mark.parametrize("value", [float("inf"), 1e30])  # an infinite error, or one whose square overflows
def test_flow_matching_rows_equal_the_reference_at_an_infinite_squared_error(device, dtype, p, value):
    output = torch.tensor([[value, 1.0], [0.5, -1.0]], device=device, dtype=dtype)
    target = torch.zeros_like(output)
    coefficients = torch.tensor([[0.0, 1.0, 1.0]] * 2, device=device)
    results = []
    for rows in (soflow_kernels.flow_matching_rows, flow_matching_rows_reference):
        leaf = output.clone().requires_grad_()
        out = rows(leaf, None, target, coefficients, p, 0.01)
        (grad,) = torch.autograd.grad(out[0].sum(), [leaf])
        results.append([*out, grad])
    for name, kernel, reference in zip(("per_sample", "mse", "weight", "grad"), *results):
        assert _same(kernel, reference), f"{name}: kernel {kernel.tolist()}, reference {reference.tolist()}"


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("p", [0.0, 1.0])
@pytest.mark.parametrize("gap", [1e-30, 1e-45, 0.0])
def test_consistency_rows_equal_the_reference_at_tiny_and_zero_gaps(device, dtype, p, gap):
    output = torch.tensor([[1.0, 2.0], [1.0, 2.0]], device=device, dtype=dtype)
    x_t = torch.zeros_like(output)
    teacher = output - torch.tensor([[1.0, 0.0], [0.0, 0.0]], device=device, dtype=dtype)  # f_t − f_ℓ: 1 and 0
    coefficients = torch.tensor([[0.0, 1.0, 1.0, 0.0, gap, 1.0, 1.0]] * 2, device=device)
    results = []
    for rows in (soflow_kernels.consistency_rows, consistency_rows_reference):
        leaf = output.clone().requires_grad_()
        out = rows(leaf, x_t, teacher, None, coefficients, p, 0.01)
        (grad,) = torch.autograd.grad(out[0].sum(), [leaf])
        results.append([*out, grad])
    for name, kernel, reference in zip(("surrogate", "quotient_mse", "weight", "equivalent", "grad"), *results):
        assert _same(kernel, reference), f"{name}: kernel {kernel.tolist()}, reference {reference.tolist()}"


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_every_kernel_takes_an_empty_batch(device, dtype):
    empty = torch.zeros(0, 3, 2, device=device, dtype=dtype, requires_grad=True)
    fm = soflow_kernels.flow_matching_rows(empty, empty, empty, torch.zeros(0, 3, device=device), 1.0, 0.01)
    sc = soflow_kernels.consistency_rows(empty, empty, empty, empty, torch.zeros(0, 7, device=device), 1.0, 0.01)
    (combined,) = soflow_kernels.linear_combination([empty, empty], torch.zeros(0, 1, 2, device=device))
    assert [x.shape for x in (*fm, *sc)] == [(0,)] * 7 and combined.shape == (0, 3, 2)
    for loss in (fm[0], sc[0], combined):
        (grad,) = torch.autograd.grad(loss.sum(), [empty])
        assert grad.shape == empty.shape
