"""Streams a split's shards into batches for DDP training and evaluation.

The manifest's per-shard counts let every rank plan its epoch without talking to the others:
the (per-epoch shuffled) shard order is concatenated into one sample stream, rank r takes a
contiguous slice of it, and the slice is cut into the same number of batches on every rank. So in
one epoch each sample is seen exactly once across ranks, no rank waits on a batch that never comes,
and evaluation needs no padding duplicates. DataLoader workers take contiguous runs of the rank's
batches and read only the shard ranges those batches cover.

Repeated augmentation (data.augment.repeated_augmentation = k) plans the same way over batches of
batch_size // k distinct images and tiles each batch k times, [a, b, c, a, b, c, ...]: every image appears
exactly k times per epoch across ranks (once per epoch, k times over), all k copies in one batch of one rank,
each augmented on its own. DDP averages gradients over the global batch, so copies on one rank give the
gradient DeiT's RASampler gives with copies on k ranks of the same step (BatchNorm statistics aside).
BatchMixer pairs samples along a random cycle drawn per batch, so the copies of an image get partners (and
Mixup/CutMix draws) independent of each other, as on DeiT's separate ranks, whatever the layout.
DeiT also shortens the epoch back to one pass (a third of the images, each three times); here an epoch is
k passes, so divide training.epochs by k for DeiT's budget.

Workers yield uint8 batches; conversion to float and normalisation happen on the training device
(`normalize`), which keeps worker-to-trainer traffic at a quarter of float32.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tasks.config import AugmentConfig, refuse_command_url
from tasks.data.augment import BatchAugmenter
from tasks.data.manifest import require_manifest
from tasks.data.samples import ShardFormatError, decode_image, decode_label, iter_samples
from tasks.data.sources import CIFAR10_MEAN

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, in shard order."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    segments: list[Segment]
    batch_sizes: list[int]


def batches_per_rank(total: int, world_size: int, batch_size: int, repeats: int = 1) -> int:
    """Batches every rank yields per epoch for batches of at most `batch_size` samples, copies included."""
    return math.ceil(math.ceil(total / world_size) / distinct_per_batch(batch_size, repeats))


def distinct_per_batch(batch_size: int, repeats: int) -> int:
    """Most distinct images in a batch of at most `batch_size` samples holding `repeats` copies of each."""
    if not 1 <= repeats <= batch_size:
        raise ValueError(f"{repeats} repeats of each image do not fit a batch of {batch_size}")
    return batch_size // repeats


def plan_worker(
    shard_counts: list[int],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    shard_order: list[int],
) -> WorkerPlan:
    """The exact samples (as shard segments) and batch sizes one DataLoader worker of one rank yields."""
    total = sum(shard_counts)
    rank_start, rank_stop = rank * total // world_size, (rank + 1) * total // world_size
    num_batches = batches_per_rank(total, world_size, batch_size)
    rank_samples = rank_stop - rank_start
    if rank_samples < num_batches:
        raise ValueError(
            f"{total} samples over {world_size} ranks leave rank {rank} {rank_samples} samples for "
            f"{num_batches} batches; use a larger batch size or fewer ranks"
        )
    # Batch sizes differ by at most one so every rank has exactly num_batches batches.
    small, larger_count = divmod(rank_samples, num_batches)
    sizes = [small + 1] * larger_count + [small] * (num_batches - larger_count)
    first_batch, last_batch = worker * num_batches // num_workers, (worker + 1) * num_batches // num_workers
    start = rank_start + sum(sizes[:first_batch])
    stop = start + sum(sizes[first_batch:last_batch])

    segments, offset = [], 0
    for shard in shard_order:
        shard_start, shard_stop = offset, offset + shard_counts[shard]
        offset = shard_stop
        lo, hi = max(start, shard_start), min(stop, shard_stop)
        if lo < hi:
            segments.append(Segment(shard, lo - shard_start, hi - shard_start))
    return WorkerPlan(segments, sizes[first_batch:last_batch])


class ShardStream(IterableDataset):
    """One split of a shard directory as an iterable of (uint8 images, labels, keys) batches."""

    def __init__(
        self,
        location: str,
        split: str,
        batch_size: int,
        *,
        train: bool,
        augment: AugmentConfig | None = None,
        augment_in_workers: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 10_000,
        repeats: int = 1,
        image_size: int | None = None,
        interpolation: str = "bicubic",
        mean: tuple[float, float, float] = CIFAR10_MEAN,
    ):
        refuse_command_url(location, ShardFormatError)
        manifest = require_manifest(location)
        if split not in manifest.splits:
            raise KeyError(f"{location}: no split {split!r}; the manifest has {sorted(manifest.splits)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        shards = manifest.splits[split].shards
        self.location = location.rstrip("/")
        self.shard_names = [s.name for s in shards]
        self.shard_counts = [s.num_samples for s in shards]
        self.classes = manifest.classes
        self.batch_size = batch_size
        self.train = train
        self.augment = augment or AugmentConfig()
        # False: batches leave the stream unaugmented, for augmentation on the training device.
        self.augment_in_workers = augment_in_workers
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        # Copies of each image per epoch, in the same batch (repeated augmentation); training streams only.
        self.repeats = repeats if train else 1
        distinct_per_batch(batch_size, self.repeats)  # fails early when the copies do not fit a batch
        # The training resolution the loader-side augmentation produces (None: the shards' own).
        self.image_size = image_size
        self.interpolation = interpolation
        # The dataset mean (data.mean), which RandAugment's geometric ops fill with.
        self.mean = mean
        # Shared memory, so that DataLoader workers that live across epochs see set_epoch from the trainer.
        self._epoch = multiprocessing.RawValue("q", 0)

    def __len__(self) -> int:
        return batches_per_rank(sum(self.shard_counts), self.world_size, self.batch_size, self.repeats)

    @property
    def num_samples(self) -> int:
        return sum(self.shard_counts)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Takes effect at the next iter() of the stream or of a DataLoader over it, workers included."""
        self._epoch.value = epoch

    def _shard_order(self) -> list[int]:
        order = list(range(len(self.shard_names)))
        if self.train:
            # Seeded by epoch only, so every rank computes the same order.
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        return order

    def _read_segments(self, segments: list[Segment]) -> Iterator[tuple[np.ndarray, int, str]]:
        for segment in segments:
            name = self.shard_names[segment.shard]
            with fsspec.open(f"{self.location}/{name}", "rb") as stream:
                for index, sample in enumerate(iter_samples(stream, name)):
                    if index >= segment.stop:
                        break
                    if index >= segment.start:
                        yield decode_image(sample), decode_label(sample), sample["__key__"]

    def _shuffled(self, samples: Iterator, rng: np.random.Generator) -> Iterator:
        """Bounded shuffle buffer: memory stays at shuffle_buffer samples whatever the split size."""
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        plan = plan_worker(
            self.shard_counts,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            batch_size=distinct_per_batch(self.batch_size, self.repeats),
            shard_order=self._shard_order(),
        )
        samples = self._read_segments(plan.segments)
        augmenter = None
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            samples = self._shuffled(samples, rng)
            if self.augment_in_workers:
                augmenter = BatchAugmenter(self.augment, torch.Generator().manual_seed(int(rng.integers(2**62))),
                                           image_size=self.image_size, interpolation=self.interpolation,
                                           mean=self.mean)
        for size in plan.batch_sizes:
            chunk = list(itertools.islice(samples, size))
            if len(chunk) < size:
                raise ShardFormatError(
                    f"{self.location}: shards hold fewer samples than manifest.json lists; "
                    f"run `vit-pipeline verify-shards {self.location}`"
                )
            images = torch.from_numpy(np.stack([image for image, _, _ in chunk])).permute(0, 3, 1, 2)
            labels = torch.tensor([label for _, label, _ in chunk], dtype=torch.int64)
            keys = [key for _, _, key in chunk]
            if self.repeats > 1:
                # Tiled, [a, b, a, b]: see the module docstring.
                images, labels = images.repeat(self.repeats, 1, 1, 1), labels.repeat(self.repeats)
                keys = keys * self.repeats
            if augmenter is not None:
                images = augmenter(images)
            yield images.contiguous(), labels, keys


