r"""EDM's geometric augmentation pipeline, with the augmentation labels that condition the network.

The CIFAR-10 recipe augments every training image with the non-leaking geometric
augmentations of EDM (Karras et al., 2022, after StyleGAN2-ADA) and tells the network what was
done through a vector of *augmentation labels*, so that sampling without labels gives
un-augmented images. Each operation with a positive probability multiplier adds its labels, in
this order (a label is 0 for a sample the operation left untouched):

| operation | labels | applied with probability |
|---|---|---|
| ``xflip`` | flip bit f ∈ {0, 1} | min(1, xflip·p), then f ~ Bernoulli(½) |
| ``yflip`` | flip bit | min(1, yflip·p), then Bernoulli(½) |
| ``scale`` | w (isotropic scale 2^(scale_std·w), w ~ N(0, 1)) | min(1, scale·p) |
| ``rotate_frac`` | cos θ − 1, sin θ (θ ~ U(±π·rotate_frac_max)) | min(1, rotate_frac·p) |
| ``aniso`` | w cos r, w sin r (see below) | min(1, aniso·p) |
| ``translate_frac`` | w_x, w_y (shift (w_x·W, w_y·H)·translate_frac_std px) | min(1, translate_frac·p) |

Anisotropic scaling stretches by 2^(aniso_std·w), w ~ N(0, 1), along the axis at angle r and
shrinks by the same factor across it; r ~ U(−π, π) with probability ``aniso_rotate_prob``,
else r = 0. Translations draw (w_x, w_y) ~ N(0, I).

The SoFlow CIFAR-10 setting (p = 0.12, xflip = 10⁸, yflip = 0, scale = 1, rotate_frac = 0,
aniso = 1, translate_frac = 1) gives the **6 labels** [f, w_scale, w_aniso cos r, w_aniso sin r,
w_x, w_y], the ``augment_dim = 6`` of the SongUNet. Since xflip·p ≫ 1, every image is a flip
candidate and half of them are mirrored; each of the other three operations acts on 12 % of
the images, independently.

The geometric operations are composed into one inverse affine map per image and resampled
as EDM does: reflect-pad by the margin the map needs, upsample 2× with the ``sym6`` wavelet
low-pass filter, sample bilinearly, filter and downsample 2×. Flips are exact pixel
permutations. Images whose geometric map is the identity skip the resampling and are returned
unchanged (EDM resamples them too, which changes them by float rounding only).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from soflow_core._rng import rand, randn
from soflow_core._validation import check_finite, check_real, check_tensor

__all__ = ["AugmentOutput", "AugmentParams", "EDMAugment"]

# Low-pass decomposition filter of the Symlet-6 wavelet (orthonormal: Σh = √2, Σh² = 1).
_SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)
# Filter support in original pixels on each side of a resampled pixel.
_FILTER_MARGIN = len(_SYM6) // 4


@dataclass(frozen=True)
class AugmentOutput:
    """Augmented images and the labels that describe the augmentation.

    Attributes:
        images: The augmented images, same shape, dtype and device as the input.
        labels: Augmentation labels of shape (b, label_dim), 0 for operations not applied.
    """

    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class AugmentParams:
    """Per-image parameters of one draw of the pipeline (all of shape (b,) except ``translate``).

    Zero everywhere means "no augmentation". Build one by hand to apply a chosen transform.

    Attributes:
        xflip: 1 to mirror left-right, else 0.
        yflip: 1 to mirror top-bottom, else 0.
        scale: w with isotropic scale factor 2^(scale_std·w).
        rotate: Rotation angle θ in radians.
        aniso: w with anisotropic scale factor 2^(aniso_std·w).
        aniso_angle: Angle r of the anisotropic scaling axis, in radians.
        translate: (w_x, w_y) per image, shape (b, 2), in units of translate_frac_std × image size.
    """

    xflip: Tensor
    yflip: Tensor
    scale: Tensor
    rotate: Tensor
    aniso: Tensor
    aniso_angle: Tensor
    translate: Tensor

    @classmethod
    def identity(
        cls, batch: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> "AugmentParams":
        """Parameters that leave ``batch`` images untouched.

        Args:
            batch: Number of images.
            device: Device of the parameter tensors.
            dtype: Floating dtype of the parameter tensors.

        Returns:
            All-zero parameters.
        """
        zeros = torch.zeros(batch, device=device, dtype=dtype)
        return cls(
            xflip=zeros,
            yflip=zeros,
            scale=zeros,
            rotate=zeros,
            aniso=zeros,
            aniso_angle=zeros,
            translate=torch.zeros(batch, 2, device=device, dtype=dtype),
        )


def _rotation(theta: Tensor) -> Tensor:
    """(b, 2, 2) rotations by ``theta`` (x right, y down)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _diag(sx: Tensor, sy: Tensor) -> Tensor:
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero], -1), torch.stack([zero, sy], -1)], -2)


