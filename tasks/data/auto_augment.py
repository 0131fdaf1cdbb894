"""Batched training augmentation that runs where the images are: loader workers (CPU) or the training device.

`BatchAugmenter` turns a uint8 N x C x H x W batch into an augmented one of the same dtype: pad-and-crop
and horizontal flips as one gather (or RandomResizedCrop and flips as one grid_sample), then RandAugment as
timm defines it (`data.augment.auto_augment`, e.g. DeiT's "rand-m9-mstd0.5-inc1": timm's op set, level
scale, magnitude noise, per-op probability and random signs, and PIL's definition of every op), applied op
by op to the images that drew it instead of image by image, and a resize to the training resolution.
`EvalResize` is evaluation's resize and centre crop. `BatchEraser` does random erasing on normalised
batches, `BatchMixer` timm's Mixup/CutMix on float batches of any size, odd ones and 1 included.

Both draw every random choice on the host (a CPU `torch.Generator`, a NumPy `Generator`) and send the
device only index and parameter tensors, copied with `non_blocking=True` from pinned memory. How many images
took which op is therefore known on the host, so nothing here reads a device tensor back: no `.item()`,
`.tolist()` or `nonzero()` of device data and no boolean-mask indexing with a data-dependent shape. On CUDA a
batch is queued without waiting for the GPU. (tests/unit/data/test_augment.py runs both on the meta device, which has
no values to read, and fails on blocking host-to-device copies.)
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf

from tasks.config import RAND_AUGMENT_LEVELS, AugmentConfig, DataConfig, RandAugmentPolicy
from vitmodels import CIFAR10_MEAN

# timm's RandAugment op sets, in timm's order (timm.data.auto_augment._RAND_TRANSFORMS and
# _RAND_INCREASING_TRANSFORMS): inc1 swaps six ops for variants whose severity grows with the level.
RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
_HAVE_INCREASING = frozenset({"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"})
RAND_AUGMENT_INCREASING_OPS = tuple(f"{op}Increasing" if op in _HAVE_INCREASING else op for op in RAND_AUGMENT_OPS)
# Ops whose argument takes a random sign (timm's _randomly_negate).
SIGNED_OPS = frozenset({
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
})
# timm's translate_pct: the Rel translations move by up to this share of the image side.
TRANSLATE_PCT = 0.45
# The batched implementations, one per image operation (an op and its Increasing variant differ only in how
# a level becomes an argument). "Identity" serves the images whose op was drawn but not applied. The geometric
# ops sit next to each other, grouped by the axes they move samples along, and each group is resampled at once.
IMPLEMENTATIONS = (
    "Identity", "ShearX", "TranslateXRel", "ShearY", "TranslateYRel", "Rotate", "AutoContrast", "Equalize",
    "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness",
)
_ALONG_X = range(IMPLEMENTATIONS.index("ShearX"), IMPLEMENTATIONS.index("TranslateXRel") + 1)
_ALONG_Y = range(IMPLEMENTATIONS.index("ShearY"), IMPLEMENTATIONS.index("TranslateYRel") + 1)
_ROTATE = range(IMPLEMENTATIONS.index("Rotate"), IMPLEMENTATIONS.index("Rotate") + 1)
GEOMETRIC_OPS = frozenset(IMPLEMENTATIONS[_ALONG_X.start : _ROTATE.stop])
# Per-image parameters travel as rows of this many float32: a 3x2 affine matrix is the widest.
_PARAMS = 6
_INTERPOLATION = {"bilinear": tvf.InterpolationMode.BILINEAR, "bicubic": tvf.InterpolationMode.BICUBIC}
# Added before the geometric ops truncate to integers as PIL does: float32 grids land a hair off the pixel
# centres PIL's double-precision ones hit, which would otherwise turn an exact v into v - 1.
_TRUNCATION_SLACK = 1e-3
# Tries per image for a RandomResizedCrop box (torchvision) and a random-erasing box (timm) before giving up.
RRC_ATTEMPTS = 10
ERASING_ATTEMPTS = 10
# timm's RandomErasing defaults: the erased share of the image area and the box's aspect ratio range.
ERASING_AREA = (0.02, 1 / 3)
ERASING_MIN_ASPECT = 0.3


def rand_augment_ops(policy: RandAugmentPolicy) -> tuple[str, ...]:
    """The op set images draw from under `policy`: timm's increasing set for inc1, its default set otherwise."""
    return RAND_AUGMENT_INCREASING_OPS if policy.increasing else RAND_AUGMENT_OPS


def implementation_of(op: str) -> str:
    """The image operation behind a timm op name (PosterizeIncreasing -> Posterize)."""
    return op.removesuffix("Increasing")


def op_arguments(op: str, levels: torch.Tensor, negative: torch.Tensor) -> torch.Tensor | None:
    """What timm's level function of `op` (timm.data.auto_augment.LEVEL_TO_ARG) hands the op for each level
    (float64 CPU tensor, already clipped to [0, mmax]), negated where `negative` for the signed ops; None for
    ops without an argument. The same double-precision steps as timm's, so the values are identical: degrees
    (Rotate), shear factor, translation as a share of the side, bits kept (Posterize), threshold
    (Solarize), addition (SolarizeAdd), enhancement factor (Color, Contrast, Brightness, Sharpness)."""
    fraction = levels / RAND_AUGMENT_LEVELS

    def signed(values: torch.Tensor) -> torch.Tensor:
        return torch.where(negative, -values, values)

    if op in ("AutoContrast", "Equalize", "Invert"):
        return None
    if op == "Rotate":
        return signed(fraction * 30.0)
    if op in ("ShearX", "ShearY"):
        return signed(fraction * 0.3)
    if op in ("TranslateXRel", "TranslateYRel"):
        return signed(fraction * TRANSLATE_PCT)
    if op in ("Posterize", "PosterizeIncreasing"):
        bits = (fraction * 4).trunc()
        return bits if op == "Posterize" else 4 - bits
    if op in ("Solarize", "SolarizeIncreasing"):
        threshold = (fraction * 256).trunc().clamp(max=256)
        return threshold if op == "Solarize" else 256 - threshold
    if op == "SolarizeAdd":
        return (fraction * 110).trunc().clamp(max=128)
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return fraction * 1.8 + 0.1
    if op in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (1.0 + signed(fraction * 0.9)).clamp(min=0.1)
    known = ", ".join(RAND_AUGMENT_OPS + RAND_AUGMENT_INCREASING_OPS)
    raise ValueError(f"unknown RandAugment op {op!r}; known: {known}")


