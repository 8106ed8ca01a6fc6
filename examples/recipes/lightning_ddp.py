"""SoFlow in a PyTorch Lightning ``LightningModule`` with ``Trainer(strategy="ddp")``.

    torchrun --standalone --nproc_per_node 2 examples/recipes/lightning_ddp.py --out runs/lightning

(or ``python examples/recipes/lightning_ddp.py --devices 2`` and let Lightning start the ranks.)

* ``step = self.global_step``: optimizer steps, so the ℓ schedule advances once per optimizer
  step whatever ``accumulate_grad_batches`` is; ``micro = batch_idx % accumulate_grad_batches``.
* ``total_steps = self.trainer.estimated_stepping_batches``; ``self.trainer.max_steps`` is −1
  when only ``max_epochs`` is set.
* ``generator = step_generator(seed, step, micro)``: rank and world size come from the process
  group Lightning initialised. Not ``torch.Generator().manual_seed(seed)`` nor ``generator=None``
  after ``seed_everything``: both draw alike on every rank, and a generator state saved in
  ``on_save_checkpoint`` is rank 0's only. This generator needs no saved state.
* The EMA is updated inside ``optimizer_step``, so a checkpoint written after any optimizer step
  holds it (``ModelCheckpoint`` runs its ``on_train_batch_end`` before the module's), and rides in
  the checkpoint through ``on_save_checkpoint``/``on_load_checkpoint``.
* The data order is the library's ``EpochStream``, a function of the optimizer step: the loader
  (``StepBatches``) yields this rank's micro-batches from ``self.global_step`` to the end of the
  epoch, so a run resumed from any checkpoint, mid-epoch included (``--save-every-steps``), sees
  exactly the uninterrupted run's batches. A ``DataLoader(shuffle=True)`` would restart an
  interrupted epoch from its first batch.
"""

import os

import _common as common
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from soflow_core import check_distinct_draws, step_generator
from soflow_core.train import EMA, EpochStream


class StepBatches:
    """This rank's micro-batches, in ``EpochStream`` order from the trainer's optimizer step on.

    Each ``iter()`` (Lightning makes one per epoch) starts at ``trainer.global_step`` and runs to
    the end of that step's epoch, so the order depends on the step alone, which Lightning saves
    in every checkpoint: resuming mid-epoch continues with the uninterrupted run's next batch.
    ``state_dict``/``load_state_dict`` (Lightning's stateful-loader protocol) record that step
    and check it on resume; the loader keeps nothing else.
    """

    def __init__(self, data: torch.Tensor, trainer: L.Trainer, *, seed: int, batch: int, accum: int) -> None:
        self.data, self.trainer, self.batch, self.accum = data, trainer, batch, accum
        self.stream = EpochStream(num_samples=len(data), seed=seed)
        self.global_batch = batch * accum * trainer.world_size
        self.steps_per_epoch = len(data) // self.global_batch
        if self.steps_per_epoch < 1:
            raise SystemExit(f"--samples {len(data)} holds no optimizer step of {self.global_batch} samples")

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum  # micro-batches per epoch on this rank

    def __iter__(self):
        start = self.trainer.global_step
        epoch_end = (start // self.steps_per_epoch + 1) * self.steps_per_epoch
        for step in range(start, epoch_end):
            for micro in range(self.accum):
                indices = self.stream.micro_batch(
                    position=step * self.global_batch,
                    micro_batch_size=self.batch,
                    micro_step=micro,
                    rank=self.trainer.global_rank,
                    world_size=self.trainer.world_size,
                )
                yield (self.data[indices],)

    def state_dict(self) -> dict:
        return {"step": self.trainer.global_step}

    def load_state_dict(self, state: dict) -> None:
        if state["step"] != self.trainer.global_step:
            raise RuntimeError(
                f"the checkpoint's data position is step {state['step']}, its trainer's {self.trainer.global_step}"
            )


class SoFlowModule(L.LightningModule):
    def __init__(self, args) -> None:
        super().__init__()
        self.args = args
        self.model = common.tiny_backbone(args.seed)
        self.ema = EMA(self.model, decay=args.ema_decay)
        self.trace: common.DrawTrace | None = None
        self.checked = False

    def setup(self, stage: str) -> None:
        self.trace = common.DrawTrace(self.args.out, self.global_rank, self.args.trace)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        (data,) = batch
        step = self.global_step  # optimizer steps taken
        micro = batch_idx % self.trainer.accumulate_grad_batches
        total_steps = self.trainer.estimated_stepping_batches
        generator = step_generator(self.args.seed, step, micro)
        if not self.checked:  # opt-in, once: raises if two ranks would draw alike
            check_distinct_draws(generator)
            self.checked = True
        draws = common.OBJECTIVE.sample_batch(data, step=step, total_steps=total_steps, generator=generator)
        optimizer_steps = common.optimizer_steps_taken(self.optimizers().optimizer)
        self.trace.record(step=step, micro=micro, optimizer_steps=optimizer_steps, batch=draws)
        return common.OBJECTIVE.loss(self.model, draws).backprop  # Lightning divides by accumulate_grad_batches

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model, step=self.global_step)  # global_step still counts the steps before this one

    def train_dataloader(self) -> StepBatches:
        args = self.args
        data = common.toy_data(args.seed, args.samples)
        return StepBatches(data, self.trainer, seed=args.seed, batch=args.batch, accum=args.accum)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.ema.load_state_dict(checkpoint["ema"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.args.lr)


def main() -> None:
    parser = common.recipe_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--devices",
        type=int,
        default=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        help="processes per node, as torchrun started them (its LOCAL_WORLD_SIZE)",
    )
    parser.add_argument(
        "--save-every-steps",
        type=int,
        default=0,
        help="also checkpoint every N optimizer steps (mid-epoch too); 0: off",
    )
    args = parser.parse_args()
    callbacks = []
    if args.save_every_epoch:
        callbacks.append(ModelCheckpoint(dirpath=args.out, filename="{step}", every_n_epochs=1, save_top_k=-1))
    if args.save_every_steps:
        every = args.save_every_steps
        callbacks.append(ModelCheckpoint(dirpath=args.out, filename="{step}", every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=args.devices,
        strategy="ddp",
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accum,
        callbacks=callbacks,
        enable_checkpointing=bool(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = SoFlowModule(args)
    trainer.fit(module, ckpt_path=args.resume)
    if trainer.is_global_zero:
        ema = {f"ema.{name}": value for name, value in module.ema.state_dict().items()}
        common.save_final_weights(args.out, module.model.state_dict() | ema)


if __name__ == "__main__":
    main()
