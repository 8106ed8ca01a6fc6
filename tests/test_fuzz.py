"""A property-based fuzz test of the public API, as an outside user would call it.

Random shapes, dtypes, devices (cpu, meta), label ranges and option values go to
`SoFlowObjective`, the samplers, the loss objects, the pure losses and the backbones. Every call
must either return finite results of the right shape, or raise the library's own error: a
``ValueError`` or ``TypeError`` whose message names the argument, raised before any model call
(the model is counted by a wrapper). Behind a wrapper that hides the network (a plain callable
object, as users write for logging or guidance) the library cannot see the class count or the
parameters' dtype, so there the backbone's own check in ``forward`` must raise, at the first
call and before its embedding: still the library's error, never an ``IndexError`` or a torch
``RuntimeError``.

The calls run with the test-time jaxtyping/beartype hook off (``shape_checks_off``): production
has no runtime type checker, so the library's own checks are what is under test. Each property
draws 40 derandomized examples in the default profile (a few seconds); CI's exploratory pass
runs them again with more random examples.
"""

import re
from functools import cache

import pytest
import torch
from _helpers import shape_checks_off
from hypothesis import given
from hypothesis import strategies as st

from soflow_core import (
    AdaptiveWeighting,
    ClassifierFreeGuidance,
    EulerParam,
    FlowMatchingLoss,
    LinearPath,
    SoFlowObjective,
    SolutionConsistencyLoss,
    TrigParam,
    flow_matching_loss,
    sample_chain,
    sample_few_step,
    sample_one_step,
    solution_consistency_loss,
)
from soflow_core.nets import DiT, MLPBackbone, SongUNet

ARGUMENTS = [
    *("data", "cond", "noise", "x", "x_t", "v_t", "velocity", "t", "s", "ell", "step", "total_steps", "times"),
    *("num_steps", "param", "path", "generator", "fm_fraction", "guidance", "null_cond", "num_classes", "v_pred"),
    *("target", "f_t", "f_ell", "labels", "backbone", "preset", "check_inputs", "network_output", "teacher_output"),
]
NAMED = re.compile(r"\b(" + "|".join(re.escape(name) for name in ARGUMENTS) + r")\b")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]


class Visible:
    """A wrapper that shows the network as DDP does (``.module``), counting calls."""

    def __init__(self, net):
        self.module = net
        self.calls = 0

    def __call__(self, x, t, s, cond=None):
        self.calls += 1
        return self.module(x, t, s, cond)


class Hidden:
    """A user's own wrapper that hides the network (no ``.module``, no ``num_classes``), counting calls."""

    def __init__(self, net):
        self._net = net
        self.calls = 0

    def __call__(self, x, t, s, cond=None):
        self.calls += 1
        return self._net(x, t, s, cond)


@cache
def _mlp(dim: int, num_classes: int | None, dtype: torch.dtype) -> MLPBackbone:
    torch.manual_seed(0)
    net = MLPBackbone(dim=dim, width=8, depth=1, time_features=4, num_classes=num_classes)
    torch.nn.init.normal_(net.output.weight, std=0.3)
    return net.to(dtype).eval()


@cache
def _dit(num_classes: int | None, null_class: bool) -> DiT:
    torch.manual_seed(0)
    config = {"input_size": 4, "in_channels": 2, "patch_size": 2, "hidden_size": 8, "depth": 1, "num_heads": 2}
    return DiT(**config, num_classes=num_classes, null_class=null_class).eval()


@cache
def _unet() -> SongUNet:
    torch.manual_seed(0)
    return SongUNet(img_resolution=4, in_channels=2, model_channels=4, channel_mult=[1], num_blocks=1, augment_dim=0)