def _filter_1d(h: Tensor, channels: int, dim: int) -> Tensor:
    """Depthwise conv weight that filters along ``dim`` (2 = rows, 3 = columns)."""
    shape = (channels, 1, h.numel(), 1) if dim == 2 else (channels, 1, 1, h.numel())
    return h.reshape(1, 1, -1).expand(channels, 1, -1).reshape(shape)


def _upsample2x(x: Tensor, h: Tensor) -> Tensor:
    """Zero-insertion 2× upsampling with filter ``h`` (output pixel m sits at input position m/2, see `_resample`)."""
    c = x.shape[1]
    pad = len(_SYM6) // 2 - 1
    x = F.conv_transpose2d(x, _filter_1d(h, c, 3), stride=(1, 2), padding=(0, pad), groups=c)
    return F.conv_transpose2d(x, _filter_1d(h, c, 2), stride=(2, 1), padding=(pad, 0), groups=c)


def _downsample2x(x: Tensor, h: Tensor) -> Tensor:
    """Filter with ``h`` and keep every other pixel (output k sits at input position 2k, see `_resample`)."""
    c = x.shape[1]
    pad = len(_SYM6) // 2 - 1
    x = F.conv2d(x, _filter_1d(h, c, 3), stride=(1, 2), padding=(0, pad), groups=c)
    return F.conv2d(x, _filter_1d(h, c, 2), stride=(2, 1), padding=(pad, 0), groups=c)


def _resample(images: Tensor, linear: Tensor, shift: Tensor) -> Tensor:
    """Warp ``images`` (n, c, H, W) by the inverse map p_in = linear @ p_out + shift (centred pixel coordinates)."""
    height, width = images.shape[2:]
    dtype, device = images.dtype, images.device
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=dtype, device=device)
    # Reflect-pad by the largest distance a corner of the output maps beyond the input, plus the filter support.
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=dtype, device=device) * centre
    reach = torch.einsum("nij,kj->nki", linear, corners) + shift[:, None, :]  # (n, 4, xy)
    lo = (-reach).amax(dim=(0, 1)) - centre + 2 * _FILTER_MARGIN
    hi = reach.amax(dim=(0, 1)) - centre + 2 * _FILTER_MARGIN
    limit = torch.tensor([width - 1, height - 1], dtype=dtype, device=device)
    lo = torch.minimum(lo.clamp(min=0), limit).ceil().long().tolist()
    hi = torch.minimum(hi.clamp(min=0), limit).ceil().long().tolist()
    padded = F.pad(images, [lo[0], hi[0], lo[1], hi[1]], mode="reflect")

    h = torch.tensor(_SYM6, dtype=dtype, device=device)
    up = _upsample2x(padded, h)  # (n, c, 2 H_pad, 2 W_pad)

    # sym6 is not symmetric: its effective centre is tap 5 of 0..11, not 5.5, so upsampled pixel
    # m sits at input position m/2 and downsampled pixel k at 2k (EDM's alignment; measured on
    # smooth images, the half-tap alternative shifts content by a quarter pixel). The output
    # canvas is 2× the image plus the filter margin: canvas pixel j sits at centred output
    # coordinate j/2 + 1/2 − size/2 − margin.
    m = _FILTER_MARGIN
    ys = torch.arange(2 * (height + 2 * m), dtype=dtype, device=device) / 2 + 0.5 - height / 2 - m
    xs = torch.arange(2 * (width + 2 * m), dtype=dtype, device=device) / 2 + 0.5 - width / 2 - m
    out_xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (Hc, Wc, xy)
    in_xy = torch.einsum("nij,hwj->nhwi", linear, out_xy) + shift[:, None, None, :]
    # Centred input coordinate → index in the padded image → index m in the upsampled image
    # (m = 2i) → grid_sample's normalised coordinate (align_corners=False).
    offset = torch.tensor([lo[0], lo[1]], dtype=dtype, device=device)
    up_index = 2 * (in_xy + centre + offset)
    up_size = torch.tensor([up.shape[3], up.shape[2]], dtype=dtype, device=device)
    grid = (2 * up_index + 1) / up_size - 1
    canvas = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample2x(canvas, h)[:, :, m:-m, m:-m]


