"""manifest.json, the contract between the shard step and every step that reads shards, and the checks of
shards against it.

The shard step (shard.py) writes the shards and then, last, the manifest; loaders, training, evaluation and
publishing read it back here. Two checks compare the shards with it: a cheap one from one directory listing
before each training (check_shard_sizes), and a full re-read and re-hash once per shard set (verify_shards).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field

import fsspec

from tasks.contracts import parse_record, record_json
from tasks.data.samples import IMAGE_EXTENSIONS, LABEL_EXTENSION, ShardFormatError, decode_label, iter_samples

MANIFEST_NAME = "manifest.json"
# What a file listing says about a file without reading it, where the store says it: local files their size and
# modification time, object stores their size, LastModified and ETag.
FILE_IDENTITY_KEYS = ("size", "mtime", "LastModified", "ETag")
MANIFEST_VERSION = 2  # 2: a validation split held out of the training split
VAL_SPLIT = "val"
TEST_SPLIT = "test"


@dataclass(frozen=True)
class ShardEntry:
    """One shard as manifest.json lists it."""

    name: str
    num_samples: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SplitEntry:
    """One split as manifest.json lists it."""

    num_samples: int
    class_counts: list[int]  # samples per class, in the manifest's class order
    shards: list[ShardEntry]
    held_out_from: str | None = None  # the source split a validation split was carved out of; absent on disk if none


@dataclass(frozen=True)
class Manifest:
    """manifest.json, the contract between the shard step and every step that reads shards (and W&B's lineage):
    its keys are these fields, in this order."""

    dataset: str
    classes: list[str]
    splits: dict[str, SplitEntry]
    fingerprint: str
    image_format: str | None
    version: int

    def shards(self) -> list[ShardEntry]:
        """Every shard of every split."""
        return [shard for split in self.splits.values() for shard in split.shards]

    def to_json(self) -> dict:
        return record_json(self, omit_when_none=("held_out_from",))


@dataclass
class VerifyReport:
    location: str
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    samples_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def join_location(location: str, name: str) -> str:
    """`name` inside `location`, a local path or an fsspec URL."""
    return f"{location.rstrip('/')}/{name}"


def is_local_filesystem(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def read_manifest(location: str) -> Manifest | None:
    """The manifest of the shards in `location` (path or fsspec URL); None when there is none. A manifest that
    is not valid JSON or lacks a field (or holds one of the wrong type) raises ShardFormatError naming it."""
    fs, root = fsspec.core.url_to_fs(location)
    path = join_location(root, MANIFEST_NAME)
    if not fs.exists(path):
        return None
    return parse_record(Manifest, fs.cat_file(path), join_location(location, MANIFEST_NAME), ShardFormatError)


def require_manifest(location: str) -> Manifest:
    """The manifest of shards that must exist; FileNotFoundError when `location` has none."""
    manifest = read_manifest(location)
    if manifest is None:
        raise FileNotFoundError(f"{location}: no manifest.json; run `vit-pipeline shard` first")
    return manifest


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_json(), indent=2)
    if is_local_filesystem(fs):
        temporary = os.path.join(root, f".{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp")
        with open(temporary, "w") as handle:
            handle.write(text)
        os.replace(temporary, os.path.join(root, MANIFEST_NAME))
    else:
        fs.pipe_file(join_location(root, MANIFEST_NAME), text.encode())


def _check_shard(
    name: str, data: bytes, expected: ShardEntry, num_classes: int, seen_keys: set[str]
) -> tuple[list[str], int, list[int]]:
    problems = []
    if len(data) != expected.bytes:
        problems.append(f"{name}: size is {len(data)} bytes, manifest says {expected.bytes}")
    actual_hash = hashlib.sha256(data).hexdigest()
    if actual_hash != expected.sha256:
        problems.append(f"{name}: sha256 is {actual_hash[:16]}…, manifest says {expected.sha256[:16]}…")
    count, class_counts = 0, [0] * num_classes
    try:
        for sample in iter_samples(io.BytesIO(data), name):
            key = sample["__key__"]
            if key in seen_keys:
                problems.append(f"{name}: duplicate sample key {key!r}")
            seen_keys.add(key)
            if not any(ext in sample for ext in IMAGE_EXTENSIONS) or LABEL_EXTENSION not in sample:
                problems.append(f"{name}: sample {key!r} lacks an image or a label")
                continue
            label = decode_label(sample)
            if not 0 <= label < num_classes:
                problems.append(f"{name}: sample {key!r} has label {label}, outside 0..{num_classes - 1}")
                continue
            class_counts[label] += 1
            count += 1
    except ShardFormatError as error:
        problems.append(str(error))
    if count != expected.num_samples:
        problems.append(f"{name}: holds {count} samples, manifest says {expected.num_samples}")
    return problems, count, class_counts


def shard_listing(location: str) -> dict[str, dict]:
    """Every shard file in `location`, name -> what one listing says of it (FILE_IDENTITY_KEYS); nothing is read.

    A shard rewritten or touched since shows another modification time (or ETag)."""
    fs, root = fsspec.core.url_to_fs(location)
    fs.invalidate_cache(root)  # object stores cache listings; a shard replaced since must show
    if not fs.exists(root):
        return {}
    files = [entry for entry in fs.ls(root, detail=True) if entry["type"] == "file" and entry["name"].endswith(".tar")]
    return {entry["name"].rsplit("/", 1)[-1]: {key: entry[key] for key in FILE_IDENTITY_KEYS if key in entry}
            for entry in files}


def check_shard_sizes(location: str) -> VerifyReport:
    """The cheap check before a training: the manifest is there, every shard it lists is there at the size it
    records, and no other shard is, from one listing of the directory. No shard is read: verify_shards re-reads
    and re-hashes them all, once per shard set (the flow's verify step, `vit-pipeline verify-shards`)."""
    report = VerifyReport(location)
    manifest = read_manifest(location)
    if manifest is None:
        report.problems.append(f"{join_location(location, MANIFEST_NAME)}: missing")
        return report
    listing = shard_listing(location)
    listed = set()
    for shard in manifest.shards():
        name = shard.name
        listed.add(name)
        if name not in listing:
            report.problems.append(f"{name}: missing")
        elif listing[name]["size"] != shard.bytes:
            report.problems.append(f"{name}: size is {listing[name]['size']} bytes, manifest says {shard.bytes}")
        else:
            report.shards_checked += 1
    _report_unknown_shards(report, listing, listed)
    return report


def verify_shards(location: str) -> VerifyReport:
    """Re-count and re-hash every shard against the manifest; report every difference found."""
    report = VerifyReport(location)
    manifest = read_manifest(location)
    if manifest is None:
        report.problems.append(f"{join_location(location, MANIFEST_NAME)}: missing")
        return report
    fs, root = fsspec.core.url_to_fs(location)
    num_classes = len(manifest.classes)
    seen_keys: set[str] = set()
    listed = set()
    for split_name, split in manifest.splits.items():
        split_counts = [0] * num_classes
        for shard in split.shards:
            listed.add(shard.name)
            path = join_location(root, shard.name)
            if not fs.exists(path):
                report.problems.append(f"{shard.name}: missing")
                continue
            problems, count, class_counts = _check_shard(
                shard.name, fs.cat_file(path), shard, num_classes, seen_keys
            )
            report.problems.extend(problems)
            report.shards_checked += 1
            report.samples_checked += count
            split_counts = [a + b for a, b in zip(split_counts, class_counts, strict=True)]
        if not report.problems and split_counts != split.class_counts:
            report.problems.append(
                f"split {split_name}: class counts {split_counts} differ from the manifest's {split.class_counts}"
            )
    _report_unknown_shards(report, shard_listing(location), listed)
    return report


def _report_unknown_shards(report: VerifyReport, listing: dict[str, dict], listed: set[str]) -> None:
    """Each shard file in the directory that the manifest does not list (left by another shard set, or copied in)."""
    report.problems.extend(f"{name}: unknown shard, not in the manifest" for name in sorted(listing.keys() - listed))
