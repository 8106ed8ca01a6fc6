r"""One training step of a `SoFlowObjective`, eager or compiled as whole graphs.

The random draws of a step stay outside the compiled region by design:
[`SoFlowObjective.sample_batch`][soflow_core.objective.SoFlowObjective.sample_batch] draws
noise, times and label masks eagerly from the explicit ``generator`` (exactly the eager draws),
and what is compiled is a function of tensors only, so nothing that changes from step to step
(the step k, the ratio r(k, K)) is a Python value dynamo could specialise on:

```python
step_fn = make_training_step(objective, model, optimizer, compile=True)
for k in range(total_steps):
    batch = objective.sample_batch(data, labels, step=k, total_steps=total_steps, generator=generator)
    metrics = step_fn(batch)
```

Compiled, a step is two graphs and no graph break:

1. ``accumulate(batch)``: the objective's loss, its backward and the gradient accumulation
   into ``.grad``, traced by dynamo as one graph (``fullgraph=True``;
   ``torch._dynamo.config.trace_autograd_ops`` is switched on around each call);
2. ``update()``: ``optimizer.step()``, compiled as its own graph (PyTorch's compiled optimizer),
   then ``zero_grad(set_to_none=True)``.

The optimizer cannot join graph 1 in PyTorch 2.13: ``Optimizer.step`` calls
``torch._dynamo.graph_break()`` before and after its body (``_use_grad_for_differentiable``; no
tensor op precedes them, so the body is still one graph, but ``fullgraph=True`` refuses the
calls, and the update is compiled without it), and dynamo refuses to run an optimizer's
``_init_group`` after a traced backward ("optimizer: pending mutation on parameter").

With ``backward="autograd"`` graph 1 holds only the forward (and its compiled backward runs
through the autograd engine when ``accumulate`` calls ``.backward()``), so gradient hooks fire:
DDP and FSDP2 need that, since a backward traced into the graph bypasses their gradient
synchronisation. Their forward is not traced by dynamo either, so with them the step is several
graphs: the loss path between the wrapper's calls, and the network inside each call.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from soflow_core._validation import check_bool, check_choice, check_int
from soflow_core.objective import TrainingBatch
from soflow_core.typing import Backbone

__all__ = ["BACKWARDS", "StepBackward", "StepObjective", "TrainingStep", "has_gradient_hooks", "make_training_step"]


@runtime_checkable
class StepObjective(Protocol):
    """What a training step needs of an objective: [`SoFlowObjective`][soflow_core.SoFlowObjective], or another.

    ``loss(model, batch)`` evaluates the objective on a batch of draws and returns an object with
    ``backprop`` (the scalar to backpropagate) and ``metrics`` (detached tensors).
    """

    def loss(self, model: Backbone, batch: Any) -> Any:
        """The objective's output on ``batch``."""


StepBackward = Literal["auto", "graph", "autograd"]
"""Where a compiled step's backward runs; see [`make_training_step`][soflow_core.train.make_training_step]."""
BACKWARDS: tuple[str, ...] = ("auto", "graph", "autograd")


@dataclass(frozen=True, kw_only=True)
class TrainingStep:
    """A training step split where gradient accumulation needs it.

    Attributes:
        accumulate: ``batch -> metrics``: evaluates the objective on a
            [`TrainingBatch`][soflow_core.TrainingBatch], adds the gradient of
            ``backprop / accumulation_steps`` to ``.grad`` and returns the detached metrics.
        update: Applies the optimizer step and clears the gradients.
        compiled: Whether both were compiled.
    """

    accumulate: Callable[[TrainingBatch], dict[str, Tensor]]
    update: Callable[[], None]
    compiled: bool

    def __call__(self, batch: TrainingBatch) -> dict[str, Tensor]:
        """One optimizer step on one batch: ``accumulate(batch)`` then ``update()``.

        Args:
            batch: The step's draws.

        Returns:
            The detached metrics of the objective.
        """
        metrics = self.accumulate(batch)
        self.update()
        return metrics


