"""Batched training augmentation that runs where the images are: loader workers (CPU) or the training device.

`BatchAugmenter` is the recipe's image augmentation as one step: it draws every random choice for a uint8
N x C x H x W batch on the host (`AugmentPlan`) and carries the plan out on the batch's device, in DeiT's
order: pad-and-crop and flips (or RandomResizedCrop and flips, crops.py), RandAugment as timm defines it
(auto_augment.py), and a resize to the training resolution. The float-batch steps after normalisation are
their own modules: random erasing (random_erasing.py) and Mixup/CutMix (mixup.py); evaluation's resize and
centre crop is crops.py's `EvalResize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasks.config import AugmentConfig
from tasks.data.auto_augment import BatchRandAugment, OpRound
from tasks.data.crops import INTERPOLATIONS, crop_and_flip, draw_resized_crops, resize_center_crop, resized_crops
from tasks.data.host_to_device import require_host_generator
from tasks.data.sources import CIFAR10_MEAN


@dataclass(frozen=True)
class AugmentPlan:
    """Every random choice for one batch, drawn on the host; `BatchAugmenter.apply` carries it out."""

    crop_offsets: torch.Tensor | None  # N x 2 (dy, dx) in 0..2*padding, int64
    flips: torch.Tensor | None  # N, bool
    rounds: list[OpRound]
    # RandomResizedCrop boxes, N x 4 (top, left, height, width) in source pixels, int64; replaces crop_offsets.
    crops: torch.Tensor | None = None


class BatchAugmenter:
    """Training augmentation of uint8 N x C x H x W batches on any device, without a loop over images.

    In order: zero-pad by `crop_padding` and crop back to H x W at a random offset per image, flip half the
    images horizontally (both one gather with per-image indices) -- or, with `random_resized_crop`, crop a
    RandomResizedCrop box of each image, resized to `image_size`, and flip, in one grid_sample (DeiT's order)
    -- then RandAugment as timm's rand_augment_transform does it for the config's `auto_augment` string
    (`BatchRandAugment`: n rounds, each image drawing one op of timm's set per round, every op as PIL's).
    Last, images not yet at `image_size` are resized to it (pad-and-crop and RandAugment ran at the source
    size: at 32 px, 1/49 of the work at 224).

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
        require_host_generator(generator, "BatchAugmenter")
        if config.random_resized_crop and image_size is None:
            raise ValueError("random_resized_crop needs the output size: pass image_size (data.image_size)")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.config = config
        self.generator = generator
        self.image_size = image_size
        self.interpolation = interpolation
        policy = config.rand_augment
        self.rand_augment = (None if policy is None
                             else BatchRandAugment(policy, interpolation=interpolation, mean=mean))

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
        rounds = [] if self.rand_augment is None else self.rand_augment.draw(count, generator)
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
            images = crop_and_flip(images, plan.crop_offsets, plan.flips, padding=self.config.crop_padding)
        if plan.rounds:
            if self.rand_augment is None:  # a plan drawn by another augmenter, one with RandAugment
                raise ValueError(f"a plan with RandAugment rounds needs a policy, got auto_augment "
                                 f"{self.config.auto_augment!r}")
            images = self.rand_augment.apply(images, plan.rounds)
        if self.image_size is not None:
            images = resize_center_crop(images, self.image_size, interpolation=self.interpolation)
        return images.contiguous()
