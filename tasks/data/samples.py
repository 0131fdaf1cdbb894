"""The on-disk sample format shared by the shard writer, verify-shards and the loader.

A sample is a run of tar members named `<key>.<ext>`: `cls` (the label as ASCII digits) and one
image, `npy` (raw H x W x 3 uint8, the fast default) or `png` (lossless, portable).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from tasks.errors import ShardFormatError

IMAGE_EXTENSIONS = ("npy", "png")
# Payloads that deserialise into code; a shard carrying one is refused, never loaded.
UNSAFE_EXTENSIONS = {"pth", "pt", "pkl", "pickle", "pyd", "joblib", "ckpt"}
LABEL_EXTENSION = "cls"
# A sample as read from a shard: "__key__" -> the sample's key (str), every extension -> its member's bytes.
Sample = dict[str, Any]
TAR_BLOCK = 512
ZERO_BLOCK = bytes(TAR_BLOCK)
NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype]] = {}


def encode_sample(key: str, pixels: np.ndarray, label: int, image_format: str) -> dict[str, bytes | str]:
    if image_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(pixels, dtype=np.uint8), allow_pickle=False)
        image = buffer.getvalue()
    else:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        image = buffer.getvalue()
    return {"__key__": key, image_format: image, LABEL_EXTENSION: str(int(label)).encode()}


def decode_image(sample: Sample) -> np.ndarray:
    if "npy" in sample:
        return decode_npy(sample["npy"])
    if "png" in sample:
        return decode_png_rgb(sample["png"], sample.get("__key__"))
    raise ShardFormatError(f"sample {sample.get('__key__')!r} has no image ({', '.join(IMAGE_EXTENSIONS)})")


def decode_png_rgb(payload: bytes, key: str | None) -> np.ndarray:
    """H x W x 3 uint8 from PNG bytes, any PNG colour type. torchvision's libpng call costs ~40 us for a CIFAR
    image against PIL's ~57 us, most of it per-call overhead at this size (benchmarks/README.md)."""
    # Here, not with the module: the flows import the shard step's module where torch is not installed.
    import torch
    from torchvision.io import ImageReadMode, decode_png

    try:
        # bytearray: torch.frombuffer needs a writable buffer; the copy of a few KiB is cheap.
        image = decode_png(torch.frombuffer(bytearray(payload), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise ShardFormatError(f"sample {key!r}: undecodable png ({error})") from None
    return image.permute(1, 2, 0).numpy()


def decode_label(sample: Sample) -> int:
    try:
        return int(sample[LABEL_EXTENSION])
    except (KeyError, ValueError):
        raise ShardFormatError(f"sample {sample.get('__key__')!r} has no integer '{LABEL_EXTENSION}'") from None


def decode_npy(payload: bytes) -> np.ndarray:
    """Raw uint8 image from .npy bytes. The header is parsed once per distinct header (all samples
    of a shard share one), which makes decoding a zero-copy view instead of a literal_eval each."""
    if payload[:6] != NPY_MAGIC:
        raise ShardFormatError("npy payload lacks the NumPy magic")
    if payload[6:8] != b"\x01\x00":  # np.save writes version 1.0 for any image-sized header
        return _checked_image(np.load(io.BytesIO(payload), allow_pickle=False))
    header_end = 10 + int.from_bytes(payload[8:10], "little")
    header = payload[:header_end]
    layout = _NPY_HEADERS.get(header)
    if layout is None:
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(payload[8:header_end]))
        if fortran_order:
            raise ShardFormatError("npy image must be C-order")
        layout = _NPY_HEADERS[header] = (shape, dtype)
    shape, dtype = layout
    return _checked_image(np.frombuffer(payload, dtype=dtype, offset=header_end).reshape(shape))


def _checked_image(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ShardFormatError(f"npy image must be uint8 H x W x 3, got {image.dtype} {image.shape}")
    return image


def _split_member_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot:
        raise ShardFormatError(f"tar member {name!r} has no extension")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _octal(field: bytes, what: str, shard_name: str) -> int:
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardFormatError(f"{shard_name}: corrupt tar header ({what} {field!r})") from None


def _pax_path(records: bytes) -> str | None:
    for line in records.decode("utf-8", "replace").splitlines():
        _, _, record = line.partition(" ")
        if record.startswith("path="):
            return record[len("path=") :]
    return None


def iter_tar_files(stream: BinaryIO, shard_name: str) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of every regular file in a tar stream.

    A small reader of its own because it is the loader's hot path (tarfile costs ~50 us a member) and
    because it must be stricter than tarfile: a header checksum mismatch, a member cut short, and an
    archive that ends without the end-of-archive zero block (a tar cut at a member boundary) all raise.
    """
    offset, long_name = 0, None
    while True:
        header = _read_exact(stream, TAR_BLOCK)
        if len(header) < TAR_BLOCK:
            raise ShardFormatError(f"{shard_name}: truncated (no end-of-archive marker after byte {offset})")
        if header == ZERO_BLOCK:
            return
        stored = _octal(header[148:156], "checksum", shard_name)
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise ShardFormatError(f"{shard_name}: corrupt tar header at byte {offset}")
        if header[124] & 0x80:
            raise ShardFormatError(f"{shard_name}: member at byte {offset} is larger than a shard member may be")
        size = _octal(header[124:136], "size", shard_name)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and prefix:
            name = f"{prefix}/{name}"
        padded = size + (-size % TAR_BLOCK)
        payload = _read_exact(stream, padded)
        if len(payload) < padded:
            raise ShardFormatError(f"{shard_name}: truncated inside member {long_name or name!r}")
        offset += TAR_BLOCK + padded
        payload = payload[:size]
        kind = header[156:157]
        if kind in (b"x", b"g"):
            long_name = _pax_path(payload) or long_name
        elif kind == b"L":
            long_name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            yield long_name or name, payload
            long_name = None
        else:
            long_name = None


def iter_samples(stream: BinaryIO, shard_name: str) -> Iterator[Sample]:
    """Yield samples of a tar stream in order, refusing unsafe payloads and malformed archives."""
    current: Sample = {}
    for member_name, payload in iter_tar_files(stream, shard_name):
        key, extension = _split_member_name(member_name)
        if extension in UNSAFE_EXTENSIONS:
            raise ShardFormatError(
                f"{shard_name}: sample {key!r} carries a .{extension} payload, which can run code "
                "when loaded; refusing the shard"
            )
        if current and current["__key__"] != key:
            yield current
            current = {}
        current["__key__"] = key
        current[extension] = payload
    if current:
        yield current
