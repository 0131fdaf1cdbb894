import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main as cli
from tasks.data.manifest import MANIFEST_NAME, read_manifest, verify_shards
from tasks.data.samples import ShardFormatError, decode_image, decode_label, iter_samples
from tasks.data.shard import ShardOptions, check_holdout, shard_dataset
from tasks.data.sources import SourceError, read_cifar10, read_imagefolder
from tests.conftest import REPO_ROOT, SUBSET_TEST, SUBSET_TRAIN
from tests.support.source_files import PIXELS_PER_IMAGE, valid_batch, write_cifar_dir, write_unusable_entry


def _samples(location: str, split: str) -> dict[str, dict]:
    manifest = read_manifest(location)
    samples = {}
    for shard in manifest.splits[split].shards:
        with open(Path(location) / shard.name, "rb") as stream:
            for sample in iter_samples(stream, shard.name):
                samples[sample["__key__"]] = sample
    return samples


def test_subset_counts_and_class_counts(subset_shards, cifar_source):
    manifest = read_manifest(subset_shards)
    assert manifest.dataset == "cifar10"
    assert manifest.classes[:2] == ["airplane", "automobile"]
    assert manifest.splits["train"].num_samples == SUBSET_TRAIN
    assert manifest.splits["test"].num_samples == SUBSET_TEST
    for split in ("train", "test"):
        expected = np.bincount(cifar_source.splits[split].labels, minlength=10).tolist()
        assert manifest.splits[split].class_counts == expected
        shards = manifest.splits[split].shards
        assert sum(s.num_samples for s in shards) == manifest.splits[split].num_samples
    assert [s.num_samples for s in manifest.splits["train"].shards] == [1000] * 5 + [85]
    assert len(manifest.fingerprint) == 64


def test_images_are_byte_identical_to_source(subset_shards, cifar_source):
    for split in ("train", "test"):
        samples = _samples(subset_shards, split)
        source = cifar_source.splits[split]
        assert len(samples) == len(source)
        for index in (0, 1, 2, len(source) - 1):
            sample = samples[f"{split}_{index:07d}"]
            pixels = decode_image(sample)
            assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
            assert pixels.tobytes() == source.pixels[index].tobytes()
            assert decode_label(sample) == source.labels[index]


def test_png_format_is_lossless(tmp_path, data_root, cifar_source):
    location = str(tmp_path / "png")
    shard_dataset("cifar10", data_root, location, ShardOptions(shard_size=5000, image_format="png", workers=1),
                  progress=False)
    sample = _samples(location, "test")["test_0000000"]
    assert "png" in sample and "npy" not in sample
    assert decode_image(sample).tobytes() == cifar_source.splits["test"].pixels[0].tobytes()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_png_of_any_colour_type_decodes_to_rgb(mode):
    buffer = io.BytesIO()
    Image.new(mode, (5, 3)).save(buffer, format="PNG")
    pixels = decode_image({"__key__": "k", "png": buffer.getvalue()})
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 5, 3)


def test_undecodable_png_names_the_sample():
    with pytest.raises(ShardFormatError, match="'train_0000007'.*png"):
        decode_image({"__key__": "train_0000007", "png": b"\x89PNG\r\n\x1a\n not really"})


def test_rerun_is_idempotent_and_option_change_rebuilds(tmp_path, data_root, capsys):
    out = str(tmp_path / "shards")
    args = ["-q", "shard", "--data-root", str(data_root), "--out", out, "--workers", "1", "--shard-size", "4000"]
    assert cli(args) == 0
    first = (tmp_path / "shards" / "train-000000.tar").stat().st_mtime_ns
    assert "written" in capsys.readouterr().out
    assert cli(args) == 0
    assert "up to date, nothing to do" in capsys.readouterr().out
    assert (tmp_path / "shards" / "train-000000.tar").stat().st_mtime_ns == first

    assert cli(args[:-1] + ["3000"]) == 0
    assert "written" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    assert names == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert verify_shards(out).ok
    assert not list((tmp_path / "shards").glob("*.partial")) and not list((tmp_path / "shards").glob(".staging-*"))


