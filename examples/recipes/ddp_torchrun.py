"""SoFlow under plain DDP with gradient accumulation, launched with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/recipes/ddp_torchrun.py --out runs/ddp

Every micro-batch draws from ``step_generator(seed, step, micro)``: distinct on every rank and
micro-batch (the rank comes from the process group) and exact after a resume, with no generator
state to save. ``step`` counts optimizer steps, never micro-batches. The data order is an
``EpochStream``, whose whole state is the step, so a checkpoint holds weights, optimizer, EMA
and the step only.
"""

import contextlib

import torch
import torch.distributed as dist
from _common import (
    OBJECTIVE,
    DrawTrace,
    optimizer_steps_taken,
    recipe_arguments,
    save_final_weights,
    tiny_backbone,
    toy_data,
)
from torch.nn.parallel import DistributedDataParallel

from soflow_core import check_distinct_draws, step_generator
from soflow_core.train import EMA, EpochStream, load_checkpoint, save_checkpoint


def main() -> None:
    args = recipe_arguments(__doc__.splitlines()[0]).parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = toy_data(args.seed, args.samples)
    stream = EpochStream(num_samples=len(data), seed=args.seed)
    global_batch = args.batch * args.accum * world
    steps_per_epoch = len(data) // global_batch
    total_steps = args.epochs * steps_per_epoch

    model = tiny_backbone(args.seed)
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
    trace = DrawTrace(args.out, rank, args.trace)

    for step in range(start, total_steps):
        if step == start:  # opt-in, once: raises if two ranks would draw alike
            check_distinct_draws(step_generator(args.seed, step))
        for micro in range(args.accum):
            indices = stream.micro_batch(
                position=step * global_batch, micro_batch_size=args.batch, micro_step=micro, rank=rank, world_size=world
            )
            generator = step_generator(args.seed, step, micro)
            batch = OBJECTIVE.sample_batch(data[indices], step=step, total_steps=total_steps, generator=generator)
            trace.record(step=step, micro=micro, optimizer_steps=optimizer_steps_taken(optimizer), batch=batch)
            last = micro == args.accum - 1
            with contextlib.nullcontext() if last else ddp.no_sync():  # all-reduce once, on the last micro-batch
                out = OBJECTIVE.loss(ddp, batch)
                (out.backprop / args.accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step=step)
        done = step + 1
        if args.save_every_epoch and done % steps_per_epoch == 0 and rank == 0:
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}
            save_checkpoint(args.out, done, {**payload, "step": done})

    if rank == 0:
        save_final_weights(args.out, model.state_dict())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
