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
from soflow_core.nets import DiT, MLPBackbone
from soflow_core.time_samplers import make_schedule
from soflow_core.train import EMA, EpochStream


class NeverCalled:
    """A backbone that fails the test if input validation let a call through."""

    def __call__(self, x, t, s, cond):
        raise AssertionError("the model was called before the input was validated")


class NeverCalledWithClasses(NeverCalled):
    """A conditional backbone that declares its class count (the null class is index 5)."""

    num_classes = 5


class NeverCalledUnconditional(NeverCalled):
    """A backbone that declares itself unconditional, as the library's do with num_classes=None."""

    num_classes = None


class NeverCalledShaped(NeverCalled):
    """A backbone that declares the shape of its samples, as the library's do."""

    sample_shape = (2,)


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
    "label for unconditional": (objective_call(net=NeverCalledUnconditional(), cond=LABELS), "cond"),
    "cond on another device": (objective_call(cond=torch.zeros(4, dtype=torch.long, device="meta")), "cond"),
    "sample shape objective": (objective_call(net=NeverCalledShaped()), "data"),
    "sample shape sampler": (lambda: sample_one_step(NeverCalledShaped(), X, param=EulerParam()), "noise"),
    "label sampler unconditional": (
        lambda: sample_one_step(NeverCalledUnconditional(), X, param=EulerParam(), cond=LABELS),
        "cond",
    ),
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
    with pytest.raises(
        ValueError, match=r"data holds samples of shape \(3, 8, 8\).*takes samples of shape \(4, 8, 8\)"
    ):
        GUIDED(net, data, torch.arange(8) % 5, step=0, total_steps=10)  # refused before any call: the DiT declares it
    hidden = CountingWrapper(net)  # behind a wrapper the DiT's own forward refuses it, at the first call
    with pytest.raises(ValueError, match=r"images of shape \(4, 8, 8\).*got images of shape \(3, 8, 8\)") as info:
        GUIDED(hidden, data, torch.arange(8) % 5, step=0, total_steps=10)
    assert "(10, 3, 8, 8)" not in str(info.value)  # the guidance call's concatenated batch is not the user's
    notes = getattr(info.value, "__notes__", [])
    assert hidden.calls == 1 and "step over 8 samples" in notes[0]


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


# ---------------------------------------------------------------------------- class labels, one rule everywhere


def _dit(num_classes=4, **overrides):
    config = {"input_size": 4, "in_channels": 2, "patch_size": 2, "hidden_size": 16, "depth": 1, "num_heads": 2}
    return DiT(**{**config, "num_classes": num_classes, **overrides})


def _image_inputs(batch=2):
    return torch.randn(batch, 2, 4, 4), torch.full((batch,), 0.8), torch.full((batch,), 0.2)


BACKBONE_LABELS = {
    "DiT above": (lambda: _dit(10), [0, 11], ValueError, r"cond\[1\] = 11"),
    "DiT -1": (lambda: _dit(10), [-1, 0], ValueError, r"cond\[0\] = -1"),
    "DiT -11": (lambda: _dit(10), [3, -11], ValueError, r"cond\[1\] = -11"),
    "DiT null without row": (lambda: _dit(10, null_class=False), [10, 0], ValueError, r"\[0, 10\); 1 do not"),
    "DiT float": (lambda: _dit(10), [0.5, 3.0], TypeError, "integer class labels"),
    "DiT bool": (lambda: _dit(10), [True, False], TypeError, "integer class labels"),
    "MLP float 0.5": (lambda: MLPBackbone(dim=2, num_classes=4), [0.5, 3.9], TypeError, "integer class labels"),
    "MLP above": (lambda: MLPBackbone(dim=2, num_classes=4), [5, 0], ValueError, r"or the null class 4; 1 do not"),
    "MLP -1": (lambda: MLPBackbone(dim=2, num_classes=4), [0, -1], ValueError, r"cond\[1\] = -1"),
}


@pytest.mark.parametrize("case", list(BACKBONE_LABELS), ids=list(BACKBONE_LABELS))
def test_every_backbone_checks_its_labels_in_forward(case):
    """The rule the objective applies, in the backbone itself: nothing reaches the embedding as an IndexError."""
    make, labels, error, message = BACKBONE_LABELS[case]
    net = make()
    if isinstance(net, MLPBackbone):
        x, t, s = torch.randn(2, 2), torch.full((2,), 0.8), torch.full((2,), 0.2)
    else:
        x, t, s = _image_inputs()
    with pytest.raises(error, match=message) as info:
        net(x, t, s, torch.tensor(labels))
    assert "cond" in str(info.value)


