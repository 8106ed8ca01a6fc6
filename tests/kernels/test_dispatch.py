"""Backend selection: auto, torch and triton, the one-time fallback warning, and lazy imports."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from soflow_core import SoFlowObjective
from soflow_core.ops import fused
from soflow_core.ops._dispatch import resolve_backend
from tests._helpers import shape_checks_off
from tests.kernels._support import soflow_kernels

pytestmark = pytest.mark.skipif(not soflow_kernels.INTERPRETED and not torch.cuda.is_available(), reason="no kernels")


def test_auto_never_picks_the_interpreter_on_cpu():
    x = torch.randn(2, 3)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x) == "torch"


@pytest.mark.skipif(not soflow_kernels.INTERPRETED, reason="CPU interpreter only")
def test_triton_runs_the_kernels_on_the_interpreter():
    x = torch.randn(2, 3)
    assert resolve_backend("triton", x) == "triton"
    assert resolve_backend("TRITON", x) == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_auto_picks_the_kernels_on_cuda():
    x = torch.randn(2, 3, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", x) == "triton"
    assert resolve_backend("auto", x.double()) == "torch"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        resolve_backend("cuda", torch.randn(2, 3))
    with shape_checks_off(), pytest.raises(ValueError, match="unknown backend 'fast'"):
        SoFlowObjective(backend="fast")


def test_unsupported_dtype_falls_back_with_one_warning_and_the_reference_result():
    # On a CUDA machine use CUDA tensors, so the dtype (not a CPU device) is the reason to fall back.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = [torch.randn(3, 4, dtype=torch.float64, device=device) for _ in range(2)]
    coefficients = torch.randn(3, 1, 2, dtype=torch.float64, device=device)
    expected = fused.linear_combination_reference(x, coefficients)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fused.linear_combination(x, coefficients, backend="triton")
        second = fused.linear_combination(x, coefficients, backend="triton")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "dtype torch.float64" in messages[0] and "PyTorch reference" in messages[0]
    torch.testing.assert_close(first[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(second[0], expected[0], rtol=0, atol=0)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)


def test_cpu_without_interpreter_falls_back_and_auto_never_imports_triton():
    code = """
import sys, warnings, torch
from soflow_core import SoFlowObjective
from soflow_core.nets import MLPBackbone
objective = SoFlowObjective()
out = objective(MLPBackbone(dim=2), torch.randn(8, 2), step=0, total_steps=10)
assert "triton" not in sys.modules, "auto imported triton on the CPU"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    SoFlowObjective(backend="triton")(MLPBackbone(dim=2), torch.randn(8, 2), step=0, total_steps=10)
print([str(w.message) for w in caught])
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "without TRITON_INTERPRET=1" in result.stdout


@pytest.mark.skipif(not soflow_kernels.INTERPRETED, reason="CPU interpreter only")
def test_objective_with_kernels_traces_without_breaks_in_the_loss_path():
    from soflow_core import ClassifierFreeGuidance
    from soflow_core.nets import MLPBackbone

    guidance = ClassifierFreeGuidance(scale=3.0, mix=0.25, drop_rate=0.3, decay_time=0.8, null_cond=3)
    objective = SoFlowObjective.from_preset("imagenet", guidance=guidance, backend="triton", check_inputs=False)
    model = MLPBackbone(dim=4, num_classes=3)
    with shape_checks_off():
        batch = objective.sample_batch(torch.randn(16, 4), torch.randint(0, 3, (16,)), step=0, total_steps=10)
        explained = torch._dynamo.explain(lambda b: objective.loss(model, b).backprop)(batch)
    # The only breaks allowed are the RNG snapshot's (get_rng_state cannot be traced); none in the fused ops.
    files = {reason.user_stack[-1].filename for reason in explained.break_reasons if reason.user_stack}
    assert not any(
        name.endswith(("fused.py", "_dispatch.py", "losses.py")) or "soflow_kernels" in name for name in files
    )
    assert any(op.startswith("soflow.") or "soflow" in str(op) for op in _ops_in(explained)), "kernels not traced"


def _ops_in(explained) -> list[str]:
    names = []
    for graph in explained.graphs:
        for node in graph.graph.nodes:
            if node.op == "call_function":
                names.append(str(node.target))
    return names


def test_importing_the_kernels_without_triton_names_the_extra():
    code = """
import sys
sys.modules["triton"] = None  # as if Triton were not installed
try:
    import soflow_kernels
except ModuleNotFoundError as error:
    print(error)
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert 'soflow_kernels needs Triton: pip install -e ".[triton]"' in result.stdout
