"""A flow run's directory as evaluate leaves it, for the publish step and the flow's publish task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.config import build_config
from tasks.contracts import parse_record
from tasks.data.manifest import Manifest
from tasks.judging.evaluate import Evaluation, write_evaluation
from tasks.layout import RunLayout
from tests.support.evaluation import evaluation_record

BASELINE, VIT = "resnet18_cifar", "vit_tiny_patch4_32"
SPLIT = "a" * 64
MANIFEST = {
    "dataset": "cifar10", "classes": [str(c) for c in range(10)],
    "splits": {"test": {"num_samples": 200, "class_counts": [20] * 10, "shards": [
        {"name": "test-000001.tar", "num_samples": 100, "sha256": "2" * 64, "bytes": 1},
        {"name": "test-000000.tar", "num_samples": 100, "sha256": "1" * 64, "bytes": 1}]},
               "val": {"num_samples": 80, "class_counts": [8] * 10, "held_out_from": "train", "shards": [
        {"name": "val-000000.tar", "num_samples": 80, "sha256": "4" * 64, "bytes": 1}]}},
    "fingerprint": "f" * 64, "image_format": "npy", "version": 2,
}


def manifest_of(data: dict) -> Manifest:
    """`data` (a manifest.json's content, such as MANIFEST) as read from disk."""
    return parse_record(Manifest, json.dumps(data), "a test's manifest")


@pytest.fixture
def evaluated_run(tmp_path, monkeypatch):
    """A flow run's directory as evaluate leaves it: evaluation.json, the models' weights, the shards' manifest,
    the report and an offline W&B run."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("DATA_ROOT", raising=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps(MANIFEST))
    config = build_config({
        "data": {"shard_dir": str(shards)},
        "model": {"baseline": {"name": BASELINE}, "transformers": [{"name": VIT}]},
        "tracking": {"output_dir": str(tmp_path / "runs"), "run_name": "weekly", "flow_run": "weekly-2",
                     "regression_margin": 0.02},
    })
    records = []
    for name, top1 in ((BASELINE, 0.81), (VIT, 0.75)):
        weights = RunLayout.of(config).weights(name)
        weights.parent.mkdir(parents=True)
        weights.write_bytes(f"weights of {name}".encode())
        records.append(evaluation_record(name, top1, role="x", weights=str(weights)))
    run_dir = Path(config.run_dir)
    write_evaluation(run_dir / "evaluation.json", Evaluation(records, MANIFEST["classes"]))
    (run_dir / "report").mkdir()
    (run_dir / "report" / "report.html").write_text("<html></html>")
    (run_dir / "wandb" / "offline-run-20260101_000000-weekly-2-train-vit-0123456789").mkdir(parents=True)
    return config
