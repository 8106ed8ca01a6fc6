r"""Exponential moving average (EMA) of a network's parameters, as the SoFlow recipes use it (see the Method page).

The EMA keeps a shadow copy of every parameter and buffer of a module. After an optimizer
step ``k`` (0-based, the number of steps finished before this one), the rule

$$\theta_{\mathrm{ema}} \leftarrow d^{n}\,\theta_{\mathrm{ema}} + (1 - d^{n})\,\theta
\qquad \text{when } k \bmod n = 0$$

is applied, with decay d and period n, and the buffers are copied. The ImageNet recipe uses
n = 1 in the parameter dtype; the CIFAR-10 recipe uses n = 16 in float64 (d¹⁶ makes the n-step
rule decay as fast as n single steps would). The shadow starts as a copy of the initial weights.

With d = 0.9999 the shadow is still mostly the initial weights after a few thousand steps, so the
samples of a short run drawn with the EMA weights look like noise. ``warmup=True`` caps the kept
weight by (1 + u)/(10 + u) at the u-th update (u = k // n), the rule of diffusers' ``EMAModel``:
0.1 at the first update, 0.9 at the 80th, 0.99 at the 890th, d from then on. The paper's recipes
do not use it (the trainers' paper presets keep the constant rule; their tiny presets warm up).

The step is an explicit argument, nothing counts calls. Pass the unwrapped module
(``ddp.module``, not the DDP wrapper). With FSDP2 (``fully_shard``) the parameters are
DTensors and the shadow is a DTensor with the same sharding, so each rank averages its own
shards; [`state_dict`][soflow_core.train.ema.EMA.state_dict] can gather full tensors for a
checkpoint and [`load_state_dict`][soflow_core.train.ema.EMA.load_state_dict] re-shards full tensors.
"""

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from soflow_core._validation import check_bool, check_int, check_real

__all__ = ["EMA", "ema_coefficient", "ema_warmup_coefficient"]


def ema_coefficient(decay: float, every: int) -> float:
    r"""The weight d^n that the shadow keeps at each update of the n-step rule.

    $$\theta_{\mathrm{ema}} \leftarrow d^{n}\,\theta_{\mathrm{ema}} + (1 - d^{n})\,\theta$$

    Args:
        decay: d ∈ [0, 1), the per-step decay.
        every: n ≥ 1, the number of optimizer steps between updates.

    Returns:
        d^n as a Python float (double precision).

    Raises:
        ValueError: If ``decay`` is outside [0, 1) or ``every`` < 1.

    Examples:
        >>> round(ema_coefficient(0.9999, 16), 8)
        0.9984012
    """
    check_real("decay", decay, low=0.0, high=1.0, high_open=True)
    check_int("every", every, low=1)
    return float(decay) ** int(every)


def ema_warmup_coefficient(keep: float, update: int) -> float:
    r"""The kept weight at the ``update``-th EMA update with warm-up (diffusers' ``EMAModel`` rule).

    $$\mathrm{keep}_u = \min\Bigl(d^{n},\ \frac{1 + u}{10 + u}\Bigr)$$

    Args:
        keep: d^n, the kept weight without warm-up (``ema_coefficient``).
        update: u ≥ 0, the index of the update (k // n after optimizer step k).

    Returns:
        The kept weight, a Python float.

    Examples:
        >>> ema_warmup_coefficient(0.9999, 0), ema_warmup_coefficient(0.9999, 80)
        (0.1, 0.9)
    """
    update = check_int("update", update, low=0)
    return min(float(keep), (1.0 + update) / (10.0 + update))


def _is_dtensor(x: Tensor) -> bool:
    return hasattr(x, "full_tensor") and hasattr(x, "device_mesh")


def _full(x: Tensor) -> Tensor:
    """The whole tensor: gathers a DTensor (a collective: every rank must call it)."""
    return x.full_tensor() if _is_dtensor(x) else x