@st.composite
def tensors(draw, shape, *, floating=True):
    """A tensor of ``shape`` (batch first) in a random dtype and on cpu or meta, mostly float32 on cpu."""
    dtype = draw(st.sampled_from([torch.float32] * 4 + DTYPES)) if floating else torch.int64
    device = draw(st.sampled_from(["cpu"] * 6 + ["meta"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    values = torch.randn(shape, generator=generator) if floating else torch.zeros(shape)
    return values.to(dtype).to(device)


@st.composite
def labels(draw, batch: int, num_classes: int | None):
    """None, or labels of a random kind: in range, out of range, null class, float, bool, 2-d, wrong batch, meta."""
    kind = draw(st.sampled_from(["none", "good", "good", "range", "float", "bool", "2d", "batch", "int32", "meta"]))
    n = num_classes or 3
    if kind == "none":
        return None
    if kind == "good":
        return torch.tensor(draw(st.lists(st.integers(0, n - 1), min_size=batch, max_size=batch)), dtype=torch.long)
    if kind == "range":
        values = st.integers(-3, n + 3)
        return torch.tensor(draw(st.lists(values, min_size=batch, max_size=batch)), dtype=torch.long)
    if kind == "float":
        return torch.linspace(0.0, n - 0.5, batch)
    if kind == "bool":
        return torch.ones(batch, dtype=torch.bool)
    if kind == "2d":
        return torch.zeros(batch, 2, dtype=torch.long)
    if kind == "batch":
        return torch.zeros(batch + 1, dtype=torch.long)
    if kind == "int32":
        return torch.zeros(batch, dtype=torch.int32)
    return torch.zeros(batch, dtype=torch.long, device="meta")


class Network:
    """What a case calls: an MLP (built in the test, not while drawing) behind a counting wrapper."""

    def __init__(self, wrapper: type, dim: int, num_classes: int | None, dtype: torch.dtype) -> None:
        self.wrapper, self.key = wrapper, (dim, num_classes, dtype)

    def __repr__(self) -> str:
        return f"{self.wrapper.__name__}(MLPBackbone{self.key})"

    def build(self):
        return self.wrapper(_mlp(*self.key))


def _network(draw, dim: int):
    num_classes = draw(st.sampled_from([None, 1, 3, 4]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    return Network(draw(st.sampled_from([Visible, Visible, Hidden])), dim, num_classes, dtype), num_classes


def _outcome(call, wrapper, *, check):
    """Run ``call``; on return apply ``check``; on error require the library's own, before any model call."""
    with shape_checks_off():
        try:
            result = call()
        except (ValueError, TypeError) as error:
            message = str(error)
            assert NAMED.search(message), f"the message names no argument: {type(error).__name__}: {message}"
            if wrapper is not None:
                allowed = 1 if isinstance(wrapper, Hidden) else 0  # a hidden network checks at its own first call
                assert wrapper.calls <= allowed, f"raised after {wrapper.calls} model call(s): {message}"
            return None
        except Exception as error:  # the point: nothing else may come out
            pytest.fail(f"a foreign exception: {type(error).__name__}: {error}")
    check(result)
    return result


def _finite_like(reference_shape):
    def check(out):
        assert isinstance(out, torch.Tensor) and out.shape == reference_shape, (type(out), getattr(out, "shape", None))
        assert bool(torch.isfinite(out).all()), "non-finite output"

    return check


@st.composite
def objective_cases(draw):
    dim, batch = draw(st.integers(1, 3)), draw(st.integers(0, 6))
    network, num_classes = _network(draw, dim)
    data_dim = draw(st.sampled_from([dim, dim, dim, dim + 1]))
    data = draw(tensors((batch, data_dim)))
    cond = draw(labels(batch, num_classes))
    preset = draw(st.sampled_from(["toy", "cifar10", "imagenet", "imagenet-n"]))
    options = {
        "fm_fraction": draw(st.sampled_from([0.0, 0.25, 0.75, 1.0, 1.5])),
        "check_inputs": draw(st.sampled_from([True] * 8 + ["no"])),
        "forward_batching": draw(st.sampled_from(["auto", "joint", "split"])),
    }
    if preset == "imagenet-n":
        objective = lambda: SoFlowObjective.from_preset("imagenet", num_classes=num_classes or 3, **options)  # noqa: E731
    else:
        objective = lambda: SoFlowObjective.from_preset(preset, **options)  # noqa: E731
    step = draw(st.sampled_from([0, 0, 3, 12, -1, True, 1.5]))
    total_steps = draw(st.sampled_from([10, 10, 1, 0]))
    noise = draw(st.sampled_from([None, None, "like", "short"]))
    if noise == "like":
        noise = torch.ones(data.shape, dtype=data.dtype if data.is_floating_point() else torch.float32)
    elif noise == "short":
        noise = torch.ones(max(batch - 1, 0), data_dim)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return network, objective, data, cond, step, total_steps, noise, generator


@given(case=objective_cases())
def test_fuzz_objective(case):
    network, objective, data, cond, step, total_steps, noise, generator = case
    wrapper = network.build()

    def call():
        out = objective()(wrapper, data, cond, step=step, total_steps=total_steps, generator=generator, noise=noise)
        return out.backprop

    _outcome(call, wrapper, check=_finite_like(()))


@st.composite
def sampler_cases(draw):
    dim, batch = draw(st.integers(1, 3)), draw(st.integers(0, 5))
    network, num_classes = _network(draw, dim)
    noise = draw(tensors((batch, draw(st.sampled_from([dim, dim, dim + 1])))))
    cond = draw(labels(batch, num_classes))
    param = draw(st.sampled_from([EulerParam, TrigParam, EulerParam, lambda: "euler"]))()
    kind = draw(st.sampled_from(["one", "few", "chain"]))
    if kind == "one":
        return network, noise, lambda wrapper: sample_one_step(wrapper, noise, param=param, cond=cond)
    if kind == "few":
        num_steps = draw(st.sampled_from([None, 0, 1, 2, 3]))
        times = draw(st.sampled_from([None, None, [1.0, 0.3], [True], [1.0, 0.0], [0.5, 0.2], (1.0, 0.5, 0.25)]))
        if num_steps is None and times is None:
            num_steps = 2
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        return network, noise, lambda wrapper: sample_few_step(
            wrapper, noise, param=param, path=LinearPath(), num_steps=num_steps, times=times, cond=cond,
            generator=generator,
        )  # fmt: skip
    times = draw(
        st.sampled_from(
            [
                *([1.0, 0.0], [1.0, 0.5, 0.0], [True, False], [0.0, 1.0], [1.0], [1.5, 0.0], torch.tensor([1, 0])),
                *(torch.tensor([1.0, 0.0]), [1.0, float("nan"), 0.0]),
            ]
        )
    )
    return network, noise, lambda wrapper: sample_chain(wrapper, noise, times, param=param, cond=cond)


@given(case=sampler_cases())
def test_fuzz_samplers(case):
    network, noise, call = case
    wrapper = network.build()
    _outcome(lambda: call(wrapper), wrapper, check=_finite_like(noise.shape))


@st.composite
def loss_cases(draw):
    dim, batch = draw(st.integers(1, 3)), draw(st.integers(0, 5))
    network, num_classes = _network(draw, dim)
    x_t = draw(tensors((batch, dim)))
    velocity = draw(tensors((batch, draw(st.sampled_from([dim, dim, dim + 1])))))
    cond = draw(labels(batch, num_classes))

    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def times(low, high):
        kind = draw(st.sampled_from(["ok", "ok", "ok", "out", "shape", "int"]))
        if kind == "out":
            return torch.full((batch,), 1.5)
        if kind == "shape":
            return torch.full((batch + 1,), low)
        if kind == "int":
            return torch.zeros(batch, dtype=torch.long)
        return low + (high - low) * torch.rand(batch, generator=generator)

    t, s = times(0.6, 1.0), times(0.0, 0.3)
    ell = times(0.35, 0.55)
    p = draw(st.sampled_from([0.0, 0.5, 1.0]))
    kind = draw(st.sampled_from(["fm object", "sc object", "fm pure", "sc pure"]))
    guided = draw(st.booleans()) and draw(st.booleans())
    mask = draw(st.sampled_from([None, torch.zeros(batch, dtype=torch.bool)]))

    # The library's objects are built in the call, not while drawing (the test-time type checker
    # samples containers with the random module, which hypothesis forbids inside strategies).
    def call(wrapper):
        weighting = AdaptiveWeighting(p=p, eps=0.01)
        if kind == "fm object":
            guidance = ClassifierFreeGuidance(null_cond=num_classes or 3) if guided else None
            loss = FlowMatchingLoss(weighting=weighting)
            return loss(wrapper, x_t, velocity, t, cond, guidance=guidance, drop_mask=mask).backprop
        if kind == "sc object":
            return SolutionConsistencyLoss(weighting=weighting)(wrapper, x_t, velocity, t, s, ell, cond).backprop
        if kind == "fm pure":
            return flow_matching_loss(x_t, velocity, t, param=EulerParam(), weighting=weighting).backprop
        return solution_consistency_loss(
            x_t, velocity, x_t, t, s, ell, param=EulerParam(), weighting=weighting
        ).backprop

    return (network if kind.endswith("object") else None), call


@given(case=loss_cases())
def test_fuzz_losses(case):
    network, call = case
    wrapper = network.build() if network is not None else None
    _outcome(lambda: call(wrapper), wrapper, check=_finite_like(()))


@st.composite
def backbone_cases(draw):
    kind = draw(st.sampled_from(["mlp", "dit", "unet"]))
    batch = draw(st.integers(0, 4))
    if kind == "mlp":
        num_classes = draw(st.sampled_from([None, 4]))
        net = (_mlp, 2, num_classes, draw(st.sampled_from([torch.float32, torch.float64])))
        x = draw(tensors((batch, draw(st.sampled_from([2, 2, 3])))))
    elif kind == "dit":
        num_classes = draw(st.sampled_from([None, 4]))
        net = (_dit, num_classes, draw(st.booleans()))
        x = draw(tensors((batch, draw(st.sampled_from([2, 2, 3])), 4, 4)))
    else:
        num_classes = None
        net = (_unet,)
        x = draw(tensors((batch, 2, 4, draw(st.sampled_from([4, 4, 2])))))
    t = draw(st.sampled_from(["ok", "ok", "shape", "int", "meta"]))
    t = {
        "ok": torch.linspace(0.2, 0.9, batch),
        "shape": torch.full((batch, 1), 0.5),
        "int": torch.zeros(batch, dtype=torch.long),
        "meta": torch.empty(batch, device="meta"),
    }[t]
    s = t * 0.5 if t.is_floating_point() else t
    cond = draw(labels(batch, num_classes))
    return net, x, t, s, cond


@given(case=backbone_cases())
def test_fuzz_backbones(case):
    (build, *key), x, t, s, cond = case
    net = build(*key)

    def call():
        with torch.no_grad():
            return net(x, t, s, cond)

    _outcome(call, None, check=_finite_like(x.shape))
