"""Bad input gets a ValueError/TypeError naming the argument and the value, before any model call."""

import pytest
import torch

from soflow_core import (
    ClassifierFreeGuidance,
    ConstSchedule,
    EulerParam,
    ExponentSchedule,
    FlowMatchingLoss,
    LinearPath,
    LogitNormal,
    SoFlowObjective,
    SolutionConsistencyLoss,
    sample_chain,
    sample_few_step,
    sample_one_step,
)
from soflow_core.time_samplers import make_schedule


class NeverCalled:
    """A backbone that fails the test if input validation let a call through."""

    def __call__(self, x, t, s, cond):
        raise AssertionError("the model was called before the input was validated")


NET = NeverCalled()
X = torch.randn(4, 3)
T = torch.full((4,), 0.8)
S = torch.full((4,), 0.2)
ELL = torch.full((4,), 0.7)


def objective_call(**kwargs):
    args = {"data": X, "cond": None, "step": 0, "total_steps": 10}
    args.update(kwargs)
    objective = args.pop("objective", SoFlowObjective())
    return lambda: objective(NET, **args)


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