def test_backbones_take_valid_labels_and_the_null_class_where_it_exists():
    x, t, s = _image_inputs()
    assert _dit(10)(x, t, s, torch.tensor([9, 10])).shape == x.shape
    assert _dit(10, null_class=False)(x, t, s, torch.tensor([0, 9], dtype=torch.int32)).shape == x.shape
    mlp = MLPBackbone(dim=2, num_classes=4)
    assert mlp(torch.randn(2, 2), t, s, torch.tensor([4, 3], dtype=torch.uint8)).shape == (2, 2)
    with pytest.raises(ValueError, match="SongUNet is unconditional"):
        __import__("soflow_core.nets", fromlist=["SongUNet"]).SongUNet(
            img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1], num_blocks=1
        )(torch.randn(2, 1, 8, 8), t, s, torch.tensor([0, 1]))


class CountingWrapper(nn.Module):
    """A user's small module around a backbone (as written for logging): it hides the class count."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x, t, s, cond=None):
        self.calls += 1
        return self.net(x, t, s, cond)


def test_a_wrapper_cannot_hide_a_preset_null_class_from_a_smaller_model():
    """The ImageNet preset's null class 1000 on a 4-class DiT behind a wrapper: the library's error, first call."""
    wrapper = CountingWrapper(_dit(4))
    objective = SoFlowObjective.from_preset("imagenet")  # null_cond = 1000, meant for 1000 classes
    data, _, _ = _image_inputs(8)
    with pytest.raises(ValueError, match=r"cond must hold class labels in \[0, 4\) or the null class 4") as info:
        objective(wrapper, data, torch.tensor([0, 1, 2, 3] * 2), step=0, total_steps=10)
    assert wrapper.calls <= 1
    assert any("guidance.null_cond = 1000" in note for note in getattr(info.value, "__notes__", []))


def test_sampling_behind_a_wrapper_refuses_a_label_out_of_range():
    net = _dit(4)
    noise, _, _ = _image_inputs(2)
    for wrapper in (CountingWrapper(net), lambda x, t, s, cond: net(x, t, s, cond)):
        with pytest.raises(ValueError, match=r"cond\[1\] = 7"):
            sample_one_step(wrapper, noise, param=EulerParam(), cond=torch.tensor([0, 7]))


def test_labels_checked_by_the_caller_are_not_read_again_by_the_backbone(monkeypatch):
    """One device sync per step for the labels: the backbone skips its value check where the objective checked."""
    import soflow_core._validation as validation

    reads = []
    original = validation.check_values

    def counting(checks):
        reads.append(len(checks))
        return original(checks)

    monkeypatch.setattr(validation, "check_values", counting)
    net = _dit(4)
    objective = SoFlowObjective.from_preset("imagenet", num_classes=4)
    data, _, _ = _image_inputs(8)
    labels = torch.tensor([0, 1, 2, 3] * 2)
    batch = objective.sample_batch(data, labels, step=0, total_steps=10, generator=torch.Generator().manual_seed(0))
    objective.loss(net, batch)
    assert reads == []  # the objective read the labels itself (its own check_values), the DiT did not again
    objective.loss(CountingWrapper(net), batch)
    assert len(reads) == 3  # behind a wrapper the DiT checks each of its calls: guidance, grad, teacher


# ---------------------------------------------------------------------------- dtypes


def test_float64_data_for_a_float32_model_gets_the_librarys_message():
    net = MLPBackbone(dim=2, width=8, depth=1)
    data = torch.randn(8, 2, dtype=torch.float64)
    calls = {
        "data": lambda: SoFlowObjective()(net, data, step=0, total_steps=10),
        "noise": lambda: sample_one_step(net, data, param=EulerParam()),
        "x_t": lambda: FlowMatchingLoss()(net, data, data, torch.full((8,), 0.5, dtype=torch.float64)),
        "x": lambda: net(data, torch.full((8,), 0.5), torch.zeros(8)),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"{name} has dtype torch.float64 but the backbone's parameters are "
                                            rf"torch.float32: pass {name}.to\(torch.float32\)"):  # fmt: skip
            call()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast computes in its own dtype: the mix is allowed
        assert net(data.float(), torch.full((8,), 0.5), torch.zeros(8)).shape == (8, 2)


# ---------------------------------------------------------------------------- switches, sequences, time grids


def _switch_cases():
    from soflow_core.nets import SongUNet, read_state_dict
    from soflow_core.nets.checkpoints import load_weights
    from soflow_core.train import load_checkpoint, make_training_step

    net = nn.Linear(2, 2)
    unet = {"img_resolution": 8, "in_channels": 1, "model_channels": 8, "channel_mult": [1], "num_blocks": 1}
    mlp = MLPBackbone(dim=2, width=8, depth=1)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    return {
        "check_inputs 'no'": (lambda: SoFlowObjective(check_inputs="no"), "check_inputs"),
        "differentiable_loss 1": (lambda: SoFlowObjective(differentiable_loss=1), "differentiable_loss"),
        "null_class 'no'": (lambda: _dit(4, null_class="no"), "null_class"),
        "gradient_checkpointing 'off'": (lambda: _dit(4, gradient_checkpointing="off"), "gradient_checkpointing"),
        "shuffle 'no'": (lambda: EpochStream(num_samples=4, shuffle="no"), "shuffle"),
        "warmup 'yes'": (lambda: EMA(net, warmup="yes"), "warmup"),
        "full 'no'": (lambda: EMA(net).state_dict(full="no"), "full"),
        "compile 'no'": (lambda: make_training_step(SoFlowObjective(), net, sgd, compile="no"), "compile"),
        "fullgraph 0": (lambda: make_training_step(SoFlowObjective(), net, sgd, fullgraph=0), "fullgraph"),
        "verify 'no'": (lambda: read_state_dict({"w": torch.zeros(1)}, verify="no"), "verify"),
        "checkpoint verify 'no'": (lambda: load_checkpoint("missing.pt", verify="no"), "verify"),
        "strict 'no'": (lambda: load_weights(mlp, mlp.state_dict(), strict="no"), "strict"),
        "adaptive_scale 'no'": (lambda: SongUNet(**unet, adaptive_scale="no"), "adaptive_scale"),
        "attn_resolutions 8": (lambda: SongUNet(**unet, attn_resolutions=8), "attn_resolutions"),
        "channel_mult '12'": (lambda: SongUNet(**{**unet, "channel_mult": "12"}), "channel_mult"),
        "resample_filter zeros": (lambda: SongUNet(**unet, resample_filter=[0, 0]), "resample_filter"),
        "chain times bool": (lambda: sample_chain(NET, X, [True, False], param=EulerParam()), "times"),
        "chain times int tensor": (lambda: sample_chain(NET, X, torch.tensor([1, 0]), param=EulerParam()), "times"),
        "few-step times bool": (
            lambda: sample_few_step(NET, X, param=EulerParam(), path=LinearPath(), times=[True]),
            "times",
        ),
    }


SWITCHES = list(_switch_cases())


@pytest.mark.parametrize("case", SWITCHES, ids=SWITCHES)
def test_switches_take_true_or_false_only_and_sequences_are_checked(case):
    """A string is never a switch (bool('no') is True); a lone number is not a list; a bool is not a time."""
    call, name = _switch_cases()[case]
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b") as info:
        call()
    assert not isinstance(info.value, FileNotFoundError)


def test_switches_accept_bools_and_time_grids_take_arrays():
    assert SoFlowObjective(check_inputs=False).check_inputs is False
    assert EpochStream(num_samples=4, shuffle=False).epoch_order(0).tolist() == [0, 1, 2, 3]
    assert (
        sample_chain(random_mlp(3, dtype=torch.float32), X, np.array([1.0, 0.0]), param=EulerParam()).shape == X.shape
    )


def test_an_ema_state_with_nan_is_refused_and_leaves_the_shadow_as_it_was():
    net = nn.Linear(2, 2)
    ema = EMA(net)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    state = ema.state_dict()
    state["weight"] = torch.ones(2, 2)  # a good entry before the bad one must not be written either
    state["bias"] = torch.tensor([0.0, float("nan")])
    with pytest.raises(ValueError, match=r"state\['bias'\] holds 1 non-finite value"):
        ema.load_state_dict(state)
    for name, value in ema.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_model_on_another_device_gets_the_librarys_message():
    net = MLPBackbone(dim=2, width=8, depth=1).to("meta")  # parameters not materialised: no values to compute with
    with pytest.raises(ValueError, match=r"parameters are on the meta device.*before passing noise"):
        sample_one_step(net, torch.randn(4, 2), param=EulerParam())
    with pytest.raises(ValueError, match=r"parameters are on the meta device.*before passing data"):
        SoFlowObjective()(net, torch.randn(4, 2), step=0, total_steps=10)
    assert net(torch.randn(4, 2, device="meta"), torch.rand(4).to("meta"), torch.zeros(4, device="meta")).is_meta
