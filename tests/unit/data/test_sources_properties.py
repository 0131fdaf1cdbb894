"""Property-based tests of the source readers: any malformed CIFAR-10 batch or ImageFolder tree either reads
correctly or raises a SourceError whose message starts with the path of the thing that is wrong; no other
exception escapes (the shard step turns a SourceError into exit 2 with that message)."""

from __future__ import annotations

import io
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image

from tasks.data.sources import (
    CIFAR10_SPLIT_FILES,
    SourceError,
    first_image_size,
    load_image_file,
    read_cifar10,
    read_imagefolder,
)
from tests.support.source_files import (
    BATCH_NAMES,
    CLASS_NAMES,
    PIXELS_PER_IMAGE,
    ROWS_PER_BATCH,
    UNUSABLE_ENTRIES,
    write_cifar_dir,
    write_unusable_entry,
)

# Each example writes a handful of small files; a shared 2-core CI machine makes per-example timing
# meaningless, so there is no deadline, and the example counts keep each test to a few seconds.
READER_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- CIFAR-10 batches ----------------------------------------------------------------------------------

SMALL = {"max_size": 3}
ODD_LABELS = st.one_of(
    st.lists(st.integers(-2, len(CLASS_NAMES) + 1), **SMALL),
    st.lists(st.integers(), **SMALL),  # beyond int64 numpy makes an object array
    st.lists(st.floats(), **SMALL),
    st.lists(st.booleans(), **SMALL),
    st.lists(st.text(max_size=2), **SMALL),
    st.lists(st.lists(st.integers(0, 2), max_size=2), **SMALL),
    arrays(st.sampled_from([np.int8, np.uint8, np.int64, np.uint64, np.float32, np.bool_]),
           array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3)),
    st.none(), st.integers(), st.text(max_size=3), st.binary(max_size=3),
)
ODD_DATA = st.one_of(
    arrays(st.sampled_from([np.uint8, np.int16, np.int64, np.float32, np.bool_]),
           st.tuples(st.integers(0, 3), st.sampled_from([PIXELS_PER_IMAGE, PIXELS_PER_IMAGE - 1, 1]))),
    arrays(np.uint8, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)),
    st.builds(lambda rows, value: [[value] * PIXELS_PER_IMAGE] * rows, st.integers(0, 3), st.integers(-1, 256)),
    st.none(), st.text(max_size=3),
)
ODD_NAMES = st.one_of(
    st.lists(st.one_of(st.binary(max_size=4), st.text(max_size=4)), max_size=4),
    st.lists(st.integers(), max_size=2), st.text(max_size=4), st.none(),
)


def _one_in(draw, n: int) -> bool:
    """True one time in n or so (the rare case last: Hypothesis favours, and shrinks towards, the first)."""
    return draw(st.sampled_from([False] * (n - 1) + [True]))


@st.composite
def batch_objects(draw) -> object:
    """A batch dict that is valid, or has odd labels, odd data, missing, extra or non-text keys; or not a dict."""
    rows = draw(st.integers(0, 3))
    labels = st.lists(st.integers(0, len(CLASS_NAMES) - 1), min_size=rows, max_size=rows)
    data = arrays(np.uint8, (rows, PIXELS_PER_IMAGE))
    batch = {"data": draw(ODD_DATA if _one_in(draw, 3) else data),
             "labels": draw(ODD_LABELS if _one_in(draw, 3) else labels)}
    if _one_in(draw, 8):
        del batch[draw(st.sampled_from(["data", "labels"]))]
    batch.update(draw(st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), st.integers(), max_size=2)))
    if draw(st.booleans()):  # the original batches have bytes keys
        batch = {key.encode() if isinstance(key, str) else key: value for key, value in batch.items()}
    if _one_in(draw, 8):
        return draw(st.one_of(st.lists(st.integers(), max_size=2), st.none(), arrays(np.uint8, (2,))))
    return batch


@st.composite
def meta_objects(draw) -> object:
    names = draw(st.one_of(st.just(CLASS_NAMES), st.lists(st.binary(min_size=1, max_size=3), min_size=1, max_size=5,
                                                          unique=True), ODD_NAMES))
    meta = {b"label_names": names, b"num_vis": PIXELS_PER_IMAGE}
    if _one_in(draw, 8):
        del meta[b"label_names"]
    if _one_in(draw, 8):
        return draw(st.lists(st.binary(max_size=3), max_size=2))
    return meta