def make_loader(stream: ShardStream, num_workers: int, *, persistent: bool = False,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over whole batches built in the workers (the stream already batches).

    persistent: the worker processes live across epochs (the trainer iterates once per epoch after
    stream.set_epoch); pin_memory: page-locked batches, so the copy to a GPU can run asynchronously.
    """
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
        prefetch_factor=4 if num_workers else None,
        pin_memory=pin_memory,
    )


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 N x C x H x W -> normalised float on `device` (done there, after the cheap uint8 copy)."""
    return Normalizer(mean, std, torch.device(device), channels_last=channels_last)(images.to(device))


class Normalizer:
    """uint8 N x C x H x W on `device` -> float, (x / 255 - mean) / std, in the model's memory format.

    The constants are built on the device once, not per batch: a per-batch torch.tensor(..., device="cuda")
    would be a synchronous host-to-device copy in the middle of the loop.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, *,
                 channels_last: bool = False):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=self.memory_format)
        return (images.float() - self.mean) / self.std


def device_batches(
    loader: Iterable[Batch],
    device: torch.device,
    normalizer: Normalizer,
    augmenter: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) as the step wants them: on `device`, augmented there when `augmenter` is given,
    normalised.

    On CUDA, batch i+1 is copied (from pinned memory, so asynchronously) and prepared on a side stream
    while batch i trains, so the step never waits for the copy; elsewhere batches are prepared in turn.
    """

    def prepare(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if augmenter is not None:
            images = augmenter(images)
        return normalizer(images), labels

    if device.type != "cuda":
        for images, labels, _ in loader:
            yield prepare(images, labels)
        return
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    ready = None
    for images, labels, _ in loader:
        with torch.cuda.stream(side):
            upcoming = prepare(images, labels)
        if ready is not None:
            yield ready
        main.wait_stream(side)
        for tensor in upcoming:
            # Made on the side stream, used on the main one: keep the allocator from reusing it too early.
            tensor.record_stream(main)
        ready = upcoming
    if ready is not None:
        yield ready
