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
* The EMA rides in the checkpoint through ``on_save_checkpoint``/``on_load_checkpoint``.

Checkpoints are written at epoch ends: without a stateful data loader Lightning restarts an
interrupted epoch from its first batch, so only an epoch-end checkpoint resumes onto exactly the
batches of the uninterrupted run.
"""

import os

import _common as common
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from soflow_core import check_distinct_draws, step_generator
from soflow_core.train import EMA


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

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:  # an optimizer step was just taken
            self.ema.update(self.model, step=self.global_step - 1)

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
    args = parser.parse_args()
    loader = DataLoader(TensorDataset(common.toy_data(args.seed, args.samples)), batch_size=args.batch, shuffle=True)
    callbacks = []
    if args.save_every_epoch:
        callbacks.append(ModelCheckpoint(dirpath=args.out, filename="{step}", every_n_epochs=1, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=args.devices,
        strategy="ddp",
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accum,
        callbacks=callbacks,
        enable_checkpointing=args.save_every_epoch,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = SoFlowModule(args)
    trainer.fit(module, loader, ckpt_path=args.resume)
    if trainer.is_global_zero:
        common.save_final_weights(args.out, module.model.state_dict())


if __name__ == "__main__":
    main()
