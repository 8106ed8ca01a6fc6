r"""Solution parameterizations f_θ(x_t, t, s) = a(t, s)·x_t + b(t, s)·F_θ(x_t, t, s) (see the Method page).

a(t, t) = 1 and b(t, t) = 0 make f_θ(x_t, t, t) = x_t hold for any network F_θ.
Sign convention: **b = s − t**, negative during training and sampling, where s < t.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from soflow_core._tensor import bcast_right
from soflow_core._validation import (
    check_choice,
    check_cond,
    check_tensor,
    check_time,
    check_time_order,
    prepared_backbone,
    registered_name,
)
from soflow_core.typing import Backbone, Cond, Data, Time

__all__ = ["AbstractParam", "EulerParam", "ParamName", "TrigParam", "make_param", "param_name"]

ParamName = Literal["euler", "trig"]
"""Names accepted by [`make_param`][soflow_core.parameterizations.make_param] (case-insensitive)."""
AnyTime = Float[Tensor, "*t"]


def _check_call(x_t: Tensor, t: Tensor, s: Tensor, cond: object) -> None:
    check_tensor("x_t", x_t, min_ndim=2)
    check_time("t", t, x_t.shape[0])
    check_time("s", s, x_t.shape[0])
    check_time_order("s", s, "t", t, strict=False)
    check_cond("cond", cond, x_t.shape[0], device=x_t.device)


@dataclass(frozen=True, kw_only=True)
class AbstractParam(ABC):
    """How the network output F_θ becomes the solution f_θ(x_t, t, s).

    Attributes:
        velocity_uses_state: False when ∂ₛa(t, t) ≡ 0, so v_θ(x_t, t) depends on F_θ alone and
            the fused ops skip reading x_t (true of both Euler and Trig).
    """

    velocity_uses_state: ClassVar[bool] = True

    @abstractmethod
    def a(self, t: AnyTime, s: AnyTime) -> AnyTime:
        """Coefficient of x_t, with a(t, t) = 1."""

    @abstractmethod
    def b(self, t: AnyTime, s: AnyTime) -> AnyTime:
        """Coefficient of F_θ, with b(t, t) = 0."""

    @abstractmethod
    def d_s_a(self, t: AnyTime, s: AnyTime) -> AnyTime:
        """Partial derivative ∂ₛa(t, s)."""

    @abstractmethod
    def d_s_b(self, t: AnyTime, s: AnyTime) -> AnyTime:
        """Partial derivative ∂ₛb(t, s)."""

    def combine(self, x_t: Data, network_output: Data, t: Time, s: Time) -> Data:
        r"""The parameterized solution from a network output (SoFlow paper; see the Method page of the docs).

        $$f_\theta(x_t, t, s) = a(t, s)\,x_t + b(t, s)\,F_\theta(x_t, t, s).$$

        Args:
            x_t: The state at time t.
            network_output: F_θ(x_t, t, s).
            t: Current time of each sample.
            s: Target time of each sample.

        Returns:
            f_θ(x_t, t, s).
        """
        return bcast_right(self.a(t, s), x_t) * x_t + bcast_right(self.b(t, s), x_t) * network_output

    def velocity_from_output(self, x_t: Data, network_output: Data, t: Time) -> Data:
        r"""The model velocity from F_θ evaluated at s = t (SoFlow paper; see the Method page of the docs).

        $$v_\theta(x_t, t) = \partial_s a(t, t)\,x_t + \partial_s b(t, t)\,F_\theta(x_t, t, t).$$

        Args:
            x_t: The state at time t.
            network_output: F_θ(x_t, t, t).
            t: Time of each sample.

        Returns:
            v_θ(x_t, t) = ∂ₛ f_θ(x_t, t, s) at s = t.
        """
        return bcast_right(self.d_s_a(t, t), x_t) * x_t + bcast_right(self.d_s_b(t, t), x_t) * network_output

    def solution(self, backbone: Backbone, x_t: Data, t: Time, s: Time, cond: Cond | None = None) -> Data:
        """Evaluate f_θ(x_t, t, s) with one call of the backbone.

        Args:
            backbone: The network F_θ, called as ``backbone(x_t, t, s, cond)``.
            x_t: The state at time t.
            t: Current time of each sample, in [0, 1].
            s: Target time of each sample, in [0, t].
            cond: Conditioning passed to the backbone, or None.

        Returns:
            f_θ(x_t, t, s).

        Raises:
            ValueError: On bad shapes, times outside [0, 1], s > t, or a backbone output not
                shaped like ``x_t``.

        Examples:
            >>> import torch
            >>> zero_net = lambda x, t, s, cond: torch.zeros_like(x)
            >>> x = torch.randn(3, 2)
            >>> torch.equal(EulerParam().solution(zero_net, x, torch.ones(3), torch.zeros(3)), x)
            True
        """
        _check_call(x_t, t, s, cond)
        return self.combine(x_t, prepared_backbone(backbone, "x_t", x_t, cond)(x_t, t, s, cond), t, s)

    def velocity(self, backbone: Backbone, x_t: Data, t: Time, cond: Cond | None = None) -> Data:
        """Evaluate the model velocity v_θ(x_t, t): the backbone at s = t (see the Method page).

        Args:
            backbone: The network F_θ.
            x_t: The state at time t.
            t: Time of each sample, in [0, 1].
            cond: Conditioning passed to the backbone, or None.

        Returns:
            v_θ(x_t, t).

        Raises:
            ValueError: On bad shapes, times outside [0, 1], or a backbone output not shaped
                like ``x_t``.
        """
        _check_call(x_t, t, t, cond)
        return self.velocity_from_output(x_t, prepared_backbone(backbone, "x_t", x_t, cond)(x_t, t, t, cond), t)


@dataclass(frozen=True, kw_only=True)
class EulerParam(AbstractParam):
    r"""Reference name ``Euler``: a = 1, b = s − t, so $f_\theta = x_t + (s - t)F_\theta$.

    The velocity is F_θ(x_t, t, t) itself and the one-step sample is noise − F_θ(noise, 1, 0).
    """

    velocity_uses_state: ClassVar[bool] = False

    def a(self, t: AnyTime, s: AnyTime) -> AnyTime:
        r"""$a(t, s) = 1$."""
        return torch.ones_like(s - t)

    def b(self, t: AnyTime, s: AnyTime) -> AnyTime:
        r"""$b(t, s) = s - t$."""
        return s - t

    def d_s_a(self, t: AnyTime, s: AnyTime) -> AnyTime:
        r"""$\partial_s a = 0$."""
        return torch.zeros_like(s - t)

    def d_s_b(self, t: AnyTime, s: AnyTime) -> AnyTime:
        r"""$\partial_s b = 1$."""
        return torch.ones_like(s - t)


@dataclass(frozen=True, kw_only=True)
class TrigParam(AbstractParam):
    r"""Reference name ``Trig``: a = cos(π(s − t)/2), b = sin(π(s − t)/2).

    The velocity is (π/2)·F_θ(x_t, t, t), since ∂ₛa(t, t) = 0 and ∂ₛb(t, t) = π/2.
    """

    velocity_uses_state: ClassVar[bool] = False

    def a(self, t: AnyTime, s: AnyTime) -> AnyTime:
        r"""$a(t, s) = \cos(\pi (s - t) / 2)$."""
        return torch.cos(0.5 * math.pi * (s - t))

    def b(self, t: AnyTime, s: AnyTime) -> AnyTime:
        r"""$b(t, s) = \sin(\pi (s - t) / 2)$."""
        return torch.sin(0.5 * math.pi * (s - t))

    def d_s_a(self, t: AnyTime, s: AnyTime) -> AnyTime:
        r"""$\partial_s a = -\tfrac{\pi}{2}\sin(\pi (s - t) / 2)$."""
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (s - t))

    def d_s_b(self, t: AnyTime, s: AnyTime) -> AnyTime:
        r"""$\partial_s b = \tfrac{\pi}{2}\cos(\pi (s - t) / 2)$."""
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * (s - t))


_PARAMS: dict[str, type[AbstractParam]] = {"euler": EulerParam, "trig": TrigParam}


def make_param(name: str) -> AbstractParam:
    """Build a parameterization from its name: ``"euler"`` or ``"trig"`` (case-insensitive).

    Args:
        name: The parameterization name.

    Returns:
        The parameterization object.

    Raises:
        ValueError: If the name is unknown.

    Examples:
        >>> make_param("Euler")
        EulerParam()
    """
    return _PARAMS[check_choice("parameterization", name, tuple(_PARAMS))]()


def param_name(param: AbstractParam) -> ParamName:
    """The name [`make_param`][soflow_core.parameterizations.make_param] builds ``param`` from: its inverse.

    Args:
        param: A parameterization object of a registered class.

    Returns:
        The lower-case name.

    Raises:
        ValueError: If the class of ``param`` is not registered (a custom parameterization has no name).

    Examples:
        >>> param_name(EulerParam())
        'euler'
    """
    return registered_name("parameterization", param, _PARAMS)  # type: ignore[return-value]
