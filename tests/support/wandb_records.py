"""Read the records of an offline W&B run file (`run-<id>.wandb`) without the network or `wandb sync`.

The file is a 7-byte header (":W&B", a 2-byte key, a version byte) followed by the LevelDB log
format: 32 KiB blocks of chunks, each chunk a 7-byte header (crc32c, little-endian length, type)
and its payload; a record is one FULL chunk or FIRST, MIDDLE..., LAST. Each record is a
`wandb_internal_pb2.Record` protobuf. CRCs are not checked: the tests want the content.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if not data:  # created, never written: the writer died first
        return
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no :W&B header)")
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block or a file cut short
            position += left_in_block
            continue
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history_rows(path: Path) -> list[dict]:
    """Every logged history row in file order: {"_step": step, key: value, ...}."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows
