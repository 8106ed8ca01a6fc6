"""The framework recipes under examples/recipes, each run on 2 gloo ranks on CPU with the real framework.

Every recipe is run twice with torchrun: once for the whole run (2 epochs), writing a checkpoint
after epoch 1 (Lightning: after every optimizer step), and once resumed from that checkpoint
(Lightning: from one in the middle of epoch 1). The tests check, from each rank's trace of its
draws, of the points it trained on and of the optimizer's own step counter:

* the ranks draw different times on every micro-batch;
* the ℓ schedule r(k, K) advances once per optimizer step: the ratio (t − ℓ)/(t − s) of every
  drawn triple is r(k, K) for k = the steps the optimizer has taken, the same for all
  micro-batches of a step;
* the resumed run draws exactly what the uninterrupted run drew from the checkpoint on, and
  ends with bit-equal weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soflow_core import SoFlowObjective
from soflow_core.time_samplers import consistency_times

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SCHEDULE = SoFlowObjective().consistency_times.schedule
ACCUM = 2


def torchrun(script: str, out: Path, *args: str) -> None:
    # --standalone: the rendezvous store binds port 0 itself, so no port is picked beforehand
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               f"examples/recipes/{script}", "--out", str(out), "--accum", str(ACCUM), "--trace", *args]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def trace(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"trace-rank{rank}.jsonl").read_text().splitlines()]


def ell_at(record: dict, optimizer_steps: int, total_steps: int) -> torch.Tensor:
    """ℓ of the record's (t, s) placed by r(k, K) for k = ``optimizer_steps`` (t and s are already clamped)."""
    t, s = (torch.tensor(record[k], dtype=torch.float32) for k in ("t", "s"))
    return consistency_times(t, s, SCHEDULE(optimizer_steps, total_steps)).ell


def check_recipe(script: str, checkpoint_of, tmp_path: Path, *, save: str = "--save-every-epoch") -> None:
    """Run, resume from the checkpoint at the end of epoch 1, or (``save="--save-every-steps"``) mid-epoch."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torchrun(script, whole, *([save, "1"] if save == "--save-every-steps" else [save]))
    first = [trace(whole, rank) for rank in range(2)]
    total_steps = first[0][-1]["step"] + 1
    assert total_steps >= 4 and total_steps % 2 == 0
    start = total_steps // 2 - 1 if save == "--save-every-steps" else total_steps // 2  # 3 of 4 steps per epoch
    torchrun(script, resumed, "--resume", str(checkpoint_of(whole, start)))

    for rank0, rank1 in zip(*first, strict=True):
        assert (rank0["step"], rank0["micro"]) == (rank1["step"], rank1["micro"])
        assert rank0["t"] != rank1["t"] and rank0["fm_t"] != rank1["fm_t"], "the ranks drew the same times"
    for rank in range(2):
        records = first[rank]
        assert [(r["step"], r["micro"]) for r in records] == [(k, j) for k in range(total_steps) for j in range(ACCUM)]
        for record in records:
            assert record["optimizer_steps"] == record["step"], "step must count optimizer steps"
            ell = torch.tensor(record["ell"], dtype=torch.float32)
            torch.testing.assert_close(ell, ell_at(record, record["optimizer_steps"], total_steps), rtol=0, atol=0)
        after = [r for r in records if r["step"] >= start]
        assert trace(resumed, rank) == after, "the resumed run drew differently"
    got, expected = torch.load(resumed / "final.pt"), torch.load(whole / "final.pt")
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def soflow_checkpoint(out: Path, step: int) -> Path:
    from soflow_core.train import checkpoint_path

    return checkpoint_path(out, step)


@pytest.mark.parametrize("script", ["ddp_torchrun.py", "fsdp2_torchrun.py"])
def test_torchrun_recipes(script, tmp_path):
    check_recipe(script, soflow_checkpoint, tmp_path)


def lightning_checkpoint(out: Path, step: int) -> Path:
    return out / f"step={step}.ckpt"


def accelerate_state(out: Path, step: int) -> Path:
    return out / f"state-{step}"


def test_lightning_recipe_resumes_mid_epoch_exactly(tmp_path):
    """Its data order follows the optimizer step, so a checkpoint in the middle of an epoch resumes exactly."""
    check_recipe("lightning_ddp.py", lightning_checkpoint, tmp_path, save="--save-every-steps")


def test_accelerate_recipe(tmp_path):
    check_recipe("accelerate_loop.py", accelerate_state, tmp_path)


def test_accelerate_recipe_refuses_fewer_processes_than_expected(tmp_path):
    """What ``accelerate launch --cpu --num_processes 2`` does (one process) is caught, not trained on."""
    command = [sys.executable, "examples/recipes/accelerate_loop.py", "--out", str(tmp_path), "--expect-ranks", "2"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--expect-ranks 2 but Accelerate runs 1 process" in result.stderr and "torchrun" in result.stderr
