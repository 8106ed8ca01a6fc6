"""The guidance-scale input of the backbones: ``omega_range`` checks shared by the DiT, the SongUNet and the MLP.

A backbone built with ``omega_range=(low, high)`` takes the keyword ``omega`` (one guidance
scale ω per sample) and adds an embedding of it to its conditioning. The embedding's last layer
starts at zero (as adaLN-Zero), so at initialisation the network computes exactly what it computes
without one, and a checkpoint saved without the embedding loads into it unchanged (``strict=False``).
"""

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from soflow_core._validation import check_real


def check_omega_range(value: object) -> tuple[float, float] | None:
    """Check a constructor's ``omega_range``: None, or finite guidance scales 0 <= low <= high.

    Args:
        value: The argument.

    Returns:
        The range as a pair of floats, or None.

    Raises:
        TypeError: If it is not None or a pair of real numbers.
        ValueError: If the numbers are not finite with 0 <= low <= high.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(
            f"omega_range must be None or a pair (low, high) of guidance scales; got {type(value).__name__}: {value!r}"
        )
    low = check_real("omega_range[0]", value[0], low=0.0)
    high = check_real("omega_range[1]", value[1], low=low)
    return (low, high)


def zero_output_mlp(in_features: int, width: int) -> nn.Sequential:
    """Linear → SiLU → Linear with the last layer at zero: an embedding that adds nothing until trained.

    Args:
        in_features: Input features.
        width: Hidden and output width.

    Returns:
        The module (its parameters ``0.*`` and ``2.*``).
    """
    mlp = nn.Sequential(nn.Linear(in_features, width), nn.SiLU(), nn.Linear(width, width))
    zero_last_layer(mlp)
    return mlp


def zero_last_layer(mlp: nn.Sequential) -> None:
    """Set the weight and bias of the last layer of ``mlp`` to zero.

    Args:
        mlp: A sequential whose last module is an ``nn.Linear``.
    """
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)


def check_forward_omega(omega: Tensor | None, batch: int, omega_range: tuple[float, float] | None, owner: str) -> None:
    """Check the ``omega`` a forward received against how its backbone was built (metadata only).

    Args:
        omega: One guidance scale per sample, or None.
        batch: The batch size of x.
        omega_range: The backbone's ``omega_range``.
        owner: The backbone's name, for the messages.

    Raises:
        ValueError: If ω is given to a backbone built without ``omega_range``, missing for one
            built with it, or not one value per sample.
    """
    if omega_range is None:
        if omega is not None:
            raise ValueError(
                f"omega was given to a {owner} built without omega_range (no guidance-scale input); build it with "
                "omega_range=(low, high) to train an ω-conditioned model"
            )
        return
    if omega is None:
        raise ValueError(
            f"this {owner} is ω-conditioned (omega_range={omega_range}): pass omega, one guidance scale per sample"
        )
    if omega.shape != (batch,) or not omega.is_floating_point():
        raise ValueError(
            f"omega must hold one floating-point guidance scale per sample ({batch}); got shape "
            f"{tuple(omega.shape)} and dtype {omega.dtype}"
        )


def omega_config(
    cls_name: str, state: Mapping[str, Tensor], prefix: str, hints: dict[str, Any]
) -> tuple[float, float] | None:
    """Whether a state dict holds an ω embedding (keys under ``prefix``), and the range to build it with.

    The range leaves no trace in the weights: a state dict with the embedding needs the hint
    ``omega_range``; one without it must not get one. The hint is removed from ``hints``.

    Args:
        cls_name: The backbone class, for the messages.
        state: The state dict (prefixes stripped).
        prefix: The embedding's key prefix, e.g. ``"omega_embedder."``.
        hints: The caller's constructor arguments.

    Returns:
        The ``omega_range`` to build with.

    Raises:
        ValueError: If the hint is missing for a state dict with the embedding, or given for
            one without it.
    """
    has_embedding = any(k.startswith(prefix) for k in state)
    given = check_omega_range(hints.pop("omega_range", None))
    if has_embedding and given is None:
        raise ValueError(
            f"the state dict has a guidance-scale embedding ({prefix}*), so it is an ω-conditioned {cls_name}: pass "
            "omega_range=(low, high), the guidance scales it was trained for (a pretrained folder records them)"
        )
    if given is not None and not has_embedding:
        raise ValueError(
            f"omega_range={given} was given, but the state dict has no guidance-scale embedding ({prefix}*); to add "
            f"one to this model, build the {cls_name} with omega_range and load with load_weights(strict=False)"
        )
    return given
