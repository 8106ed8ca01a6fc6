"""SoFlow under plain DDP with gradient accumulation, launched with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/recipes/ddp_torchrun.py --out runs/ddp

Every micro-batch draws from ``step_generator(seed, step, micro)``: distinct on every rank and
micro-batch (the rank comes from the process group) and exact after a resume, with no generator
state to save. ``step`` counts optimizer steps, never micro-batches. The data order is an
``EpochStream``, whose whole state is the step, so a checkpoint holds weights, optimizer, EMA
and the step only. Both live in ``_common.StepDraws``, shared with the FSDP2 recipe.
"""

import argparse
import contextlib

import _common as common
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from soflow_core.train import EMA, destroy_process_group, load_checkpoint, save_checkpoint


def main() -> None:
    args = common.recipe_arguments(__doc__.splitlines()[0]).parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(args)  # returns with its DDP wrapper (and the reducer's hold on the group) released
        dist.barrier()
    finally:
        destroy_process_group()  # soflow_core.train's: ends gloo's worker threads before Python does


def train(args: argparse.Namespace) -> None:
    batches = common.StepDraws(args, dist.get_rank(), dist.get_world_size())

    model = common.tiny_backbone(args.seed)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = EMA(model, decay=args.ema_decay)
    start = 0
    if args.resume is not None:
        state = load_checkpoint(args.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start = state["step"]
    for step in batches.steps(start):  # check_distinct_draws once, before the first step
        for micro, draws in batches.micro_batches(step, optimizer):  # draws from step_generator(seed, step, micro)
            last = micro == args.accum - 1
            with contextlib.nullcontext() if last else ddp.no_sync():  # all-reduce once, on the last micro-batch
                out = common.OBJECTIVE.loss(ddp, draws)
                (out.backprop / args.accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step=step)
        done = step + 1
        if args.save_every_epoch and done % batches.steps_per_epoch == 0 and dist.get_rank() == 0:
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}
            save_checkpoint(args.out, done, {**payload, "step": done})

    if dist.get_rank() == 0:
        common.save_final_weights(args.out, model.state_dict())


if __name__ == "__main__":
    main()