def pil_affine(implementation: str, arguments: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x 2 x 3 float64: the affine data (a, b, c, d, e, f) timm's geometric op hands PIL for each argument,
    mapping an output point (x, y) to the input point (a x + b y + c, d x + e y + f), in pixels from the
    top-left corner. Shears are about that corner (PIL's (1, m, 0, 0, 1, 0), not torchvision's atan
    angle); Rotate is PIL's Image.rotate about the centre, counter-clockwise, its matrix rounded as PIL's."""
    count = arguments.shape[0]
    matrix = torch.zeros(count, 2, 3, dtype=torch.float64)
    matrix[:, 0, 0] = matrix[:, 1, 1] = 1.0
    if implementation == "ShearX":
        matrix[:, 0, 1] = arguments
    elif implementation == "ShearY":
        matrix[:, 1, 0] = arguments
    elif implementation == "TranslateXRel":
        matrix[:, 0, 2] = arguments * width
    elif implementation == "TranslateYRel":
        matrix[:, 1, 2] = arguments * height
    elif implementation == "Rotate":
        angle = -torch.deg2rad(arguments.remainder(360.0))
        cos, sin = angle.cos().round(decimals=15), angle.sin().round(decimals=15)
        center_x, center_y = width / 2.0, height / 2.0
        matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1] = cos, sin, -sin, cos
        matrix[:, 0, 2] = cos * -center_x + sin * -center_y + center_x
        matrix[:, 1, 2] = -sin * -center_x + cos * -center_y + center_y
    else:
        raise ValueError(f"{implementation!r} is not a geometric op")
    return matrix


def op_parameters(ops: tuple[str, ...], chosen: torch.Tensor, levels: torch.Tensor, negative: torch.Tensor,
                  height: int, width: int) -> torch.Tensor:
    """float32 N x _PARAMS on the host: what each image's op (index `chosen` into `ops`) needs at its level
    and sign, computed for the batch at once.

    Geometric ops: PIL's matrix transposed to 3x2, to multiply (x + 0.5, y + 0.5, 1) pixel-centre rows.
    Colour ops: the factor. Posterize: the bit mask PIL's lookup table keeps. Solarize: the threshold
    clipped to 255 and the xor value (0 for PIL's 256, which inverts nothing). SolarizeAdd: the addition.
    Others: unused zeros."""
    params = torch.zeros(chosen.shape[0], _PARAMS, dtype=torch.float64)
    for index, op in enumerate(ops):
        rows = chosen == index  # host tensors: no device involved
        arguments = op_arguments(op, levels[rows], negative[rows])
        if arguments is None:
            continue
        implementation = implementation_of(op)
        if implementation in GEOMETRIC_OPS:
            params[rows] = pil_affine(implementation, arguments, height, width).transpose(1, 2).reshape(-1, _PARAMS)
        elif implementation == "Posterize":
            # ImageOps.posterize keeps value & ~(2 ** (8 - bits) - 1); 8 or more bits keep everything.
            params[rows, 0] = 256.0 - torch.pow(2.0, (8.0 - arguments).clamp(0.0, 8.0))
        elif implementation == "Solarize":
            params[rows, 0] = arguments.clamp(max=255.0)
            params[rows, 1] = (arguments < 256.0).double() * 255.0
        else:
            params[rows, 0] = arguments
    return params.float()


@dataclass(frozen=True)
class OpRound:
    """One RandAugment round, per image (CPU tensors of length N): the op drawn (index into the policy's op
    set), whether it is applied (probability p), its level (after magnitude noise, clipped to [0, mmax],
    float64) and whether a signed op's argument is negated."""

    ops: torch.Tensor
    applied: torch.Tensor
    levels: torch.Tensor
    negative: torch.Tensor


@dataclass(frozen=True)
class AugmentPlan:
    """Every random choice for one batch, drawn on the host; `BatchAugmenter.apply` carries it out."""

    crop_offsets: torch.Tensor | None  # N x 2 (dy, dx) in 0..2*padding, int64
    flips: torch.Tensor | None  # N, bool
    rounds: list[OpRound]
    # RandomResizedCrop boxes, N x 4 (top, left, height, width) in source pixels, int64; replaces crop_offsets.
    crops: torch.Tensor | None = None


def _pinned_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without making the host wait: pinned memory, non-blocking copy."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _require_host_generator(generator: torch.Generator, user: str) -> None:
    if generator.device.type != "cpu":
        raise ValueError(f"{user} draws on the host: pass a CPU torch.Generator, not one on {generator.device}")


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Float pixel values -> uint8, clamped to [0, 255] and truncated as PIL's and torchvision's casts do.
    Through int16, which is the same for values in range and several times faster on CPU than the direct cast."""
    return values.clamp_(0, 255).to(torch.int16).to(torch.uint8)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """N per-image values laid out like `like` (N x C x H x W). Materialised: a uint8 comparison with a
    broadcast operand takes an unvectorised path on CPU that is over ten times slower."""
    return values.view(-1, 1, 1, 1).expand_as(like).contiguous()


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, images, factor) per image, the core of ImageEnhance: degenerate +
    factor * (images - degenerate) in float32 (PIL's float alpha, the same two roundings), clipped and
    truncated to uint8. `degenerate` is float and broadcasts against the images."""
    return _to_uint8(images.float().sub_(degenerate).mul_(factors.view(-1, 1, 1, 1)).add_(degenerate))


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """Float luma N x 1 x H x W as PIL converts RGB to L: (19595 R + 38470 G + 7471 B + 2^15) >> 16. Every
    partial sum is an integer below 2^24, so float32 holds it exactly."""
    if images.shape[1] == 1:
        return images.float()
    red, green, blue = images.float().unbind(dim=1)
    luma = red.mul_(19595).add_(green, alpha=38470).add_(blue, alpha=7471).add_(32768)
    return luma.div_(65536).floor_().unsqueeze(1)


def _lookup(images: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Each (image, channel)'s pixels through its own 256-entry uint8 table (N*C x 256): one index_select."""
    return tables.reshape(-1).index_select(0, _table_indices(images).view(-1)).view_as(images)


def _table_indices(images: torch.Tensor) -> torch.Tensor:
    """int64 N*C x H*W: pixel value plus 256 times the pixel's (image, channel) row."""
    count, channels, height, width = images.shape
    rows = count * channels
    offsets = torch.arange(0, rows * 256, 256, device=images.device)[:, None]
    return images.reshape(rows, height * width).long().add_(offsets)


def _identity(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return images


def _brightness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # Blending with black: 0 + factor * (images - 0).
    return _to_uint8(images.float().mul_(params[:, 0].view(-1, 1, 1, 1)))


def _color(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images  # no colour to change
    return _blend(_grayscale(images), images, params[:, 0])


def _contrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma, rounded half up to an integer as ImageEnhance.Contrast does."""
    luma_sum = _grayscale(images).sum(dim=(-3, -2, -1), keepdim=True, dtype=torch.float64)
    mean = luma_sum.div_(images.shape[-2] * images.shape[-1]).add_(0.5).floor_().float()
    return _blend(mean, images, params[:, 0])


def _sharpness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (3x3 kernel: 1s around a 5, over 13, rounded) inside a one-pixel border
    that stays as it is. (sum of integers) / 13 is never within 1/26 of a rounding tie, so summing shifted
    slices gives exactly the integers PIL's float filter rounds to, at a fraction of a depthwise
    convolution's cost on CPU."""
    if images.shape[-2] <= 2 or images.shape[-1] <= 2:
        return images
    output = images.float()
    rows = output[..., :-2, :] + output[..., 1:-1, :] + output[..., 2:, :]
    inner = output[..., 1:-1, 1:-1]
    smoothed = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4).div_(13).round_()
    inner.sub_(smoothed).mul_(params[:, 0].view(-1, 1, 1, 1)).add_(smoothed)
    return _to_uint8(output)


def _invert(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return images.bitwise_not()


def _posterize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return images & _per_image(params[:, 0].to(torch.uint8), images)


def _solarize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Invert (xor 255) the pixels at or above the image's threshold; a threshold of 256 (xor 0) none."""
    at_or_above = images >= _per_image(params[:, 0].to(torch.uint8), images)
    return images ^ at_or_above.to(torch.uint8).mul_(_per_image(params[:, 1].to(torch.uint8), images))


def _solarize_add(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Add the image's amount to pixels below 128 (timm's solarize_add; at most 127 + 128, so no overflow)."""
    below = images < 128
    return images + below.to(torch.uint8).mul_(_per_image(params[:, 0].to(torch.uint8), images))


def _autocontrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast per image and channel: value v maps to int(v * scale + offset) clipped to
    [0, 255], scale = 255 / (high - low) and offset = -low * scale in double precision as PIL computes its
    table; unchanged where the channel has one value. A 256-entry table per channel, built on the device."""
    count, channels = images.shape[:2]
    flat = images.reshape(count * channels, -1)
    low, high = flat.amin(dim=1, keepdim=True).double(), flat.amax(dim=1, keepdim=True).double()
    # A true division: torch computes `255.0 / tensor` as 255 * (1 / tensor), which rounds differently.
    scale = torch.full_like(low, 255.0).div_((high - low).clamp_(min=1.0))
    offset = -low * scale
    values = torch.arange(256, dtype=torch.float64, device=images.device)
    tables = torch.where(high > low, (values * scale).add_(offset).trunc_().clamp_(0, 255), values)
    return _lookup(images, tables.to(torch.uint8))


def _equalize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation, per image and channel: value v maps to (pixels below v + step // 2) //
    step, at most 255, with step = (pixels not of the highest value present) // 255; unchanged where step is
    0. One scatter for all histograms (bincount would read its maximum back from the device) and one lookup
    for all pixels."""
    count, channels, height, width = images.shape
    rows, device = count * channels, images.device
    bins = _table_indices(images)
    histogram = torch.zeros(rows * 256, dtype=torch.int64, device=device)
    histogram.scatter_add_(0, bins.view(-1), torch.ones(1, dtype=torch.int64, device=device).expand(bins.numel()))
    histogram = histogram.view(rows, 256)
    cumulative = histogram.cumsum(dim=1)
    highest_count = histogram.gather(1, cumulative.argmax(dim=1, keepdim=True))  # the first bin reaching the total
    step = (height * width - highest_count).div_(255, rounding_mode="floor")
    table = (cumulative[:, :-1] + step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(max=255)
    table = torch.cat([torch.zeros_like(step), table], dim=1)
    table = torch.where(step == 0, torch.arange(256, device=device), table).to(torch.uint8)
    return table.view(-1).index_select(0, bins.view(-1)).view_as(images)




def draw_resized_crops(count: int, height: int, width: int, *, scale: tuple[float, float],
                       ratio: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """N x 4 int64 boxes (top, left, height, width): torchvision's RandomResizedCrop.get_params for N images at
    once. Each image gets up to RRC_ATTEMPTS tries of an area share uniform in `scale` and an aspect ratio
    (width / height) log-uniform in `ratio`, and keeps the first box that fits, at a uniform position; when none
    fits, the centred box of the whole image clamped to the ratio range."""
    shares = torch.empty(count, RRC_ATTEMPTS).uniform_(scale[0], scale[1], generator=generator)
    log_ratios = torch.empty(count, RRC_ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                           generator=generator)
    target_area, aspect = shares * (height * width), log_ratios.exp()
    crop_widths = (target_area * aspect).sqrt().round().long()
    crop_heights = (target_area / aspect).sqrt().round().long()
    fits = (crop_widths > 0) & (crop_widths <= width) & (crop_heights > 0) & (crop_heights <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (any try when none does)
    found = fits.any(dim=1)
    image_ratio = width / height
    fallback_width, fallback_height = width, height
    if image_ratio < ratio[0]:
        fallback_height = int(round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        fallback_width = int(round(height * ratio[1]))
    crop_heights = torch.where(found, crop_heights.gather(1, first).squeeze(1), fallback_height)
    crop_widths = torch.where(found, crop_widths.gather(1, first).squeeze(1), fallback_width)
    position = torch.rand(count, 2, generator=generator)
    top = torch.where(found, (position[:, 0] * (height - crop_heights + 1)).long(), (height - crop_heights) // 2)
    left = torch.where(found, (position[:, 1] * (width - crop_widths + 1)).long(), (width - crop_widths) // 2)
    return torch.stack([top, left, crop_heights, crop_widths], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, *, flips: torch.Tensor | None = None,
                  interpolation: str = "bicubic") -> torch.Tensor:
    """Each image's box (host N x 4 top, left, height, width) resized to size x size, mirrored where `flips`
    says: one affine grid_sample for the batch, uint8 in and out.

    Output pixel centres are spread evenly over the box as a resize of the crop spaces them (align_corners
    False); the first and last half pixel sample the image beside the box instead of repeating its edge.
    No antialiasing: RandomResizedCrop enlarges, except for boxes larger than the output."""
    count, channels, height, width = images.shape
    top, left, box_height, box_width = boxes.double().unbind(dim=1)
    # grid = theta @ (u, v, 1) maps output coordinates in [-1, 1] to input coordinates in [-1, 1].
    scale_x, scale_y = box_width / width, box_height / height
    if flips is not None:
        scale_x = torch.where(flips, -scale_x, scale_x)
    theta = torch.zeros(count, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x, (2 * left + box_width) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = scale_y, (2 * top + box_height) / height - 1
    theta = _pinned_to(theta.float(), images.device)
    grid = nnf.affine_grid(theta, [count, channels, size, size], align_corners=False)
    sampled = nnf.grid_sample(images.float(), grid, mode=interpolation, padding_mode="border", align_corners=False)
    return _to_uint8(sampled.round_())


def resize_center_crop(images: torch.Tensor, size: int, *, crop_pct: float = 1.0,
                       interpolation: str = "bicubic") -> torch.Tensor:
    """timm's evaluation transform on a uint8 batch: the shorter side resized to floor(size / crop_pct)
    (torchvision's resize, antialiased when shrinking), then the centre size x size. crop_pct 1.0 on square
    images is a plain resize; a batch already at size x size is returned as it is."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size) and crop_pct == 1.0:
        return images
    scale_size = math.floor(size / crop_pct)
    if height <= width:
        new_height, new_width = scale_size, int(scale_size * width / height)
    else:
        new_height, new_width = int(scale_size * height / width), scale_size
    if (new_height, new_width) != (height, width):
        images = tvf.resize(images, [new_height, new_width], interpolation=_INTERPOLATION[interpolation],
                            antialias=True)
    top, left = int(round((new_height - size) / 2)), int(round((new_width - size) / 2))
    return images[..., top : top + size, left : left + size].contiguous()


@dataclass(frozen=True)
class EvalResize:
    """Evaluation's view of a uint8 batch (validation, test, attention maps): `resize_center_crop` to
    data.image_size with data.crop_pct; nothing to do when image_size is None or already the batch's."""

    size: int | None
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    @classmethod
    def from_config(cls, data: DataConfig) -> EvalResize:
        return cls(data.image_size, data.crop_pct, data.interpolation)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return images
        return resize_center_crop(images, self.size, crop_pct=self.crop_pct, interpolation=self.interpolation)

    def output_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """C x H x W of what a batch of C x H x W images becomes."""
        return shape if self.size is None else (shape[0], self.size, self.size)


class BatchAugmenter:
    """Training augmentation of uint8 N x C x H x W batches on any device, without a loop over images.

    In order: zero-pad by `crop_padding` and crop back to H x W at a random offset per image, flip half the
    images horizontally (both one gather with per-image indices) -- or, with `random_resized_crop`, crop a
    RandomResizedCrop box of each image, resized to `image_size`, and flip, in one grid_sample (DeiT's order)
    -- then RandAugment as timm's rand_augment_transform does it for the config's `auto_augment` string: n
    rounds; in each, every image draws one op of timm's set uniformly, applies it with probability p, at a
    level drawn from N(m, mstd) clipped to [0, mmax] and turned into the op's argument by timm's level
    function, with a random sign for the signed ops.

    Images are sorted by the op they drew, each op runs once on its slice (one resampling for each group of
    geometric ops, per-image factors, thresholds and masks for the colour ops, one histogram scatter for
    Equalize, per-channel tables for AutoContrast), and the results are put back in order. Every op follows
    PIL as timm's ops call it: on CPU the colour and pixel ops equal PIL's image by image, pixel for pixel;
    the geometric ops resample with `interpolation` (PIL's own bicubic kernel, or bilinear), filling what
    falls outside with the dataset mean in 0..255 (timm's img_mean), and differ from PIL by one level in a few
    pixels where PIL's double-precision arithmetic truncates a hair below an integer (tests/unit/data/test_augment.py
    measures it). Last, images not yet at `image_size` are resized to it (pad-and-crop and RandAugment ran at
    the source size: at 32 px, 1/49 of the work at 224).

    Args:
        config: the recipe's augmentation settings (the Mixup/CutMix, erasing and repeat fields are others').
        generator: CPU generator every random choice is drawn from; seed it per (seed, epoch, rank, worker)
            for reproducible runs. The same seed gives the same batch on CPU.
        image_size: the square training resolution (data.image_size); None keeps the batch's size.
        interpolation: how RandomResizedCrop, the geometric ops and the resize sample ("bilinear" or "bicubic").
        mean: the dataset's per-channel mean in 0..1 (data.mean): the geometric ops' fill, rounded to 0..255 as
            timm's create_transform rounds its img_mean. A 1-channel batch is filled with the first value.
    """

    def __init__(self, config: AugmentConfig, generator: torch.Generator, *, image_size: int | None = None,
                 interpolation: str = "bicubic", mean: tuple[float, float, float] = CIFAR10_MEAN):
        _require_host_generator(generator, "BatchAugmenter")
        if config.random_resized_crop and image_size is None:
            raise ValueError("random_resized_crop needs the output size: pass image_size (data.image_size)")
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATION)}, got {interpolation!r}")
        self.config = config
        self.generator = generator
        self.image_size = image_size
        self.interpolation = interpolation
        self.policy = config.rand_augment
        self.ops = rand_augment_ops(self.policy) if self.policy is not None else ()
        self.fill = tuple(min(255, round(255 * value)) for value in mean)
        # The policy's op index -> its implementation's index.
        self._implementation_index = torch.tensor([IMPLEMENTATIONS.index(implementation_of(op)) for op in self.ops],
                                                  dtype=torch.int64)
        self._base_grids: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._fills: dict[tuple[int, torch.device], torch.Tensor] = {}
        # Consecutive implementation indices and the batched function that serves them, in IMPLEMENTATIONS
        # order: the geometric ops that move samples along the same axes share one resampling.
        single: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
            "AutoContrast": _autocontrast, "Equalize": _equalize, "Invert": _invert, "Posterize": _posterize,
            "Solarize": _solarize, "SolarizeAdd": _solarize_add, "Color": _color, "Contrast": _contrast,
            "Brightness": _brightness, "Sharpness": _sharpness,
        }
        self._spans: list[tuple[range, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = [
            (range(0, 1), _identity),
            (_ALONG_X, functools.partial(self._affine, along="x")),
            (_ALONG_Y, functools.partial(self._affine, along="y")),
            (_ROTATE, functools.partial(self._affine, along="xy")),
            *((range(IMPLEMENTATIONS.index(name), IMPLEMENTATIONS.index(name) + 1), op) for name, op in single.items()),
        ]

    @property
    def num_rounds(self) -> int:
        return 0 if self.policy is None else self.policy.num_ops

    def draw(self, count: int, size: tuple[int, int] | None = None) -> AugmentPlan:
        """All random choices for a batch of `count` images, from the generator, on the host. `size` (height,
        width) of the source images is needed for RandomResizedCrop boxes only."""
        generator, pad = self.generator, self.config.crop_padding
        offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator) if pad else None
        crops = None
        if self.config.random_resized_crop:
            if size is None:
                raise ValueError("random_resized_crop draws boxes for a source size: pass size=(height, width)")
            crops = draw_resized_crops(count, *size, scale=self.config.rrc_scale, ratio=self.config.rrc_ratio,
                                       generator=generator)
        flips = torch.rand(count, generator=generator) < 0.5 if self.config.hflip else None
        rounds = [] if self.policy is None else [self._draw_round(self.policy, count) for _ in range(self.num_rounds)]
        return AugmentPlan(offsets, flips, rounds, crops)

    def _draw_round(self, policy: RandAugmentPolicy, count: int) -> OpRound:
        """timm's AugmentOp choices for one round of `count` images: the op (uniform, with replacement across
        rounds), applied when a uniform draw is below p, the level N(m, mstd) (uniform in [0, m] for an
        infinite mstd) clipped to [0, mmax], and the sign (negated half the time)."""
        generator = self.generator
        ops = torch.randint(len(self.ops), (count,), generator=generator)
        applied = torch.rand(count, generator=generator) < policy.prob
        if policy.magnitude_std == math.inf:
            levels = torch.rand(count, dtype=torch.float64, generator=generator).mul_(policy.magnitude)
        elif policy.magnitude_std > 0:
            levels = torch.randn(count, dtype=torch.float64, generator=generator)
            levels.mul_(policy.magnitude_std).add_(policy.magnitude)
        else:
            levels = torch.full((count,), float(policy.magnitude), dtype=torch.float64)
        negative = torch.rand(count, generator=generator) < 0.5
        return OpRound(ops, applied, levels.clamp_(0.0, policy.magnitude_max), negative)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], (images.shape[-2], images.shape[-1])))

    def apply(self, images: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
        """Carry out `plan` on uint8 N x C x H x W `images` on their own device; uint8 of the same shape."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"BatchAugmenter takes uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            return images.contiguous()
        if plan.rounds and images.shape[1] not in (1, 3):
            raise ValueError(f"{self.config.auto_augment} needs 1 or 3 channels, got {images.shape[1]}")
        if plan.crops is not None:
            if self.image_size is None:  # a plan drawn by another augmenter, one with RandomResizedCrop
                raise ValueError("a plan with RandomResizedCrop boxes needs the output size: pass image_size")
            images = resized_crops(images, plan.crops, self.image_size, flips=plan.flips,
                                   interpolation=self.interpolation)
        elif plan.crop_offsets is not None or plan.flips is not None:
            images = self._crop_and_flip(images, plan)
        for op_round in plan.rounds:
            images = self._apply_round(images, op_round)
        if self.image_size is not None:
            images = resize_center_crop(images, self.image_size, interpolation=self.interpolation)
        return images.contiguous()

    def _crop_and_flip(self, images: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
        count, channels, height, width = images.shape
        device, pad = images.device, self.config.crop_padding if plan.crop_offsets is not None else 0
        if pad:
            # A zeroed canvas plus one slice copy: cheaper than F.pad on uint8.
            canvas = images.new_zeros(count, channels, height + 2 * pad, width + 2 * pad)
            canvas[:, :, pad : pad + height, pad : pad + width] = images
        else:
            canvas = images
        # Host side: offsets and flips as one small int64 tensor, so a single copy reaches the device.
        offsets = plan.crop_offsets if plan.crop_offsets is not None else torch.zeros(count, 2, dtype=torch.int64)
        flips = plan.flips if plan.flips is not None else torch.zeros(count, dtype=torch.bool)
        per_image = _pinned_to(torch.cat([offsets, flips.long().unsqueeze(1)], dim=1), device)
        row_offset, column_offset, flip = per_image.unbind(dim=1)
        columns = torch.arange(width, device=device)
        # out[y, x] = canvas[y + dy, dx + x], or dx + (W - 1 - x) when flipped.
        columns = torch.where(flip.bool()[:, None], width - 1 - columns, columns) + column_offset[:, None]
        rows = torch.arange(height, device=device) + row_offset[:, None]
        source = (rows[:, :, None] * canvas.shape[-1] + columns[:, None, :]).view(count, 1, height * width)
        flat = canvas.reshape(count, channels, -1)
        return flat.gather(2, source.expand(count, channels, height * width)).view(count, channels, height, width)

    def _apply_round(self, images: torch.Tensor, op_round: OpRound) -> torch.Tensor:
        count, _, height, width = images.shape
        device = images.device
        # Host side: sort images by implementation (Identity where the op is not applied) so that each
        # one's images form one slice, and compute their parameters.
        implementations = torch.where(op_round.applied, self._implementation_index[op_round.ops], 0)
        order = torch.argsort(implementations, stable=True)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(count)
        counts = torch.bincount(implementations, minlength=len(IMPLEMENTATIONS)).tolist()  # a CPU tensor: no sync
        params = op_parameters(self.ops, op_round.ops, op_round.levels, op_round.negative, height, width)[order]
        indices = _pinned_to(torch.stack([order, restore]), device)
        params = _pinned_to(params, device)

        sorted_images = images.index_select(0, indices[0])
        starts = [0, *itertools.accumulate(counts)]
        pieces = []
        for implementation_range, implementation in self._spans:
            start, stop = starts[implementation_range.start], starts[implementation_range.stop]
            if stop > start:
                pieces.append(implementation(sorted_images[start:stop], params[start:stop]))
        return torch.cat(pieces).index_select(0, indices[1])

    def _base_grid(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """1 x HW x 3 homogeneous pixel-centre coordinates (x + 0.5, y + 0.5, 1) from the top-left corner, where
        PIL samples; made on the device itself (fills, no host copy), once per size and device."""
        key = (height, width, device)
        if key not in self._base_grids:
            grid = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
            grid[..., 0].copy_(torch.arange(width, dtype=torch.float32, device=device).add_(0.5))
            grid[..., 1].copy_(torch.arange(height, dtype=torch.float32, device=device).add_(0.5).unsqueeze_(-1))
            grid[..., 2].fill_(1)
            self._base_grids[key] = grid.view(1, height * width, 3)
        return self._base_grids[key]

    def _fill(self, channels: int, device: torch.device) -> torch.Tensor:
        """1 x C x 1 x 1 float fill on the device, made there from Python numbers (no host copy)."""
        key = (channels, device)
        if key not in self._fills:
            fill = torch.empty(1, channels, 1, 1, dtype=torch.float32, device=device)
            for channel, value in enumerate(self.fill[:channels]):
                fill[:, channel].fill_(value)
            self._fills[key] = fill
        return self._fills[key]

    def _affine(self, images: torch.Tensor, params: torch.Tensor, *, along: str) -> torch.Tensor:
        """One resampling for geometric ops that move samples `along` the same axes ("x": ShearX and
        TranslateXRel, "y": ShearY and TranslateYRel, "xy": Rotate); each image has its own (transposed) PIL
        matrix.

        As PIL's Image.transform: an output pixel whose sample point (x, y) falls outside the image (x outside
        [0, W) or y outside [0, H)) takes the fill; the others interpolate with out-of-range neighbours
        clamped to the edge, and the result is truncated to an integer. Bilinear through grid_sample with
        border padding; bicubic with PIL's own cubic (`_pil_bicubic`), which grid_sample's kernel is not."""
        count, channels, height, width = images.shape
        base = self._base_grid(height, width, images.device)
        points = base.expand(count, -1, -1).bmm(params.view(count, 3, 2)).view(count, height, width, 2)
        x, y = points.unbind(dim=-1)
        inside = ((x >= 0) & (x < width) & (y >= 0) & (y < height)).unsqueeze(1)
        if self.interpolation == "bicubic":
            sampled = _pil_bicubic(images.float(), x - 0.5, y - 0.5, along=along)
        else:
            x.mul_(2.0 / width).sub_(1.0)  # grid_sample's [-1, 1] coordinates (align_corners=False)
            y.mul_(2.0 / height).sub_(1.0)
            sampled = nnf.grid_sample(images.float(), points, mode="bilinear", padding_mode="border",
                                      align_corners=False)
        filled = torch.where(inside, sampled, self._fill(channels, images.device))
        return _to_uint8(filled.add_(_TRUNCATION_SLACK))


def _cubic_weights(offsets: torch.Tensor) -> list[torch.Tensor]:
    """PIL's cubic convolution weights (its a = -1 kernel) of the four taps at -1, 0, 1, 2 around a sample
    `offsets` (0..1) past tap 0: PIL's v2 + d (v3 - v1) + d^2 (2 v1 - 2 v2 + v3 - v4) + d^3 (v2 - v1 + v4 - v3)
    sorted by tap."""
    squared = offsets * offsets
    cubed = squared * offsets
    return [
        (2 * squared).sub_(offsets).sub_(cubed),
        (1 - 2 * squared).add_(cubed),
        (offsets + squared).sub_(cubed),
        cubed - squared,
    ]


def _cubic_taps(coordinates: torch.Tensor, size: int, moves: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(index clamped to the image, weight) of each of PIL's cubic taps along one axis, for N x H' x W'
    coordinates; where the samples do not move along the axis they sit on pixel centres, where PIL's weights
    are 0, 1, 0, 0: then a single tap and no weight (None)."""
    start = coordinates.floor()
    first = start.long()
    if not moves:
        return [(first.clamp_(0, size - 1), None)]
    weights = _cubic_weights(coordinates - start)
    return [((first + (tap - 1)).clamp_(0, size - 1), weight) for tap, weight in enumerate(weights)]


def _pil_bicubic(images: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, along: str = "xy") -> torch.Tensor:
    """Float N x C x H x W images sampled at N x H' x W' points (pixel coordinates, pixel centres at integers)
    with PIL's bicubic filter of Image.transform: 4 x 4 taps, indices clamped to the image, weights from
    `_cubic_weights`, each tap row summed, then the rows. Points that move only `along` one axis ("x" or "y")
    need a single tap on the other: a quarter of the gathers."""
    count, channels, height, width = images.shape
    flat = images.reshape(count, channels, height * width)
    columns = _cubic_taps(x, width, "x" in along)
    rows = _cubic_taps(y, height, "y" in along)

    def weighted(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return values if weight is None else values.mul_(weight.unsqueeze(1))

    def total(terms: list[torch.Tensor]) -> torch.Tensor:
        return functools.reduce(torch.Tensor.add_, terms)

    def tap_row(row_start: torch.Tensor) -> torch.Tensor:
        gathered = [flat.gather(2, (row_start + column).view(count, 1, -1).expand(count, channels, -1))
                    for column, _ in columns]
        return total([weighted(values.view(count, channels, *x.shape[1:]), weight)
                      for values, (_, weight) in zip(gathered, columns, strict=True)])

    return total([weighted(tap_row(row * width), weight) for row, weight in rows])


class BatchEraser:
    """Random erasing (Zhong et al., timm's RandomErasing with one box) of normalised float N x C x H x W
    batches on any device, after normalisation and before Mixup/CutMix as in timm and DeiT.

    Each image is erased with probability `probability`: up to ERASING_ATTEMPTS tries of an area share uniform
    in ERASING_AREA and an aspect ratio log-uniform in [0.3, 1/0.3] (timm's defaults), keeping the first box
    strictly inside the image, at a uniform position. The box is filled with zeros ("const": the dataset mean
    after normalisation), one standard normal value per channel ("rand") or per pixel ("pixel").

    The boxes are drawn on the host (CPU `generator`) and reach the device as one small non-blocking copy; the
    fill is drawn on the device from a device generator seeded from the host one, so nothing is read back.

    Args:
        probability: the chance each image is erased (data.augment.random_erasing).
        mode: "const", "rand" or "pixel" (data.augment.random_erasing_mode).
        generator: CPU generator for the boxes and the fill's seed; seed it per (seed, epoch, rank).
    """

    def __init__(self, probability: float, mode: str, generator: torch.Generator):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"erasing probability must be in [0, 1], got {probability}")
        if mode not in ("const", "rand", "pixel"):
            raise ValueError(f"erasing mode must be 'const', 'rand' or 'pixel', got {mode!r}")
        _require_host_generator(generator, "BatchEraser")
        self.probability = probability
        self.mode = mode
        self.generator = generator
        self._device_generators: dict[torch.device, torch.Generator | None] = {}

    def draw(self, count: int, height: int, width: int) -> torch.Tensor:
        """N x 4 int64 boxes (top, left, height, width) on the host; height 0 where an image is not erased."""
        generator = self.generator
        erased = torch.rand(count, generator=generator) < self.probability
        shares = torch.empty(count, ERASING_ATTEMPTS).uniform_(*ERASING_AREA, generator=generator)
        log_aspect = math.log(ERASING_MIN_ASPECT)
        aspect = torch.empty(count, ERASING_ATTEMPTS).uniform_(log_aspect, -log_aspect, generator=generator).exp()
        target_area = shares * (height * width)
        box_heights = (target_area * aspect).sqrt().round().long()
        box_widths = (target_area / aspect).sqrt().round().long()
        fits = (box_heights < height) & (box_widths < width)
        first = fits.int().argmax(dim=1, keepdim=True)
        erased &= fits.any(dim=1)
        box_heights = torch.where(erased, box_heights.gather(1, first).squeeze(1), 0)
        box_widths = torch.where(erased, box_widths.gather(1, first).squeeze(1), 0)
        position = torch.rand(count, 2, generator=generator)
        top = (position[:, 0] * (height - box_heights + 1)).long()
        left = (position[:, 1] * (width - box_widths + 1)).long()
        return torch.stack([top, left, box_heights, box_widths], dim=1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], images.shape[-2], images.shape[-1]))

    def apply(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Erase host `boxes` of float `images`; a new tensor, the input left as it is."""
        if not images.is_floating_point() or images.dim() != 4:
            raise ValueError(f"BatchEraser takes float N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
        count, channels, height, width = images.shape
        device = images.device
        top, left, box_height, box_width = _pinned_to(boxes, device).view(count, 4, 1, 1).unbind(dim=1)
        rows = torch.arange(height, device=device).view(1, height, 1)
        columns = torch.arange(width, device=device).view(1, 1, width)
        inside = ((rows >= top) & (rows < top + box_height) & (columns >= left) & (columns < left + box_width))
        fill_shape = {"const": (1, 1, 1, 1), "rand": (count, channels, 1, 1), "pixel": images.shape}[self.mode]
        if self.mode == "const":
            fill = images.new_zeros(fill_shape)
        else:
            seed = int(torch.randint(2**62, (1,), generator=self.generator))
            device_generator = self._device_generator(device)
            if device_generator is not None:
                device_generator.manual_seed(seed)
            fill = torch.randn(fill_shape, dtype=images.dtype, device=device, generator=device_generator)
        return torch.where(inside.unsqueeze(1), fill, images)

    def _device_generator(self, device: torch.device) -> torch.Generator | None:
        """A generator on `device`, made once; None where torch has none (the meta device): the global one."""
        if device not in self._device_generators:
            try:
                self._device_generators[device] = torch.Generator(device=device)
            except RuntimeError:
                self._device_generators[device] = None
        return self._device_generators[device]


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing, drawn on the host: the weight of each sample's own image and label, for CutMix the
    pasted box (rows top:bottom, columns left:right; lam already corrected to its area), and each sample's
    partner (sample i is mixed with sample partners[i]); no partners for an unmixed batch."""

    lam: float
    box: tuple[int, int, int, int] | None = None
    partners: tuple[int, ...] | None = None


def random_cycle(count: int, rng: np.random.Generator) -> tuple[int, ...]:
    """Partners along one random cycle through `count` samples: shuffle, then each sample is paired with the
    one before it in the shuffled order. For count >= 2 nobody is their own partner and everybody is
    somebody's partner exactly once."""
    order = rng.permutation(count)
    partners = np.empty(count, dtype=np.int64)
    partners[order] = np.roll(order, 1)
    return tuple(partners.tolist())


class BatchMixer:
    """Mixup / CutMix with label smoothing on the training device, for every batch size.

    timm's Mixup in "batch" mode: with probability `mixup_prob` a batch is mixed, by CutMix with
    probability `switch_prob` when both alphas are set (else by whichever is set), with lam ~ Beta(alpha,
    alpha); CutMix pastes a box of area ~(1 - lam) centred anywhere (clipped at the borders) and corrects lam
    to the pasted area. Targets are the smoothed one-hots (1 - s + s/K on the label, s/K elsewhere) mixed
    with the same lam; an unmixed batch gets plain smoothed one-hots.

    Pairing: each mixed batch draws a random cycle through its samples (`random_cycle`, on the host), and
    each sample is mixed with its predecessor on it. Every sample is some other sample's partner exactly
    once, for every N >= 2, so no sample is dropped or counted twice. A fresh cycle per batch matters for
    repeated augmentation, whose batches hold each image k times ([a b c ... a b c ...], tasks/data/loader.py): a
    fixed pairing such as a roll by one would give every copy of an image the same partner, where DeiT mixes
    the copies independently on different ranks. timm pairs by `flip(0)` instead, which in an odd batch
    pairs the middle sample with itself (timm therefore refuses odd batches); an even-batch plan would have
    to drop or repeat samples, breaking the loader's exact once-per-epoch coverage. A batch of 1 has no
    partner: its image and smoothed target come back unmixed.

    Args:
        config: mixup_alpha, cutmix_alpha, mixup_prob and label_smoothing are used.
        num_classes: width of the soft targets.
        rng: host random generator for lam, the switch, the box and the pairing; seed it per (seed, epoch,
            rank) for runs that replay exactly.
        switch_prob: chance of CutMix rather than Mixup when both alphas are set (timm's default 0.5).
    """

    def __init__(self, config: AugmentConfig, *, num_classes: int, rng: np.random.Generator,
                 switch_prob: float = 0.5):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
        self.mixup_alpha = config.mixup_alpha
        self.cutmix_alpha = config.cutmix_alpha
        self.prob = config.mixup_prob
        self.label_smoothing = config.label_smoothing
        self.num_classes = num_classes
        self.rng = rng
        self.switch_prob = switch_prob

    @property
    def mixes(self) -> bool:
        """False when the config switches mixing off; the mixer then only smooths labels."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def draw(self, count: int, height: int, width: int) -> MixDraw:
        """lam, the box for CutMix and the partners for one batch of `count` height x width images, from the
        host generator."""
        if not self.mixes or self.rng.random() >= self.prob:
            return MixDraw(lam=1.0)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < self.switch_prob)
        lam = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha) if use_cutmix
                    else self.rng.beta(self.mixup_alpha, self.mixup_alpha))
        box = None
        if use_cutmix:
            # A box with sides sqrt(1 - lam) of the image's, centred uniformly, clipped at the borders.
            side = math.sqrt(1.0 - lam)
            cut_height, cut_width = int(height * side), int(width * side)
            center_y, center_x = int(self.rng.integers(0, height)), int(self.rng.integers(0, width))
            top, bottom = max(center_y - cut_height // 2, 0), min(center_y + (cut_height + 1) // 2, height)
            left, right = max(center_x - cut_width // 2, 0), min(center_x + (cut_width + 1) // 2, width)
            lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
            box = (top, bottom, left, right)
        return MixDraw(lam=lam, box=box, partners=random_cycle(count, self.rng))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images, labels, self.draw(*images.shape[:1], *images.shape[-2:]))

    def smoothed_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """N x num_classes float32 on the labels' device: 1 - s + s/K at the label, s/K elsewhere."""
        off_value = self.label_smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off_value, dtype=torch.float32, device=labels.device)
        return targets.scatter_(1, labels.view(-1, 1), 1.0 - self.label_smoothing + off_value)

    def apply(self, images: torch.Tensor, labels: torch.Tensor, draw: MixDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix float N x C x H x W `images` and int64 N `labels` as `draw` says; returns (images, N x K targets).
        The inputs are left as they are."""
        if not images.is_floating_point() or images.dim() != 4:
            raise ValueError(f"BatchMixer takes float N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
        count = images.shape[0]
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"BatchMixer takes int64 labels of shape ({count},), got {labels.dtype} {tuple(labels.shape)}"
            )
        targets = self.smoothed_one_hot(labels)
        if draw.lam == 1.0 or count < 2:  # unmixed, or a single sample without a partner
            return images, targets
        if draw.partners is None or len(draw.partners) != count:
            given = "none" if draw.partners is None else len(draw.partners)
            raise ValueError(f"a mixing draw needs a partner for each of the {count} samples, got {given}")
        lam = draw.lam
        partners = _pinned_to(torch.tensor(draw.partners, dtype=torch.int64), images.device)
        if draw.box is None:
            # lam * own + (1 - lam) * partner, with one new tensor (the partners' copy) instead of three.
            mixed = images.index_select(0, partners).mul_(1.0 - lam).add_(images, alpha=lam)
        else:
            top, bottom, left, right = draw.box
            mixed = images.clone()
            mixed[:, :, top:bottom, left:right] = images[:, :, top:bottom, left:right].index_select(0, partners)
        return mixed, targets.index_select(0, partners).mul_(1.0 - lam).add_(targets, alpha=lam)
