r"""Noising paths x_t = α(t)·data + β(t)·noise (SoFlow paper; see the Method page of the docs).

Time runs from data (t = 0) to noise (t = 1): α(0) = 1, β(0) = 0, α(1) = 0, β(1) = 1.
The conditional velocity, the Flow Matching regression target, is
$v_t = \alpha'(t)\,\text{data} + \beta'(t)\,\text{noise}$.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from soflow_core._validation import (
    check_choice,
    check_same_dtype,
    check_same_shape,
    check_tensor,
    check_time,
    registered_name,
)
from soflow_core.ops.fused import linear_combination
from soflow_core.typing import Data, Time

__all__ = ["AbstractPath", "LinearPath", "PathName", "PathSample", "TrigPath", "make_path", "path_name"]

PathName = Literal["linear", "trig"]
"""Names accepted by [`make_path`][soflow_core.paths.make_path] (case-insensitive)."""
AnyTime = Float[Tensor, "*t"]


@dataclass(frozen=True, kw_only=True)
class PathSample:
    """A point on the path and its conditional velocity.

    Attributes:
        x_t: α(t)·data + β(t)·noise.
        v_t: α′(t)·data + β′(t)·noise, the conditional velocity d x_t / dt.
    """

    x_t: Data
    v_t: Data


@dataclass(frozen=True, kw_only=True)
class AbstractPath(ABC):
    """An interpolant between data (t = 0) and noise (t = 1) with its time derivatives."""

    @abstractmethod
    def alpha(self, t: AnyTime) -> AnyTime:
        """Coefficient of the data, α(t)."""

    @abstractmethod
    def beta(self, t: AnyTime) -> AnyTime:
        """Coefficient of the noise, β(t)."""

    @abstractmethod
    def d_alpha(self, t: AnyTime) -> AnyTime:
        """Time derivative α′(t)."""

    @abstractmethod
    def d_beta(self, t: AnyTime) -> AnyTime:
        """Time derivative β′(t)."""

    def coefficients(self, t: Time) -> Float[Tensor, "b 2 2"]:
        r"""The path as a per-sample linear map from (data, noise) to (x_t, v_t).

        $$\begin{pmatrix} x_t \\ v_t \end{pmatrix} =
          \begin{pmatrix} \alpha(t) & \beta(t) \\ \alpha'(t) & \beta'(t) \end{pmatrix}
          \begin{pmatrix} \text{data} \\ \text{noise} \end{pmatrix}.$$

        Args:
            t: Time of each sample.

        Returns:
            The (b, 2, 2) table the fused path build takes.
        """
        rows = (
            torch.stack([self.alpha(t), self.beta(t)], dim=1),
            torch.stack([self.d_alpha(t), self.d_beta(t)], dim=1),
        )
        return torch.stack(rows, dim=1)

    def sample(self, data: Data, noise: Data, t: Time, *, backend: str = "auto") -> PathSample:
        r"""Build $x_t$ and the conditional velocity $v_t$ (SoFlow paper; see the Method page of the docs).

        $$x_t = \alpha(t)\,\text{data} + \beta(t)\,\text{noise},\qquad
          v_t = \alpha'(t)\,\text{data} + \beta'(t)\,\text{noise}.$$

        Args:
            data: Clean samples (t = 0).
            noise: Gaussian noise (t = 1), same shape as ``data``.
            t: Time of each sample, in [0, 1].
            backend: Where the fused path build runs: ``"auto"``, ``"torch"`` or ``"triton"``.

        Returns:
            The [`PathSample`][soflow_core.paths.PathSample] ``(x_t, v_t)``.

        Raises:
            ValueError: On mismatched shapes or t outside [0, 1].
            TypeError: If ``noise`` has another dtype than ``data``.

        Examples:
            >>> import torch
            >>> out = LinearPath().sample(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
            >>> out.x_t[:, 0].tolist(), out.v_t[0, 0].item()
            ([1.0, 0.0], -1.0)
        """
        check_tensor("data", data, min_ndim=2)
        check_tensor("noise", noise, min_ndim=2)
        check_same_shape("noise", noise, "data", data)
        check_same_dtype("noise", noise, "data", data)
        check_time("t", t, data.shape[0])
        return self.interpolate(data, noise, t, backend=backend)

    def interpolate(self, data: Data, noise: Data, t: Time, *, backend: str = "auto") -> PathSample:
        """[`sample`][soflow_core.paths.AbstractPath.sample] without input checks (for hot paths).

        Args:
            data: Clean samples.
            noise: Gaussian noise, same shape as ``data``.
            t: Time of each sample.
            backend: Where the fused path build runs.

        Returns:
            The [`PathSample`][soflow_core.paths.PathSample].
        """
        x_t, v_t = linear_combination([data, noise], self.coefficients(t), backend=backend)
        return PathSample(x_t=x_t, v_t=v_t)


@dataclass(frozen=True, kw_only=True)
class LinearPath(AbstractPath):
    r"""The rectified-flow path, reference name ``Linear``: α(t) = 1 − t, β(t) = t.

    The conditional velocity is $v_t = \text{noise} - \text{data}$ (it points from data to
    noise; sampling moves against it as t decreases).
    """

    def alpha(self, t: AnyTime) -> AnyTime:
        r"""$\alpha(t) = 1 - t$."""
        return 1.0 - t

    def beta(self, t: AnyTime) -> AnyTime:
        r"""$\beta(t) = t$."""
        return t.clone()

    def d_alpha(self, t: AnyTime) -> AnyTime:
        r"""$\alpha'(t) = -1$."""
        return torch.full_like(t, -1.0)

    def d_beta(self, t: AnyTime) -> AnyTime:
        r"""$\beta'(t) = 1$."""
        return torch.ones_like(t)


@dataclass(frozen=True, kw_only=True)
class TrigPath(AbstractPath):
    r"""The trigonometric path, reference name ``Trig``: α(t) = cos(πt/2), β(t) = sin(πt/2)."""

    def alpha(self, t: AnyTime) -> AnyTime:
        r"""$\alpha(t) = \cos(\pi t / 2)$."""
        return torch.cos(0.5 * math.pi * t)

    def beta(self, t: AnyTime) -> AnyTime:
        r"""$\beta(t) = \sin(\pi t / 2)$."""
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: AnyTime) -> AnyTime:
        r"""$\alpha'(t) = -\tfrac{\pi}{2}\sin(\pi t / 2)$."""
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_beta(self, t: AnyTime) -> AnyTime:
        r"""$\beta'(t) = \tfrac{\pi}{2}\cos(\pi t / 2)$."""
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


_PATHS: dict[str, type[AbstractPath]] = {"linear": LinearPath, "trig": TrigPath}


def make_path(name: str) -> AbstractPath:
    """Build a path from its name: ``"linear"`` or ``"trig"`` (case-insensitive, reference spelling accepted).

    Args:
        name: The path name.

    Returns:
        The path object.

    Raises:
        ValueError: If the name is unknown.

    Examples:
        >>> make_path("Linear")
        LinearPath()
    """
    return _PATHS[check_choice("path", name, tuple(_PATHS))]()


def path_name(path: AbstractPath) -> PathName:
    """The name [`make_path`][soflow_core.paths.make_path] builds ``path`` from: its inverse.

    Args:
        path: A path object of a registered class.

    Returns:
        The lower-case name.

    Raises:
        ValueError: If the class of ``path`` is not registered (a custom path has no name).

    Examples:
        >>> path_name(LinearPath())
        'linear'
    """
    return registered_name("path", path, _PATHS)  # type: ignore[return-value]
