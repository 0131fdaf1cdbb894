"""Random erasing of normalised float batches: `BatchEraser` (timm's RandomErasing with one box per image, its
boxes drawn for the whole batch on the host) and the ranges its boxes are drawn from, timm's defaults.
"""

from __future__ import annotations

import math

import torch

from tasks.data.host_to_device import pinned_to, require_host_generator

# Tries per image for a random-erasing box (timm) before leaving the image as it is.
ERASING_ATTEMPTS = 10
# timm's RandomErasing defaults: the erased share of the image area and the box's aspect ratio range.
ERASING_AREA = (0.02, 1 / 3)
ERASING_MIN_ASPECT = 0.3


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
        require_host_generator(generator, "BatchEraser")
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
        top, left, box_height, box_width = pinned_to(boxes, device).view(count, 4, 1, 1).unbind(dim=1)
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
