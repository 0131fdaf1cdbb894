"""Batched training augmentation that runs where the images are: loader workers (CPU) or the training device.

`BatchAugmenter` turns a uint8 N x C x H x W batch into an augmented one of the same dtype: pad-and-crop
and horizontal flips as one gather (or RandomResizedCrop and flips as one grid_sample), then RandAugment or
TrivialAugmentWide with torchvision's semantics (op set, magnitude bins, random signs, an op per image and
round), applied op by op to the images that drew it instead of image by image, and a resize to the
training resolution. `EvalResize` is evaluation's resize and centre crop. `BatchEraser` does random
erasing on normalised batches, `BatchMixer` timm's Mixup/CutMix on float batches of any size, odd ones and
1 included.

Both draw every random choice on the host (a CPU `torch.Generator`, a NumPy `Generator`) and send the
device only index and parameter tensors, copied with `non_blocking=True` from pinned memory. How many images
took which op is therefore known on the host, so nothing here reads a device tensor back: no `.item()`,
`.tolist()` or `nonzero()` of device data and no boolean-mask indexing with a data-dependent shape. On CUDA a
batch is queued without waiting for the GPU. (tests/test_augment.py runs both on the meta device, which has
no values to read, and fails on blocking host-to-device copies; no CUDA machine has run this module yet.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf

from tasks.config import AugmentConfig, DataConfig

# torchvision's default for RandAugment and TrivialAugmentWide: magnitude m means bin m of 31 (0..30).
NUM_MAGNITUDE_BINS = 31

# The ops of torchvision's RandAugment and TrivialAugmentWide, in torchvision's order. The five geometric
# ops sit next to each other so that one grid_sample serves all of them.
OP_NAMES = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
    "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)
SIGNED_OPS = frozenset(OP_NAMES[1:10])
_GEOMETRIC = range(OP_NAMES.index("ShearX"), OP_NAMES.index("Rotate") + 1)
# Per-image parameters travel as rows of this many float32: a 3x2 affine matrix is the widest.
_PARAMS = 6
_INTERPOLATION = {"bilinear": tvf.InterpolationMode.BILINEAR, "bicubic": tvf.InterpolationMode.BICUBIC}
# Tries per image for a RandomResizedCrop box (torchvision) and a random-erasing box (timm) before giving up.
RRC_ATTEMPTS = 10
ERASING_ATTEMPTS = 10
# timm's RandomErasing defaults: the erased share of the image area and the box's aspect ratio range.
ERASING_AREA = (0.02, 1 / 3)
ERASING_MIN_ASPECT = 0.3


def magnitude_bins(policy: str, op: str, height: int, width: int) -> torch.Tensor | None:
    """The unsigned magnitude of each bin of `op` under `policy` ("randaugment" or "trivialaugment") for an
    image of height x width, as torchvision defines them; None for ops without a magnitude."""
    wide = policy == "trivialaugment"
    bins = NUM_MAGNITUDE_BINS
    if op in ("Identity", "AutoContrast", "Equalize"):
        return None
    if op in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.99 if wide else 0.3, bins)
    if op in ("TranslateX", "TranslateY"):
        size = width if op == "TranslateX" else height
        # RandAugment translates by up to 150/331 of the image (the paper's 150 px at 331 px); the wide
        # space by up to 32 px whatever the size.
        return torch.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * size, bins)
    if op == "Rotate":
        return torch.linspace(0.0, 135.0 if wide else 30.0, bins)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.99 if wide else 0.9, bins)
    if op == "Posterize":
        # Bits kept: 8 at bin 0 down to 8 - 4 (RandAugment) or 8 - 6 (wide) at the last bin.
        dropped_bits = 6 if wide else 4
        return (8 - torch.arange(bins) / ((bins - 1) / dropped_bits)).round().int()
    if op == "Solarize":
        return torch.linspace(1.0, 0.0, bins)
    raise ValueError(f"unknown augmentation op {op!r}; known: {', '.join(OP_NAMES)}")


def signed_magnitude(policy: str, op: str, bin_index: int, negative: bool, height: int, width: int) -> float:
    """The magnitude torchvision hands an op for this draw: the bin's value, negated for signed ops when the
    sign came out negative; 0.0 for ops without a magnitude."""
    values = magnitude_bins(policy, op, height, width)
    if values is None:
        return 0.0
    magnitude = float(values[bin_index])
    return -magnitude if negative and op in SIGNED_OPS else magnitude


def _inverse_affine(*, angle: float, translate: tuple[float, float], shear: tuple[float, float],
                    center: tuple[float, float]) -> list[float]:
    """The output-to-input (inverse) affine matrix, row-major 2x3, of a rotation by `angle` degrees and a
    shear by `shear` degrees about `center`, then a translation; center and translation in pixels relative
    to the image centre. The double-precision steps are the ones torchvision takes, so that the float32
    matrix, and with nearest sampling every output pixel, comes out identical."""
    rotation, shear_x, shear_y = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    center_x, center_y = center
    shifted_x, shifted_y = center_x + translate[0], center_y + translate[1]
    # Forward rotation-shear matrix [[a, b], [c, d]] (determinant 1), inverted as [[d, -b], [-c, a]].
    a = math.cos(rotation - shear_y) / math.cos(shear_y)
    b = -(a * math.tan(shear_x) + math.sin(rotation))
    c = math.sin(rotation - shear_y) / math.cos(shear_y)
    d = math.cos(rotation) - c * math.tan(shear_x)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += center_x - matrix[0] * shifted_x - matrix[1] * shifted_y
    matrix[5] += center_y - matrix[3] * shifted_x - matrix[4] * shifted_y
    return matrix


def _geometric_matrix(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """The inverse matrix of torchvision's affine/rotate call for one geometric op and magnitude."""
    if op in ("ShearX", "ShearY"):
        # torchvision shears by atan(magnitude), passed in degrees, about the top-left corner.
        degrees = math.degrees(math.atan(magnitude))
        shear = (degrees, 0.0) if op == "ShearX" else (0.0, degrees)
        return _inverse_affine(angle=0.0, translate=(0.0, 0.0), shear=shear, center=(-width * 0.5, -height * 0.5))
    if op in ("TranslateX", "TranslateY"):
        pixels = float(int(magnitude))  # whole pixels, truncated towards zero
        translate = (pixels, 0.0) if op == "TranslateX" else (0.0, pixels)
        return _inverse_affine(angle=0.0, translate=translate, shear=(0.0, 0.0), center=(0.0, 0.0))
    # Rotate: counter-clockwise by `magnitude` degrees about the centre; rotate() normalises to [0, 360)
    # and hands affine the negated angle.
    return _inverse_affine(angle=-(magnitude % 360), translate=(0.0, 0.0), shear=(0.0, 0.0), center=(0.0, 0.0))


