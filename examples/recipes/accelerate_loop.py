"""SoFlow in a Hugging Face Accelerate loop with gradient accumulation, launched with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/recipes/accelerate_loop.py --out runs/accelerate

Launch with torchrun (or ``accelerate launch --multi_gpu`` on GPUs): ``accelerate launch --cpu
--num_processes 2`` starts a single process. The script refuses to run when ``--expect-ranks``
differs from the number of processes Accelerate sees.

* ``step`` is this loop's own count of optimizer steps, advanced when
  ``accelerator.sync_gradients`` is True; passing the micro-batch index instead would run the ℓ
  schedule ``gradient_accumulation_steps`` times too fast. It is registered for checkpointing.
* ``generator = step_generator(seed, step, micro)``: rank and world size from the process group.
  Not ``torch.Generator().manual_seed(seed)`` nor ``generator=None`` after ``set_seed``: both
  draw alike on every rank, and a generator registered for checkpointing is saved from rank 0
  only. This generator needs no saved state.
* ``total_steps = epochs · ceil(len(loader) / gradient_accumulation_steps)`` with the prepared
  (per-rank) loader.
* The EMA is registered for checkpointing, so ``save_state``/``load_state`` carry it.

Checkpoints are written at epoch ends, where the prepared loader starts a fresh epoch on resume.
"""

import math

import _common as common
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, TensorDataset

from soflow_core import check_distinct_draws, step_generator
from soflow_core.train import EMA


class StepCount:
    """Optimizer steps taken, as an object Accelerate can checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def main() -> None:
    parser = common.recipe_arguments(__doc__.splitlines()[0])
    parser.add_argument("--expect-ranks", type=int, default=None, help="fail unless this many processes run")
    args = parser.parse_args()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.accum,
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if args.expect_ranks is not None and accelerator.num_processes != args.expect_ranks:
        raise SystemExit(
            f"--expect-ranks {args.expect_ranks} but Accelerate runs {accelerator.num_processes} process(es); "
            "on CPU launch with torchrun --nproc_per_node N (accelerate launch --cpu starts one process)"
        )
    dataset = TensorDataset(common.toy_data(args.seed, args.samples))
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True)
    model = common.tiny_backbone(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = EMA(accelerator.unwrap_model(model), decay=args.ema_decay)
    progress = StepCount()
    accelerator.register_for_checkpointing(ema, progress)
    steps_per_epoch = math.ceil(len(loader) / args.accum)
    total_steps = args.epochs * steps_per_epoch
    if args.resume is not None:
        accelerator.load_state(args.resume)
    trace = common.DrawTrace(args.out, accelerator.process_index, args.trace)

    check_distinct_draws(step_generator(args.seed, progress.step))  # opt-in, once
    for epoch in range(progress.step // steps_per_epoch, args.epochs):
        loader.set_epoch(epoch)
        for index, (data,) in enumerate(loader):
            micro = index % args.accum
            step = progress.step  # optimizer steps taken, not micro-batches
            with accelerator.accumulate(model):
                generator = step_generator(args.seed, step, micro)
                draws = common.OBJECTIVE.sample_batch(data, step=step, total_steps=total_steps, generator=generator)
                trace.record(
                    step=step, micro=micro, optimizer_steps=common.optimizer_steps_taken(optimizer), batch=draws
                )
                accelerator.backward(common.OBJECTIVE.loss(model, draws).backprop)  # divided by the accumulation steps
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:  # an optimizer step was taken
                ema.update(accelerator.unwrap_model(model), step=progress.step)
                progress.step += 1
                if args.save_every_epoch and progress.step % steps_per_epoch == 0:
                    accelerator.save_state(args.out / f"state-{progress.step}")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        common.save_final_weights(args.out, accelerator.unwrap_model(model).state_dict())
    accelerator.end_training()


if __name__ == "__main__":
    main()
