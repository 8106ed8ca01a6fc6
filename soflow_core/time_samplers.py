r"""Time distributions, the (t, s, ℓ) consistency sampler and the ℓ-schedule r(k, K) (see the Method page).

Everything here is a pure function of its arguments: the schedule takes the optimizer
step ``k`` and the planned total ``K`` explicitly, and every draw takes a ``generator``.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch

from soflow_core._rng import rand, randn
from soflow_core._validation import (
    check_choice,
    check_generator,
    check_instance,
    check_int,
    check_real,
    check_total_steps,
)
from soflow_core.typing import Time

__all__ = [
    "MIN_TIME_GAP",
    "AbstractRSchedule",
    "AbstractTimeDistribution",
    "ConsistencyTimeSampler",
    "ConstSchedule",
    "CosineSchedule",
    "ExponentSchedule",
    "LinearSchedule",
    "LogitNormal",
    "ScheduleName",
    "TimeTriple",
    "Uniform",
    "consistency_times",
    "make_schedule",
]

MIN_TIME_GAP = 1e-4
"""The reference's clamp: t ≥ 1e-4, s ≤ t − 1e-4 and ℓ ≤ t − 1e-4."""

ScheduleName = Literal["const", "linear", "cosine", "exponent"]
"""Names accepted by [`make_schedule`][soflow_core.time_samplers.make_schedule] (case-insensitive)."""