def _parameter_table(policy: str, height: int, width: int) -> torch.Tensor:
    """float32 [op, bin, negative, _PARAMS]: what each op needs per image, precomputed for every draw.

    Geometric ops: the inverse matrix transposed to 3x2 and divided by the half-size, as torchvision feeds
    it to its grid computation. Brightness/Color/Contrast/Sharpness: (factor, 1 - factor). Posterize: the
    bit mask. Solarize: the threshold in pixel values, rounded up. Others: unused zeros."""
    table = torch.zeros(len(OP_NAMES), NUM_MAGNITUDE_BINS, 2, _PARAMS, dtype=torch.float32)
    half_size = torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float32)
    for op_index, op in enumerate(OP_NAMES):
        if magnitude_bins(policy, op, height, width) is None:
            continue
        for bin_index in range(NUM_MAGNITUDE_BINS):
            for negative in (False, True):
                magnitude = signed_magnitude(policy, op, bin_index, negative, height, width)
                cell = table[op_index, bin_index, int(negative)]
                if op_index in _GEOMETRIC:
                    theta = torch.tensor(_geometric_matrix(op, magnitude, height, width), dtype=torch.float32)
                    cell.copy_((theta.view(2, 3).transpose(0, 1) / half_size).reshape(-1))
                elif op == "Posterize":
                    bits = int(magnitude)
                    cell[0] = ((1 << bits) - 1) << (8 - bits)
                elif op == "Solarize":
                    # An integer pixel is >= a float32 threshold exactly when it is >= the threshold's
                    # ceiling, so the comparison can stay in uint8.
                    cell[0] = torch.tensor(255.0 * magnitude, dtype=torch.float32).ceil()
                else:
                    factor = 1.0 + magnitude
                    cell[0], cell[1] = factor, 1.0 - factor
    return table


@dataclass(frozen=True)
class OpRound:
    """One round of RandAugment (or TrivialAugment's single round): per image, the op (index into OP_NAMES),
    the magnitude bin and whether a signed op's magnitude is negated. CPU tensors of length N."""

    ops: torch.Tensor
    bins: torch.Tensor
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
    """Float pixel values -> uint8, clamped to [0, 255] and truncated as torchvision's `.to(uint8)` does. Through
    int16, which is the same for values in range and several times faster on CPU than the direct cast."""
    return values.clamp_(0, 255).to(torch.int16).to(torch.uint8)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """N per-image values laid out like `like` (N x C x H x W). Materialised: a uint8 comparison with a
    broadcast operand takes an unvectorised path on CPU that is over ten times slower."""
    return values.view(-1, 1, 1, 1).expand_as(like).contiguous()


