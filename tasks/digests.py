"""Content digests: a file's sha256, read in blocks, and the sha256 of a JSON value.

Neutral on purpose (standard library only) so the data, training, operations and flow modules share
one way of hashing without importing one another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any

BLOCK_BYTES = 1 << 20

# A path, or a file already open for reading in binary mode (an fsspec file of a remote shard, say).
FileLike = str | Path | IO[bytes]


def update_with_file(digest: Any, file: FileLike, *, block: int = BLOCK_BYTES) -> None:
    """Feed `file`'s bytes into the hashlib object `digest`, `block` bytes at a time."""
    if isinstance(file, (str, Path)):
        with open(file, "rb") as handle:
            update_with_file(digest, handle, block=block)
        return
    for chunk in iter(lambda: file.read(block), b""):
        digest.update(chunk)


def file_sha256(file: FileLike, *, block: int = BLOCK_BYTES) -> str:
    """Hex sha256 of a file's content, read in blocks so a large file never sits in memory whole."""
    digest = hashlib.sha256()
    update_with_file(digest, file, block=block)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """Hex sha256 of `value` as key-sorted JSON; a value JSON cannot encode (a Path, a datetime) counts
    as its str()."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
