"""SoFlow under FSDP2 (``fully_shard``) with gradient accumulation, launched with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/recipes/fsdp2_torchrun.py --out runs/fsdp2

The generator pattern is the DDP recipe's: ``step_generator(seed, step, micro)`` per micro-batch.
FSDP2 shards the module in place, so the objective takes the module itself; gradient sync is
switched off on all but the last micro-batch. Checkpoints hold full (gathered) state dicts, written
by rank 0 and read by every rank; the EMA tracks the sharded parameters and gathers them to save.
"""

import argparse

import _common as common
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from soflow_core.train import EMA, destroy_process_group, load_checkpoint, save_checkpoint

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def main() -> None:
    args = common.recipe_arguments(__doc__.splitlines()[0]).parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(args)  # returns with the sharded model, optimizer and EMA released
        dist.barrier()
    finally:
        destroy_process_group()  # soflow_core.train's: ends gloo's worker threads before Python does


def train(args: argparse.Namespace) -> None:
    rank = dist.get_rank()
    batches = common.StepDraws(args, rank, dist.get_world_size())

    model = common.tiny_backbone(args.seed)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = EMA(model, decay=args.ema_decay)
    start = 0
    if args.resume is not None:
        state = load_checkpoint(args.resume)
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        ema.load_state_dict(state["ema"])
        start = state["step"]
    for step in batches.steps(start):  # check_distinct_draws once, before the first step
        for micro, draws in batches.micro_batches(step, optimizer):  # draws from step_generator(seed, step, micro)
            model.set_requires_gradient_sync(micro == args.accum - 1)  # reduce-scatter once, on the last one
            out = common.OBJECTIVE.loss(model, draws)
            (out.backprop / args.accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step=step)
        done = step + 1
        if args.save_every_epoch and done % batches.steps_per_epoch == 0:
            payload = {  # gathering is a collective: every rank enters, rank 0 writes
                "model": get_model_state_dict(model, options=FULL),
                "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL),
                "ema": ema.state_dict(full=True),
                "step": done,
            }
            if rank == 0:
                save_checkpoint(args.out, done, payload)

    weights = get_model_state_dict(model, options=FULL)
    if rank == 0:
        common.save_final_weights(args.out, weights)


if __name__ == "__main__":
    main()