def _blend(images: torch.Tensor, other: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other per image (params holds both), to uint8: torchvision's blend
    with a per-image factor. addcmul_ rounds as torchvision's add_ with a scalar alpha does, so the results
    are bit-identical."""
    factor, complement = params[:, 0].view(-1, 1, 1, 1), params[:, 1].view(-1, 1, 1, 1)
    return _to_uint8(images.float().mul_(factor).addcmul_(other, complement))


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """Float luma N x 1 x H x W (ITU-R 601 weights), floored as torchvision does for integer images."""
    if images.shape[1] == 1:
        return images.float()
    red, green, blue = images.float().unbind(dim=1)
    return red.mul_(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(1).floor_()


def _identity(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return images


def _brightness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return _to_uint8(images.float().mul_(params[:, 0].view(-1, 1, 1, 1)))


def _color(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images  # no colour to change
    return _blend(images, _grayscale(images), params)


def _contrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), params)


def _sharpness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Blend with a smoothed copy (3x3 kernel: 1s around a 5, over 13) inside a one-pixel border that stays
    as it is: PIL's and torchvision's definition. The smoothed value is rounded to an integer, and
    (sum of integers) / 13 is never within 1/26 of a rounding tie, so summing shifted slices gives exactly
    the integers torchvision's convolution rounds to, at a fraction of a depthwise convolution's cost on CPU."""
    if images.shape[-2] <= 2 or images.shape[-1] <= 2:
        return images
    output = images.float()
    rows = output[..., :-2, :] + output[..., 1:-1, :] + output[..., 2:, :]
    inner = output[..., 1:-1, 1:-1]
    smoothed = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4).div_(13).round_()
    inner.addcmul_(smoothed.sub_(inner), params[:, 1].view(-1, 1, 1, 1))
    return _to_uint8(output)


def _posterize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return images & _per_image(params[:, 0].to(torch.uint8), images)


def _solarize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Invert (xor 255) the pixels at or above the image's threshold."""
    at_or_above = images >= _per_image(params[:, 0].to(torch.uint8), images)
    return images ^ at_or_above.to(torch.uint8).mul_(255)


def _autocontrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    # Batched in torchvision, and free of host syncs: its one masked assignment of a Python scalar becomes
    # masked_fill_ on the device.
    return tvf.autocontrast(images)


