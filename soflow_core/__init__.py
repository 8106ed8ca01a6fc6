"""soflow_core: Solution Flow Models (SoFlow) as typed, backbone-agnostic PyTorch building blocks.

Time runs from data (t = 0) to noise (t = 1). A network F_θ(x, t, s, cond) is turned into the
solution f_θ(x_t, t, s) = a·x_t + b·F_θ of the flow ODE, trained with Flow Matching plus the
JVP-free solution-consistency loss, and sampled in one step as f_θ(noise, 1, 0).

The top level is the method: the objective and its losses, paths, parameterizations, time
samplers, weighting, guidance, samplers, the backbone protocol, the per-step generator and its cross-rank check.
Everything else lives in a named sub-package: ``soflow_core.train`` (EMA, checkpoints, batch
order, augmentation, latents), ``soflow_core.nets`` (backbones), ``soflow_core.metrics``,
``soflow_core.data`` (2-D toys) and ``soflow_core.ops`` (fused ops and backends). The method
modules (``soflow_core.losses``, ``soflow_core.guidance``, ...) hold the per-equation functions.

Examples:
    >>> import torch
    >>> from soflow_core import SoFlowObjective, step_generator
    >>> from soflow_core.nets import MLPBackbone
    >>> model, objective = MLPBackbone(dim=2), SoFlowObjective()
    >>> out = objective(model, torch.randn(32, 2), step=0, total_steps=1000, generator=step_generator(0, 0))
    >>> out.backprop.backward()
"""

from soflow_core.guidance import ClassifierFreeGuidance
from soflow_core.losses import (
    ConsistencyOutput,
    FlowMatchingLoss,
    FlowMatchingOutput,
    SolutionConsistencyLoss,
    flow_matching_loss,
    solution_consistency_loss,
)
from soflow_core.objective import ObjectiveOutput, SoFlowObjective, TrainingBatch
from soflow_core.parameterizations import AbstractParam, EulerParam, TrigParam
from soflow_core.paths import AbstractPath, LinearPath, TrigPath
from soflow_core.samplers import sample_chain, sample_few_step, sample_one_step
from soflow_core.seeding import check_distinct_draws, step_generator
from soflow_core.time_samplers import (
    ConsistencyTimeSampler,
    ConstSchedule,
    CosineSchedule,
    ExponentSchedule,
    LinearSchedule,
    LogitNormal,
    Uniform,
)
from soflow_core.typing import Backbone
from soflow_core.weighting import AdaptiveWeighting

__version__ = "0.1.0"

__all__ = [
    "AbstractParam",
    "AbstractPath",
    "AdaptiveWeighting",
    "Backbone",
    "ClassifierFreeGuidance",
    "ConsistencyOutput",
    "ConsistencyTimeSampler",
    "ConstSchedule",
    "CosineSchedule",
    "EulerParam",
    "ExponentSchedule",
    "FlowMatchingLoss",
    "FlowMatchingOutput",
    "LinearPath",
    "LinearSchedule",
    "LogitNormal",
    "ObjectiveOutput",
    "SoFlowObjective",
    "SolutionConsistencyLoss",
    "TrainingBatch",
    "TrigParam",
    "TrigPath",
    "Uniform",
    "check_distinct_draws",
    "flow_matching_loss",
    "sample_chain",
    "sample_few_step",
    "sample_one_step",
    "solution_consistency_loss",
    "step_generator",
]
