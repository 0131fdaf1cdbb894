"""The geometry of a batch: pad-and-crop and flips, RandomResizedCrop, and evaluation's resize and centre crop.

Training: `crop_and_flip` zero-pads uint8 N x C x H x W images and crops them back at a per-image offset,
flipping some horizontally, as one gather with per-image indices; `draw_resized_crops` draws torchvision's
RandomResizedCrop boxes for a whole batch and `resized_crops` resizes (and flips) them in one grid_sample.
Evaluation: `resize_center_crop` is timm's resize-then-centre-crop on a uint8 batch, and `EvalResize` applies
it as the config says (validation, test, attention maps). The offsets, flips and boxes come from the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf

from tasks.config import DataConfig
from tasks.data.auto_augment import to_uint8
from tasks.data.host_to_device import pinned_to

# The resamplings the resizes take, by the config's name (data.interpolation).
INTERPOLATIONS = {"bilinear": tvf.InterpolationMode.BILINEAR, "bicubic": tvf.InterpolationMode.BICUBIC}
# Tries per image for a RandomResizedCrop box (torchvision) before falling back to the centred whole image.
RRC_ATTEMPTS = 10


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None, *,
                  padding: int) -> torch.Tensor:
    """Zero-pad uint8 N x C x H x W `images` by `padding`, crop each back to H x W at its host offset (N x 2
    int64 (dy, dx) in 0..2*padding) and mirror the images whose host `flips` (N, bool) is set: one gather with
    per-image indices. Without offsets nothing is padded or cropped; without flips nothing is mirrored."""
    count, channels, height, width = images.shape
    device, pad = images.device, padding if offsets is not None else 0
    if pad:
        # A zeroed canvas plus one slice copy: cheaper than F.pad on uint8.
        canvas = images.new_zeros(count, channels, height + 2 * pad, width + 2 * pad)
        canvas[:, :, pad : pad + height, pad : pad + width] = images
    else:
        canvas = images
    # Host side: offsets and flips as one small int64 tensor, so a single copy reaches the device.
    if offsets is None:
        offsets = torch.zeros(count, 2, dtype=torch.int64)
    if flips is None:
        flips = torch.zeros(count, dtype=torch.bool)
    per_image = pinned_to(torch.cat([offsets, flips.long().unsqueeze(1)], dim=1), device)
    row_offset, column_offset, flip = per_image.unbind(dim=1)
    columns = torch.arange(width, device=device)
    # out[y, x] = canvas[y + dy, dx + x], or dx + (W - 1 - x) when flipped.
    columns = torch.where(flip.bool()[:, None], width - 1 - columns, columns) + column_offset[:, None]
    rows = torch.arange(height, device=device) + row_offset[:, None]
    source = (rows[:, :, None] * canvas.shape[-1] + columns[:, None, :]).view(count, 1, height * width)
    flat = canvas.reshape(count, channels, -1)
    return flat.gather(2, source.expand(count, channels, height * width)).view(count, channels, height, width)


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
    theta = pinned_to(theta.float(), images.device)
    grid = nnf.affine_grid(theta, [count, channels, size, size], align_corners=False)
    sampled = nnf.grid_sample(images.float(), grid, mode=interpolation, padding_mode="border", align_corners=False)
    return to_uint8(sampled.round_())


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
        images = tvf.resize(images, [new_height, new_width], interpolation=INTERPOLATIONS[interpolation],
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

