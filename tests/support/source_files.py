"""Source files for reader and shard tests: tiny CIFAR-10 python-batch directories, valid or with chosen files
replaced, and the malformed entries an ImageFolder tree can hold."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from tasks.data.sources import CIFAR10_DIRNAME, CIFAR10_SPLIT_FILES

CLASS_NAMES = [b"cat", b"dog", b"ship"]
ROWS_PER_BATCH = 2
PIXELS_PER_IMAGE = 3 * 32 * 32
BATCH_NAMES = [name for names in CIFAR10_SPLIT_FILES.values() for name in names]


def valid_batch(seed: int) -> dict[bytes, object]:
    """A batch as the original CIFAR-10 pickles hold it: bytes keys, uint8 rows, a list of int labels."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"data": rng.integers(0, 256, (ROWS_PER_BATCH, PIXELS_PER_IMAGE), dtype=np.uint8),
        b"labels": [int(label) for label in rng.integers(0, len(CLASS_NAMES), ROWS_PER_BATCH)],
        b"filenames": [f"image_{seed}_{row}.png".encode() for row in range(ROWS_PER_BATCH)],
    }


def write_cifar_dir(root: Path, replaced: dict[str, bytes] | None = None) -> Path:
    """`root/cifar-10-batches-py` with batches.meta and the six batches; `replaced` maps a file name to the
    bytes written instead of the valid pickle. Returns the batches directory."""
    batches = root / CIFAR10_DIRNAME
    batches.mkdir(parents=True, exist_ok=True)
    contents = {"batches.meta": pickle.dumps({b"label_names": CLASS_NAMES, b"num_vis": PIXELS_PER_IMAGE}, protocol=2)}
    for seed, name in enumerate(BATCH_NAMES):
        contents[name] = pickle.dumps(valid_batch(seed), protocol=2)
    contents.update(replaced or {})
    for name, payload in contents.items():
        (batches / name).write_bytes(payload)
    return batches


# ImageFolder entries with an image suffix that no reader can use, whatever their content would be.
UNUSABLE_ENTRIES = ("zero bytes", "directory", "dangling link", "looping link")


def write_unusable_entry(path: Path, kind: str) -> None:
    match kind:
        case "zero bytes":
            path.write_bytes(b"")
        case "directory":
            path.mkdir()
        case "dangling link":
            path.symlink_to(path.parent / "no-such-file.png")
        case "looping link":
            path.symlink_to(path.name)
        case _:
            raise ValueError(f"unknown entry kind {kind!r}; one of {UNUSABLE_ENTRIES}")
