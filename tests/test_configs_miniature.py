"""Every shipped config, as shipped but shrunk, through the whole pipeline: shard -> train (2 Ray workers) ->
evaluate -> attention maps -> report.

Only sizes shrink (epochs, images, widths and depths, workers, the batch, so that odd batches occur, with
gradient accumulation over two of them); every feature a config switches on stays on. A config added to
configs/ is picked up here by itself, and a model family this file cannot shrink fails by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import vit_pipeline
from tasks.config import PipelineConfig, load_config
from tasks.evaluate import read_evaluation
from tasks.loader import ShardStream
from tasks.recipe import trained_weights
from tasks.shard import read_manifest
from tasks.sources import read_cifar10
from tests.conftest import MINI_TEST_IMAGES, REPO_ROOT
from vitmodels import ResNet, SwinTransformer, VisionTransformer

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
VAL_IMAGES = 80  # of MINI_TRAIN_IMAGES
# 400 training images over 2 ranks in batches of at most 27: 8 batches of 25 per rank, odd-sized.
BATCH_SIZE = 27
EPOCHS = 3
# Tiny widths and depths per family, keeping what makes the family what it is (Swin: two blocks per stage,
# so shifted windows run; DeiT: its distillation token and head).
SHRUNK = [
    (SwinTransformer, {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2]}),
    (VisionTransformer, {"embed_dim": 32, "depth": 1, "num_heads": 2}),
    (ResNet, {"channels": [8, 16, 32, 64], "layers": [1, 1, 1, 1]}),
]


def shrunk_model_kwargs(name: str, image_size: int) -> dict:
    with torch.device("meta"):
        model = timm.create_model(name)
    for family, kwargs in SHRUNK:
        if isinstance(model, family):
            if isinstance(model, VisionTransformer | SwinTransformer):
                return {**kwargs, "img_size": image_size}
            return dict(kwargs)
    pytest.fail(f"{name} ({type(model).__name__}): no miniature size for this model family; add it to SHRUNK")


def miniature(config: PipelineConfig, data_root: Path, output_dir: Path) -> PipelineConfig:
    """The shipped config with only its sizes shrunk; every switch is left as it is."""
    tree = config.model_dump(mode="json")
    image_size = 32  # the CIFAR-10 images, as the shipped recipes train on them
    tree["data"] |= {"data_root": str(data_root), "shard_dir": None, "shard_size": 100, "shard_workers": 1,
                     "loader_workers": min(tree["data"]["loader_workers"], 1), "val_size": VAL_IMAGES,
                     "shuffle_buffer": 100}
    for spec in [tree["model"]["baseline"], *tree["model"]["transformers"]]:
        spec["model_kwargs"] = {**spec["model_kwargs"], **shrunk_model_kwargs(spec["name"], image_size)}
    tree["training"] |= {"epochs": EPOCHS, "batch_size": BATCH_SIZE, "grad_accum_steps": 2,
                         "warmup_epochs": min(tree["training"]["warmup_epochs"], 1.0), "log_every_steps": 2}
    tree["scaling"] |= {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1, "gpus_per_worker": 0,
                        "ray_address": None, "ray_num_cpus": 4}
    tree["tracking"] |= {"output_dir": str(output_dir), "mode": "offline"}
    tree["orchestration"] |= {"retries": 0, "max_concurrent_trainings": 2}
    if tree.get("sweep"):  # the pipeline ignores it; it must still fit the shorter budget
        scheduler = tree["sweep"]["scheduler"]
        scheduler["grace_period"] = min(scheduler["grace_period"], EPOCHS)
    return PipelineConfig.model_validate(tree)


def _keys(location: str, split: str) -> set[str]:
    return {key for _, _, keys in ShardStream(location, split, 256, train=False) for key in keys}


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_shipped_config_runs_in_miniature(path, mini_cifar, tmp_path, monkeypatch, prefect_api):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("DATA_ROOT", str(mini_cifar))
    shipped = load_config(path)
    config = miniature(shipped, mini_cifar, tmp_path / "runs")
    try:
        vit_pipeline(config=config)
    finally:
        ray.shutdown()

    location = config.shard_location
    train, val, test = (_keys(location, split) for split in ("train", "val", "test"))
    assert len(val) == VAL_IMAGES and not val & train and not (val | train) & test
    assert len(train) + len(val) == len(read_cifar10(mini_cifar).splits["train"])
    assert read_manifest(location)["splits"]["val"]["held_out_from"] == "train"

    evaluation = {record["model"]: record for record in read_evaluation(config)["models"]}
    assert set(evaluation) == {spec.name for spec in config.model.all_specs()}
    for name, record in evaluation.items():
        history = record_history(config, name)
        losses = [epoch["train_loss"] for epoch in history]
        assert all(math.isfinite(loss) for loss in losses), (name, losses)
        assert losses[-1] < losses[0], (name, losses)
        # The weights evaluate scores are the ones training selected, and score the same on validation.
        assert record["train_val_top1"] == history[record["best_epoch"] - 1]["val_acc"]
        assert record["val_top1"] == pytest.approx(record["train_val_top1"], abs=1.5 / VAL_IMAGES), name
        assert record["test_samples"] == MINI_TEST_IMAGES
    assert (Path(config.run_dir) / "report" / "report.html").is_file()
    transformers = {spec.name for spec in config.model.transformers}
    assert {p.stem for p in (Path(config.run_dir) / "attention").glob("*.png")} == transformers
    distilled = [s for s in config.model.transformers if s.distillation != "none"]
    for spec in distilled:
        assert "train_loss_distillation" in record_history(config, spec.name)[0]


def record_history(config: PipelineConfig, name: str) -> list[dict]:
    return json.loads((trained_weights(config, name).parent / "metrics.json").read_text())["history"]


def test_miniature_keeps_every_switch(data_root, tmp_path, monkeypatch):
    """The shrinking touches sizes only: every boolean, choice and rate of each shipped config survives it."""
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    for path in CONFIGS:
        shipped = load_config(path)
        shrunk = miniature(shipped, data_root, tmp_path)
        assert shrunk.data.augment == shipped.data.augment, path.name
        for before, after in zip(shipped.model.all_specs(), shrunk.model.all_specs(), strict=True):
            kept = {"model_kwargs"}
            assert before.model_dump(exclude=kept) == after.model_dump(exclude=kept), path.name
        for field in ("ema_decay", "ema_warmup", "bf16", "compile", "channels_last", "grad_clip_norm", "lr"):
            assert getattr(shrunk.training, field) == getattr(shipped.training, field), (path.name, field)
