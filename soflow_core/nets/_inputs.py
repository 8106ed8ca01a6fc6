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
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"x must have shape (b, {', '.join(map(str, expected))}); got {tuple(x.shape)}")
    batch = x.shape[0]
    for name, value in (("t", t), ("s", s)):
        if value.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), one time per sample; got {tuple(value.shape)}")
    return batch