@st.composite
def damaged(draw, payload: bytes) -> bytes:
    """The pickle as written, truncated, with bytes overwritten, or replaced by arbitrary bytes."""
    kind = draw(st.sampled_from(["intact"] * 5 + ["truncated", "overwritten", "arbitrary"]))
    if kind == "truncated":
        return payload[: draw(st.integers(0, len(payload) - 1))]
    if kind == "overwritten":
        data = bytearray(payload)
        for position in draw(st.lists(st.integers(0, len(payload) - 1), min_size=1, max_size=4)):
            data[position] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "arbitrary":
        return draw(st.binary(max_size=64))
    return payload


@st.composite
def cifar_files(draw) -> tuple[str, object, bytes, bool]:
    """(file name, the object pickled, the bytes written, whether they are the intact pickle)."""
    name = draw(st.sampled_from(["batches.meta", *BATCH_NAMES]))
    obj = draw(meta_objects() if name == "batches.meta" else batch_objects())
    payload = pickle.dumps(obj, protocol=draw(st.integers(2, pickle.HIGHEST_PROTOCOL)))
    written = draw(damaged(payload))
    return name, obj, written, written == payload


def _segment(split_labels: np.ndarray, name: str) -> slice:
    """Where a batch file's rows sit in its split, the other files holding ROWS_PER_BATCH rows each."""
    names = next(names for names in CIFAR10_SPLIT_FILES.values() if name in names)
    start = names.index(name) * ROWS_PER_BATCH
    rows = len(split_labels) - (len(names) - 1) * ROWS_PER_BATCH
    return slice(start, start + rows)


