"""The shared loop of the example trainers, in process: the evaluation duty (the seam in-loop scores plug into)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _helpers import spawn_gloo_ranks

from soflow_core.train.checkpoint import checkpoint_path, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _training as T  # noqa: E402
import train_dit_imagenet as imagenet  # noqa: E402
from _duties import Evaluation  # noqa: E402
from _run_folder import run_folder  # noqa: E402
from _runtime import Runtime  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(out: Path, **changes) -> imagenet.ImageNetConfig:
    base = imagenet.PRESETS["tiny"]
    return dataclasses.replace(base, synthetic=True, progress=False, out=str(out), **changes)


def train(config, runtime: Runtime, evaluation: Evaluation | None) -> dict:
    with run_folder(runtime, Path(config.out)) as folder:
        task = dataclasses.replace(imagenet.build_task(config, runtime), evaluation=evaluation)
        return T.train(task, runtime, folder)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_evaluation_gets_the_ema_weights_on_its_schedule_and_logs_into_the_rows(tmp_path):
    """Every 2 steps and at the last planned step, once each across a chunked run, before the step's checkpoint."""
    out = tmp_path / "run"
    config = tiny(out, total_steps=5, log_every=2, ckpt_every=1, keep=10)
    runtime = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    seen, finished = {}, []

    def evaluate(network, step, got_runtime):
        assert got_runtime is runtime and not torch.is_grad_enabled()
        assert not network.training and not any(p.requires_grad for p in network.parameters())
        assert step not in seen, f"step {step} evaluated twice"
        seen[step] = {k: v.clone() for k, v in network.state_dict().items()}
        return {"score": step / 10, "count": torch.tensor(3)}  # tensors are logged as floats

    evaluation = Evaluation(every=2, evaluate=evaluate, finish=finished.append)
    train(dataclasses.replace(config, max_steps=3), runtime, evaluation)  # a chunk: steps 1-3
    assert sorted(seen) == [2] and finished == []
    train(config, runtime, evaluation)  # resumed at 3: steps 4 and 5
    assert sorted(seen) == [2, 4, 5] and finished == [out]

    for step, weights in seen.items():  # the EMA of that very step, in a plain network
        ema = load_checkpoint(checkpoint_path(out / "checkpoints", step))["ema"]
        assert all(torch.equal(weights[k], v.to(weights[k].dtype)) for k, v in ema.items()), step
    logged = {row["step"]: row for row in rows(out) if "event" not in row}
    assert [s for s, row in logged.items() if "score" in row] == [2, 4, 5]
    for step in (2, 4, 5):  # merged into the metric row of that step, with the time it took
        assert logged[step]["score"] == step / 10 and logged[step]["count"] == 3.0
        assert logged[step]["evaluation_seconds"] >= 0 and "fm_loss" in logged[step]
    assert 3 not in logged  # the end of the first chunk is no row of an uninterrupted run


def test_an_evaluation_interval_must_be_a_positive_int():
    for every in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"Evaluation\.every must be an int >= 1"):
            Evaluation(every=every, evaluate=lambda network, step, runtime: {})


def _evaluating_rank(rank: int, world: int, out: str) -> None:
    """One rank of a 2-rank FSDP2 run whose evaluation spreads its work over the ranks (a collective inside)."""
    runtime = Runtime(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    runtime = dataclasses.replace(runtime, control=dist.new_group(backend="gloo"))

    def evaluate(network, step, got_runtime):
        # each rank sums its half of the parameters; the halves add up to the whole on every rank
        flat = torch.cat([p.detach().flatten() for p in network.parameters()]).double()
        part = flat.chunk(got_runtime.world_size)[got_runtime.rank].sum()
        total = part.clone()
        dist.all_reduce(total)
        return {"weight_sum": float(total), "local_sum": float(flat.sum()), "rank": got_runtime.rank}

    config = tiny(Path(out), total_steps=2, ckpt_every=2, fsdp=True)
    train(config, runtime, Evaluation(every=2, evaluate=evaluate))


def test_an_evaluation_runs_on_every_rank_with_the_whole_ema_network_under_fsdp(tmp_path):
    out = tmp_path / "run"
    spawn_gloo_ranks(_evaluating_rank, str(out), world=2, tmp_path=tmp_path)
    [row] = [row for row in rows(out) if "weight_sum" in row]
    assert row["step"] == 2 and row["rank"] == 0  # rank 0's result is the one logged
    assert row["weight_sum"] == pytest.approx(row["local_sum"], rel=1e-9)  # both ranks held the whole network
    ema = load_checkpoint(checkpoint_path(out / "checkpoints", 2))["ema"]
    params = dict(T.build_net(json.loads((out / "config.json").read_text())).named_parameters())
    expected = sum(float(ema[name].double().sum()) for name in params)
    assert row["local_sum"] == pytest.approx(expected, rel=1e-9)
