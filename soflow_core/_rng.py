"""Explicit random draws, and the replay that lets two backbone passes share their dropout masks.

Every draw takes an explicit ``generator`` (or None for the global one) and is made on the
generator's device, then moved to ``device``, so a CPU generator drives CUDA training
reproducibly. Nothing here keeps state between calls.

The teacher pass of the consistency loss must see the dropout masks of the student pass
(the official code rewinds the generator with ``get_rng_state``/``set_rng_state``).
[`PassReplay`][soflow_core._rng.PassReplay] does that in two ways: eagerly it rewinds the
default generator (exactly the official behaviour), and while ``torch.compile`` traces it
records the masks that ``torch.nn.functional.dropout`` draws in the first pass and hands the
same mask tensors to the second, since dynamo cannot trace generator states.
"""

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "PassReplay",
    "RngSnapshot",
    "has_active_dropout",
    "may_use_dropout",
    "rand",
    "randn",
    "reachable_modules",
    "replay_rng",
    "snapshot_rng",
]


def _draw(
    sampler, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, generator: torch.Generator | None
) -> Tensor:
    """Draw on the generator's device (so a CPU generator drives any device), then move to ``device``."""
    draw_device = generator.device if generator is not None else device
    return sampler(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def randn(
    shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None
) -> Tensor:
    """Standard normal draws of ``shape`` from ``generator`` (or the global RNG), placed on ``device``.

    Args:
        shape: Output shape.
        device: Where the result lives.
        dtype: Result dtype.
        generator: Source of randomness; None uses the default generator of ``device``.

    Returns:
        A tensor of N(0, 1) draws.
    """
    return _draw(torch.randn, shape, device, dtype, generator)


def rand(
    shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform [0, 1) draws of ``shape`` from ``generator`` (or the global RNG), placed on ``device``.

    Args:
        shape: Output shape.
        device: Where the result lives.
        dtype: Result dtype.
        generator: Source of randomness; None uses the default generator of ``device``.

    Returns:
        A tensor of U[0, 1) draws.
    """
    return _draw(torch.rand, shape, device, dtype, generator)


@dataclass(frozen=True)
class RngSnapshot:
    """The state of the default generator that stochastic layers on ``device`` draw from.

    Attributes:
        device: The device whose default generator was captured.
        state: The captured generator state (a CPU byte tensor).
    """

    device: torch.device
    state: Tensor


def _device_module(device: torch.device):
    return torch.get_device_module(device.type)


def snapshot_rng(device: torch.device | str) -> RngSnapshot:
    """Capture the default generator state that dropout on ``device`` will use next.

    Works for CPU and any accelerator with a default generator (CUDA, MPS, XPU, ...):
    stochastic layers draw from the CPU generator for CPU tensors and from the current
    device's generator otherwise.

    Args:
        device: The device the network computes on.

    Returns:
        The snapshot to hand to `replay_rng`.

    Examples:
        >>> import torch
        >>> snap = snapshot_rng("cpu")
        >>> a = torch.rand(3)
        >>> with replay_rng(snap):
        ...     b = torch.rand(3)
        >>> torch.equal(a, b)
        True
    """
    device = torch.device(device)
    if device.type == "cpu":
        return RngSnapshot(device, torch.get_rng_state())
    module = _device_module(device)
    index = device.index if device.index is not None else module.current_device()
    return RngSnapshot(torch.device(device.type, index), module.get_rng_state(index))


def _restore(snapshot: RngSnapshot) -> None:
    if snapshot.device.type == "cpu":
        torch.set_rng_state(snapshot.state)
    else:
        _device_module(snapshot.device).set_rng_state(snapshot.state, snapshot.device.index)


@contextmanager
def replay_rng(snapshot: RngSnapshot) -> Iterator[None]:
    """Run a block with the generator rewound to ``snapshot``, then put the stream back.

    Inside the block, stochastic layers draw exactly what they drew right after the
    snapshot was taken (same shapes give the same dropout masks). On exit the generator
    returns to the state it had on entry, so the replayed pass consumes no randomness from
    the caller's point of view.

    Args:
        snapshot: A state captured by `snapshot_rng`.

    Yields:
        Nothing; the block runs with the rewound generator.
    """
    current = snapshot_rng(snapshot.device)
    _restore(snapshot)
    try:
        yield
    finally:
        _restore(current)


# ---------------------------------------------------------------------------- replaying a pass


_UNWRAP_DEPTH = 8


def _wrapped_objects(model: object) -> list[object]:
    """What a callable wrapper holds: the objects it calls through or closes over."""
    held: list[object] = []
    for name in ("__wrapped__", "_torchdynamo_orig_callable"):  # functools.wraps, torch.compile of a function
        if hasattr(model, name):
            held.append(getattr(model, name))
    if isinstance(model, functools.partial):  # partial(call, module, params) around torch.func.functional_call
        held += [model.func, *model.args, *model.keywords.values()]
    elif inspect.ismethod(model):  # module.forward, wrapper.__call__
        held.append(model.__self__)
    elif inspect.isfunction(model):  # a lambda or closure calling functional_call(module, ...)
        for cell in model.__closure__ or ():
            try:
                held.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    elif not isinstance(model, type) and hasattr(model, "__dict__"):  # a callable object holding the network
        held += list(vars(model).values())
    return [obj for obj in held if isinstance(obj, nn.Module) or callable(obj)]


def reachable_modules(model: object) -> list[nn.Module]:
    """The ``nn.Module`` objects a backbone is, or calls through its wrappers.

    A module is returned as it is: DDP (``.module``), FSDP2 (the module itself) and
    ``torch.compile`` (``_orig_mod``) hold the network as a sub-module, so ``.modules()`` sees
    through them. A function is followed through ``__wrapped__`` (``functools.wraps``, the checks
    this package adds), ``torch.compile``'s original callable, ``functools.partial`` (its function,
    arguments and keywords: ``partial(call, module, params)`` with ``call`` running
    ``torch.func.functional_call(module, params, (x, t, s, cond))``), bound
    methods (``module.forward``), the variables a closure captures (``lambda x, t, s, c:
    functional_call(module, params, (x, t, s, c))``) and the attributes of a callable object.

    Args:
        model: A backbone: a module or any callable.

    Returns:
        The modules found (empty when none is reachable), each once.

    Examples:
        >>> import functools
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> reachable_modules(functools.partial(torch.func.functional_call, net, {})) == [net]
        True
    """
    found: list[nn.Module] = []
    seen: set[int] = set()
    frontier: list[tuple[object, int]] = [(model, 0)]
    while frontier:
        obj, depth = frontier.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            found.append(obj)
        elif depth < _UNWRAP_DEPTH:
            frontier += [(held, depth + 1) for held in reversed(_wrapped_objects(obj))]
    return found


def has_active_dropout(model: object) -> bool:
    """Whether ``model`` reaches a module in training mode holding a dropout layer with p > 0.

    Wrappers are seen through as ``reachable_modules`` describes: DDP, FSDP2,
    ``torch.compile``, ``functools.partial`` and closures over ``torch.func.functional_call``.
    Dropout applied functionally inside ``forward``, or by a callable that reaches no module, is
    not detected: declare it with ``forward_batching="split"``.

    Args:
        model: The backbone.

    Returns:
        True if some dropout layer would draw random masks.

    Examples:
        >>> from torch import nn
        >>> has_active_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
        True
        >>> has_active_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).eval())
        False
    """
    for root in reachable_modules(model):
        for module in root.modules():
            if not module.training:
                continue
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                return True
            if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
                return True
    return False


def may_use_dropout(model: object) -> bool:
    """Whether a pass of ``model`` may draw dropout masks: it reaches no module, or has active dropout.

    A callable through which no ``nn.Module`` is reachable cannot be inspected, so it counts as
    random.

    Args:
        model: The backbone.

    Returns:
        False only for a backbone that reaches modules, none with active dropout layers.
    """
    return not reachable_modules(model) or has_active_dropout(model)


def _argument(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


# Functions that draw random numbers the traced replay cannot hand from one pass to the other.
_UNREPLAYABLE: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.rand,
        torch.rand_like,
        torch.randn,
        torch.randn_like,
        torch.randint,
        torch.randint_like,
        torch.randperm,
        torch.bernoulli,
        torch.multinomial,
        torch.normal,
        torch.poisson,
        Tensor.bernoulli,
        Tensor.bernoulli_,
        Tensor.uniform_,
        Tensor.normal_,
        Tensor.random_,
        Tensor.exponential_,
        Tensor.geometric_,
        Tensor.cauchy_,
        Tensor.log_normal_,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        F.gumbel_softmax,
    }
)


def _unreplayable_draw(func: Callable[..., Any], args: tuple, kwargs: dict) -> str | None:
    """What random draw a torch function call makes that the traced replay cannot share, or None."""
    if func is F.scaled_dot_product_attention and _argument(args, kwargs, 4, "dropout_p", 0.0) > 0:
        return "scaled_dot_product_attention with dropout_p > 0"
    if func is F.multi_head_attention_forward and _argument(args, kwargs, 12, "dropout_p", 0.0) > 0:
        training = _argument(args, kwargs, 13, "training", True)
        return "multi_head_attention_forward with dropout > 0" if training else None
    if func is F.rrelu:
        return "rrelu in training mode" if _argument(args, kwargs, 3, "training", False) else None
    if func in _UNREPLAYABLE:
        return getattr(func, "__qualname__", repr(func))
    return None


class _SharedDropoutMode(TorchFunctionMode):
    """Draws ``F.dropout`` masks explicitly: new ones while recording, the recorded ones in order while replaying."""

    def __init__(self, masks: list[Tensor], *, replay: bool) -> None:
        super().__init__()
        self.masks = masks
        self.replay = replay
        self.used = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return self._dropout(args, kwargs)
        draw = _unreplayable_draw(func, args, kwargs)
        if draw is not None:
            self._refuse(draw)
        return func(*args, **kwargs)

    def _refuse(self, what: str) -> None:
        raise NotImplementedError(
            f"the backbone calls {what} in a pass whose random draws the teacher pass must replay; under "
            "torch.compile only torch.nn.functional.dropout (nn.Dropout) masks can be replayed. Use nn.Dropout, "
            "or run this step eagerly, where the generator state is rewound instead"
        )

    def _dropout(self, args: tuple, kwargs: dict) -> Tensor:
        x = args[0]
        p = _argument(args, kwargs, 1, "p", 0.5)
        training = _argument(args, kwargs, 2, "training", True)
        inplace = _argument(args, kwargs, 3, "inplace", False)
        if not training or p == 0.0:
            return x
        if self.replay:
            if self.used >= len(self.masks):
                raise ValueError(
                    f"the replayed pass applies dropout more often than the recorded pass ({len(self.masks)} "
                    "masks were recorded); both passes must run the same layers"
                )
            keep = self.masks[self.used]
            if keep.shape != x.shape:
                raise ValueError(
                    f"dropout mask {self.used} was recorded for shape {tuple(keep.shape)} but is replayed on "
                    f"shape {tuple(x.shape)}; the two passes must have the same batch (use "
                    'forward_batching="split" with dropout)'
                )
        else:
            keep = torch.rand_like(x) >= p  # P(keep) = 1 − p, as torch.nn.functional.dropout
            self.masks.append(keep)
        self.used += 1
        scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
        if inplace:
            return x.mul_(keep).mul_(scale)
        return x * keep * scale


class PassReplay:
    """Lets a second backbone pass draw the random numbers (dropout masks) of a first pass.

    Used for the teacher pass f(x_ℓ, ℓ, s), which must see the dropout masks of the student
    pass F(x_t, t, s). Run the first pass inside [`record`][soflow_core._rng.PassReplay.record]
    and the second inside [`replay`][soflow_core._rng.PassReplay.replay]:

    * eagerly, ``record`` snapshots the default generator of ``device`` and ``replay`` rewinds
      it there and puts the stream back afterwards, so every stochastic layer repeats its draws
      and the caller's stream goes on as if the second pass had drawn nothing (the official
      code's ``get_rng_state``/``set_rng_state``);
    * while ``torch.compile`` traces, where generator states cannot be traced, ``record``
      draws every ``torch.nn.functional.dropout`` mask (``nn.Dropout``) explicitly and
      ``replay`` applies the same mask tensors in the same order, inside one graph. Other
      random draws in either pass raise ``NotImplementedError`` rather than silently differ.

    With ``enabled=False`` (a backbone without active dropout) both blocks do nothing: no
    generator snapshot, no device synchronisation.

    Args:
        device: The device the backbone computes on.
        enabled: Whether the backbone draws random numbers that must be replayed.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> drop = nn.Dropout(0.5)
        >>> replay = PassReplay("cpu", enabled=True)
        >>> with replay.record():
        ...     a = drop(torch.ones(8))
        >>> with replay.replay():
        ...     b = drop(torch.ones(8))
        >>> torch.equal(a, b)
        True
    """

    def __init__(self, device: torch.device | str, *, enabled: bool) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self._snapshot: RngSnapshot | None = None
        self._masks: list[Tensor] = []
        self._traced = False

    @contextmanager
    def record(self) -> Iterator[None]:
        """Run the first pass, keeping what the second must replay.

        Yields:
            Nothing.
        """
        if not self.enabled:
            yield
            return
        self._traced = torch.compiler.is_compiling()
        if not self._traced:
            self._snapshot = snapshot_rng(self.device)
            yield
            return
        with _SharedDropoutMode(self._masks, replay=False):
            yield

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the second pass with the first pass's random draws.

        Yields:
            Nothing.

        Raises:
            RuntimeError: If ``record`` did not run first.
            ValueError: If, under ``torch.compile``, the passes apply dropout a different
                number of times or on different shapes.
        """
        if not self.enabled:
            yield
            return
        if self._traced:
            mode = _SharedDropoutMode(self._masks, replay=True)
            with mode:
                yield
            if mode.used != len(self._masks):
                raise ValueError(
                    f"the replayed pass applied {mode.used} of the {len(self._masks)} recorded dropout masks; "
                    "both passes must run the same layers"
                )
            return
        if self._snapshot is None:
            raise RuntimeError("PassReplay.replay() needs a record() block before it")
        with replay_rng(self._snapshot):
            yield
