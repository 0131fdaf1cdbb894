"""Throughput of the shard step and of the training loader, against plain torchvision and webdataset.

On the same images (a CIFAR-10 python-batch directory) it measures, in one run:
  1. shard_dataset (npy and png shards, 1 and 2 worker processes): images/s and MB written;
  2. our loader (ShardStream + BatchAugmenter, optionally + normalize) in one process with one thread;
  3. baselines doing the same work: torchvision's CIFAR10 + RandomCrop/Flip/ToTensor/Normalize, and
     webdataset decoding our png shards with the same transforms;
and prints images/s per core and the ratios ours/baseline.

    python benchmarks/shard_loader.py --data-root /work/shared/data/cifar10-subset
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tasks.data.shard import ShardOptions, shard_dataset

# shard_dataset(workers=2) spawns processes that re-run this file as __mp_main__; they need none of the
# loader side, and importing it there (torchvision, timm via tasks.config) would be charged to the shard step.
if __name__ != "__mp_main__":
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import CIFAR10

    from tasks.config import AugmentConfig
    from tasks.data.loader import ShardStream, make_loader, normalize
    from vitmodels import CIFAR10_MEAN, CIFAR10_STD


def shard_rows(data_root: Path, work: Path, formats: list[str], shard_size: int, repeats: int) -> tuple[list, dict]:
    """Time shard_dataset per (format, workers); every repeat writes into a fresh directory because an
    up-to-date directory is (rightly) skipped. Returns the rows and one shard directory per format."""
    rows, kept = [], {}
    for image_format in formats:
        for workers in (1, 2):
            times = []
            for repeat in range(repeats):
                location = str(work / f"{image_format}-w{workers}-r{repeat}")
                options = ShardOptions(shard_size=shard_size, image_format=image_format, workers=workers)
                start = time.perf_counter()
                result = shard_dataset("cifar10", data_root, location, options, progress=False)
                times.append(time.perf_counter() - start)
                kept.setdefault(image_format, location)
            images = sum(split.num_samples for split in result.manifest.splits.values())
            megabytes = sum(shard.bytes for shard in result.manifest.shards()) / 1e6
            rows.append((image_format, workers, images, megabytes, min(times), images / min(times)))
    return rows, kept


def measure(epoch_batches: Callable[[int], Iterable], epochs: int, post: Callable | None = None) -> list[float]:
    """images/s of each epoch; `post` runs on every batch's images inside the timed loop."""
    rates = []
    for epoch in range(epochs):
        count, start = 0, time.perf_counter()
        for batch in epoch_batches(epoch):
            images = post(batch[0]) if post else batch[0]
            count += images.shape[0]
        rates.append(count / (time.perf_counter() - start))
    return rates


def ours(location: str, batch_size: int, workers: int, train: bool = True, **augment) -> Callable[[int], Iterable]:
    # shuffle_buffer left at the pipeline default (10,000), so the subset's train split is fully shuffled.
    stream = ShardStream(location, "train", batch_size, train=train, augment=AugmentConfig(**augment))

    def epoch_batches(epoch: int) -> Iterable:
        stream.set_epoch(epoch)
        return make_loader(stream, workers)

    return epoch_batches


def torchvision_transform() -> T.Compose:
    return T.Compose([
        T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])


def torchvision_cifar(data_root: Path, batch_size: int, workers: int) -> Callable[[int], Iterable]:
    class LocalCIFAR10(CIFAR10):
        # torchvision md5-checks every batch file against the full dataset; the subset has the same layout
        # but other contents, so the check would reject it (batches.meta is the original and still checked).
        def _check_integrity(self) -> bool:
            return True

    dataset = LocalCIFAR10(str(data_root), train=True, transform=torchvision_transform())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    return lambda epoch: loader


def webdataset_png(location: str, batch_size: int, workers: int) -> Callable[[int], Iterable]:
    urls = sorted(str(path) for path in Path(location).glob("train-*.tar"))  # plain paths: no pipe: URLs
    transform = torchvision_transform()
    # No .shuffle(): the plain decode path; our loader shuffles all samples, so this slightly favours webdataset.
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("pil").to_tuple("png", "cls").map_tuple(transform, None)
    )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return lambda epoch: loader


def cifar_normalize(images: torch.Tensor) -> torch.Tensor:
    return normalize(images, CIFAR10_MEAN, CIFAR10_STD)


