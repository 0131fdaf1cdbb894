import hashlib
import io

from tasks.digests import file_sha256, json_sha256, update_with_file


def test_file_sha256_reads_a_path_or_an_open_file_in_blocks(tmp_path):
    content = bytes(range(256)) * 41  # not a multiple of the block size
    path = tmp_path / "blob"
    path.write_bytes(content)
    expected = hashlib.sha256(content).hexdigest()
    assert file_sha256(path) == file_sha256(str(path)) == expected
    assert file_sha256(io.BytesIO(content), block=1000) == expected


def test_update_with_file_continues_a_digest(tmp_path):
    (tmp_path / "a").write_bytes(b"first")
    digest = hashlib.sha256(b"name")
    update_with_file(digest, tmp_path / "a", block=2)
    assert digest.hexdigest() == hashlib.sha256(b"namefirst").hexdigest()


def test_json_sha256_ignores_key_order_and_strs_what_json_cannot_encode(tmp_path):
    assert json_sha256({"b": 1, "a": [2, 3]}) == json_sha256({"a": [2, 3], "b": 1})
    assert json_sha256({"a": 1}) == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert json_sha256([tmp_path]) == json_sha256([str(tmp_path)])