@dataclass(frozen=True, kw_only=True)
class AbstractTimeDistribution(ABC):
    """A distribution of times in [0, 1]."""

    @abstractmethod
    def transform(self, n: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None) -> Time:
        """Draw ``n`` times (inputs already checked)."""

    def sample(
        self,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> Time:
        """Draw ``batch_size`` times.

        Args:
            batch_size: Number of draws, ≥ 1.
            device: Where the result lives.
            dtype: Result dtype.
            generator: Source of randomness, or None for the global RNG.

        Returns:
            One time per sample.

        Examples:
            >>> import torch
            >>> t = LogitNormal(mean=-0.2, std=1.0).sample(4, generator=torch.Generator().manual_seed(0))
            >>> t.shape, bool(((t > 0) & (t < 1)).all())
            (torch.Size([4]), True)
        """
        n = check_int("batch_size", batch_size, low=1)
        check_generator("generator", generator)
        return self.transform(n, torch.device(device), dtype, generator)


@dataclass(frozen=True, kw_only=True)
class LogitNormal(AbstractTimeDistribution):
    r"""Logit-normal times: $t = \mathrm{sigmoid}(u)$, $u \sim \mathcal{N}(\mu, \sigma^2)$.

    Values lie in (0, 1); 1.0 exactly only through float rounding.

    Attributes:
        mean: μ of the underlying normal (reference ``time_mean``).
        std: σ of the underlying normal (reference ``time_std``), > 0.
    """

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        check_real("mean", self.mean)
        check_real("std", self.std, low=0.0, low_open=True)

    def transform(self, n: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None) -> Time:
        r"""$t = \mathrm{sigmoid}(\sigma z + \mu)$ with $z \sim \mathcal{N}(0, 1)$."""
        return torch.sigmoid(randn((n,), device=device, dtype=dtype, generator=generator) * self.std + self.mean)


@dataclass(frozen=True, kw_only=True)
class Uniform(AbstractTimeDistribution):
    """Uniform times on [low, high) ⊆ [0, 1].

    Attributes:
        low: Lower end.
        high: Upper end, > low.
    """

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        check_real("low", self.low, low=0.0, high=1.0)
        check_real("high", self.high, low=self.low, high=1.0, low_open=True)

    def transform(self, n: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None) -> Time:
        r"""$t = \text{low} + (\text{high} - \text{low})\,u$ with $u \sim U[0, 1)$."""
        return self.low + (self.high - self.low) * rand((n,), device=device, dtype=dtype, generator=generator)


# ---------------------------------------------------------------------------- r schedules


def _progress(step: int, total_steps: int) -> float:
    k = check_int("step", step, low=0)
    total = check_total_steps(total_steps)
    # Past the planned end the schedule holds its final value instead of extrapolating.
    return min(k / total, 1.0)


def _check_ratio(name: str, value: float) -> None:
    check_real(name, value, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class AbstractRSchedule(ABC):
    """The ratio r(k, K) ∈ (0, 1] that places ℓ = t + (s − t)·r between t and s (see the Method page).

    Attributes:
        r_init: r at step 0 (reference ``l_init_ratio``).
        r_end: r at step K (reference ``l_end_ratio``).
    """

    r_init: float = 0.1
    r_end: float = 0.002

    def __post_init__(self) -> None:
        _check_ratio("r_init", self.r_init)
        _check_ratio("r_end", self.r_end)

    @abstractmethod
    def ratio(self, progress: float) -> float:
        """r as a function of the training progress k/K ∈ [0, 1]."""

    def __call__(self, step: int, total_steps: int) -> float:
        """r(k, K) for optimizer step ``step`` = k of a run planned for ``total_steps`` = K.

        For k > K the schedule stays at r(K, K) (the reference would extrapolate).

        Args:
            step: Optimizer steps done so far, k ≥ 0.
            total_steps: Planned run length, K ≥ 1.

        Returns:
            The ratio r.

        Raises:
            ValueError: If k < 0 or K ≤ 0.
            TypeError: If k or K is not an int.
        """
        return self.ratio(_progress(step, total_steps))


@dataclass(frozen=True, kw_only=True)
class ConstSchedule(AbstractRSchedule):
    """Reference ``Const``: r = r_end at every step (``r_init`` is ignored)."""

    def ratio(self, progress: float) -> float:
        r"""$r = r_\text{end}$."""
        return self.r_end


@dataclass(frozen=True, kw_only=True)
class LinearSchedule(AbstractRSchedule):
    """Reference ``Linear``: linear interpolation from r_init to r_end."""

    def ratio(self, progress: float) -> float:
        r"""$r = r_\text{init} + (r_\text{end} - r_\text{init})\,k/K$."""
        return self.r_init + (self.r_end - self.r_init) * progress


@dataclass(frozen=True, kw_only=True)
class CosineSchedule(AbstractRSchedule):
    """Reference ``Cosine``: half-cosine from r_init to r_end."""

    def ratio(self, progress: float) -> float:
        r"""$r = r_\text{end} + (r_\text{init} - r_\text{end})\cdot\tfrac12(1 + \cos(\pi k/K))$."""
        return self.r_end + (self.r_init - self.r_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True, kw_only=True)
class ExponentSchedule(AbstractRSchedule):
    """Reference ``Exponent`` (both released recipes): geometric from r_init to r_end."""

    def ratio(self, progress: float) -> float:
        r"""$r = r_\text{init}\,(r_\text{end}/r_\text{init})^{k/K}$."""
        return self.r_init * (self.r_end / self.r_init) ** progress


_SCHEDULES: dict[str, type[AbstractRSchedule]] = {
    "const": ConstSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "exponent": ExponentSchedule,
}


def make_schedule(name: str, *, r_init: float, r_end: float) -> AbstractRSchedule:
    """Build an r-schedule by name (case-insensitive; the reference's ``Exponent`` etc. work).

    Args:
        name: One of ``const``, ``linear``, ``cosine``, ``exponent``.
        r_init: r at step 0.
        r_end: r at the last step.

    Returns:
        The schedule.

    Raises:
        ValueError: If the name is unknown or a ratio lies outside (0, 1].

    Examples:
        >>> sched = make_schedule("Exponent", r_init=0.1, r_end=0.002)
        >>> round(sched(step=200_000, total_steps=400_000), 4)
        0.0141
    """
    return _SCHEDULES[check_choice("schedule", name, tuple(_SCHEDULES))](r_init=r_init, r_end=r_end)


# ---------------------------------------------------------------------------- (t, s, ℓ)


@dataclass(frozen=True, kw_only=True)
class TimeTriple:
    """Times of one consistency sub-batch, with 0 ≤ s ≤ ℓ < t ≤ 1 and t − ℓ ≥ 1e-4.

    Attributes:
        t: The time of x_t (reference ``time2`` after the clamp).
        s: The target time of the solution.
        ell: The intermediate time ℓ of the teacher pass.
    """

    t: Time
    s: Time
    ell: Time


def consistency_times(t_draw: Time, s_draw: Time, r: float) -> TimeTriple:
    r"""Clamp raw draws into (t, s, ℓ) exactly as the reference does (SoFlow paper; see the Method page of the docs).

    $$t = \max(t_\text{draw}, 10^{-4}),\quad s = \min(s_\text{draw}, t - 10^{-4}),\quad
      \ell = \min\big(t + (s - t)\,r,\; t - 10^{-4}\big).$$

    There is no sort or swap: a draw with s ≥ t pins s to t − 1e-4. Since r ≤ 1, ℓ ≥ s;
    ℓ = s exactly when r = 1 or s was pinned.

    Args:
        t_draw: Raw draws for t (reference ``time2``).
        s_draw: Raw draws for s (reference ``time1``).
        r: The schedule ratio r(k, K) ∈ (0, 1].

    Returns:
        The [`TimeTriple`][soflow_core.time_samplers.TimeTriple].

    Examples:
        >>> import torch
        >>> tr = consistency_times(torch.tensor([0.5, 0.3]), torch.tensor([0.1, 0.9]), r=0.5)
        >>> [round(v, 4) for v in tr.ell.tolist()]
        [0.3, 0.2999]
    """
    _check_ratio("r", r)
    t = torch.clamp(t_draw, min=MIN_TIME_GAP)
    s = torch.minimum(s_draw, t - MIN_TIME_GAP)
    # t + (s − t)·r written as s + (t − s)·(1 − r): equal in exact arithmetic, and in floating point it
    # can never round below s, and gives ℓ = s exactly for r = 1.
    ell = torch.minimum(s + (t - s) * (1.0 - r), t - MIN_TIME_GAP)
    return TimeTriple(t=t, s=s, ell=ell)


@dataclass(frozen=True, kw_only=True)
class ConsistencyTimeSampler:
    """Draws (t, s, ℓ) for the solution-consistency loss (SoFlow paper; see the Method page of the docs).

    Attributes:
        t_distribution: Distribution of t (reference ``time_mean[2]``, ``time_std[2]``).
        s_distribution: Distribution of s (reference ``time_mean[1]``, ``time_std[1]``).
        schedule: The ratio r(k, K) that places ℓ.
    """

    t_distribution: AbstractTimeDistribution = field(default_factory=lambda: LogitNormal(mean=0.2, std=0.8))
    s_distribution: AbstractTimeDistribution = field(default_factory=lambda: LogitNormal(mean=-1.0, std=0.8))
    schedule: AbstractRSchedule = field(default_factory=lambda: ExponentSchedule(r_init=0.1, r_end=0.002))

    def __post_init__(self) -> None:
        for name in ("t_distribution", "s_distribution"):
            check_instance(name, getattr(self, name), AbstractTimeDistribution, "LogitNormal(mean=0.2, std=0.8)")
        check_instance("schedule", self.schedule, AbstractRSchedule, "ExponentSchedule(r_init=0.1, r_end=0.002)")

    def sample(
        self,
        batch_size: int,
        *,
        step: int,
        total_steps: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> TimeTriple:
        """Draw ``batch_size`` triples at training step k = ``step`` of K = ``total_steps``.

        s is drawn first, then t, from the same generator.

        Args:
            batch_size: Number of triples, ≥ 1.
            step: Optimizer steps done so far, k ≥ 0.
            total_steps: Planned run length, K ≥ 1.
            device: Where the result lives.
            dtype: Result dtype (use float32 or float64; low precision cannot hold t − 1e-4).
            generator: Source of randomness, or None for the global RNG.

        Returns:
            The [`TimeTriple`][soflow_core.time_samplers.TimeTriple].

        Examples:
            >>> import torch
            >>> tr = ConsistencyTimeSampler().sample(8, step=0, total_steps=100,
            ...                                      generator=torch.Generator().manual_seed(0))
            >>> bool(((tr.s <= tr.ell) & (tr.ell < tr.t)).all())
            True
        """
        r = self.schedule(step, total_steps)
        s_draw = self.s_distribution.sample(batch_size, device=device, dtype=dtype, generator=generator)
        t_draw = self.t_distribution.sample(batch_size, device=device, dtype=dtype, generator=generator)
        return consistency_times(t_draw, s_draw, r)
