"""What every recipe shares: arguments, the toy data, the tiny backbone, the objective and the draw trace.

The recipes keep the generator pattern in plain sight; only the parts that are the same in every
framework live here. ``--trace`` makes each rank write one JSON line per micro-batch with the
times the objective drew, sums of the points x_t it trained on (they change with the data order)
and the optimizer's own step count, which the recipe tests read.
"""

import argparse
import json
from pathlib import Path

import torch

from soflow_core import SoFlowObjective, TrainingBatch, check_distinct_draws, step_generator
from soflow_core.data import sample_toy_2d
from soflow_core.nets import MLPBackbone
from soflow_core.train import EpochStream

OBJECTIVE = SoFlowObjective()


def recipe_arguments(description: str) -> argparse.ArgumentParser:
    """The command line every recipe takes (each may add its own)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoints, final weights and traces")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the toy dataset")
    parser.add_argument("--samples", type=int, default=128, help="toy dataset size")
    parser.add_argument("--batch", type=int, default=8, help="samples per micro-batch on each rank")
    parser.add_argument("--accum", type=int, default=2, help="gradient-accumulation micro-batches per optimizer step")
    parser.add_argument("--seed", type=int, default=0, help="run seed: weights, data order and every draw")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--ema-decay", type=float, default=0.9, help="EMA decay per optimizer step")
    parser.add_argument("--save-every-epoch", action="store_true", help="checkpoint at the end of every epoch")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from")
    parser.add_argument("--trace", action="store_true", help="write out/trace-rank<r>.jsonl (what the tests read)")
    return parser


def toy_data(seed: int, samples: int) -> torch.Tensor:
    """The dataset: ``samples`` checkerboard points, the same on every rank (each rank reads its own shard)."""
    points, _ = sample_toy_2d("checkerboard", samples, generator=torch.Generator().manual_seed(seed))
    return points


def tiny_backbone(seed: int) -> MLPBackbone:
    """The network F_θ(x, t, s), initialised alike on every rank."""
    torch.manual_seed(seed)
    return MLPBackbone(dim=2, width=32, depth=2)


def optimizer_steps_taken(optimizer: torch.optim.Optimizer) -> int:
    """How many steps the optimizer has taken, read from Adam's own per-parameter counter."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


class DrawTrace:
    """One JSON line per micro-batch: step, micro, rank, the optimizer's count, the drawn times and x_t's sums."""

    def __init__(self, out: Path, rank: int, enabled: bool) -> None:
        self.path = out / f"trace-rank{rank}.jsonl" if enabled else None
        self.rank = rank

    def record(self, *, step: int, micro: int, optimizer_steps: int, batch: TrainingBatch) -> None:
        if self.path is None:
            return
        times = batch.consistency
        line = {
            "rank": self.rank,
            "step": step,
            "micro": micro,
            "optimizer_steps": optimizer_steps,
            "fm_t": batch.flow_matching.t.tolist(),
            "t": times.t.tolist(),
            "s": times.s.tolist(),
            "ell": times.ell.tolist(),
            # the data the step trained on (x_t mixes it with the noise): equal only for the same batches
            "x_t_sums": [part.x_t.sum().item() for part in (batch.flow_matching, times)],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")


def save_final_weights(out: Path, state: dict) -> None:
    """Write the trained weights (rank 0 only) so runs can be compared bit for bit."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out / "final.pt")


class StepDraws:
    """The torchrun recipes' batches: this rank's micro-batches of each optimizer step, with their draws.

    The data order is an ``EpochStream`` (its whole state is the step) and every micro-batch draws
    from ``step_generator(seed, step, micro)``, so a resumed run sees exactly the uninterrupted
    run's batches and draws.
    """

    def __init__(self, args: argparse.Namespace, rank: int, world: int) -> None:
        self.args, self.rank, self.world = args, rank, world
        self.data = toy_data(args.seed, args.samples)
        self.stream = EpochStream(num_samples=len(self.data), seed=args.seed)
        self.global_batch = args.batch * args.accum * world
        self.steps_per_epoch = len(self.data) // self.global_batch
        self.total_steps = args.epochs * self.steps_per_epoch
        self.trace = DrawTrace(args.out, rank, args.trace)

    def steps(self, start: int):
        """Yield the optimizer steps start, ..., K − 1, first checking once that the ranks draw differently."""
        check_distinct_draws(step_generator(self.args.seed, start))  # opt-in; raises if two ranks draw alike
        yield from range(start, self.total_steps)

    def micro_batches(self, step: int, optimizer: torch.optim.Optimizer):
        """Yield (micro, draws) for the micro-batches of optimizer step ``step``."""
        args = self.args
        for micro in range(args.accum):
            indices = self.stream.micro_batch(
                position=step * self.global_batch,
                micro_batch_size=args.batch,
                micro_step=micro,
                rank=self.rank,
                world_size=self.world,
            )
            generator = step_generator(args.seed, step, micro)  # distinct per rank and micro-batch
            draws = OBJECTIVE.sample_batch(
                self.data[indices], step=step, total_steps=self.total_steps, generator=generator
            )
            self.trace.record(step=step, micro=micro, optimizer_steps=optimizer_steps_taken(optimizer), batch=draws)
            yield micro, draws
