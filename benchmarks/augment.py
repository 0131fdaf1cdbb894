"""Augmented images/s per core: timm's per-image RandAugment (PIL) against the batched one (tasks/data/auto_augment.py).

Times the image augmentation of a config's recipe (default configs/cifar10.yaml: pad-and-crop 4, horizontal
flip, RandAugment "rand-m9-mstd0.5-inc1") on batches of real CIFAR-10 images, uint8 in and out, with one
torch thread, and Mixup/CutMix (BatchMixer against timm's Mixup) on the same batches as float. The per-image
reference is timm's rand_augment_transform on PIL images, built with the hyperparameters timm's
create_transform gives it (the dataset mean as fill, the config's interpolation), the tensor-to-PIL round trip
included. Prints a markdown table with images/s per core and the cores that --target images/s would need, then
the ratio `batched/per-image = R`.

    .venv/bin/python benchmarks/augment.py --data-root /work/shared/data/cifar10-subset

`--device cuda` times the batched augmenter and the mixer on the GPU instead (images already on the device,
synchronised around each round); the per-image reference is a CPU loader-worker path and is not run there.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform

from tasks.config import DataConfig, load_config
from tasks.data.augment import BatchAugmenter
from tasks.data.mixup import BatchMixer
from tasks.data.sources import read_cifar10

from harness import let_timm_posterize_to_no_bits, sync

REPO_ROOT = Path(__file__).resolve().parents[1]


def images_per_second(step: Callable, batches: list, images: int, rounds: int, device: torch.device) -> float:
    """Best round's images/s of `step` over all `batches` (`images` in all), after a warm-up on two of them."""
    for batch in batches[:2]:
        step(batch)
    best = 0.0
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        sync(device)
        best = max(best, images / (time.perf_counter() - start))
    return best


def per_image_reference(data: DataConfig, size: int, generator: torch.Generator) -> Callable:
    """How a per-image loader augments: batched crop and flip, then timm's RandAugment one PIL image at a time
    (each image draws its own ops), with create_transform's hyperparameters for the training size."""
    recipe = data.augment
    crop_flip = BatchAugmenter(recipe.model_copy(update={"auto_augment": "none"}), generator)
    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * x)) for x in data.mean),
               "interpolation": {"bilinear": Image.Resampling.BILINEAR,
                                 "bicubic": Image.Resampling.BICUBIC}[data.interpolation]}
    let_timm_posterize_to_no_bits()
    policy = rand_augment_transform(recipe.auto_augment, hparams)

    def step(images: torch.Tensor) -> torch.Tensor:
        pictures = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in crop_flip(images)]
        return torch.stack([torch.from_numpy(np.array(policy(picture))).permute(2, 0, 1) for picture in pictures])

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=os.environ.get("DATA_ROOT"),
                        help="directory holding cifar-10-batches-py/ (default $DATA_ROOT)")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "cifar10.yaml",
                        help="whose data.augment to time")
    parser.add_argument("--policy", default=None,
                        help="override the config's auto_augment with a timm RandAugment string, e.g. rand-m9-n3")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=10, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best one counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the figures are per core)")
    parser.add_argument("--target", type=int, default=60_000, help="images/s one GPU worker needs")
    args = parser.parse_args()
    if args.data_root is None:
        parser.error("--data-root or $DATA_ROOT is required")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and torch.cuda.is_available() is False here")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_config(args.config, [f"data.augment.auto_augment={args.policy}"] if args.policy else []).data
    if data.augment.auto_augment == "none":
        parser.error(f"{args.config.name} has no RandAugment (data.augment.auto_augment: none): pass --policy")
    recipe = data.augment
    train = read_cifar10(args.data_root).splits["train"]
    count = args.batch_size * args.batches
    pixels = torch.from_numpy(train.pixels[np.arange(count) % len(train.pixels)]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(train.labels[np.arange(count) % len(train.labels)])
    batches = [chunk.to(device) for chunk in pixels.split(args.batch_size)]
    float_batches = [(chunk.float() / 255, label_chunk.to(device))
                     for chunk, label_chunk in zip(batches, labels.split(args.batch_size), strict=True)]

    crop_flip = recipe.model_copy(update={"auto_augment": "none"})
    cases: list[tuple[str, str, Callable, list]] = []
    if device.type == "cpu":
        cases.append((f"crop+flip+{recipe.auto_augment}", "timm (PIL), per image",
                      per_image_reference(data, pixels.shape[-1], torch.Generator().manual_seed(0)), batches))
    cases += [
        ("crop+flip", "tasks/data/augment.py", BatchAugmenter(crop_flip, torch.Generator().manual_seed(0)),
         batches),
        (f"crop+flip+{recipe.auto_augment}", "tasks/data/augment.py (batched)",
         BatchAugmenter(recipe, torch.Generator().manual_seed(0), interpolation=data.interpolation,
                        mean=data.mean), batches),
    ]
    mixer = BatchMixer(recipe, num_classes=10, rng=np.random.default_rng(0))
    cases.append(("mixup/cutmix", "BatchMixer", lambda batch: mixer(*batch), float_batches))
    if args.batch_size % 2 == 0:
        timm_mixup = Mixup(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha, prob=recipe.mixup_prob,
                           label_smoothing=recipe.label_smoothing, num_classes=10)
        # timm mixes in place: give it a copy, as BatchMixer leaves its input alone.
        cases.append(("mixup/cutmix", "timm Mixup (even batches only)",
                      lambda batch: timm_mixup(batch[0].clone(), batch[1]), float_batches))

    print(f"device {args.device}, torch threads {args.threads}, batch {args.batch_size}, {args.batches} batches "
          f"x best of {args.rounds} rounds, recipe {args.config.name} ({recipe.auto_augment}, {data.interpolation}, "
          f"padding {recipe.crop_padding}, hflip {recipe.hflip}), cpus {os.cpu_count()}")
    per_core = "per core" if device.type == "cpu" else "on the GPU"
    print(f"\n| augmentation | implementation | images/s {per_core} | us/image | cores for {args.target:,} img/s |")
    print("|---|---|---:|---:|---:|")
    rates = {}
    for name, implementation, step, inputs in cases:
        rate = images_per_second(step, inputs, count, args.rounds, device)
        rates[implementation] = rate
        cores = f"{math.ceil(args.target / rate)}" if device.type == "cpu" else ""
        print(f"| {name} | {implementation} | {rate:,.0f} | {1e6 / rate:.1f} | {cores} |", flush=True)
    if device.type == "cpu":
        ratio = rates["tasks/data/augment.py (batched)"] / rates["timm (PIL), per image"]
        print(f"\nbatched/per-image = {ratio:.2f}")


if __name__ == "__main__":
    main()
