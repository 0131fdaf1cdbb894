"""Source datasets the shard step reads: CIFAR-10 (python-batch layout) and any ImageFolder tree.

A source is a list of split samples that know their label and how to load their pixels, so the
shard workers can load images in parallel without the parent holding a whole ImageFolder in memory.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_SPLIT_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CIFAR10_SIDE = 32


class SourceError(ValueError):
    """The source dataset is missing, malformed or holds an image that cannot be used."""


@dataclass(frozen=True)
class SplitSource:
    """One split: labels, plus either decoded pixels (CIFAR-10) or image files (ImageFolder)."""

    labels: np.ndarray
    pixels: np.ndarray | None = None  # N x H x W x 3 uint8
    files: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Source:
    dataset: str
    classes: tuple[str, ...]
    splits: dict[str, SplitSource]
    # Identifies the source content; part of the shard fingerprint.
    digest: str


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles: allow the numpy array reconstructors and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise SourceError(f"{path}: not a readable CIFAR-10 batch ({error})") from None
    if not isinstance(batch, dict):
        raise SourceError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, expected a dict)")
    # The original batches (Python 2) have bytes keys; re-written copies have str keys.
    return {_decode_text(key): value for key, value in batch.items()}


def _decode_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def find_cifar10_dir(root: Path) -> Path:
    batches = root if root.name == CIFAR10_DIRNAME else root / CIFAR10_DIRNAME
    if not (batches / "batches.meta").is_file():
        raise SourceError(f"{root}: no CIFAR-10 python batches (expected {batches}/batches.meta)")
    return batches


def download_cifar10(download_dir: Path) -> Path:
    """Fetch CIFAR-10 through torchvision (md5-checked) and return the directory holding the batches."""
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(download_dir), train=True, download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError, ... depending on the failure
        raise SourceError(
            f"could not download CIFAR-10 into {download_dir} ({error}); "
            "point data.data_root or $DATA_ROOT at a local copy"
        ) from None
    return download_dir


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_cifar10(root: Path) -> Source:
    batches = find_cifar10_dir(root)
    meta = _read_cifar_batch(batches / "batches.meta")
    classes = tuple(_decode_text(name) for name in meta["label_names"])
    splits = {}
    read_files = [batches / "batches.meta"]
    for split, names in CIFAR10_SPLIT_FILES.items():
        pixels, labels = [], []
        for name in names:
            path = batches / name
            if not path.is_file():
                raise SourceError(f"{batches}: missing CIFAR-10 batch {name}")
            batch = _read_cifar_batch(path)
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * CIFAR10_SIDE * CIFAR10_SIDE:
                raise SourceError(f"{path}: data has shape {data.shape}, expected (N, 3072)")
            pixels.append(data.reshape(-1, 3, CIFAR10_SIDE, CIFAR10_SIDE).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
            read_files.append(path)
        splits[split] = SplitSource(
            labels=np.concatenate(labels), pixels=np.ascontiguousarray(np.concatenate(pixels))
        )
    return Source("cifar10", classes, splits, _file_digest(read_files))


def read_imagefolder(root: Path) -> Source:
    """`<root>/<split>/<class>/<image>`: every split directory, classes the union of class names."""
    if not root.is_dir():
        raise SourceError(f"{root}: ImageFolder root does not exist")
    split_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not split_dirs:
        raise SourceError(f"{root}: no split directories (expected {root}/train/<class>/<image>)")
    classes = tuple(
        sorted({c.name for split in split_dirs for c in split.iterdir() if c.is_dir()})
    )
    class_index = {name: i for i, name in enumerate(classes)}
    digest = hashlib.sha256()
    splits = {}
    for split_dir in split_dirs:
        files, labels = [], []
        for class_dir in sorted(c for c in split_dir.iterdir() if c.is_dir()):
            for image in sorted(class_dir.iterdir()):
                if image.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                stat = image.stat()
                # Path, size and mtime stand in for content so a large tree is not read twice.
                digest.update(f"{image.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
                files.append(str(image))
                labels.append(class_index[class_dir.name])
        if not files:
            raise SourceError(f"{split_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        splits[split_dir.name] = SplitSource(labels=np.asarray(labels, dtype=np.int64), files=tuple(files))
    return Source("imagefolder", classes, splits, digest.hexdigest())


def load_image_file(path: str, image_size: int | None, expected_size: tuple[int, int] | None) -> np.ndarray:
    """Decode one ImageFolder file to H x W x 3 uint8: any mode becomes RGB; the size is made
    `image_size` square or must equal `expected_size`, otherwise the file is rejected by name."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None:
                image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
            elif expected_size is not None and image.size != expected_size:
                raise SourceError(
                    f"{path}: image is {image.size[0]}x{image.size[1]}, the split's images are "
                    f"{expected_size[0]}x{expected_size[1]}; set data.image_size to resize"
                )
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise SourceError(f"{path}: not a readable image ({error})") from None


def first_image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise SourceError(f"{path}: not a readable image ({error})") from None


def open_source(dataset: str, data_root: Path | None, download_dir: Path) -> Source:
    if dataset == "cifar10":
        return read_cifar10(data_root if data_root is not None else download_cifar10(download_dir))
    if dataset == "imagefolder":
        if data_root is None:
            raise SourceError("imagefolder needs a data root")
        return read_imagefolder(data_root)
    raise SourceError(f"unknown dataset {dataset!r}; choose cifar10 or imagefolder")