def _equalize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation, per image and channel, as torchvision defines it: value v maps to
    (pixels below v + step // 2) // step, with step = (pixels not of the highest value present) // 255;
    unchanged where step is 0. One scatter for all histograms (bincount would read its maximum back from the
    device) and one lookup for all pixels."""
    count, channels, height, width = images.shape
    rows, device = count * channels, images.device
    # Each (image, channel) row owns 256 histogram bins; a pixel's bin is row * 256 + value.
    bins = images.reshape(rows, height * width).long().add_(torch.arange(0, rows * 256, 256, device=device)[:, None])
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
    -- then `auto_augment`:
    - "randaugment": `randaugment_ops` rounds; in each, every image draws one of torchvision's 14 ops
      uniformly (Identity included) and applies it at bin `randaugment_magnitude` of 31, with a random sign
      for the signed ops, exactly as torchvision.transforms.v2.RandAugment does image by image;
    - "trivialaugment": one round of TrivialAugmentWide's wider space, with a random bin per image.
    Images are sorted by the op they drew, each op runs once on its slice (one grid_sample for the five
    geometric ops, per-image factors and thresholds for the colour ops, one histogram scatter for Equalize,
    torchvision's own batched AutoContrast), and the results are put back in order. Nearest interpolation,
    zero fill: torchvision's defaults. On CPU the output equals torchvision's functional ops image by image,
    pixel for pixel (tests/test_augment.py checks every op, bin and sign); on CUDA, float kernels may round
    a rare pixel differently, as torchvision's own do between devices. Last, images not yet at `image_size`
    are resized to it (pad-and-crop and RandAugment ran at the source size: at 32 px, 1/49 of the work at 224).

    Args:
        config: the recipe's augmentation settings (the Mixup/CutMix, erasing and repeat fields are others').
        generator: CPU generator every random choice is drawn from; seed it per (seed, epoch, rank, worker)
            for reproducible runs. The same seed gives the same batch on CPU.
        image_size: the square training resolution (data.image_size); None keeps the batch's size.
        interpolation: how RandomResizedCrop and the resize sample ("bilinear" or "bicubic").
    """

    def __init__(self, config: AugmentConfig, generator: torch.Generator, *, image_size: int | None = None,
                 interpolation: str = "bicubic"):
        _require_host_generator(generator, "BatchAugmenter")
        if config.random_resized_crop and image_size is None:
            raise ValueError("random_resized_crop needs the output size: pass image_size (data.image_size)")
        self.config = config
        self.generator = generator
        self.image_size = image_size
        self.interpolation = interpolation
        self._tables: dict[tuple[int, int], torch.Tensor] = {}
        self._base_grids: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        # Consecutive op indices and the batched implementation that serves them, in OP_NAMES order: the
        # five geometric ops share one grid_sample.
        self._spans: list[tuple[range, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = [
            (range(0, 1), _identity),
            (_GEOMETRIC, self._affine),
            *((range(OP_NAMES.index(name), OP_NAMES.index(name) + 1), op) for name, op in (
                ("Brightness", _brightness), ("Color", _color), ("Contrast", _contrast),
                ("Sharpness", _sharpness), ("Posterize", _posterize), ("Solarize", _solarize),
                ("AutoContrast", _autocontrast), ("Equalize", _equalize),
            )),
        ]

    @property
    def num_rounds(self) -> int:
        return {"none": 0, "randaugment": self.config.randaugment_ops, "trivialaugment": 1}[self.config.auto_augment]

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
        rounds = []
        for _ in range(self.num_rounds):
            ops = torch.randint(len(OP_NAMES), (count,), generator=generator)
            if self.config.auto_augment == "randaugment":
                bins = torch.full((count,), self.config.randaugment_magnitude, dtype=torch.int64)
            else:
                bins = torch.randint(NUM_MAGNITUDE_BINS, (count,), generator=generator)
            # torchvision negates when rand() <= 0.5; drawn for every image, used by the signed ops only.
            negative = torch.rand(count, generator=generator) <= 0.5
            rounds.append(OpRound(ops, bins, negative))
        return AugmentPlan(offsets, flips, rounds, crops)

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

    def _table(self, height: int, width: int) -> torch.Tensor:
        if (height, width) not in self._tables:
            self._tables[height, width] = _parameter_table(self.config.auto_augment, height, width)
        return self._tables[height, width]

    def _apply_round(self, images: torch.Tensor, op_round: OpRound) -> torch.Tensor:
        count, _, height, width = images.shape
        device = images.device
        # Host side: sort images by op so each op's images form one slice, and look up their parameters.
        order = torch.argsort(op_round.ops, stable=True)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(count)
        counts = torch.bincount(op_round.ops, minlength=len(OP_NAMES)).tolist()  # a CPU tensor: no sync
        params = self._table(height, width)[op_round.ops, op_round.bins, op_round.negative.long()][order]
        indices = _pinned_to(torch.stack([order, restore]), device)
        params = _pinned_to(params, device)

        sorted_images = images.index_select(0, indices[0])
        starts = [0, *itertools.accumulate(counts)]
        pieces = []
        for ops, implementation in self._spans:
            start, stop = starts[ops.start], starts[ops.stop]
            if stop > start:
                pieces.append(implementation(sorted_images[start:stop], params[start:stop]))
        return torch.cat(pieces).index_select(0, indices[1])

    def _base_grid(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """1 x HW x 3 homogeneous pixel-centre coordinates relative to the image centre, as torchvision builds
        them; made on the device itself (fills, no host copy), once per size and device."""
        key = (height, width, device)
        if key not in self._base_grids:
            grid = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
            grid[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device))
            grid[..., 1].copy_(
                torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=device).unsqueeze_(-1)
            )
            grid[..., 2].fill_(1)
            self._base_grids[key] = grid.view(1, height * width, 3)
        return self._base_grids[key]

    def _affine(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """One grid_sample for every geometric op: each image has its own (rescaled, transposed) matrix."""
        count, _, height, width = images.shape
        base = self._base_grid(height, width, images.device)
        grid = base.expand(count, -1, -1).bmm(params.view(count, 3, 2)).view(count, height, width, 2)
        warped = nnf.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return _to_uint8(warped.round_())


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
    repeated augmentation, whose batches hold each image k times ([a b c ... a b c ...], tasks/loader.py): a
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
