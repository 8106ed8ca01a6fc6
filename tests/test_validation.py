"""Bad input gets a ValueError/TypeError naming the argument and the value, before any model call."""

import dataclasses

import numpy as np
import pytest
import torch
from _helpers import random_mlp
from torch import nn

from soflow_core import (
    AdaptiveWeighting,
    ClassifierFreeGuidance,
    ConsistencyTimeSampler,
    ConstSchedule,
    EulerParam,
    ExponentSchedule,
    FlowMatchingLoss,
    LinearPath,
    LinearSchedule,
    LogitNormal,
    SoFlowObjective,
    SolutionConsistencyLoss,
    flow_matching_loss,
    sample_chain,
    sample_few_step,
    sample_one_step,
    solution_consistency_loss,
)
from soflow_core._validation import check_total_steps
from soflow_core.guidance import drop_cond
from soflow_core.nets import DiT
from soflow_core.time_samplers import make_schedule
from soflow_core.train import EMA, EpochStream


class NeverCalled:
    """A backbone that fails the test if input validation let a call through."""

    def __call__(self, x, t, s, cond):
        raise AssertionError("the model was called before the input was validated")


class NeverCalledWithClasses(NeverCalled):
    """A conditional backbone that declares its class count (the null class is index 5)."""

    num_classes = 5


class Returns:
    """A backbone that returns ``make(x)``: the wrong shape, dtype, device or nothing at all."""

    def __init__(self, make):
        self.make = make

    def __call__(self, x, t, s, cond):
        return self.make(x)


NET = NeverCalled()
CLASSES = NeverCalledWithClasses()
X = torch.randn(4, 3)
T = torch.full((4,), 0.8)
S = torch.full((4,), 0.2)
ELL = torch.full((4,), 0.7)


def objective_call(**kwargs):
    args = {"data": X, "cond": None, "step": 0, "total_steps": 10}
    args.update(kwargs)
    objective = args.pop("objective", SoFlowObjective())
    net = args.pop("net", NET)
    return lambda: objective(net, **args)


GUIDED = SoFlowObjective.from_preset("imagenet", guidance=ClassifierFreeGuidance(null_cond=5))
LABELS = torch.tensor([0, 1, 2, 3])
WEIGHTS = {"param": EulerParam(), "weighting": AdaptiveWeighting()}


