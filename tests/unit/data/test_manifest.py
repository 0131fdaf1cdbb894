"""manifest.json as a Manifest: read back as written, its keys on disk unchanged, a bad field named with its file;
and the shards checked against it (verify_shards, check_shard_sizes)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import fsspec
import pytest

from flows.cli import EXIT_BAD_INPUT, main
from tasks.data.manifest import MANIFEST_NAME, check_shard_sizes, read_manifest, verify_shards, write_manifest
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


# --- the shards checked against it -------------------------------------------------------------------------

@pytest.fixture
def shard_copy(subset_shards, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(subset_shards, target)
    assert verify_shards(str(target)).ok
    return target


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as archive:
        return archive.getmembers()


def _assert_verify_fails(location: Path, shard: str, words: str, capsys) -> None:
    report = verify_shards(str(location))
    assert not report.ok
    assert any(problem.startswith(shard) and words in problem for problem in report.problems), report.problems
    assert main(["verify-shards", str(location)]) == 1
    assert shard in capsys.readouterr().err


def test_verify_catches_truncation_mid_member(shard_copy, capsys):
    shard = shard_copy / "train-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: _members(shard)[7].offset_data + 100])
    _assert_verify_fails(shard_copy, "train-000002.tar", "truncated inside member", capsys)


def test_verify_catches_truncation_at_member_boundary(shard_copy, capsys):
    shard = shard_copy / "test-000000.tar"
    data = shard.read_bytes()
    cut = _members(shard)[-2].offset  # the header of the last sample's last member
    shard.write_bytes(data[:cut])
    with tarfile.open(shard) as archive:  # tarfile itself reads this without complaint
        assert len(archive.getmembers()) == len(_members(shard))
    _assert_verify_fails(shard_copy, "test-000000.tar", "end-of-archive", capsys)
    assert any("holds" in p for p in verify_shards(str(shard_copy)).problems)


def test_verify_catches_flipped_byte(shard_copy, capsys):
    shard = shard_copy / "train-000004.tar"
    data = bytearray(shard.read_bytes())
    data[_members(shard)[11].offset_data + 200] ^= 0x01
    shard.write_bytes(bytes(data))
    _assert_verify_fails(shard_copy, "train-000004.tar", "sha256", capsys)


def test_verify_catches_missing_and_extra_shard(shard_copy, capsys):
    (shard_copy / "train-000001.tar").rename(shard_copy / "train-000099.tar")
    _assert_verify_fails(shard_copy, "train-000001.tar", "missing", capsys)
    _assert_verify_fails(shard_copy, "train-000099.tar", "unknown shard", capsys)


def test_the_size_check_names_missing_resized_and_unknown_shards_without_reading_any(shard_copy):
    assert check_shard_sizes(str(shard_copy)).ok and check_shard_sizes(str(shard_copy)).shards_checked == 8
    recorded = read_manifest(str(shard_copy)).splits["train"].shards[2].bytes
    with open(shard_copy / "train-000002.tar", "r+b") as shard:
        shard.truncate(4096)
    (shard_copy / "train-000001.tar").rename(shard_copy / "train-000099.tar")
    assert check_shard_sizes(str(shard_copy)).problems == [
        "train-000001.tar: missing", f"train-000002.tar: size is 4096 bytes, manifest says {recorded}",
        "train-000099.tar: unknown shard, not in the manifest"]
    (shard_copy / MANIFEST_NAME).unlink()
    assert check_shard_sizes(str(shard_copy)).problems == [f"{shard_copy / MANIFEST_NAME}: missing"]


def test_verify_catches_duplicate_key_and_missing_manifest(shard_copy, capsys, tmp_path):
    shard = shard_copy / "train-000005.tar"
    with tarfile.open(shard) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member, payload in members[:-2] + members[:2]:
            archive.addfile(member, io.BytesIO(payload))
    _assert_verify_fails(shard_copy, "train-000005.tar", "duplicate sample key", capsys)
    (shard_copy / MANIFEST_NAME).unlink()
    _assert_verify_fails(shard_copy, str(shard_copy / MANIFEST_NAME), "missing", capsys)


def test_verify_refuses_pickle_payloads(shard_copy, capsys):
    shard = shard_copy / "test-000000.tar"
    with tarfile.open(shard, "a") as archive:
        payload = b"cos\nsystem\n(S'touch /tmp/owned'\ntR."
        info = tarfile.TarInfo("test_9999999.pkl")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    _assert_verify_fails(shard_copy, "test-000000.tar", ".pkl payload", capsys)
