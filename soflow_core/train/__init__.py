"""The training toolkit the examples use: EMA, atomic checkpoints, batch order, augmentation, latents, the step,
leaving a process group.

Optional for library users: the losses and samplers at the top of ``soflow_core`` never
import this package. Import from here, e.g. ``from soflow_core.train import EMA, save_checkpoint``.
"""

from soflow_core.train.augment import AugmentOutput, AugmentParams, EDMAugment
from soflow_core.train.batching import EpochStream
from soflow_core.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    latest_loadable_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    non_finite_entries,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from soflow_core.train.distributed import destroy_process_group
from soflow_core.train.ema import EMA, ema_coefficient, ema_warmup_coefficient
from soflow_core.train.latents import SD_VAE_SCALE_FACTOR, sample_latents, to_uint8_images
from soflow_core.train.step import TrainingStep, make_training_step

__all__ = [
    "EMA",
    "SD_VAE_SCALE_FACTOR",
    "AugmentOutput",
    "AugmentParams",
    "CheckpointError",
    "EDMAugment",
    "EpochStream",
    "TrainingStep",
    "capture_rng_state",
    "checkpoint_path",
    "destroy_process_group",
    "ema_coefficient",
    "ema_warmup_coefficient",
    "latest_loadable_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "make_training_step",
    "non_finite_entries",
    "remove_stale_temporaries",
    "restore_rng_state",
    "sample_latents",
    "save_checkpoint",
    "to_uint8_images",
    "verify_checkpoint",
]
