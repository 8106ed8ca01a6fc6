"""``soflow_core.train.destroy_process_group``: a run's gloo worker threads end before Python does.

A gloo worker still running when the interpreter shuts down can abort a finished run (SIGABRT,
"terminate called without an active exception") as it drops its last collective. Under FSDP2,
PyTorch's DTensor caches keep the process group alive past a plain
``torch.distributed.destroy_process_group()``, so its threads are still there at shutdown. Each
check runs in a fresh process (one gloo rank) and counts the process's threads through /proc.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from soflow_core import SoFlowObjective, TrainingBatch
from soflow_core.nets import MLPBackbone
from soflow_core.train import destroy_process_group


def threads():
    return len(os.listdir("/proc/self/task"))


def train(wrapper):
    torch.manual_seed(0)
    model = MLPBackbone(dim=2, width=16, depth=2)
    if wrapper == "fsdp2":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        net = model
    else:
        net = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters())
    objective = SoFlowObjective()
    draws = objective.sample_batch(torch.randn(8, 2), step=0, total_steps=1, generator=torch.Generator().manual_seed(0))
    objective.loss(net, draws).backprop.backward()
    optimizer.step()
    if wrapper == "fsdp2":
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


wrapper, store = sys.argv[1], sys.argv[2]
before_init = threads()
dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
after_init = threads()
train(wrapper)
after_train = threads()
destroy_process_group()
print(after_init - before_init, after_train - threads(), dist.is_initialized())
destroy_process_group()  # a second call (nothing initialised) does nothing
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
@pytest.mark.parametrize("wrapper", ["fsdp2", "ddp"])
def test_no_gloo_thread_outlives_destroy_process_group(wrapper, tmp_path):
    command = [sys.executable, "-c", SCRIPT, wrapper, str(tmp_path / "store")]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    started, ended, still_initialized = result.stdout.split()
    assert int(started) > 0, "gloo started no worker thread: the check would see nothing"
    assert int(ended) == int(started), f"{int(started) - int(ended)} of the group's {started} threads still run"
    assert still_initialized == "False"