class EMA:
    """Shadow weights of a module, updated by the n-step rule of the SoFlow recipes.

    Args:
        model: The module whose parameters and buffers are tracked (unwrap DDP first).
        decay: d, the per-step decay (0.9999 in both recipes).
        every: n, update every n optimizer steps (1 for ImageNet, 16 for CIFAR-10).
        dtype: dtype of the shadow parameters (``torch.float64`` for CIFAR-10), or None to
            keep each parameter's dtype.
        warmup: Cap the kept weight by (1 + u)/(10 + u) at the u-th update (see the module
            docstring); False keeps the recipes' constant rule.

    Raises:
        ValueError: If ``decay``/``every`` are out of range or the model has no parameters.
        TypeError: If ``model`` is not a module or ``dtype`` is not a floating-point
            ``torch.dtype`` (or None).

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> ema = EMA(net, decay=0.9, every=1)
        >>> ema.update(net, step=0)
        True
        >>> ema.copy_to(net)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.9999,
        every: int = 1,
        dtype: torch.dtype | None = None,
        warmup: bool = False,
    ):
        self.decay = check_real("decay", decay, low=0.0, high=1.0, high_open=True)
        self.every = check_int("every", every, low=1)
        self.warmup = check_bool("warmup", warmup)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"dtype must be a floating-point torch.dtype such as torch.float64, or None; "
                f"got {type(dtype).__name__}: {dtype!r}"
            )
        self.dtype = dtype
        with torch.no_grad():
            self.params: dict[str, Tensor] = {
                name: p.detach().to(dtype or p.dtype, copy=True) for name, p in model.named_parameters()
            }
            self.buffers: dict[str, Tensor] = {name: b.detach().clone() for name, b in model.named_buffers()}
        if not self.params:
            raise ValueError(f"model must have parameters; got a {type(model).__name__} without any")

    def due(self, step: int) -> bool:
        """Whether the rule updates after optimizer step ``step`` (k mod n = 0).

        Args:
            step: Optimizer steps finished before the one just taken, k ≥ 0.

        Returns:
            True when [`update`][soflow_core.train.ema.EMA.update] would change the shadow.
        """
        return check_int("step", step, low=0) % self.every == 0

    @torch.no_grad()
    def update(self, model: nn.Module, *, step: int) -> bool:
        """Apply the rule after an optimizer step, if ``step`` is due, and copy the buffers.

        Args:
            model: The trained module (same structure as at construction; unwrap DDP first).
            step: Optimizer steps finished before the one just taken, k ≥ 0; the update runs
                when k mod n = 0.

        Returns:
            Whether the shadow was updated.

        Raises:
            ValueError: If the model's parameter names differ from the tracked ones.
        """
        if not self.due(step):
            return False
        keep = ema_coefficient(self.decay, self.every)
        if self.warmup:
            keep = ema_warmup_coefficient(keep, step // self.every)
        params = dict(model.named_parameters())
        if params.keys() != self.params.keys():
            raise ValueError("model must have the parameters the EMA was built from; the names differ")
        for name, shadow in self.params.items():
            shadow.mul_(keep).add_(params[name].detach().to(shadow.dtype), alpha=1.0 - keep)
        for name, buffer in model.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(buffer)
        return True

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights (cast to each parameter's dtype) and buffers into ``model``.

        ``model`` must be laid out like the tracked module: sharded the same way, or both plain.

        Args:
            model: The module to receive the EMA weights, e.g. a copy used for sampling.
        """
        for name, p in model.named_parameters():
            p.copy_(self.params[name].to(p.dtype))
        for name, b in model.named_buffers():
            if name in self.buffers:
                b.copy_(self.buffers[name])

    def state_dict(self, *, full: bool = True) -> dict[str, Tensor]:
        """The shadow as a state dict in the module's own layout (parameters and buffers).

        The result loads into the module with ``load_state_dict`` (and into a DiT with
        [`load_weights`][soflow_core.nets.checkpoints.load_weights]).

        Args:
            full: Gather sharded (FSDP2) shadows into whole CPU tensors, a collective that every
                rank must enter; when False the local tensors (DTensors) are returned as they are.

        Returns:
            A mapping from parameter and buffer names to tensors.
        """
        check_bool("full", full)
        out: dict[str, Tensor] = {}
        for name, value in {**self.params, **self.buffers}.items():
            out[name] = _full(value).detach().cpu().clone() if full else value
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the shadow from [`state_dict`][soflow_core.train.ema.EMA.state_dict] (full or local tensors).

        Whole tensors are re-sharded onto a DTensor shadow's mesh and placements. Every entry is
        checked before anything is written, so a refused state leaves the shadow as it was.

        Args:
            state: A mapping with every tracked name.

        Raises:
            ValueError: If names are missing, shapes differ, or an entry holds NaN or Inf (the
                shadow of a run that diverged; a sharded entry is checked on its local shard).
            TypeError: If an entry is not a tensor.
        """
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise ValueError(f"state is missing EMA entries: {missing[:5]} ({len(missing)} in all)")
        entries = {name: state[name] for name in {**self.params, **self.buffers} if name in state}
        for name, value in entries.items():
            target = self.params.get(name, self.buffers.get(name))
            if not isinstance(value, Tensor):
                raise TypeError(f"state[{name!r}] must be a tensor; got {type(value).__name__}")
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"state[{name!r}] has shape {tuple(value.shape)}; the EMA has {tuple(target.shape)}")
            local = value.to_local() if _is_dtensor(value) else value
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                bad = int((~torch.isfinite(local)).sum())
                raise ValueError(
                    f"state[{name!r}] holds {bad} non-finite value(s) (NaN or Inf): the EMA of a run that diverged; "
                    "load an earlier checkpoint"
                )
        for name, value in entries.items():
            target = self.params.get(name, self.buffers.get(name))
            if _is_dtensor(target) and not _is_dtensor(value):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(
                    value.to(device=target.device_mesh.device_type, dtype=target.dtype),
                    target.device_mesh,
                    target.placements,
                )
            target.copy_(value.to(target.dtype) if not _is_dtensor(value) else value)
