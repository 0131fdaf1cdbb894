"""Source datasets the shard step reads: CIFAR-10 (python-batch layout) and any ImageFolder tree.

A source is a list of split samples that know their label and how to load their pixels, so the
shard workers can load images in parallel without the parent holding a whole ImageFolder in memory.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from tasks.digests import update_with_file

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_SPLIT_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CIFAR10_SIDE = 32
# Per-channel statistics of the CIFAR-10 training images; here, torch-free, so the configuration's defaults
# need no torch (vitmodels' CIFAR-10 preset takes them from here too).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
T = TypeVar("T")


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
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes...
        ("__builtin__", "bytes"),  # ...and empty bytes (an empty array's data)
        # pickle.dump's default protocol (5) stores arrays as raw buffers; frombuffer refuses object dtypes.
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise SourceError(f"{path}: cannot be read ({error.strerror or error})") from None
    except Exception as error:  # a malformed pickle can raise nearly any type (the pickle docs say so)
        raise SourceError(f"{path}: not a readable CIFAR-10 batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise SourceError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, expected a dict)")
    return {_key_text(key): value for key, value in batch.items()}


def _key_text(key: object) -> str:
    # The original batches (Python 2) have bytes keys; re-written copies have str keys.
    if isinstance(key, bytes):
        return key.decode(errors="replace")
    return key if isinstance(key, str) else repr(key)


def _entry(batch: dict[str, object], key: str, path: Path) -> object:
    if key not in batch:
        raise SourceError(f"{path}: no {key!r} entry (it has {', '.join(map(repr, sorted(batch))) or 'none'})")
    return batch[key]


def _class_names(meta: dict[str, object], path: Path) -> tuple[str, ...]:
    names = _entry(meta, "label_names", path)
    if not isinstance(names, list | tuple) or not all(isinstance(name, bytes | str) for name in names):
        raise SourceError(f"{path}: label_names must be a list of class names, not {names!r:.80}")
    try:
        classes = tuple(name.decode() if isinstance(name, bytes) else name for name in names)
    except UnicodeDecodeError:
        raise SourceError(f"{path}: label_names must be UTF-8 text, got {names!r:.80}") from None
    if not classes or len(set(classes)) != len(classes):
        raise SourceError(f"{path}: label_names must be distinct and at least one, got {list(classes)!r:.200}")
    return classes


def _integer_array(value: object, path: Path, key: str, *, ndim: int) -> np.ndarray:
    """`value` as an integer array of `ndim` dimensions; floats, booleans, text and ragged lists are refused."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:  # ragged nested lists
        raise SourceError(f"{path}: {key} is not an array ({error})") from None
    if array.ndim != ndim or (array.size and array.dtype.kind not in "iu"):
        raise SourceError(
            f"{path}: {key} is a {array.ndim}-d array of {array.dtype}, expected a {ndim}-d array of integers"
        )
    return array.astype(np.int64) if array.size == 0 else array


def _cifar_batch_arrays(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N x 32 x 32 x 3 uint8) and labels (N int64) of one batch file, every value checked."""
    batch = _read_cifar_batch(path)
    data = _integer_array(_entry(batch, "data", path), path, "data", ndim=2)
    if data.shape[1] != 3 * CIFAR10_SIDE * CIFAR10_SIDE:
        raise SourceError(f"{path}: data has shape {data.shape}, expected (N, {3 * CIFAR10_SIDE * CIFAR10_SIDE})")
    if data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise SourceError(f"{path}: pixel values span {data.min()}..{data.max()}, expected 0..255")
    labels = _integer_array(_entry(batch, "labels", path), path, "labels", ndim=1)
    if len(labels) != len(data):
        raise SourceError(f"{path}: {len(labels)} labels for {len(data)} images")
    out_of_range = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if out_of_range.size:
        first = int(out_of_range[0])
        raise SourceError(
            f"{path}: sample {first} has label {labels[first]}, outside 0..{num_classes - 1} "
            f"(batches.meta names {num_classes} classes); {out_of_range.size} label(s) out of range in all"
        )
    pixels = data.astype(np.uint8, copy=False).reshape(-1, 3, CIFAR10_SIDE, CIFAR10_SIDE).transpose(0, 2, 3, 1)
    return pixels, labels.astype(np.int64, copy=False)


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
        update_with_file(digest, path)
    return digest.hexdigest()


def read_cifar10(root: Path) -> Source:
    """Every batch is read and checked here (keys, shapes, dtypes, label range), before anything is written."""
    batches = find_cifar10_dir(root)
    classes = _class_names(_read_cifar_batch(batches / "batches.meta"), batches / "batches.meta")
    splits = {}
    read_files = [batches / "batches.meta"]
    for split, names in CIFAR10_SPLIT_FILES.items():
        pixels, labels = [], []
        for name in names:
            path = batches / name
            if not path.is_file():
                raise SourceError(f"{batches}: missing CIFAR-10 batch {name}")
            batch_pixels, batch_labels = _cifar_batch_arrays(path, len(classes))
            pixels.append(batch_pixels)
            labels.append(batch_labels)
            read_files.append(path)
        split_labels = np.concatenate(labels)
        if not len(split_labels):
            raise SourceError(f"{batches}: the {split} batches ({', '.join(names)}) hold no images")
        splits[split] = SplitSource(labels=split_labels, pixels=np.ascontiguousarray(np.concatenate(pixels)))
    return Source("cifar10", classes, splits, _file_digest(read_files))


def _visible_entries(directory: Path) -> list[Path]:
    """Sorted entries without hidden ones (.DS_Store, macOS's ._<name> twins of images, .ipynb_checkpoints)."""
    try:
        return sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))
    except OSError as error:
        raise SourceError(f"{directory}: cannot be listed ({error.strerror or error})") from None