@dataclass(frozen=True, kw_only=True)
class EDMAugment:
    """EDM's geometric augmentation pipeline with augmentation labels (defaults: the CIFAR-10 recipe).

    Probability multipliers are scaled by ``p``; an operation with multiplier 0 is off and adds
    no labels. With the defaults the labels have 6 entries (see the module docs). Randomness
    comes only from the ``generator`` argument; parameters are drawn on the generator's device.

    Attributes:
        p: Overall augmentation probability in [0, 1].
        xflip: Probability multiplier of the left-right flip.
        yflip: Probability multiplier of the top-bottom flip.
        scale: Probability multiplier of isotropic scaling.
        rotate_frac: Probability multiplier of arbitrary rotation.
        aniso: Probability multiplier of anisotropic scaling.
        translate_frac: Probability multiplier of fractional translation.
        scale_std: Log2 standard deviation of isotropic scaling.
        rotate_frac_max: Rotation range as a fraction of a half turn each way (1 = full circle).
        aniso_std: Log2 standard deviation of anisotropic scaling.
        aniso_rotate_prob: Probability that the anisotropic axis is rotated (else it is the x axis).
        translate_frac_std: Standard deviation of translation, as a fraction of the image size.

    Examples:
        >>> import torch
        >>> augment = EDMAugment()
        >>> out = augment(torch.rand(8, 3, 32, 32) * 2 - 1, generator=torch.Generator().manual_seed(0))
        >>> out.images.shape, out.labels.shape, augment.label_dim
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 6]), 6)
    """

    p: float = 0.12
    xflip: float = 1e8
    yflip: float = 0.0
    scale: float = 1.0
    rotate_frac: float = 0.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    scale_std: float = 0.2
    rotate_frac_max: float = 1.0
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_frac_std: float = 0.125

    def __post_init__(self) -> None:
        check_real("p", self.p, low=0.0, high=1.0)
        for name in ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac"):
            check_real(name, getattr(self, name), low=0.0)
        for name in ("scale_std", "rotate_frac_max", "aniso_std", "translate_frac_std"):
            check_real(name, getattr(self, name), low=0.0, low_open=True)
        check_real("aniso_rotate_prob", self.aniso_rotate_prob, low=0.0, high=1.0)

    @property
    def label_dim(self) -> int:
        """Number of augmentation labels per image (6 for the defaults)."""
        widths = {"xflip": 1, "yflip": 1, "scale": 1, "rotate_frac": 2, "aniso": 2, "translate_frac": 2}
        return sum(width for name, width in widths.items() if getattr(self, name) > 0)

    def sample_params(
        self,
        batch: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AugmentParams:
        """Draw the augmentation parameters of ``batch`` images.

        Args:
            batch: Number of images, ≥ 1.
            generator: Source of randomness, or None for the global RNG of ``device``.
            device: Device of the returned parameters.
            dtype: Floating dtype of the returned parameters.

        Returns:
            The parameters; entries of operations that were not applied are 0.

        Raises:
            ValueError: If ``batch`` < 1.
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1; got {batch!r}")
        device = torch.device(device)
        params = AugmentParams.identity(batch, device=device, dtype=dtype)

        def uniform(*shape: int) -> Tensor:
            return rand(shape, device=device, dtype=dtype, generator=generator)

        def normal(*shape: int) -> Tensor:
            return randn(shape, device=device, dtype=dtype, generator=generator)

        def gate(multiplier: float, value: Tensor) -> Tensor:
            # Keep ``value`` for the images drawn to receive this operation, 0 elsewhere.
            applied = uniform(batch) < multiplier * self.p
            return torch.where(applied.view(-1, *([1] * (value.ndim - 1))), value, torch.zeros_like(value))

        values = {}
        if self.xflip > 0:
            values["xflip"] = gate(self.xflip, (uniform(batch) < 0.5).to(dtype))
        if self.yflip > 0:
            values["yflip"] = gate(self.yflip, (uniform(batch) < 0.5).to(dtype))
        if self.scale > 0:
            values["scale"] = gate(self.scale, normal(batch))
        if self.rotate_frac > 0:
            values["rotate"] = gate(self.rotate_frac, (uniform(batch) * 2 - 1) * (math.pi * self.rotate_frac_max))
        if self.aniso > 0:
            values["aniso"] = gate(self.aniso, normal(batch))
            angle = (uniform(batch) * 2 - 1) * math.pi
            rotated = uniform(batch) < self.aniso_rotate_prob
            values["aniso_angle"] = torch.where(rotated & (values["aniso"] != 0), angle, torch.zeros_like(angle))
        if self.translate_frac > 0:
            values["translate"] = gate(self.translate_frac, normal(batch, 2))
        return AugmentParams(**{**params.__dict__, **values})

    def labels(self, params: AugmentParams) -> Float[Tensor, "b d"]:
        """The augmentation labels of ``params``, in the order of the module docs.

        Args:
            params: Per-image parameters.

        Returns:
            Labels of shape (b, label_dim).
        """
        columns = []
        if self.xflip > 0:
            columns.append(params.xflip)
        if self.yflip > 0:
            columns.append(params.yflip)
        if self.scale > 0:
            columns.append(params.scale)
        if self.rotate_frac > 0:
            columns += [torch.cos(params.rotate) - 1, torch.sin(params.rotate)]
        if self.aniso > 0:
            columns += [params.aniso * torch.cos(params.aniso_angle), params.aniso * torch.sin(params.aniso_angle)]
        if self.translate_frac > 0:
            columns += [params.translate[:, 0], params.translate[:, 1]]
        if not columns:
            return params.xflip.new_zeros(params.xflip.shape[0], 0)
        return torch.stack(columns, dim=1)

    def apply(self, images: Float[Tensor, "b c h w"], params: AugmentParams) -> AugmentOutput:
        r"""Apply given parameters: flips, then one resampling by the composed inverse map.

        In centred pixel coordinates (x right, y down) the output pixel p reads the input at

        $$G^{-1} p = 2^{-\sigma_s w_s} R(\theta)\, R(-r)\,
          \operatorname{diag}(2^{-\sigma_a w_a}, 2^{\sigma_a w_a})\, R(r)\,
          \big(p - \sigma_t\,(w_x W,\ w_y H)\big),$$

        so the content is scaled up by $2^{\sigma_s w_s}$, rotated by −θ, stretched and shifted
        right/down by $(w_x W, w_y H)\,\sigma_t$ pixels.

        Args:
            images: Float images, channels first.
            params: Per-image parameters (see [`AugmentParams`][soflow_core.train.augment.AugmentParams]).

        Returns:
            The augmented images and their labels (in the images' dtype).

        Raises:
            ValueError: If the images are not 4-D, not finite, or smaller than 2 × 2, or the
                parameters do not match the batch.
        """
        check_tensor("images", images, min_ndim=4)
        if images.ndim != 4 or images.shape[2] < 2 or images.shape[3] < 2:
            raise ValueError(f"images must have shape (b, c, h, w) with h, w >= 2; got {tuple(images.shape)}")
        check_finite("images", images)
        b, _, height, width = images.shape
        for name, value in params.__dict__.items():
            expected = (b, 2) if name == "translate" else (b,)
            if tuple(value.shape) != expected:
                raise ValueError(f"params.{name} must have shape {expected}; got {tuple(value.shape)}")
        dtype, device = images.dtype, images.device
        p = AugmentParams(**{k: v.to(device=device, dtype=dtype) for k, v in params.__dict__.items()})

        out = torch.where(p.xflip.view(b, 1, 1, 1) == 1, images.flip(3), images)
        out = torch.where(p.yflip.view(b, 1, 1, 1) == 1, out.flip(2), out)

        # Inverse map G⁻¹ = S⁻¹ · R(θ) · R(−r) D⁻¹ R(r) · T⁻¹, split into its linear part and shift.
        s = torch.exp2(p.scale * self.scale_std)
        a = torch.exp2(p.aniso * self.aniso_std)
        linear = _diag(1 / s, 1 / s) @ _rotation(p.rotate)
        linear = linear @ _rotation(-p.aniso_angle) @ _diag(1 / a, a) @ _rotation(p.aniso_angle)
        shift_px = p.translate * torch.tensor([width, height], dtype=dtype, device=device) * self.translate_frac_std
        shift = -torch.einsum("nij,nj->ni", linear, shift_px)
        moved = ((p.scale != 0) | (p.rotate != 0) | (p.aniso != 0) | (p.translate != 0).any(dim=1)).nonzero()[:, 0]
        if moved.numel() > 0:
            out = out.index_copy(0, moved, _resample(out[moved], linear[moved], shift[moved]))
        return AugmentOutput(images=out, labels=self.labels(p))

    def __call__(self, images: Float[Tensor, "b c h w"], *, generator: torch.Generator | None = None) -> AugmentOutput:
        """Draw parameters for every image and apply them.

        Args:
            images: Float images in [−1, 1], channels first.
            generator: Source of randomness (on any device), or None for the global RNG.

        Returns:
            The augmented images and their (b, label_dim) labels.

        Raises:
            ValueError: If the images are not 4-D float images.
        """
        check_tensor("images", images, min_ndim=4)
        if images.ndim != 4:
            raise ValueError(f"images must have shape (b, c, h, w); got {tuple(images.shape)}")
        params = self.sample_params(images.shape[0], generator=generator, device=images.device, dtype=images.dtype)
        return self.apply(images, params)