def test_same_input_gives_byte_identical_shards_in_process_or_pooled(tmp_path, data_root):
    for name, workers in (("a", 2), ("b", 1)):
        shard_dataset("cifar10", data_root, str(tmp_path / name), ShardOptions(shard_size=3000, workers=workers),
                      progress=False)
    for shard in (tmp_path / "a").glob("*.tar"):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def _write_image(path: Path, size=(8, 8), mode="RGB", fmt="PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=128 if mode == "L" else (10, 20, 30)).save(path, format=fmt)


def test_imagefolder_converts_modes_and_rejects_wrong_size_by_name(tmp_path):
    root = tmp_path / "folder"
    _write_image(root / "train" / "cat" / "a.png")
    _write_image(root / "train" / "cat" / "gray.png", mode="L")
    _write_image(root / "train" / "dog" / "b.jpg", fmt="JPEG")
    _write_image(root / "train" / "dog" / "rgba.png", mode="RGBA")
    _write_image(root / "test" / "dog" / "c.png")
    options = ShardOptions(shard_size=2, workers=1)
    result = shard_dataset("imagefolder", root, str(tmp_path / "ok"), options, progress=False)
    assert result.manifest.classes == ["cat", "dog"]
    assert result.manifest.splits["train"].class_counts == [2, 2]
    assert verify_shards(str(tmp_path / "ok")).ok

    _write_image(root / "train" / "dog" / "big.png", size=(16, 12))
    with pytest.raises(SourceError, match=r"big\.png: image is 16x12"):
        shard_dataset("imagefolder", root, str(tmp_path / "bad"), options, progress=False)
    assert not (tmp_path / "bad" / MANIFEST_NAME).exists()
    assert not list((tmp_path / "bad").glob("*.tar"))

    resize = ShardOptions(shard_size=10, image_size=8, workers=1)
    resized = shard_dataset("imagefolder", root, str(tmp_path / "resized"), resize, progress=False)
    assert resized.manifest.splits["train"].num_samples == 5
    (root / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SourceError, match=r"broken\.png: not a readable image"):
        shard_dataset("imagefolder", root, str(tmp_path / "broken"), resize, progress=False)


def test_resharding_into_fewer_shards_removes_the_ones_no_longer_listed(tmp_path):
    root = tmp_path / "folder"
    for name in "abcde":
        _write_image(root / "train" / "cat" / f"{name}.png")
    _write_image(root / "test" / "cat" / "f.png")
    out = tmp_path / "out"
    shard_dataset("imagefolder", root, str(out), ShardOptions(shard_size=2, workers=1), progress=False)
    assert len(list(out.glob("train-*.tar"))) == 3
    shard_dataset("imagefolder", root, str(out), ShardOptions(shard_size=10, workers=1), progress=False)
    assert sorted(path.name for path in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
    assert verify_shards(str(out)).ok


def test_cli_names_bad_input(tmp_path, capsys):
    assert cli(["shard", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "data.data_root" in capsys.readouterr().err
    assert cli(["shard", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no CIFAR-10 python batches" in capsys.readouterr().err
    assert cli(["shard", "--out", "pipe:cat /etc/passwd", "--data-root", str(tmp_path)]) == 2
    assert "pipe:" in capsys.readouterr().err


# --- malformed sources: a SourceError naming the file, before anything is written ------------------------

def _batch_with(**changes) -> bytes:
    batch = valid_batch(0)
    for key, value in changes.items():
        if value is MISSING:
            del batch[key.encode()]
        else:
            batch[key.encode()] = value
    return pickle.dumps(batch, protocol=2)


MISSING = object()
TWO_ROWS = np.zeros((2, PIXELS_PER_IMAGE), dtype=np.uint8)


# id: (file replaced, its bytes, what the SourceError must say after the file's path)
MALFORMED_CIFAR = {
    "label-too-large": ("data_batch_3", _batch_with(labels=[0, 3]), r"sample 1 has label 3, outside 0\.\.2"),
    "label-negative": ("test_batch", _batch_with(labels=[-1, 0]), r"sample 0 has label -1, outside 0\.\.2"),
    "fewer-labels-than-rows": ("data_batch_1", _batch_with(labels=[0]), r"1 labels for 2 images"),
    "float-labels": ("data_batch_1", _batch_with(labels=[0.0, 1.5]), r"labels is a 1-d array of float64"),
    "bool-labels": ("data_batch_1", _batch_with(labels=[True, False]), r"labels is a 1-d array of bool"),
    "text-labels": ("data_batch_1", _batch_with(labels=["0", "1"]), r"labels is a 1-d array of <U1"),
    "2d-labels": ("data_batch_1", _batch_with(labels=[[0], [1]]), r"labels is a 2-d array"),
    "huge-int-label": ("data_batch_1", _batch_with(labels=[2**70, 0]), r"labels is a 1-d array of object"),
    "no-labels": ("data_batch_2", _batch_with(labels=MISSING), r"no 'labels' entry \(it has 'batch_label', 'data'"),
    "no-data": ("data_batch_2", _batch_with(data=MISSING), r"no 'data' entry"),
    "wrong-pixel-count": ("data_batch_4", _batch_with(data=TWO_ROWS[:, :-1]), r"data has shape \(2, 3071\)"),
    "1d-data": ("data_batch_4", _batch_with(data=TWO_ROWS.ravel()), r"data is a 1-d array of uint8"),
    "float-pixels": ("data_batch_4", _batch_with(data=TWO_ROWS.astype(np.float32)), r"data is a 2-d array of float32"),
    "pixels-over-255": ("data_batch_4", _batch_with(data=TWO_ROWS.astype(np.int16) + 300),
                        r"pixel values span 300\.\.300"),
    "ragged-data": ("data_batch_4", _batch_with(data=[[0] * 3072, [0]]), r"data is not an array"),
    "not-a-dict": ("data_batch_5", pickle.dumps([TWO_ROWS, [0, 1]]), r"not a CIFAR-10 batch \(a list"),
    "truncated-pickle": ("data_batch_5", _batch_with()[:-40], r"not a readable CIFAR-10 batch \(\w+Error"),
    "empty-file": ("data_batch_5", b"", r"not a readable CIFAR-10 batch \(EOFError"),
    "garbage-bytes": ("data_batch_5", b"\x00garbage" * 10, r"not a readable CIFAR-10 batch"),
    "code-in-pickle": ("data_batch_5", b"cos\nsystem\n(S'true'\ntR.", r"refusing to load os\.system"),
    "empty-test-split": ("test_batch", _batch_with(data=TWO_ROWS[:0], labels=[]),
                         r"the test batches \(test_batch\) hold no images"),
    "meta-without-names": ("batches.meta", pickle.dumps({b"num_vis": 3072}), r"no 'label_names' entry"),
    "meta-names-not-text": ("batches.meta", pickle.dumps({b"label_names": [1, 2]}),
                            r"label_names must be a list of class names"),
    "meta-names-repeated": ("batches.meta", pickle.dumps({b"label_names": [b"cat", b"cat"]}),
                            r"label_names must be distinct"),
}


@pytest.mark.parametrize("name,payload,message", MALFORMED_CIFAR.values(), ids=MALFORMED_CIFAR.keys())
def test_malformed_cifar_batch_is_named(tmp_path, name, payload, message):
    batches = write_cifar_dir(tmp_path, {name: payload})
    with pytest.raises(SourceError, match=message) as raised:
        read_cifar10(tmp_path)
    named = batches if message.startswith("the test batches") else batches / name
    assert str(raised.value).startswith(f"{named}: ")


def test_rewritten_cifar_batches_read_like_the_originals(tmp_path):
    """str keys, pickle's default protocol (numpy's raw-buffer path), int64 pixels and numpy labels are fine."""
    original = read_cifar10(write_cifar_dir(tmp_path / "original"))
    batch = {key.decode(): value for key, value in valid_batch(0).items()}
    batch["data"] = batch["data"].astype(np.int64)
    batch["labels"] = np.asarray(batch["labels"], dtype=np.uint8)
    rewritten = read_cifar10(write_cifar_dir(tmp_path / "rewritten", {"data_batch_1": pickle.dumps(batch)}))
    for split in ("train", "test"):
        np.testing.assert_array_equal(rewritten.splits[split].labels, original.splits[split].labels)
        np.testing.assert_array_equal(rewritten.splits[split].pixels, original.splits[split].pixels)
    assert rewritten.classes == ("cat", "dog", "ship")


def _assert_refused_by_cli(args: list[str], out: Path, words: list[str], capsys, workers: int = 1) -> None:
    assert cli(["-q", "shard", *args, "--out", str(out), "--workers", str(workers)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_cli_names_out_of_range_label_and_writes_nothing(tmp_path, capsys):
    batches = write_cifar_dir(tmp_path / "cifar", {"data_batch_3": _batch_with(labels=[2, 10])})
    out = tmp_path / "shards"
    _assert_refused_by_cli(["--data-root", str(tmp_path / "cifar")], out, [str(batches / "data_batch_3"),
                           "sample 1 has label 10"], capsys)
    assert not out.exists()


@pytest.mark.parametrize("below", ["", "shards"])
def test_cli_names_an_out_path_under_a_file(tmp_path, capsys, below):
    write_cifar_dir(tmp_path / "cifar")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / below if below else blocker
    _assert_refused_by_cli(["--data-root", str(tmp_path / "cifar")], out, [str(out), str(blocker), "is a file"], capsys)
    assert blocker.read_text() == "not a directory"


def test_cli_names_a_looping_symlink_out_path(tmp_path, capsys):
    write_cifar_dir(tmp_path / "cifar")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    _assert_refused_by_cli(["--data-root", str(tmp_path / "cifar")], loop / "shards", [str(loop), "symbolic link"],
                           capsys)


def _image_tree(root: Path) -> None:
    for split, names in (("train", ["a.png", "b.png"]), ("test", ["c.png"])):
        for name in names:
            _write_image(root / split / "cat" / name)
            _write_image(root / split / "dog" / name)


def _spoil(root: Path, kind: str) -> Path:
    """One malformation of an _image_tree; returns the path the error must name."""
    if kind == "empty class directory":
        (root / "train" / "bird").mkdir()
        return root / "train" / "bird"
    if kind == "split without classes":
        (root / "extra").mkdir()
        return root / "extra"
    write_unusable_entry(root / "train" / "cat" / "z.png", kind)
    return root / "train" / "cat" / "z.png"


@pytest.mark.parametrize("kind,message", [
    ("empty class directory", "no images"),
    ("split without classes", "no class directories"),
    ("zero bytes", "empty file"),
    ("directory", "not a regular file"),
    ("dangling link", "cannot be read"),
    ("looping link", "cannot be read"),
])
def test_malformed_imagefolder_tree_is_named_before_sharding(tmp_path, kind, message):
    root = tmp_path / "folder"
    _image_tree(root)
    named = _spoil(root, kind)
    with pytest.raises(SourceError, match=message) as raised:
        shard_dataset("imagefolder", root, str(tmp_path / "out"), ShardOptions(shard_size=2, workers=1),
                      progress=False)
    assert str(raised.value).startswith(f"{named}: ")
    assert not (tmp_path / "out").exists()


def test_hidden_and_non_image_files_are_skipped(tmp_path):
    root = tmp_path / "folder"
    _image_tree(root)
    (root / "train" / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata twin
    (root / "train" / "cat" / "notes.txt").write_text("hello")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    source = read_imagefolder(root)
    assert source.classes == ("cat", "dog")
    assert len(source.splits["train"]) == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_undecodable_image_keeps_the_previous_shards_and_manifest(tmp_path, capsys, workers):
    root = tmp_path / "folder"
    _image_tree(root)
    out = tmp_path / "shards"
    assert cli(["-q", "shard", "--dataset", "imagefolder", "--data-root", str(root), "--out", str(out),
                "--shard-size", "2", "--workers", "1"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    truncated = root / "train" / "dog" / "t.png"
    _write_image(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:-30])  # cut inside the image data
    _assert_refused_by_cli(["--dataset", "imagefolder", "--data-root", str(root), "--image-size", "8",
                            "--shard-size", "2"], out, [str(truncated), "not a readable image"], capsys, workers)
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before
    assert verify_shards(str(out)).ok and not list(out.glob(".staging-*"))


def test_validation_split_is_held_out_of_train_stratified_seeded_and_recorded(val_shards, cifar_source, tmp_path,
                                                                              data_root):
    from tasks.data.shard import stratified_holdout
    from tests.conftest import SUBSET_VAL

    manifest = read_manifest(val_shards)
    val = manifest.splits["val"]
    assert val.num_samples == SUBSET_VAL and val.held_out_from == "train"
    train_keys, val_keys = set(_samples(val_shards, "train")), set(_samples(val_shards, "val"))
    assert not train_keys & val_keys
    assert train_keys | val_keys == {f"train_{i:07d}" for i in range(SUBSET_TRAIN)}
    # Stratified: each class gives its proportional share, off by less than one image.
    source_counts = np.bincount(cifar_source.splits["train"].labels, minlength=10)
    assert all(abs(v - c * SUBSET_VAL / SUBSET_TRAIN) < 1 for v, c in zip(val.class_counts, source_counts,
                                                                          strict=True))
    assert [a + b for a, b in zip(val.class_counts, manifest.splits["train"].class_counts, strict=True)] \
        == source_counts.tolist()
    labels = cifar_source.splits["train"].labels
    assert np.array_equal(stratified_holdout(labels, 500, seed=0), stratified_holdout(labels, 500, seed=0))
    assert not np.array_equal(stratified_holdout(labels, 500, seed=0), stratified_holdout(labels, 500, seed=1))
    with pytest.raises(SourceError, match="data.val_size 5085 holds out 5085 of the 5085 training images"):
        shard_dataset("cifar10", data_root, str(tmp_path / "all"), ShardOptions(shard_size=5000, val_size=5085),
                      progress=False)


def test_the_shipped_hold_out_fits_the_subset_and_one_that_swallows_its_training_split_is_refused(
        tmp_path, data_root, capsys):
    """configs/cifar10.yaml holds out a tenth: 508 of the subset's 5,085 training images. A count meant for full
    CIFAR-10 (5,000) would leave 85 to train on: refused by name, before anything is written."""
    shipped = ["-q", "shard", "--config", str(REPO_ROOT / "configs" / "cifar10.yaml"), "--data-root", str(data_root),
               "--workers", "1"]
    assert cli([*shipped, "--out", str(tmp_path / "shipped")]) == 0
    splits = read_manifest(str(tmp_path / "shipped")).splits
    assert (splits["val"].num_samples, splits["train"].num_samples) == (508, SUBSET_TRAIN - 508)

    swallowed = tmp_path / "swallowed"
    _assert_refused_by_cli(["--config", str(REPO_ROOT / "configs" / "cifar10.yaml"), "--data-root", str(data_root),
                            "--set", "data.val_size=5000"], swallowed,
                           ["data.val_size 5000", "5000 of the 5085 training images", "leaving 85 to train on"],
                           capsys)
    assert read_manifest(str(swallowed)) is None
    # Half and half is the most a hold-out may take.
    check_holdout(SUBSET_TRAIN // 2, SUBSET_TRAIN // 2, "cifar10", SUBSET_TRAIN)
    with pytest.raises(SourceError, match=f"leaving {SUBSET_TRAIN // 2} to train on"):
        check_holdout(SUBSET_TRAIN // 2 + 1, SUBSET_TRAIN // 2 + 1, "cifar10", SUBSET_TRAIN)