def loader_rows(args: argparse.Namespace, shards: dict[str, str], workers: int) -> dict[str, list[float]]:
    batch, epochs = args.batch_size, args.repeats
    cases: list[tuple[str, Callable[[int], Iterable], Callable | None]] = []
    for image_format, location in shards.items():
        cases += [
            (f"ours {image_format}: read+decode only (train=False)", ours(location, batch, workers, train=False), None),
            (f"ours {image_format}: crop+flip, uint8", ours(location, batch, workers), None),
            (f"ours {image_format}: crop+flip + normalize", ours(location, batch, workers), cifar_normalize),
        ]
    if not args.skip_randaugment:
        cases.append((
            "ours npy: crop+flip+randaugment + normalize",
            ours(shards["npy"], batch, workers, auto_augment="rand-m9-mstd0.5-inc1"), cifar_normalize,
        ))
    cases.append(("torchvision CIFAR10 DataLoader", torchvision_cifar(args.data_root, batch, workers), None))
    if "png" in shards:
        cases.append(("webdataset png decode(pil)", webdataset_png(shards["png"], batch, workers), None))
    results = {}
    for name, epoch_batches, post in cases:
        results[name] = measure(epoch_batches, epochs, post)
        print(f"  measured {name}", flush=True)
    return results


def print_loader_table(title: str, results: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"{'pipeline':<46} {'img/s best':>10} {'img/s mean':>10} {'us/img':>7}")
    for name, rates in results.items():
        print(f"{name:<46} {max(rates):>10.0f} {statistics.mean(rates):>10.0f} {1e6 / max(rates):>7.1f}")


def print_ratios(results: dict[str, list[float]]) -> None:
    # Normalised variants of ours, because both baselines end in Normalize (float32 output).
    pairs = [
        ("ours(npy) / torchvision", "ours npy: crop+flip + normalize", "torchvision CIFAR10 DataLoader"),
        ("ours(npy) / webdataset-png", "ours npy: crop+flip + normalize", "webdataset png decode(pil)"),
        ("ours(png) / webdataset-png", "ours png: crop+flip + normalize", "webdataset png decode(pil)"),
    ]
    print("\nratios (best epoch, ours with crop+flip+normalize, same work as the baselines)")
    for label, mine, theirs in pairs:
        if mine in results and theirs in results:
            print(f"  {label:<28} {max(results[mine]) / max(results[theirs]):5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=os.environ.get("DATA_ROOT"),
                        help="directory holding cifar-10-batches-py/ (default $DATA_ROOT)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="epochs per loader measurement, runs per shard one")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="samples per shard; 1000 gives 8 shard jobs so 2 workers have work to share")
    parser.add_argument("--out-dir", type=Path, default=None, help="parent of the temporary shard directory")
    parser.add_argument("--skip-png", action="store_true", help="no png shards, png loader or webdataset baseline")
    parser.add_argument("--skip-randaugment", action="store_true")
    parser.add_argument("--with-workers", action="store_true", help="also total throughput with 2 DataLoader workers")
    args = parser.parse_args()
    if args.data_root is None:
        parser.error("--data-root or $DATA_ROOT is required")

    # One intra-op thread: the numbers are per core, and the shard workers / DataLoader workers add cores.
    torch.set_num_threads(1)
    formats = ["npy"] if args.skip_png else ["npy", "png"]
    print(f"torch threads 1, batch {args.batch_size}, repeats {args.repeats}, cpus {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="shard-bench-", dir=args.out_dir) as work:
        rows, shards = shard_rows(args.data_root, Path(work), formats, args.shard_size, args.repeats)
        print(f"\nshard_dataset (train+test, shard_size {args.shard_size}, best of {args.repeats} runs, "
              "incl. reading the source)")
        print(f"{'format':<6} {'workers':>7} {'images':>7} {'MB':>7} {'seconds':>8} {'img/s':>8}")
        for image_format, workers, images, megabytes, seconds, rate in rows:
            print(f"{image_format:<6} {workers:>7} {images:>7} {megabytes:>7.1f} {seconds:>8.2f} {rate:>8.0f}")

        results = loader_rows(args, shards, workers=0)
        print_loader_table("loader, train split, 1 process, 1 thread, num_workers=0 (per core)", results)
        print_ratios(results)
        if args.with_workers:
            results = loader_rows(args, shards, workers=2)
            print_loader_table("loader, 2 DataLoader workers (total, incl. worker start-up each epoch)", results)
            print_ratios(results)


if __name__ == "__main__":
    main()
