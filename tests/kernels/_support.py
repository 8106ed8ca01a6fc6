"""Shared pieces of the kernel tests: devices, dtypes, input builders and the 2x tolerance rule."""

import pytest
import torch
from hypothesis import strategies as st

soflow_kernels = pytest.importorskip("soflow_kernels", reason="the kernels need Triton")

CUDA = torch.cuda.is_available()


# (device, dtype) cases: the CPU interpreter runs float32 only; CUDA runs all three kernel dtypes.
def _case(device: str, dtype: torch.dtype):
    if device == "cpu":
        marks = [pytest.mark.skipif(not soflow_kernels.INTERPRETED, reason="kernels not built for the interpreter")]
    else:
        marks = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
    return pytest.param(device, dtype, id=f"{device}-{str(dtype).removeprefix('torch.')}", marks=marks)


CASES = [_case("cpu", torch.float32), *(_case("cuda", d) for d in (torch.float32, torch.bfloat16, torch.float16))]

# Absolute slack of the tolerance rule, relative to the size of the float64 reference.
ATOL = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 2e-4}


@st.composite
def sample_shapes(draw) -> tuple[int, ...]:
    """A batch with feature shapes that are odd, tiny, or not a multiple of any block size; now and then empty."""
    batch = draw(st.integers(0, 5))
    kind = draw(st.sampled_from(["flat", "image"]))
    if kind == "flat":
        return (batch, draw(st.integers(1, 1500)))
    return (batch, draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))


EDGE_VALUES = (0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e30, -1e30, 1e-45)
"""Values a float32 reference meets at its edges: signed zeros, ±inf, NaN, a value whose square
overflows (1e30² = inf) and the smallest subnormal."""


def with_edges(x: torch.Tensor, *, seed: int, count: int) -> torch.Tensor:
    """A copy of ``x`` with ``count`` elements (at random places) set to values drawn from EDGE_VALUES."""
    if count == 0 or x.numel() == 0:
        return x
    generator = torch.Generator().manual_seed(seed)
    flat = x.detach().cpu().double().clone().reshape(-1)
    places = torch.randint(flat.numel(), (count,), generator=generator)
    values = torch.tensor(EDGE_VALUES, dtype=torch.float64)[
        torch.randint(len(EDGE_VALUES), (count,), generator=generator)
    ]
    flat[places] = values
    return flat.reshape(x.shape).to(device=x.device, dtype=x.dtype)


def make_tensor(shape, *, seed: int, device: str, dtype: torch.dtype, layout: str, scale: float = 1.0, edges: int = 0):
    """A random tensor in one of three layouts: contiguous, row-strided (a slice), or permuted.

    With ``edges`` > 0, that many elements hold values of EDGE_VALUES (in whatever layout).
    """
    generator = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        wide = torch.randn((shape[0], 2 * shape[1], *shape[2:]), generator=generator) * scale
        x = wide[:, ::2]
    elif layout == "permuted" and len(shape) > 2:
        x = (torch.randn((shape[0], *shape[2:], shape[1]), generator=generator) * scale).movedim(-1, 1)
    else:
        x = torch.randn(shape, generator=generator) * scale
    if edges:
        x.copy_(with_edges(x, seed=seed + 1, count=edges))
    return x.to(device=device, dtype=dtype)


def assert_within_rule(name: str, kernel: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, dtype) -> None:
    """The kernel is the reference at the edges and within 2x its error elsewhere.

    Where the reference in the kernel's own precision (``low``) is NaN or ±inf (an inf or NaN
    input, a squared error past the float32 range, a zero gap), the kernel must give exactly the
    same value. Everywhere else it must be finite and satisfy, over the tensor,
    max|kernel − ref64| ≤ 2·max|ref_lowprec − ref64| + atol (atol scaled by max|ref64|).

    The worst error over the tensor, as flash-attention's rule: an elementwise bound fails on
    ill-conditioned rows (q = Δf/(t − ℓ) with t − ℓ = 1e-4) whenever the low-precision reference
    happens to round one element better than the kernel, which says nothing about the kernel.
    """
    kernel, low, exact = kernel.detach().double().cpu(), low.detach().double().cpu(), exact.detach().double().cpu()
    assert kernel.shape == exact.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(exact.shape)}"
    if not exact.numel():
        return
    edge = ~torch.isfinite(low)
    same = (kernel == low) | (kernel.isnan() & low.isnan())
    assert same[edge].all(), (
        f"{name}: where the reference is NaN or inf the kernel differs: kernel {kernel[edge & ~same][:5].tolist()}, "
        f"reference {low[edge & ~same][:5].tolist()}"
    )
    stray = ~edge & ~torch.isfinite(kernel)
    assert not stray.any(), f"{name}: kernel gives {kernel[stray][:5].tolist()} where the reference is finite"
    ruled = ~edge & torch.isfinite(exact)
    if not ruled.any():
        return
    kernel, low, exact = kernel[ruled], low[ruled], exact[ruled]
    atol = ATOL[dtype] * max(1.0, float(exact.abs().max()))
    kernel_error = float((kernel - exact).abs().max())
    reference_error = float((low - exact).abs().max())
    assert kernel_error <= 2 * reference_error + atol, (
        f"{name}: kernel error {kernel_error:.3e} exceeds 2x the reference's own error "
        f"{reference_error:.3e} + {atol:.2e}"
    )


def to64(*tensors):
    """Float64 CPU copies that require grad where the originals do."""
    out = []
    for x in tensors:
        if x is None:
            out.append(None)
            continue
        y = x.detach().double().cpu()
        out.append(y.requires_grad_(x.requires_grad))
    return out
