"""Mixup and CutMix with label smoothing for float batches of any size: `BatchMixer` (timm's Mixup in "batch"
mode, pairing samples along a random cycle so that odd batches and batches of 1 work), the draw it makes for
a batch on the host (`MixDraw`) and the pairing itself (`random_cycle`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tasks.config import AugmentConfig
from tasks.data.host_to_device import pinned_to


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
        partners = pinned_to(torch.tensor(draw.partners, dtype=torch.int64), images.device)
        if draw.box is None:
            # lam * own + (1 - lam) * partner, with one new tensor (the partners' copy) instead of three.
            mixed = images.index_select(0, partners).mul_(1.0 - lam).add_(images, alpha=lam)
        else:
            top, bottom, left, right = draw.box
            mixed = images.clone()
            mixed[:, :, top:bottom, left:right] = images[:, :, top:bottom, left:right].index_select(0, partners)
        return mixed, targets.index_select(0, partners).mul_(1.0 - lam).add_(targets, alpha=lam)
