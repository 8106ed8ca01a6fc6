"""soflow_core: Solution Flow Models (SoFlow) as typed, backbone-agnostic PyTorch building blocks.

Time runs from data (t = 0) to noise (t = 1). A network F_θ(x, t, s, cond) is turned into the
solution f_θ(x_t, t, s) = a·x_t + b·F_θ of the flow ODE, trained with Flow Matching plus the
JVP-free solution-consistency loss, and sampled in one step as f_θ(noise, 1, 0).

Examples:
    >>> import torch
    >>> from soflow_core import MLPBackbone, SoFlowObjective, sample_one_step
    >>> model, objective = MLPBackbone(dim=2), SoFlowObjective()
    >>> out = objective(model, torch.randn(32, 2), step=0, total_steps=1000)
    >>> out.backprop.backward()
"""

from soflow_core._dispatch import Backend, kernels_available
from soflow_core._tensor import bcast_right
from soflow_core.augment import AugmentOutput, AugmentParams, EDMAugment
from soflow_core.guidance import (
    ClassifierFreeGuidance,
    cfg_decay,
    drop_cond,
    guidance_coefficients,
    guided_target,
    guided_velocity,
    mixed_velocity,
    sample_drop_mask,
)
from soflow_core.latents import SD_VAE_SCALE_FACTOR, sample_latents, to_uint8_images
from soflow_core.losses import (
    ConsistencyOutput,
    FlowMatchingLoss,
    FlowMatchingOutput,
    SolutionConsistencyLoss,
    consistency_coefficients,
    consistency_quotient,
    flow_matching_loss,
    flow_matching_loss_from_output,
    guided_target_from_outputs,
    guided_teacher_state,
    solution_consistency_loss,
    solution_consistency_loss_from_teacher,
    teacher_state,
)
from soflow_core.metrics import (
    energy_distance,
    frechet_distance,
    gaussian_frechet_distance,
    median_bandwidth,
    mmd,
    sliced_wasserstein,
)
from soflow_core.nets import DIT_SIZES, DiT, MLPBackbone, SongUNet, load_dit_checkpoint
from soflow_core.objective import (
    PRESETS,
    ConsistencyBatch,
    FlowMatchingBatch,
    ObjectiveOutput,
    SoFlowObjective,
    TrainingBatch,
    has_active_dropout,
    split_sizes,
)
from soflow_core.parameterizations import AbstractParam, EulerParam, TrigParam, make_param
from soflow_core.paths import AbstractPath, LinearPath, PathSample, TrigPath, make_path
from soflow_core.rng import RngSnapshot, replay_rng, snapshot_rng
from soflow_core.samplers import sample_chain, sample_few_step, sample_one_step, uniform_time_grid
from soflow_core.time_samplers import (
    MIN_TIME_GAP,
    AbstractRSchedule,
    AbstractTimeDistribution,
    ConsistencyTimeSampler,
    ConstSchedule,
    CosineSchedule,
    ExponentSchedule,
    LinearSchedule,
    LogitNormal,
    TimeTriple,
    Uniform,
    consistency_times,
    make_schedule,
)
from soflow_core.toy import sample_toy_2d
from soflow_core.typing import Backbone
from soflow_core.weighting import AdaptiveWeighting, adaptive_weight, flow_matching_weight

__version__ = "0.1.0"

__all__ = [
    "DIT_SIZES",
    "MIN_TIME_GAP",
    "PRESETS",
    "SD_VAE_SCALE_FACTOR",
    "AbstractParam",
    "AbstractPath",
    "AbstractRSchedule",
    "AbstractTimeDistribution",
    "AdaptiveWeighting",
    "AugmentOutput",
    "AugmentParams",
    "Backbone",
    "Backend",
    "ClassifierFreeGuidance",
    "ConsistencyBatch",
    "ConsistencyOutput",
    "ConsistencyTimeSampler",
    "ConstSchedule",
    "CosineSchedule",
    "DiT",
    "EDMAugment",
    "EulerParam",
    "ExponentSchedule",
    "FlowMatchingBatch",
    "FlowMatchingLoss",
    "FlowMatchingOutput",
    "LinearPath",
    "LinearSchedule",
    "LogitNormal",
    "MLPBackbone",
    "ObjectiveOutput",
    "PathSample",
    "RngSnapshot",
    "SoFlowObjective",
    "SolutionConsistencyLoss",
    "SongUNet",
    "TimeTriple",
    "TrainingBatch",
    "TrigParam",
    "TrigPath",
    "Uniform",
    "adaptive_weight",
    "bcast_right",
    "cfg_decay",
    "consistency_coefficients",
    "consistency_quotient",
    "consistency_times",
    "drop_cond",
    "energy_distance",
    "flow_matching_loss",
    "flow_matching_loss_from_output",
    "flow_matching_weight",
    "frechet_distance",
    "gaussian_frechet_distance",
    "guidance_coefficients",
    "guided_target",
    "guided_target_from_outputs",
    "guided_teacher_state",
    "guided_velocity",
    "has_active_dropout",
    "kernels_available",
    "load_dit_checkpoint",
    "make_param",
    "make_path",
    "make_schedule",
    "median_bandwidth",
    "mixed_velocity",
    "mmd",
    "replay_rng",
    "sample_chain",
    "sample_drop_mask",
    "sample_few_step",
    "sample_latents",
    "sample_one_step",
    "sample_toy_2d",
    "sliced_wasserstein",
    "snapshot_rng",
    "solution_consistency_loss",
    "solution_consistency_loss_from_teacher",
    "split_sizes",
    "teacher_state",
    "to_uint8_images",
    "uniform_time_grid",
]
