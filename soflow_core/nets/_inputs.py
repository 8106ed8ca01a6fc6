"""Input checks shared by the image backbones."""

from torch import Tensor


def check_image_inputs(x: Tensor, t: Tensor, s: Tensor, *, channels: int, resolution: int) -> int:
    """Check x is (b, channels, resolution, resolution) and t, s are (b,); return b.

    Args:
        x: Images.
        t: Current times.
        s: Target times.
        channels: Expected channel count.
        resolution: Expected height and width.

    Returns:
        The batch size b.

    Raises:
        ValueError: On a wrong shape, naming the argument.
    """
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
    batch = x.shape[0]
    for name, value in (("t", t), ("s", s)):
        if value.shape != (batch,):
            raise ValueError(
                f"{name} must hold one time per image of x ({batch} images); got shape {tuple(value.shape)}"
            )
    return batch
