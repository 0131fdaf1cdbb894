"""`vit-pipeline predict`: real CIFAR-10 test images as PNG files, classified as evaluate classifies them."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import main
from tasks.data.loader import ShardStream
from tasks.inference.predict import find_images
from tasks.judging.attention import grid_pixel_size
from tasks.judging.evaluate import load_trained_model, predict
from tasks.layout import LATEST_LINK, RunLayout
from tests.support.inference import TINY_VIT, png_test_images, trained_run

VIT = TINY_VIT["name"]
IMAGES = 24


@pytest.fixture
def run(tmp_path, mini_shards):
    return trained_run(tmp_path, mini_shards)


@pytest.fixture
def pngs(tmp_path, mini_shards):
    return png_test_images(mini_shards, tmp_path / "images", IMAGES)


def _evaluate_top3(config, mini_shards) -> tuple[list[list[str]], np.ndarray]:
    """The top-3 labels and probabilities of evaluate's forward pass on the first IMAGES test images."""
    stream = ShardStream(mini_shards, "test", IMAGES, train=False)
    model = load_trained_model(config, VIT, RunLayout.of(config).weights(VIT), len(stream.classes))
    logits, _ = predict(model, stream, config, torch.device("cpu"))
    probabilities, indices = torch.from_numpy(logits[:IMAGES]).softmax(1).topk(3, dim=1)
    return [[stream.classes[i] for i in row] for row in indices.tolist()], probabilities.numpy()


def test_predict_on_png_test_images_agrees_with_evaluate(run, pngs, tmp_path, mini_shards, capsys):
    paths, _, _ = pngs
    out = tmp_path / "predictions.csv"
    # A folder, given whole; batches of 5 leave a short last batch.
    code = main(["predict", "--model", f"{run.run_dir}:{VIT}", str(paths[0].parent), "--batch-size", "5",
                 "--top-k", "3", "--output", str(out)])
    assert code == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(p) for p in paths]
    assert list(rows[0]) == ["path", "label_1", "probability_1", "label_2", "probability_2", "label_3",
                             "probability_3", "attention"]
    labels, probabilities = _evaluate_top3(run, mini_shards)
    assert [[row[f"label_{k}"] for k in (1, 2, 3)] for row in rows] == labels
    np.testing.assert_allclose([[float(row[f"probability_{k}"]) for k in (1, 2, 3)] for row in rows],
                               probabilities, atol=2e-6)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{paths[0]}: {rows[0]['label_1']} ") and len(printed) == IMAGES + 1


def test_unreadable_files_are_skipped_by_name_and_the_rest_classified(run, pngs, tmp_path, capsys):
    paths, _, _ = pngs
    corrupt = tmp_path / "images" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(paths[1].read_bytes()[:60])
    missing = tmp_path / "missing.jpg"
    out = tmp_path / "predictions.jsonl"
    code = main(["predict", "--model", f"{run.run_dir}:{VIT}", str(tmp_path / "images" / "*.png"),
                 str(truncated), str(missing), "--output", str(out), "--top-k", "2"])
    assert code == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in paths]  # corrupt.png sorts after them
    assert len(lines[0]["predictions"]) == 2 and set(lines[0]["predictions"][0]) == {"label", "probability"}
    assert lines[0]["attention"] is None
    err = capsys.readouterr().err
    assert f"skipped 3 of {IMAGES + 3} files" in err
    for path in (corrupt, truncated):
        assert f"  {path}: not a readable image" in err
    assert f"  {missing}: no such file" in err
    assert "Traceback" not in err


