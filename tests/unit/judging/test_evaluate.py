"""Evaluate step: the metrics on hand-computed cases, and evaluation.json from real shards."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from tasks.data.loader import ShardStream
from tasks.judging.evaluate import (
    ECE_BINS,
    classification_metrics,
    count_gflops,
    evaluate_models,
    expected_calibration_error,
    markdown_table,
    predict,
)
from tests.conftest import SUBSET_VAL
from tests.support.evaluation import RECORD_KEYS, save_random_weights, tiny_config

# 5 samples, 3 classes; labels and the logits' arg-max chosen so every count below is known.
LOGITS = np.array([
    [4.0, 1.0, 0.0],  # true 0, predicted 0
    [0.0, 3.0, 1.0],  # true 1, predicted 1
    [2.0, 0.0, 1.0],  # true 1, predicted 0 (top-2 misses: 0 > 2 > 1)
    [0.0, 0.0, 5.0],  # true 2, predicted 2
    [1.0, 0.5, 2.0],  # true 0, predicted 2
])
LABELS = np.array([0, 1, 1, 2, 0])


def test_metrics_match_hand_counts():
    metrics = classification_metrics(LOGITS, LABELS, num_classes=3)
    assert metrics["top1"] == pytest.approx(3 / 5)
    assert metrics["top5"] == 1.0  # 3 classes: the top "5" is every class
    assert metrics["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 1]]
    assert metrics["per_class_accuracy"] == pytest.approx([0.5, 0.5, 1.0])
    per_sample = [math.log(np.exp(row).sum()) - row[label] for row, label in zip(LOGITS, LABELS, strict=True)]
    expected_loss = np.mean(per_sample)
    assert metrics["loss"] == pytest.approx(expected_loss)
    assert metrics["test_samples"] == 5


def test_top5_and_a_class_without_samples():
    logits = np.tile(np.arange(7.0), (2, 1))  # ranking 6 > 5 > 4 > 3 > 2 > 1 > 0
    metrics = classification_metrics(logits, np.array([2, 1]), num_classes=7)
    assert metrics["top5"] == 0.5  # class 2 is 5th, class 1 is 6th
    assert metrics["top1"] == 0.0
    assert metrics["per_class_accuracy"][0] is None


def test_ece_by_hand():
    # bin (0.6, 0.667]: confidence 0.65 twice, one right -> |0.5 - 0.65|; bin (0.933, 1]: 1.0, right -> 0
    confidence = np.array([0.65, 0.65, 1.0])
    correct = np.array([True, False, True])
    assert expected_calibration_error(confidence, correct, ECE_BINS) == pytest.approx(2 / 3 * 0.15)


def test_perfectly_calibrated_is_zero_and_overconfident_is_not():
    confidence = np.full(10, 0.7)
    assert expected_calibration_error(confidence, np.arange(10) < 7) == pytest.approx(0.0)
    assert expected_calibration_error(confidence, np.arange(10) < 2) == pytest.approx(0.5)


class FixedLogits(nn.Module):
    """Predicts class 3 for every image, so accuracy and the confusion matrix follow from the label counts."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), 10)
        logits[:, 3] = 1.0
        return logits


def test_predict_sees_every_test_sample_once(subset_shards, tmp_path):
    config = tiny_config(tmp_path, subset_shards)
    stream = ShardStream(subset_shards, "test", 100, train=False)
    logits, labels = predict(FixedLogits(), stream, config, torch.device("cpu"))
    assert logits.shape == (1017, 10) and labels.shape == (1017,)
    metrics = classification_metrics(logits, labels, 10)
    counts = np.bincount(labels, minlength=10)
    assert metrics["top1"] == pytest.approx(counts[3] / 1017)
    assert [row[3] for row in metrics["confusion_matrix"]] == counts.tolist()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, val_shards):
    config = tiny_config(tmp_path_factory.mktemp("evaluate"), val_shards)
    save_random_weights(config)
    return config, evaluate_models(config)


def test_evaluation_json_lists_every_model(evaluated):
    config, records = evaluated
    stored = json.loads((config.run_dir / "evaluation.json").read_text())
    names = [spec.name for spec in config.model.all_specs()]
    assert [record["model"] for record in stored["models"]] == names
    assert all(list(record) == RECORD_KEYS for record in stored["models"])  # evaluation.json's keys, in order
    assert stored["classes"][0] == "airplane" and len(stored["classes"]) == 10
    for record in stored["models"]:
        assert record["test_samples"] == 1017
        assert sum(map(sum, record["confusion_matrix"])) == 1017
        assert 0 <= record["top1"] <= record["top5"] <= 1
        assert record["params"] > 0 and record["gflops"] > 0
        assert record["images_per_s"] > 0 and record["latency_ms"] > 0
        assert record["train_seconds"] is None  # no metrics.json: never trained
        assert record["val_samples"] == SUBSET_VAL and 0 <= record["val_top1"] <= 1
        assert record["device"] == "cpu"
    assert stored["models"][0]["role"] == "baseline"


def test_training_cost_from_metrics_json(evaluated, tmp_path):
    config, _ = evaluated
    config = config.model_copy(deep=True)
    config.tracking.output_dir = tmp_path / "runs"
    weights = save_random_weights(config)
    history = [{"epoch": e, "images_per_s": speed} for e, speed in ((1, 100.0), (2, 300.0))]
    vit = "vit_tiny_patch4_32"
    (weights[vit].parent / "metrics.json").write_text(json.dumps({"history": history, "train_seconds": 1800.0}))
    config.scaling.num_workers, config.scaling.cpus_per_worker = 2, 3
    [record] = evaluate_models(config, {vit: weights[vit]})
    assert record.train_seconds == 1800.0
    assert record.train_images_per_s == 200.0
    assert record.device_hours == pytest.approx(0.5 * 2 * 3)
    assert record.device_kind == "cpu"


def test_missing_weights_are_named(tmp_path, subset_shards):
    config = tiny_config(tmp_path, subset_shards)
    with pytest.raises(FileNotFoundError, match="resnet10t.*best.safetensors"):
        evaluate_models(config)


def test_markdown_table_has_a_row_per_model(evaluated):
    _, records = evaluated
    lines = markdown_table(records).strip().splitlines()
    assert len(lines) == 2 + len(records)
    for record, line in zip(records, lines[2:], strict=True):
        assert line.startswith(f"| {record.model} | {record.val_top1:.4f} | {record.top1:.4f} |")
        assert line.endswith("| n/a | n/a |")  # never trained: no training time or device hours


def test_wandb_offline_run_holds_the_table(tmp_path, subset_shards):
    config = tiny_config(tmp_path, subset_shards, mode="offline", transformers=[])
    save_random_weights(config)
    evaluate_models(config)
    tables = list((config.run_dir / "wandb").glob("offline-run-*/files/media/table/evaluation_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["data"][0][table["columns"].index("model")] == "resnet10t"


def test_gflops_count_attention_like_the_hand_formula():
    import timm

    import vitmodels  # noqa: F401

    model = timm.create_model("vit_tiny_patch4_32").eval()
    tokens, width, depth, patch_inputs = 65, 192, 12, 4 * 4 * 3
    # per block: qkv + proj + 4x MLP = 12 N D^2 multiply-adds, attention scores and mixing 2 N^2 D
    per_block = 12 * tokens * width**2 + 2 * tokens**2 * width
    macs = depth * per_block + (tokens - 1) * patch_inputs * width + width * 10
    assert count_gflops(model, (3, 32, 32)) == pytest.approx(2 * macs / 1e9, rel=0.01)