CASES = {
    # shapes
    "noise shape": (lambda: LinearPath().sample(X, torch.randn(4, 2), T), "noise"),
    "t shape": (lambda: LinearPath().sample(X, X, torch.rand(3)), "t"),
    "t 2-d": (lambda: SolutionConsistencyLoss()(NET, X, X, T[:, None], S, ELL), "t"),
    "velocity shape": (lambda: SolutionConsistencyLoss()(NET, X, torch.randn(4, 2), T, S, ELL), "velocity"),
    "data 1-d": (objective_call(data=torch.randn(4)), "data"),
    "cond batch": (objective_call(cond=torch.zeros(3, dtype=torch.long)), "cond"),
    "noise vs data": (objective_call(noise=torch.randn(4, 2)), "noise"),
    "data not tensor": (objective_call(data=[[1.0, 2.0]]), "data"),
    "data integer": (objective_call(data=torch.ones(4, 3, dtype=torch.long)), "data"),
    "empty batch": (objective_call(data=torch.randn(0, 3)), "data"),
    # values
    "t > 1": (lambda: LinearPath().sample(X, X, torch.full((4,), 1.5)), "t"),
    "t < 0": (lambda: FlowMatchingLoss()(NET, X, X, torch.full((4,), -0.1)), "t"),
    "s > t": (lambda: EulerParam().solution(NET, X, S, T), "s"),
    "s < 0": (lambda: SolutionConsistencyLoss()(NET, X, X, T, torch.full((4,), -0.5), ELL), "s"),
    "ell >= t": (lambda: SolutionConsistencyLoss()(NET, X, X, T, S, T), "ell"),
    "ell < s": (lambda: SolutionConsistencyLoss()(NET, X, X, T, ELL, S), "s"),
    "nan data": (objective_call(data=torch.tensor([[float("nan"), 0.0, 0.0]] * 4)), "data"),
    "inf data": (objective_call(data=torch.tensor([[float("inf"), 0.0, 0.0]] * 4)), "data"),
    "nan x_t": (lambda: FlowMatchingLoss()(NET, X * float("nan"), X, T), "x_t"),
    "nan noise": (lambda: sample_one_step(NET, X * float("nan"), param=EulerParam()), "noise"),
    # names
    "preset": (lambda: SoFlowObjective.from_preset("imagenet512"), "preset"),
    "schedule": (lambda: make_schedule("step", r_init=0.1, r_end=0.01), "schedule"),
    "batching": (lambda: SoFlowObjective(forward_batching="fused"), "forward_batching"),
    "path name": (lambda: SoFlowObjective(path="cosine"), "path"),
    "param name": (lambda: SoFlowObjective(param="heun"), "parameterization"),
    "param type": (lambda: SoFlowObjective(param=LinearPath()), "param"),
    # hyperparameters
    "lambda > 1": (lambda: SoFlowObjective(fm_fraction=1.5), "fm_fraction"),
    "lambda < 0": (lambda: SoFlowObjective(fm_fraction=-0.1), "fm_fraction"),
    "omega < 1": (lambda: ClassifierFreeGuidance(scale=0.9), "scale"),
    "std <= 0": (lambda: LogitNormal(mean=0.0, std=0.0), "std"),
    "r_end 0": (lambda: ExponentSchedule(r_init=0.1, r_end=0.0), "r_end"),
    "r_init > 1": (lambda: ConstSchedule(r_init=2.0, r_end=0.1), "r_init"),
    # step counters
    "K = 0": (objective_call(total_steps=0), "total_steps"),
    "k < 0": (objective_call(step=-1), "step"),
    "k float": (objective_call(step=1.5), "step"),
    "k bool": (objective_call(step=True), "step"),
    "guidance without cond": (objective_call(objective=SoFlowObjective.from_preset("imagenet")), "cond"),
    # samplers
    "num_steps 0": (lambda: sample_few_step(NET, X, param=EulerParam(), path=LinearPath(), num_steps=0), "num_steps"),
    "increasing times": (lambda: sample_chain(NET, X, [0.0, 1.0], param=EulerParam()), "times"),
    "times outside": (lambda: sample_chain(NET, X, [1.5, 0.0], param=EulerParam()), "times"),
    "one time": (lambda: sample_chain(NET, X, [1.0], param=EulerParam()), "times"),
    "nan time": (lambda: sample_chain(NET, X, [1.0, float("nan"), 0.0], param=EulerParam()), "times"),
    # class labels, against the guidance's null index or the backbone's num_classes, before any model call
    "label = null class": (objective_call(objective=GUIDED, cond=torch.tensor([0, 1, 5, 2])), "cond"),
    "label negative": (objective_call(objective=GUIDED, cond=torch.tensor([0, -1, 2, 3])), "cond"),
    "label float": (objective_call(objective=GUIDED, cond=LABELS.float()), "cond"),
    "label vs backbone": (objective_call(net=CLASSES, cond=torch.tensor([0, 1, 7, 2])), "cond"),
    "label null, no drop": (objective_call(net=CLASSES, cond=torch.tensor([0, 1, 5, 2])), "cond"),
    "label sampler": (lambda: sample_one_step(CLASSES, X, param=EulerParam(), cond=torch.tensor([0, 6, 1, 2])), "cond"),
    "label loss object": (lambda: FlowMatchingLoss()(CLASSES, X, X, T, torch.tensor([0, 1, 2, 9])), "cond"),
    "guidance vs backbone": (
        objective_call(objective=SoFlowObjective.from_preset("imagenet"), net=CLASSES, cond=LABELS),
        "num_classes",
    ),
    # what the backbone returns, checked against its input
    "output shape": (objective_call(net=Returns(lambda x: x[:, :1])), "backbone"),
    "output dtype": (objective_call(net=Returns(lambda x: x.double())), "backbone"),
    "output None": (objective_call(net=Returns(lambda x: None)), "backbone"),
    "output sampler": (lambda: sample_one_step(Returns(lambda x: x[:, :1]), X, param=EulerParam()), "backbone"),
    "output chain": (lambda: sample_chain(Returns(lambda x: x[:1]), X, [1.0, 0.0], param=EulerParam()), "backbone"),
    "output loss": (lambda: SolutionConsistencyLoss()(Returns(lambda x: x.sum()), X, X, T, S, ELL), "backbone"),
    "output solution": (lambda: EulerParam().solution(Returns(lambda x: x[:, :1]), X, T, S), "backbone"),
    "output meta": (lambda: sample_one_step(Returns(lambda x: x.to("meta")), X, param=EulerParam()), "backbone"),
    # the public pure losses
    "pure t > 1": (lambda: flow_matching_loss(X, X, torch.full((4,), 1.5), **WEIGHTS), "t"),
    "pure target shape": (lambda: flow_matching_loss(X, X[:, :1], T, **WEIGHTS), "v_pred"),
    "pure s > t": (lambda: solution_consistency_loss(X, X, X, S, T, S, **WEIGHTS), "s"),
    "pure f_ell shape": (lambda: solution_consistency_loss(X, X, X[:1], T, S, ELL, **WEIGHTS), "f_ell"),
    "pure t shape": (lambda: solution_consistency_loss(X, X, X, T[:, None], S, ELL, **WEIGHTS), "t"),
    "pure param name": (lambda: flow_matching_loss(X, X, T, param="euler", weighting=AdaptiveWeighting()), "param"),
    # dtypes and types of the other inputs
    "noise dtype": (objective_call(noise=X.double()), "noise"),
    "path noise dtype": (lambda: LinearPath().sample(X, X.double(), T), "noise"),
    "null_cond 2.7": (lambda: drop_cond(LABELS, torch.tensor([True, False, False, True]), 2.7), "null_cond"),
    "null_cond str": (lambda: ClassifierFreeGuidance(null_cond="none"), "null_cond"),
    "null_cond in objective": (
        objective_call(
            objective=dataclasses.replace(GUIDED, guidance=ClassifierFreeGuidance(null_cond=2.7)), cond=LABELS
        ),
        "null_cond",
    ),
    "schedule number": (lambda: ConsistencyTimeSampler(schedule=0.1), "schedule"),
    "t_distribution": (lambda: ConsistencyTimeSampler(t_distribution="logit-normal"), "t_distribution"),
    "sampler param name": (lambda: sample_one_step(NET, X, param="euler"), "param"),
    "sampler path name": (lambda: sample_few_step(NET, X, param=EulerParam(), path="linear", num_steps=2), "path"),
    "sampler generator": (
        lambda: sample_few_step(NET, X, param=EulerParam(), path=LinearPath(), num_steps=2, generator=0),
        "generator",
    ),
    "objective generator": (objective_call(generator=42), "generator"),
    "time generator": (lambda: LogitNormal().sample(4, generator="cpu"), "generator"),
    "loss guidance": (lambda: FlowMatchingLoss()(NET, X, X, T, LABELS, guidance=3.0), "guidance"),
    "loss param": (lambda: FlowMatchingLoss(param="euler"), "param"),
    "meta data": (objective_call(data=torch.empty(4, 3, device="meta")), "data"),
    "meta noise": (lambda: sample_one_step(NET, torch.empty(4, 3, device="meta"), param=EulerParam()), "noise"),
    "ema dtype": (lambda: EMA(nn.Linear(2, 2), dtype="float64"), "dtype"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_raises_naming_the_argument(case):
    call, name = CASES[case]
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        call()


def test_messages_show_the_value():
    with pytest.raises(ValueError, match=r"fm_fraction must lie in \[0.0, 1.0\]; got 1.5"):
        SoFlowObjective(fm_fraction=1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]; got values in \[1.5, 1.5\]"):
        LinearPath().sample(X, X, torch.full((4,), 1.5))
    with pytest.raises(ValueError, match=r"unknown preset 'imagenet512'; choose one of 'imagenet', 'cifar10'"):
        SoFlowObjective.from_preset("imagenet512")
    with pytest.raises(ValueError, match=r"data holds 4 non-finite value\(s\)"):
        objective_call(data=torch.tensor([[float("nan"), 0.0, 0.0]] * 4))()
    with pytest.raises(ValueError, match=r"sample 0 has s=0.8.*t=0.2"):
        EulerParam().solution(NET, X, S, T)
    with pytest.raises(ValueError, match=r"eps must lie in \(0.0, inf\]; got 0.0"):
        SoFlowObjective(weighting=__import__("soflow_core").AdaptiveWeighting(eps=0.0))


def test_check_inputs_can_be_turned_off_for_data_checks():
    objective = SoFlowObjective(check_inputs=False, fm_fraction=1.0)
    calls = []

    def model(x, t, s, cond):
        calls.append(x.shape)
        return torch.zeros_like(x)

    out = objective(model, torch.tensor([[float("nan"), 0.0]] * 4), step=0, total_steps=1)
    assert calls and out.metrics["finite"].item() == 0.0


def test_labels_may_be_the_null_class_where_it_is_meant():
    """The null class is a label for sampling and for dropped samples, never a training label."""
    net = random_mlp(3, num_classes=5, dtype=torch.float32)
    null = torch.tensor([5, 0, 5, 4])
    assert sample_one_step(net, X, param=EulerParam(), cond=null).shape == X.shape
    objective = dataclasses.replace(GUIDED, guidance=ClassifierFreeGuidance(null_cond=5, drop_rate=0.5))
    batch = objective.sample_batch(X, LABELS, step=0, total_steps=10, generator=torch.Generator().manual_seed(0))
    masks = [part.drop_mask for part in (batch.flow_matching, batch.consistency) if part is not None]
    assert bool(torch.cat(masks).any())  # the label drop put the null class into the batch
    assert objective.loss(net, batch).metrics["finite"].item() == 1.0


def test_a_dit_error_inside_the_objective_names_the_users_batch():
    """The objective concatenates sub-batches; errors speak of per-sample shapes and say which call raised."""
    net = DiT(input_size=8, in_channels=4, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    data = torch.randn(8, 3, 8, 8)  # three channels for a four-channel DiT
    with pytest.raises(ValueError, match=r"images of shape \(4, 8, 8\).*got images of shape \(3, 8, 8\)") as info:
        GUIDED(net, data, torch.arange(8) % 5, step=0, total_steps=10)
    assert "(10, 3, 8, 8)" not in str(info.value)  # the guidance call's concatenated batch is not the user's
    notes = getattr(info.value, "__notes__", [])
    assert not notes or "step over 8 samples" in notes[0]


def test_epoch_stream_arrays_are_the_callers_own():
    stream = EpochStream(num_samples=6, seed=1)
    order = stream.epoch_order(0)
    expected = order.copy()
    order[:] = 0  # a caller that mutates its array must not change any later stream
    assert np.array_equal(EpochStream(num_samples=6, seed=1).epoch_order(0), expected)
    indices = stream.indices(0, 6)
    indices[:] = -1
    assert np.array_equal(stream.indices(0, 6), expected)


@pytest.mark.parametrize(
    ("total_steps", "error"),
    [(-1, ValueError), (0, ValueError), (float("inf"), TypeError), (100.0, TypeError)],
    ids=["lightning-max_steps-unset", "zero", "infinite-epochs", "float"],
)
def test_a_bad_total_steps_says_what_to_pass_under_lightning_and_accelerate(total_steps, error):
    calls = [lambda: check_total_steps(total_steps)]  # the check the objective and the schedules share
    if error is ValueError:  # their int annotations reject a float first when the jaxtyping hook runs
        calls.append(lambda: SoFlowObjective().sample_batch(X, step=0, total_steps=total_steps))
        calls.append(lambda: LinearSchedule()(0, total_steps))
    for call in calls:
        with pytest.raises(error, match="total_steps") as caught:
            call()
        message = str(caught.value)
        assert repr(total_steps) in message
        assert "estimated_stepping_batches" in message and "sync_gradients" in message
