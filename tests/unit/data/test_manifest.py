"""manifest.json as a Manifest: read back as written, its keys on disk unchanged, a bad field named with its file."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from flows.cli import EXIT_BAD_INPUT, main
from tasks.data.manifest import MANIFEST_NAME, read_manifest, write_manifest
from tasks.data.samples import ShardFormatError

# The contract other steps and W&B read: these keys, in this order.
MANIFEST_KEYS = ["dataset", "classes", "splits", "fingerprint", "image_format", "version"]
SPLIT_KEYS = ["num_samples", "class_counts", "shards"]
HELD_OUT_SPLIT_KEYS = [*SPLIT_KEYS, "held_out_from"]
SHARD_KEYS = ["name", "num_samples", "sha256", "bytes"]


def test_the_manifest_on_disk_keeps_its_keys(val_shards):
    stored = json.loads((Path(val_shards) / MANIFEST_NAME).read_text())
    assert list(stored) == MANIFEST_KEYS
    assert list(stored["splits"]) == ["train", "val", "test"]
    assert list(stored["splits"]["train"]) == list(stored["splits"]["test"]) == SPLIT_KEYS
    assert list(stored["splits"]["val"]) == HELD_OUT_SPLIT_KEYS
    assert all(list(shard) == SHARD_KEYS for split in stored["splits"].values() for shard in split["shards"])


@pytest.mark.parametrize("shards", ["subset_shards", "val_shards"])
def test_a_manifest_reads_back_as_written_byte_for_byte(shards, request, tmp_path):
    location = request.getfixturevalue(shards)
    manifest = read_manifest(location)
    assert json.dumps(manifest.to_json(), indent=2) == (Path(location) / MANIFEST_NAME).read_text()
    fs, root = fsspec.core.url_to_fs(str(tmp_path))
    write_manifest(fs, root, manifest)
    assert read_manifest(str(tmp_path)) == manifest
    assert (tmp_path / MANIFEST_NAME).read_bytes() == (Path(location) / MANIFEST_NAME).read_bytes()


def _spoil(stored: dict, where: list, value) -> None:
    *path, last = where
    for key in path:
        stored = stored[key]
    if value is None:
        del stored[last]
    else:
        stored[last] = value


@pytest.mark.parametrize(("where", "value", "named"), [
    (["fingerprint"], None, "field 'fingerprint' missing"),
    (["classes"], "airplane", "field 'classes'"),
    (["splits", "test", "shards", 0, "bytes"], "12", "field 'splits.test.shards.0.bytes': input should be a valid "
                                                      "integer"),
    (["splits", "test", "num_samples"], 1.5, "field 'splits.test.num_samples'"),
    (["splits", "val", "held_out_from"], 3, "field 'splits.val.held_out_from'"),
])
def test_a_missing_or_wrongly_typed_field_is_named_with_its_file(val_shards, tmp_path, capsys, where, value, named):
    stored = json.loads((Path(val_shards) / MANIFEST_NAME).read_text())
    _spoil(stored, where, value)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(stored))
    with pytest.raises(ShardFormatError) as raised:
        read_manifest(str(tmp_path))
    assert str(raised.value).startswith(f"{tmp_path}/{MANIFEST_NAME}: ") and named in str(raised.value)
    assert main(["verify-shards", str(tmp_path)]) == EXIT_BAD_INPUT  # by name, no traceback
    assert named in capsys.readouterr().err


def test_a_manifest_that_is_not_json_is_named(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(ShardFormatError, match=rf"{MANIFEST_NAME}: not valid JSON"):
        read_manifest(str(tmp_path))