def _with_traced_autograd(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Call ``fn`` with dynamo allowed to trace ``.backward()`` (it compiles, or recompiles, during the call)."""

    def call(*args: Any) -> Any:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return fn(*args)

    return call


def has_gradient_hooks(model: object) -> bool:
    """Whether ``model`` is, or holds, a DDP or FSDP2 module, whose gradient synchronisation runs in autograd hooks.

    Args:
        model: The backbone.

    Returns:
        True when a backward traced into a compiled graph would skip gradient synchronisation.
    """
    if not isinstance(model, torch.nn.Module) or not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    return any(isinstance(m, DistributedDataParallel | FSDPModule) for m in model.modules())


def make_training_step(
    objective: StepObjective,
    model: Backbone,
    optimizer: torch.optim.Optimizer,
    *,
    accumulation_steps: int = 1,
    compile: bool = False,
    backward: StepBackward = "auto",
    fullgraph: bool | None = None,
    mode: str | None = None,
    backend: str = "inductor",
) -> TrainingStep:
    r"""Build the training step of ``objective`` on ``model`` and ``optimizer``, eager or compiled.

    Eager, ``accumulate`` is ``objective.loss(model, batch)`` followed by
    ``(backprop / accumulation_steps).backward()``, and ``update`` is ``optimizer.step()`` then
    ``optimizer.zero_grad(set_to_none=True)``. Compiled, the same two functions go through
    ``torch.compile`` (see the module docstring for the graphs): loss, backward and gradient
    accumulation in one graph, the optimizer step in another.

    Nothing step-dependent may enter the compiled functions as a Python number: draw the batch
    eagerly with ``objective.sample_batch`` and pass it in. A learning-rate schedule that writes
    Python floats into ``optimizer.param_groups`` recompiles the update each time; give the
    optimizer a tensor learning rate (``lr=torch.tensor(1e-4)``) instead.

    Under ``torch.compile``, dropout masks are drawn inside the graph from PyTorch's default
    generator (seed it per step for reproducibility) and the teacher pass reuses the student's
    mask tensors; see [shared dropout masks](../method.md#shared-dropout-masks).

    Args:
        objective: The SoFlow objective (or any [`StepObjective`][soflow_core.train.step.StepObjective]).
        model: The backbone (a module, a DDP/FSDP wrapper, or any callable).
        optimizer: The optimizer of the model's parameters.
        accumulation_steps: N, the micro-batches per optimizer step: each ``accumulate`` adds
            the gradient of ``backprop / N``.
        compile: Compile both functions with ``torch.compile``.
        backward: ``"graph"`` traces the backward into the loss graph; ``"autograd"`` compiles
            the forward only and runs its compiled backward through the autograd engine, so
            gradient hooks fire; ``"auto"`` picks ``"autograd"`` when the model is or holds a
            DDP or FSDP2 module (their gradient synchronisation lives in such hooks), else
            ``"graph"``.
        fullgraph: Passed to ``torch.compile``: fail instead of breaking the graph. None: True,
            except for a model that is or holds a DDP or FSDP2 module, which dynamo does not
            trace (``DistributedDataParallel._inside_ddp_forward`` is on its skip list, FSDP2's
            hooks are skipped), so the step breaks its graph around the wrapper's calls.
        mode: ``torch.compile`` mode (``"reduce-overhead"`` adds CUDA graphs), or None.
        backend: ``torch.compile`` backend.

    Returns:
        The [`TrainingStep`][soflow_core.train.TrainingStep].

    Raises:
        ValueError: If ``backward`` is unknown, ``accumulation_steps`` < 1, or a compiled
            ``backward="graph"`` is asked for a DDP or FSDP2 model.

    Examples:
        >>> import torch
        >>> from soflow_core import SoFlowObjective
        >>> from soflow_core.nets import MLPBackbone
        >>> objective, model = SoFlowObjective(), MLPBackbone(dim=2, width=16, depth=1)
        >>> step_fn = make_training_step(objective, model, torch.optim.Adam(model.parameters()))
        >>> batch = objective.sample_batch(torch.randn(8, 2), step=0, total_steps=10)
        >>> sorted(step_fn(batch))[:2]
        ['consistency_loss', 'consistency_mse']
    """
    check_bool("compile", compile)
    if fullgraph is not None:
        check_bool("fullgraph", fullgraph)
    choice = check_choice("backward", backward, BACKWARDS)
    steps = check_int("accumulation_steps", accumulation_steps, low=1)
    hooked = has_gradient_hooks(model)
    if compile and choice == "graph" and hooked:
        raise ValueError(
            'backward="graph" traces the backward into the compiled graph, which skips the gradient '
            'synchronisation hooks of the DDP/FSDP2 model; use backward="autograd" (or "auto")'
        )
    in_graph = compile and (choice == "graph" or (choice == "auto" and not hooked))

    def backward_of(backprop: Tensor) -> None:
        (backprop / steps if steps > 1 else backprop).backward()

    def loss_and_backward(batch: TrainingBatch) -> dict[str, Tensor]:
        out = objective.loss(model, batch)
        backward_of(out.backprop)
        return out.metrics

    def loss_only(batch: TrainingBatch) -> tuple[Tensor, dict[str, Tensor]]:
        out = objective.loss(model, batch)
        return out.backprop, out.metrics

    def clear() -> None:
        optimizer.zero_grad(set_to_none=True)

    if not compile:

        def update() -> None:
            optimizer.step()
            clear()

        return TrainingStep(accumulate=loss_and_backward, update=update, compiled=False)

    options: dict[str, Any] = {"fullgraph": not hooked if fullgraph is None else fullgraph}
    options |= {"backend": backend, "mode": mode}
    if in_graph:
        accumulate = _with_traced_autograd(torch.compile(loss_and_backward, **options))
    else:
        compiled_loss = torch.compile(loss_only, **options)

        def accumulate(batch: TrainingBatch) -> dict[str, Tensor]:
            backprop, metrics = compiled_loss(batch)
            backward_of(backprop)
            return metrics

    # Optimizer.step starts and ends with torch._dynamo.graph_break() (before any tensor op, so its
    # body is still exactly one graph), which fullgraph=True rejects outright.
    optimizer_step = torch.compile(optimizer.step, **(options | {"fullgraph": False}))

    def compiled_update() -> None:
        optimizer_step()
        clear()

    return TrainingStep(accumulate=accumulate, update=compiled_update, compiled=True)
