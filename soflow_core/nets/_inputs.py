"""Input checks shared by the backbones' ``forward`` (metadata only: no device synchronisation)."""

from torch import Tensor, nn

from soflow_core._validation import check_backbone_input


def _check_times(x: Tensor, t: object, s: object) -> None:
    """t and s are floating-point tensors of shape (b,) on x's device."""
    batch = x.shape[0]
    for name, value in (("t", t), ("s", s)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            kind = f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"{name} must be a floating-point tensor of times in [0, 1]; got {kind}")
        if value.shape != (batch,):
            raise ValueError(f"{name} must hold one time per sample of x ({batch}); got shape {tuple(value.shape)}")
        if value.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}); got {value.device}")


def _check_x(x: object, model: nn.Module) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor; got {kind}")
    check_backbone_input("x", x, model, shape=False)
    return x


def check_image_inputs(x: Tensor, t: Tensor, s: Tensor, *, channels: int, resolution: int, model: nn.Module) -> int:
    """Check x is (b, channels, resolution, resolution) in the model's dtype and t, s are (b,) times; return b.

    Args:
        x: Images.
        t: Current times.
        s: Target times.
        channels: Expected channel count.
        resolution: Expected height and width.
        model: The backbone (for its parameters' dtype).

    Returns:
        The batch size b.

    Raises:
        ValueError: On a wrong shape or device, naming the argument.
        TypeError: On a non-floating input, or x in another dtype than the model's parameters
            outside autocast.
    """
    x = _check_x(x, model)
    expected = (channels, resolution, resolution)
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images of shape {expected} (channels, height, width); got {x.ndim}-d x")
    if tuple(x.shape[1:]) != expected:
        # Per-sample shapes only: callers such as the objective concatenate sub-batches, so the batch
        # size of x need not be the user's.
        raise ValueError(
            f"x must be a batch of images of shape {expected} (channels, height, width); got images of "
            f"shape {tuple(x.shape[1:])}"
        )
    _check_times(x, t, s)
    return x.shape[0]


def check_flat_inputs(x: Tensor, t: Tensor, s: Tensor, *, dim: int, model: nn.Module) -> int:
    """Check x is (b, dim) in the model's dtype and t, s are (b,) times; return b.

    Args:
        x: Flat samples.
        t: Current times.
        s: Target times.
        dim: Expected data dimension.
        model: The backbone (for its parameters' dtype).

    Returns:
        The batch size b.

    Raises:
        ValueError: On a wrong shape or device, naming the argument.
        TypeError: On a non-floating input, or x in another dtype than the model's parameters
            outside autocast.
    """
    x = _check_x(x, model)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x must have shape (b, {dim}); got {tuple(x.shape)}")
    _check_times(x, t, s)
    return x.shape[0]
