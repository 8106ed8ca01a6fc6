"""The whole training step under torch.compile: one graph per part, no graph break, no recompile.

Compiled graphs cannot run in this process: the test-time jaxtyping/beartype import hook wraps
soflow_core's classes in code dynamo cannot trace. The checks therefore run in fresh
interpreters, as in production: ``benchmarks/compile_step.py --config tiny`` (graphs, breaks,
recompiles, kernels, compiled against eager with Inductor) and ``tests/_compiled_checks.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _helpers import random_mlp, shape_checks_off
from test_benchmarks import run_benchmark

from soflow_core import SoFlowObjective
from soflow_core.train import make_training_step
from soflow_core.train.step import has_gradient_hooks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile_step")
    result = run_benchmark("compile_step.py", "--preset", "tiny", "--out-dir", str(out), "--out", "t", timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "t.json").read_text())


@pytest.fixture(scope="module")
def compiled_checks() -> dict[str, str]:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run(
        [sys.executable, "tests/_compiled_checks.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_recipe_and_backbone_is_one_graph_without_breaks(tiny_rows):
    """ImageNet/CIFAR recipes, CFG on/off, joint/split forward, dropout on/off, on the MLP, DiT and SongUNet."""
    traced = [row for row in tiny_rows if row["section"] == "graphs"]
    assert {row["backbone"] for row in traced} == {"mlp", "dit", "unet"}
    assert {row["recipe"] for row in traced} == {"imagenet", "cifar10"}
    assert {row["cfg"] for row in traced} == {True, False}
    assert {row["joint_forward"] for row in traced} == {True, False}
    assert {row["dropout"] > 0 for row in traced} == {True, False}
    for row in traced:
        assert (row["step_graphs"], row["step_graph_breaks"]) == (1, 0), row
        assert (row["optimizer_graphs"], row["optimizer_graph_breaks"]) == (1, 0), row


def test_compiled_step_never_recompiles_and_equals_eager(tiny_rows):
    """50 steps of a moving r(k, K) with Inductor: two graphs compiled once, the first step as eager's.

    Later steps drift apart by rounding at a rate set by the training dynamics (chaotic for this
    toy under the adaptive weight), so equality over many steps is checked bit for bit with the
    aot_eager backend instead (``traced_step_reproduces_eager_bit_for_bit``).
    """
    (row,) = [row for row in tiny_rows if row["section"] == "steps"]
    assert row["backend"] == "inductor" and row["config"]["steps"] == 50
    assert row["graphs_compiled"] == 2 and row["recompiles"] == 0
    assert row["first_step_metric_rel_diff"] < 1e-5
    assert row["max_metric_rel_diff"] == row["max_metric_rel_diff"]  # finite, not NaN


def test_compiled_step_launches_fewer_kernels_through_fewer_regions(tiny_rows):
    """A regression in fusion or a new graph break shows here without a GPU."""
    (row,) = [row for row in tiny_rows if row["section"] == "steps"]
    assert row["compiled_regions_per_step"] == 3  # the optimizer's empty prologue region, then two graphs
    assert 0 < row["compiled_kernels_per_step"] < row["eager_kernels_per_step"] / 4


@pytest.mark.parametrize(
    "check",
    [
        "replay_shares_the_mask_tensors",
        "objective_replays_the_consistency_masks_in_the_teacher",
        "consistency_loss_replays_the_masks_in_the_teacher",
        "replay_refuses_draws_it_cannot_share",
        "replay_refuses_a_pass_of_another_shape",
        "accumulation_steps_compile_once_and_equal_eager",
        "autograd_backward_compiles_the_forward_only",
        "traced_step_reproduces_eager_bit_for_bit",
        "users_compile_of_the_objective_never_recompiles",
    ],
)
def test_compiled_check(compiled_checks, check):
    assert compiled_checks[f"check_{check}"] == "ok", compiled_checks[f"check_{check}"]


def test_eager_training_step_is_the_plain_loop():
    """make_training_step without compile: loss, backward, optimizer step, exactly."""
    objective = SoFlowObjective()
    net, twin = random_mlp(3), random_mlp(3)
    step_fn = make_training_step(objective, net, torch.optim.SGD(net.parameters(), lr=0.1), accumulation_steps=2)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    data = torch.randn(8, 3, dtype=torch.float64)
    batch = objective.sample_batch(data, step=1, total_steps=4, generator=torch.Generator().manual_seed(0))
    assert not step_fn.compiled
    metrics = step_fn.accumulate(batch)
    (objective.loss(twin, batch).backprop / 2).backward()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    step_fn.update()
    optimizer.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b) and a.grad is None
    assert set(metrics) >= {"fm_loss", "consistency_loss", "finite"}


def test_training_step_arguments_are_checked():
    net = random_mlp(3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with shape_checks_off(), pytest.raises(ValueError, match="backward"):
        make_training_step(SoFlowObjective(), net, optimizer, backward="inline")
    with pytest.raises(ValueError, match="accumulation_steps"):
        make_training_step(SoFlowObjective(), net, optimizer, accumulation_steps=0)


def test_a_ddp_model_is_never_given_a_traced_backward(tmp_path):
    """DDP synchronises gradients in autograd hooks, which a backward traced into the graph skips."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = torch.nn.parallel.DistributedDataParallel(random_mlp(3))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        assert has_gradient_hooks(net) and not has_gradient_hooks(random_mlp(3))
        with pytest.raises(ValueError, match="DDP/FSDP2"):
            make_training_step(SoFlowObjective(), net, optimizer, compile=True, backward="graph")
        make_training_step(SoFlowObjective(), net, optimizer, backward="graph")  # eager: fine
    finally:
        dist.destroy_process_group()