def test_attention_writes_one_overlay_per_image(tmp_path, mini_shards, capsys):
    swin = {"name": "swin_tiny_patch2_window4_32", "drop_path_rate": 0.0,
            "model_kwargs": {"depths": [2, 2], "num_heads": [3, 6]}}
    run = trained_run(tmp_path, mini_shards, transformers=[TINY_VIT, swin])
    paths, _, _ = png_test_images(mini_shards, tmp_path / "images", 3)
    for name, columns in ((VIT, 1 + (3 + 2)), (swin["name"], 1 + 2)):  # ViT-Ti: 3 heads, mean, rollout
        out = tmp_path / "attention" / name
        assert main(["predict", "--model", f"{run.run_dir}:{name}", *map(str, paths), "--attention", str(out),
                     "--output", str(tmp_path / f"{name}.jsonl")]) == 0
        written = sorted(out.glob("*.png"))
        assert [p.name for p in written] == [p.name for p in paths]
        for overlay in written:
            with Image.open(overlay) as image:
                assert image.size == grid_pixel_size(1, columns)
                assert np.asarray(image.convert("L")).std() > 0
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert [Path(r["attention"]).name for r in records] == [p.name for p in paths]
        # Each overlay is its own image's: the last image alone draws as in the batch of three (but for a colour
        # level here and there: a batch of one runs other kernels).
        alone = tmp_path / "attention" / f"{name}-alone"
        assert main(["predict", "--model", f"{run.run_dir}:{name}", str(paths[-1]), "--attention", str(alone)]) == 0
        with Image.open(alone / paths[-1].name) as single, Image.open(written[-1]) as batched:
            assert np.abs(np.asarray(single, dtype=int) - np.asarray(batched, dtype=int)).max() <= 2
    # A ResNet has no attention: predictions still, and a warning instead of overlays.
    assert main(["predict", "--model", f"{run.run_dir}:resnet10t", str(paths[0]), "--attention",
                 str(tmp_path / "attention" / "resnet")]) == 0
    assert not (tmp_path / "attention" / "resnet").exists()


def test_the_demos_reference_form_from_the_project_directory(tmp_path, mini_shards, monkeypatch, capsys):
    """`make demo` leaves runs/smoke/<flow run>/ and runs/smoke/latest -> it; the README's command then works."""
    monkeypatch.chdir(tmp_path)
    config = trained_run(tmp_path, mini_shards, flow_run="smoke-0123abcd")
    (Path(config.run_root) / LATEST_LINK).symlink_to("smoke-0123abcd", target_is_directory=True)
    paths, _, _ = png_test_images(mini_shards, tmp_path / "images", 2)
    ref = f"{os.path.relpath(config.run_root, tmp_path)}/{LATEST_LINK}:{VIT}"
    assert ref == f"runs/eval/{LATEST_LINK}:{VIT}"
    assert main(["predict", "--model", ref, os.path.relpath(paths[0], tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("images/000-")


@pytest.mark.parametrize("arguments, message", [
    (["--model", "runs/nowhere/latest:vit_tiny_patch4_32", "{image}"], "run directory runs/nowhere/latest does not"),
    (["--model", "{model}", "{image}", "--output", "p.txt"], "--output p.txt: the name must end in .csv or .jsonl"),
    (["--model", "{model}", "{image}", "--top-k", "0"], "--top-k 0 and --batch-size 64 must be at least 1"),
    (["--model", "{model}", "{folder}/*.jpg"], "no image files in"),
])
def test_bad_input_exits_2_without_a_traceback(run, pngs, arguments, message, capsys):
    paths, _, _ = pngs
    values = {"model": f"{run.run_dir}:{VIT}", "image": str(paths[0]), "folder": str(paths[0].parent)}
    assert main(["predict", *(argument.format(**values) for argument in arguments)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_find_images_searches_folders_and_globs_once_each(tmp_path):
    for name in ("a/x.png", "a/b/y.JPG", "a/b/notes.txt", "c.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found, missing = find_images([str(tmp_path / "a"), str(tmp_path / "**" / "*.png"), str(tmp_path / "c.webp"),
                                  str(tmp_path / "*.gif")])
    assert found == [tmp_path / "a/b/y.JPG", tmp_path / "a/x.png", tmp_path / "c.webp"]
    assert [(m.path, m.reason) for m in missing] == [(tmp_path / "*.gif", "the pattern matches no file")]