@settings(READER_SETTINGS, max_examples=200)
@given(cifar_files())
def test_any_cifar_batch_reads_correctly_or_is_named(case):
    name, obj, written, intact = case
    with tempfile.TemporaryDirectory() as directory:
        batches = write_cifar_dir(Path(directory), {name: written})
        try:
            source = read_cifar10(Path(directory))
        except SourceError as error:
            message = str(error)
            # A label outside a damaged meta's classes is reported in the batch that holds it, citing the meta.
            assert message.startswith(f"{batches / name}: ") or (
                message.startswith(f"{batches}") and name in message), message
            event(f"refused: {message.split(': ', 1)[1][:24]}")  # --hypothesis-show-statistics shows the mix
            return
    event(f"read ({'meta' if name == 'batches.meta' else 'batch'})")
    classes = len(source.classes)
    for split in source.splits.values():
        assert split.labels.dtype == np.int64 and split.pixels.dtype == np.uint8
        assert split.pixels.shape == (len(split.labels), 32, 32, 3) and len(split.labels) > 0
        assert ((split.labels >= 0) & (split.labels < classes)).all()
    if not intact:  # a damaged pickle that still loads (say, a protocol byte overwritten) passes the checks
        return
    if name == "batches.meta":
        names = obj[b"label_names"]
        assert source.classes == tuple(n.decode() if isinstance(n, bytes) else n for n in names)
        return
    split = source.splits["test" if name == "test_batch" else "train"]
    rows = _segment(split.labels, name)
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in obj.items()}
    np.testing.assert_array_equal(split.labels[rows], np.asarray(batch["labels"]))
    expected_pixels = np.asarray(batch["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(split.pixels[rows], expected_pixels)


# --- ImageFolder trees ---------------------------------------------------------------------------------

SIDE = 8
# (suffix, Pillow format, mode) that Pillow writes
IMAGE_KINDS = [
    (".png", "PNG", mode) for mode in ("RGB", "L", "P", "RGBA", "1", "I;16", "LA")
] + [(".jpg", "JPEG", mode) for mode in ("RGB", "L", "CMYK")] + [
    (".bmp", "BMP", mode) for mode in ("RGB", "L", "P", "1")
] + [(".webp", "WEBP", mode) for mode in ("RGB", "RGBA")] + [(".JPEG", "JPEG", "RGB")]

# What an entry is: "good" must read; "maybe" may read or be named (a cut may fall after the pixel data);
# "bad" must be named; "ignored" must be skipped (hidden, or not an image suffix).
ENTRY_KINDS = {
    "image": "good", "other size": "good", "truncated": "maybe", "arbitrary bytes": "maybe",
    "zero bytes": "bad", "directory": "bad", "dangling link": "bad", "looping link": "bad",
    "hidden": "ignored", "text": "ignored",
}


@dataclass(frozen=True)
class Entry:
    kind: str
    image: tuple[str, str, str]
    cut: float
    junk: bytes


# Mostly valid images, so that trees read as often as they are refused.
ENTRIES = st.builds(Entry, st.sampled_from(["image"] * len(ENTRY_KINDS) + list(ENTRY_KINDS)),
                    st.sampled_from(IMAGE_KINDS), st.floats(0.0, 0.99), st.binary(min_size=1, max_size=40))


@st.composite
def image_trees(draw) -> dict[str, dict[str, list[Entry]]]:
    """split -> class -> entries; now and then a split without class directories."""
    tree = {}
    for split in draw(st.lists(st.sampled_from(["train", "test", "val"]), min_size=1, max_size=2, unique=True)):
        classes = draw(st.permutations(["cat", "dog", "ship"]))[: draw(st.sampled_from([3, 3, 2, 2, 1, 0]))]
        tree[split] = {name: draw(st.lists(ENTRIES, min_size=1, max_size=3)) for name in classes}
    return tree


def _image_bytes(image: tuple[str, str, str], size: tuple[int, int]) -> bytes:
    _, image_format, mode = image
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert(mode).save(buffer, format=image_format)
    return buffer.getvalue()


def _write_entry(class_dir: Path, position: int, entry: Entry) -> Path:
    path = class_dir / f"{position}{entry.image[0]}"
    match entry.kind:
        case "image" | "other size":
            path.write_bytes(_image_bytes(entry.image, (SIDE, SIDE) if entry.kind == "image" else (SIDE - 2, SIDE)))
        case "truncated":
            payload = _image_bytes(entry.image, (SIDE, SIDE))
            path.write_bytes(payload[: int(entry.cut * len(payload))] or payload[:1])
        case "arbitrary bytes":
            path.write_bytes(entry.junk)
        case kind if kind in UNUSABLE_ENTRIES:
            write_unusable_entry(path, kind)
        case "hidden":
            path = class_dir / f"._{position}.png"  # macOS metadata twin of an image
            path.write_bytes(entry.junk)
        case "text":
            path = class_dir / f"{position}.txt"
            path.write_bytes(entry.junk)
    return path


def _write_tree(root: Path, tree: dict[str, dict[str, list[Entry]]]) -> dict[Path, str]:
    """Writes the tree; returns every path an error may name, with its kind (directories: 'empty')."""
    named = {}
    for split, classes in tree.items():
        (root / split).mkdir(parents=True)
        if not classes:
            named[root / split] = "empty"
        for class_name, entries in classes.items():
            class_dir = root / split / class_name
            class_dir.mkdir()
            for position, entry in enumerate(entries):
                named[_write_entry(class_dir, position, entry)] = entry.kind
            if all(ENTRY_KINDS[entry.kind] == "ignored" for entry in entries):
                named[class_dir] = "empty"
    return named


def _named_path(error: SourceError) -> Path:
    return Path(str(error).split(": ", 1)[0])


def _sizes_differ(tree: dict[str, dict[str, list[Entry]]]) -> bool:
    """Whether a split mixes images of two sizes, which is refused unless image_size resizes them."""
    for classes in tree.values():
        kinds = {entry.kind for entries in classes.values() for entry in entries}
        if "other size" in kinds and kinds & {"image", "truncated"}:
            return True
    return False


@settings(READER_SETTINGS, max_examples=150)
@given(image_trees(), st.sampled_from([None, SIDE]))
def test_any_imagefolder_tree_reads_correctly_or_is_named(tree, image_size):
    sizes_differ = image_size is None and _sizes_differ(tree)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory) / "folder"
        kinds = _write_tree(root, tree)
        verdicts = {ENTRY_KINDS.get(kind, kind) for kind in kinds.values()}  # directories: "empty"
        must_read = not sizes_differ and verdicts <= {"good", "ignored"}
        try:
            source = read_imagefolder(root)
            for split in source.splits.values():
                expected_size = first_image_size(split.files[0]) if image_size is None else None
                for path in split.files:
                    pixels = load_image_file(path, image_size, expected_size)
                    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
                    assert image_size is None or pixels.shape == (SIDE, SIDE, 3)
        except SourceError as error:
            named = _named_path(error)
            assert not must_read, f"a valid tree was refused: {error}"
            assert named in kinds, f"the error names {named}, not an entry of the tree: {error}"
            verdict = ENTRY_KINDS.get(kinds[named], kinds[named])
            assert verdict in ("bad", "maybe", "empty") or (sizes_differ and "image is" in str(error)), (
                f"a {kinds[named]} entry was named: {error}")
            event(f"refused: {kinds[named]}")
            return
    event("read")
    assert not verdicts & {"bad", "empty"}, f"read without error: {kinds}"
    assert source.classes == tuple(sorted({name for classes in tree.values() for name in classes}))
    for split_name, split in source.splits.items():
        expected_labels = [source.classes.index(class_name) for class_name, entries in tree[split_name].items()
                           for entry in entries if ENTRY_KINDS[entry.kind] != "ignored"]
        assert sorted(split.labels.tolist()) == sorted(expected_labels)
