"""Shard step: a source dataset -> WebDataset tar shards + manifest.json (manifest.py holds the manifest and
the checks of shards against it).

Shards are written by worker processes (one shard per job) under temporary names and renamed into
place, and the manifest is written last, so a crash never leaves a half-written shard or a manifest
that points at one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import webdataset as wds
from tqdm import tqdm

from tasks.config import refuse_command_url
from tasks.data.manifest import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    VAL_SPLIT,
    Manifest,
    ShardEntry,
    SplitEntry,
    is_local_filesystem,
    join_location,
    read_manifest,
    shard_listing,
    write_manifest,
)
from tasks.data.samples import ShardFormatError, encode_sample
from tasks.data.sources import Source, SourceError, first_image_size, load_image_file, open_source
from tasks.digests import file_sha256, json_sha256

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

log = logging.getLogger(__name__)

HOLDOUT_SOURCE_SPLIT = "train"


@dataclass(frozen=True)
class ShardOptions:
    shard_size: int
    image_format: str = "npy"
    image_size: int | None = None
    shuffle_seed: int | None = 0
    workers: int = 2
    # Held out of the training split for validation: a count, a fraction of the split, or 0 for none.
    val_size: int | float = 0
    split_seed: int = 0

    def fingerprint_fields(self) -> dict:
        # workers changes how, not what, is written, so it is not part of the fingerprint.
        return {
            "shard_size": self.shard_size,
            "image_format": self.image_format,
            "image_size": self.image_size,
            "shuffle_seed": self.shuffle_seed,
            "val_size": self.val_size,
            "split_seed": self.split_seed,
            "manifest_version": MANIFEST_VERSION,
        }


@dataclass(frozen=True)
class OutputSplit:
    """A split as written: which samples of which source split, in source order."""

    name: str
    source_split: str
    indices: np.ndarray


def holdout_count(val_size: int | float, total: int) -> int:
    """A count as given; a fraction of `total`, at least one image."""
    return max(1, round(val_size * total)) if isinstance(val_size, float) else int(val_size)


def check_holdout(val_size: int | float, count: int, dataset: str, total: int) -> None:
    """Refuse a hold-out that leaves fewer images to train on than to validate on: a count meant for a larger
    source (5,000 of CIFAR-10's 50,000) would otherwise swallow a smaller one's training split without a word."""
    kept = total - count
    if kept >= count:
        return
    fraction = holdout_count(0.1, total)
    raise SourceError(
        f"data.val_size {val_size} holds out {count} of the {total} training images of this {dataset} source, "
        f"leaving {kept} to train on, fewer than the {count} it validates on; give a fraction of the training "
        f"split (0.1 holds out {fraction}) or a count of at most {total // 2}"
    )


def stratified_holdout(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` samples drawn per class in proportion to the class's size.

    Quotas are the proportional shares rounded down, with the samples left over given to the classes
    with the largest fractional parts, so the total is exactly `count` and no class is off by more than one.
    """
    if not 0 < count < len(labels):
        raise SourceError(
            f"data.val_size asks for {count} validation images out of a training split of {len(labels)}; "
            f"it must leave at least one image on each side"
        )
    classes, sizes = np.unique(labels, return_counts=True)
    shares = sizes * count / len(labels)
    quotas = np.floor(shares).astype(int)
    leftover = count - quotas.sum()
    quotas[np.argsort(-(shares - quotas), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng([seed, count])
    chosen = [rng.choice(np.flatnonzero(labels == label), size=quota, replace=False)
              for label, quota in zip(classes, quotas, strict=True)]
    return np.sort(np.concatenate(chosen))


def output_splits(source: Source, options: ShardOptions) -> list[OutputSplit]:
    """The source's splits, with the validation split carved out of the training split when asked for."""
    splits = [OutputSplit(name, name, np.arange(len(split))) for name, split in source.splits.items()]
    if not options.val_size:
        return splits
    if VAL_SPLIT in source.splits:
        log.info("the source has a %r split of its own; it is used and data.val_size is not", VAL_SPLIT)
        return splits
    if HOLDOUT_SOURCE_SPLIT not in source.splits:
        raise SourceError(f"data.val_size needs a {HOLDOUT_SOURCE_SPLIT!r} split to hold images out of; "
                          f"the source has {sorted(source.splits)}")
    train = source.splits[HOLDOUT_SOURCE_SPLIT]
    count = holdout_count(options.val_size, len(train))
    check_holdout(options.val_size, count, source.dataset, len(train))
    held_out = stratified_holdout(train.labels, count, options.split_seed)
    kept = np.setdiff1d(np.arange(len(train)), held_out, assume_unique=True)
    replaced = [s for s in splits if s.name != HOLDOUT_SOURCE_SPLIT]
    return [OutputSplit(HOLDOUT_SOURCE_SPLIT, HOLDOUT_SOURCE_SPLIT, kept),
            OutputSplit(VAL_SPLIT, HOLDOUT_SOURCE_SPLIT, held_out), *replaced]


@dataclass(frozen=True)
class ShardJob:
    split: str
    source_split: str
    index: int
    keys: list[str]
    labels: list[int]
    pixels: np.ndarray | None
    files: list[str] | None
    image_format: str
    image_size: int | None
    expected_size: tuple[int, int] | None
    staging_dir: str
    num_classes: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


@dataclass
class ShardResult:
    manifest: Manifest
    skipped: bool
    location: str


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def compute_fingerprint(source: Source, options: ShardOptions) -> str:
    return json_sha256(
        {"dataset": source.dataset, "source": source.digest, "classes": list(source.classes),
         **options.fingerprint_fields()}
    )


def _write_shard(job: ShardJob) -> dict:
    """Runs in a worker process: encode the job's samples into one tar in the staging directory."""
    class_counts = [0] * job.num_classes
    pattern = os.path.join(job.staging_dir, f"{job.split}-%06d.tar.partial")
    # mtime is fixed so the same input gives byte-identical shards.
    with wds.ShardWriter(
        pattern, maxcount=len(job.keys), start_shard=job.index, verbose=0, encoder=False, mtime=0
    ) as writer:
        for position, (key, label) in enumerate(zip(job.keys, job.labels, strict=True)):
            if job.pixels is not None:
                pixels = job.pixels[position]
            elif job.files is not None:
                pixels = load_image_file(job.files[position], job.image_size, job.expected_size)
            else:
                raise ValueError(f"{job.name}: the job carries neither pixels nor image files")
            writer.write(encode_sample(key, pixels, label, job.image_format))
            class_counts[label] += 1
    partial = pattern % job.index
    return {
        "name": job.name,
        "num_samples": len(job.keys),
        "sha256": file_sha256(partial),
        "bytes": os.path.getsize(partial),
        "class_counts": class_counts,
        "partial": partial,
    }


def _plan_jobs(source: Source, options: ShardOptions, staging_dir: str) -> list[ShardJob]:
    jobs = []
    for output in output_splits(source, options):
        split, split_source = output.name, source.splits[output.source_split]
        order = output.indices
        if options.shuffle_seed is not None:
            # Shuffled once at write time so every shard holds a mix of classes (ImageFolder is sorted).
            order = np.random.default_rng([options.shuffle_seed, len(split)]).permutation(order)
        expected_size = None
        if split_source.files is not None and options.image_size is None:
            expected_size = first_image_size(split_source.files[0])
        for index, start in enumerate(range(0, len(order), options.shard_size)):
            chosen = order[start : start + options.shard_size]
            jobs.append(
                ShardJob(
                    split=split,
                    source_split=output.source_split,
                    index=index,
                    # Keys name the source split and index, so a held-out image keeps its identity.
                    keys=[f"{output.source_split}_{int(i):07d}" for i in chosen],
                    labels=[int(split_source.labels[i]) for i in chosen],
                    pixels=None if split_source.pixels is None else split_source.pixels[chosen],
                    files=None if split_source.files is None else [split_source.files[i] for i in chosen],
                    image_format=options.image_format,
                    image_size=options.image_size,
                    expected_size=expected_size,
                    staging_dir=staging_dir,
                    num_classes=len(source.classes),
                )
            )
    return jobs


def _shards_intact(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> bool:
    for shard in manifest.shards():
        path = join_location(root, shard.name)
        if not fs.exists(path) or fs.size(path) != shard.bytes:
            return False
        with fs.open(path, "rb") as handle:
            if file_sha256(handle) != shard.sha256:
                return False
    return True


@contextlib.contextmanager
def _exclusive(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[None]:
    """Serialise writers of one local shard directory (two identical runs write shards once)."""
    if not is_local_filesystem(fs):
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".shard.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _publish(fs: fsspec.AbstractFileSystem, local_file: str, target: str) -> None:
    """Move a finished local file to its final name; a rename locally, one PUT on object stores."""
    if is_local_filesystem(fs):
        os.replace(local_file, target)
    else:
        fs.put_file(local_file, target)
        os.remove(local_file)


def _remove_unlisted_shards(fs: fsspec.AbstractFileSystem, root: str, location: str, manifest: Manifest) -> None:
    """Shards of an earlier shard set that the new manifest does not list."""
    for name in shard_listing(location).keys() - {shard.name for shard in manifest.shards()}:
        fs.rm_file(join_location(root, name))


def check_shard_location(location: str) -> None:
    """Refuse, by name and before anything is written, a location that runs commands (pipe:) or a local
    directory that cannot be made or written (under a file, a broken link, no write permission)."""
    refuse_command_url(location, ShardFormatError)
    fs, root = fsspec.core.url_to_fs(location)
    if not is_local_filesystem(fs):
        return
    path = Path(root).absolute()
    nearest = next(candidate for candidate in (path, *path.parents) if os.path.lexists(candidate))
    if not nearest.is_dir():
        what = "a file" if nearest.exists() else "a broken or looping symbolic link"
        where = "it" if nearest == path else str(nearest)
        raise ShardFormatError(f"shard directory {location}: {where} is {what}, not a directory")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ShardFormatError(f"shard directory {location}: {nearest} is not writable")


def write_shards(
    source: Source, location: str, options: ShardOptions, progress: bool = True
) -> ShardResult:
    """Shard `source` into `location` (path or fsspec URL); no work when intact shards already match."""
    fingerprint = compute_fingerprint(source, options)
    check_shard_location(location)
    fs, root = fsspec.core.url_to_fs(location)
    with _exclusive(fs, root):
        existing = read_manifest(location)
        if existing and existing.fingerprint == fingerprint and _shards_intact(fs, root, existing):
            log.info("shards in %s are up to date (fingerprint %s): nothing to do", location, fingerprint[:12])
            return ShardResult(existing, skipped=True, location=location)
        fs.makedirs(root, exist_ok=True)
        staging_parent = root if is_local_filesystem(fs) else None
        with tempfile.TemporaryDirectory(prefix=".staging-", dir=staging_parent) as staging:
            jobs = _plan_jobs(source, options, staging)
            # A bad image fails here, in staging: the previous shards and manifest are untouched.
            records = _run_jobs(jobs, options.workers, progress)
            if existing is not None:
                # The old manifest goes before any shard is replaced: a crash mid-publish must not leave it
                # naming new shards.
                fs.rm_file(join_location(root, MANIFEST_NAME))
            for record in records.values():
                _publish(fs, record.pop("partial"), join_location(root, record["name"]))
        manifest = _build_manifest(source, jobs, records, fingerprint)
        _remove_unlisted_shards(fs, root, location, manifest)
        write_manifest(fs, root, manifest)
    return ShardResult(manifest, skipped=False, location=location)


def _run_jobs(jobs: list[ShardJob], workers: int, progress: bool) -> dict[str, dict]:
    records: dict[str, dict] = {}
    with tqdm(total=sum(len(job.keys) for job in jobs), unit="img", desc="shard", disable=not progress) as bar:
        for record in _finished_shards(jobs, workers):
            records[record["name"]] = record
            bar.update(record["num_samples"])
    return records


def _finished_shards(jobs: list[ShardJob], workers: int) -> Iterator[dict]:
    if workers == 1 or len(jobs) == 1:
        yield from map(_write_shard, jobs)
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads that a forked child would deadlock on.
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_write_shard, job) for job in jobs]):
            yield future.result()


def _build_manifest(source: Source, jobs: list[ShardJob], records: dict[str, dict], fingerprint: str) -> Manifest:
    splits: dict[str, SplitEntry] = {}
    for job in jobs:
        record = records[job.name]
        split = splits.get(job.split, SplitEntry(0, [0] * len(source.classes), []))
        splits[job.split] = SplitEntry(
            num_samples=split.num_samples + record["num_samples"],
            class_counts=[a + b for a, b in zip(split.class_counts, record["class_counts"], strict=True)],
            shards=[*split.shards,
                    ShardEntry(record["name"], record["num_samples"], record["sha256"], record["bytes"])],
            held_out_from=job.source_split if job.source_split != job.split else split.held_out_from,
        )
    return Manifest(
        dataset=source.dataset,
        classes=list(source.classes),
        splits=splits,
        fingerprint=fingerprint,
        image_format=jobs[0].image_format if jobs else None,
        version=MANIFEST_VERSION,
    )


def shard_dataset(
    dataset: str,
    data_root: Path | None,
    location: str,
    options: ShardOptions,
    download_dir: Path = Path("data"),
    progress: bool = True,
) -> ShardResult:
    """The shard step as one call: read the source, write (or reuse) the shards."""
    check_shard_location(location)  # before reading the source, which can take a while
    source = open_source(dataset, data_root, download_dir)
    return write_shards(source, location, options, progress=progress)


def shard_options(config: PipelineConfig) -> ShardOptions:
    """The shard options the data section configures."""
    data = config.data
    return ShardOptions(
        shard_size=data.shard_size,
        image_format=data.image_format,
        # ImageFolder images are resized when sharded; CIFAR-10's keep their 32 px, the loader resizes them.
        image_size=data.image_size if data.dataset == "imagefolder" else None,
        shuffle_seed=data.shuffle_seed,
        workers=data.shard_workers,
        val_size=data.val_size,
        split_seed=data.split_seed,
    )


def shard_cache_inputs(config: PipelineConfig) -> dict:
    """What the shards `config` writes depend on, known before the source is read: the source's name and
    root (where the fingerprint has the content's digest), the fingerprinted options, and the location."""
    return {"dataset": config.data.dataset, "data_root": str(config.data.data_root),
            **shard_options(config).fingerprint_fields(), "location": config.shard_location}


def shard_from_config(config: PipelineConfig, progress: bool = True) -> ShardResult:
    """The shard step as the pipeline configures it (data section -> config.shard_location)."""
    data = config.data
    return shard_dataset(
        data.dataset, data.data_root, config.shard_location, shard_options(config), download_dir=data.download_dir,
        progress=progress,
    )