def _image_file_stat(image: Path) -> os.stat_result:
    try:
        status = image.stat()
    except OSError as error:  # a dangling or looping symbolic link, a permission problem
        raise SourceError(f"{image}: cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(status.st_mode):
        raise SourceError(f"{image}: not a regular file")
    if status.st_size == 0:
        raise SourceError(f"{image}: empty file (0 bytes)")
    return status


def read_imagefolder(root: Path) -> Source:
    """`<root>/<split>/<class>/<image>`: every split directory, classes the union of class names.

    The tree is checked here (no empty class directory, no empty, unreadable or non-regular image file);
    pixels are decoded later by the shard workers, which name any file Pillow cannot decode, and a failure
    there publishes nothing.
    """
    if not root.is_dir():
        raise SourceError(f"{root}: ImageFolder root is not a directory")
    split_dirs = [entry for entry in _visible_entries(root) if entry.is_dir()]
    if not split_dirs:
        raise SourceError(f"{root}: no split directories (expected {root}/train/<class>/<image>)")
    class_dirs = {split_dir: [c for c in _visible_entries(split_dir) if c.is_dir()] for split_dir in split_dirs}
    classes = tuple(sorted({class_dir.name for dirs in class_dirs.values() for class_dir in dirs}))
    class_index = {name: i for i, name in enumerate(classes)}
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    digest = hashlib.sha256()
    splits = {}
    for split_dir, dirs in class_dirs.items():
        if not dirs:
            raise SourceError(f"{split_dir}: no class directories (expected {split_dir}/<class>/<image>)")
        files, labels = [], []
        for class_dir in dirs:
            images = [entry for entry in _visible_entries(class_dir) if entry.suffix.lower() in IMAGE_SUFFIXES]
            if not images:  # as torchvision's ImageFolder: an empty class is a copying mistake, not a class
                raise SourceError(f"{class_dir}: no images ({suffixes}); every class directory needs one or more")
            for image in images:
                status = _image_file_stat(image)
                # Path, size and mtime stand in for content so a large tree is not read twice.
                digest.update(f"{image.relative_to(root)}:{status.st_size}:{status.st_mtime_ns}\n".encode())
                files.append(str(image))
                labels.append(class_index[class_dir.name])
        splits[split_dir.name] = SplitSource(labels=np.asarray(labels, dtype=np.int64), files=tuple(files))
    return Source("imagefolder", classes, splits, digest.hexdigest())


def _with_image(path: str, read: Callable[[Image.Image], T]) -> T:
    """`read` applied to the opened file; whatever Pillow raises on a corrupt file becomes a SourceError naming it."""
    try:
        with Image.open(path) as image:
            return read(image)
    except Exception as error:  # OSError, ValueError, SyntaxError, DecompressionBombError, ... depending on the codec
        raise SourceError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


def load_image_file(path: str, image_size: int | None, expected_size: tuple[int, int] | None) -> np.ndarray:
    """Decode one ImageFolder file to H x W x 3 uint8: any mode becomes RGB; the size is made
    `image_size` square or must equal `expected_size`, otherwise the file is rejected by name."""
    image = _with_image(path, lambda opened: opened.convert("RGB"))
    if image_size is not None:
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    elif expected_size is not None and image.size != expected_size:
        raise SourceError(
            f"{path}: image is {image.size[0]}x{image.size[1]}, the split's images are "
            f"{expected_size[0]}x{expected_size[1]}; set data.image_size to resize"
        )
    return np.asarray(image, dtype=np.uint8)


def first_image_size(path: str) -> tuple[int, int]:
    return _with_image(path, lambda opened: opened.size)


def open_source(dataset: str, data_root: Path | None, download_dir: Path) -> Source:
    if dataset == "cifar10":
        return read_cifar10(data_root if data_root is not None else download_cifar10(download_dir))
    if dataset == "imagefolder":
        if data_root is None:
            raise SourceError("imagefolder needs a data root")
        return read_imagefolder(data_root)
    raise SourceError(f"unknown dataset {dataset!r}; choose cifar10 or imagefolder")
