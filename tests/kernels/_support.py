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
    """A batch with feature shapes that are odd, tiny, or not a multiple of any block size."""
    batch = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["flat", "image"]))
    if kind == "flat":
        return (batch, draw(st.integers(1, 1500)))
    return (batch, draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))


def make_tensor(shape, *, seed: int, device: str, dtype: torch.dtype, layout: str, scale: float = 1.0):
    """A random tensor in one of three layouts: contiguous, row-strided (a slice), or permuted."""
    generator = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        wide = torch.randn((shape[0], 2 * shape[1], *shape[2:]), generator=generator) * scale
        x = wide[:, ::2]
    elif layout == "permuted" and len(shape) > 2:
        x = (torch.randn((shape[0], *shape[2:], shape[1]), generator=generator) * scale).movedim(-1, 1)
    else:
        x = torch.randn(shape, generator=generator) * scale
    return x.to(device=device, dtype=dtype)


def assert_within_rule(name: str, kernel: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, dtype) -> None:
    """max|kernel − ref64| ≤ 2·max|ref_lowprec − ref64| + atol (atol scaled by max|ref64|).

    The worst error over the tensor, as flash-attention's rule: an elementwise bound fails on
    ill-conditioned rows (q = Δf/(t − ℓ) with t − ℓ = 1e-4) whenever the low-precision reference
    happens to round one element better than the kernel, which says nothing about the kernel.
    """
    kernel, low, exact = kernel.detach().double().cpu(), low.detach().double().cpu(), exact.detach().double().cpu()
    assert kernel.shape == exact.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(exact.shape)}"
    if not exact.numel():
        return
    assert not kernel.isnan().any(), f"{name}: kernel output has NaN"
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
