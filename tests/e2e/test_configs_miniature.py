"""Every shipped config, as shipped but shrunk, through the whole pipeline: shard -> train (2 Ray workers) ->
evaluate -> attention maps -> report; a sweep config through its sweep: shard -> Ray Tune trials of that
training, ASHA on -> results.json and best.yaml.

Only sizes shrink (epochs, images, widths and depths, workers, the batch, so that odd batches occur, with
gradient accumulation over two of them); every feature a config switches on stays on. A config that trains at
another resolution than CIFAR-10's 32 px keeps a resize, at MINIATURE_RESIZED px. A pretrained model starts from
a checkpoint the test writes (random weights of the shrunk architecture at the preset's own resolution, 1000
classes, so that position embeddings, Swin tables and heads are adapted), the hub being out of reach. A config
added to configs/ is picked up here by itself, and a model family this file cannot shrink fails by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import save_file
from timm.models.resnet import ResNet as TimmResNet

from flows.pipeline import vit_pipeline
from flows.sweep import vit_sweep
from tasks.config import PipelineConfig, TrainingConfig, get_dotted, load_config
from tasks.data.loader import ShardStream
from tasks.data.manifest import read_manifest
from tasks.data.sources import read_cifar10
from tasks.judging.evaluate import read_evaluation
from tasks.layout import RunLayout
from tasks.operations.sweep import BEST_CONFIG_FILE, RESULTS_FILE
from tasks.training.recipe import effective_lr, global_batch
from tests.conftest import MINI_TEST_IMAGES, REPO_ROOT
from vitmodels import ResNet, SwinTransformer, VisionTransformer

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
VAL_IMAGES = 80  # of MINI_TRAIN_IMAGES
# 400 training images over 2 ranks in batches of at most 27: 8 batches of 25 per rank, odd-sized.
BATCH_SIZE = 27
EPOCHS = 3
SWEEP_TRIALS = 2  # one after the other: two trainings of two workers each would share two cores
MINIATURE_WORKERS = 2
SOURCE_SIZE = 32  # CIFAR-10's images
MINIATURE_RESIZED = 48  # the training resolution of a config that resizes (224 px as shipped)
# Tiny widths and depths per family, keeping what makes the family what it is (Swin: two blocks per stage,
# so shifted windows run; DeiT: its distillation token and head).
SHRUNK = [
    (SwinTransformer, {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2]}),
    (VisionTransformer, {"embed_dim": 32, "depth": 1, "num_heads": 2}),
    (ResNet, {"channels": [8, 16, 32, 64], "layers": [1, 1, 1, 1]}),
    (TimmResNet, {"channels": [8, 16, 32, 64], "layers": [1, 1, 1, 1], "stem_width": 8}),
]


def shrunk_model_kwargs(name: str, image_size: int) -> dict:
    with torch.device("meta"):
        model = timm.create_model(name)
    for family, kwargs in SHRUNK:
        if isinstance(model, family):
            if isinstance(model, SwinTransformer):
                return {**kwargs, "img_size": image_size, "window_size": swin_window(model, image_size)}
            if isinstance(model, VisionTransformer):
                return {**kwargs, "img_size": image_size}
            return dict(kwargs)
    pytest.fail(f"{name} ({type(model).__name__}): no miniature size for this model family; add it to SHRUNK")


def swin_window(model: SwinTransformer, image_size: int) -> int:
    """The largest window up to the preset's that tiles both miniature stages with shifted windows."""
    grid = image_size // model.patch_embed.patch_size[0]
    preset = model.layers[0].blocks[0].window_size[0]
    return next(w for w in range(preset, 0, -1) if grid % w == 0 and (grid // 2) % w == 0 and grid // 2 > w)


def miniature_checkpoint(name: str, model_kwargs: dict, directory: Path) -> Path:
    """Random weights of the shrunk architecture at the preset's own resolution and window, 1000 classes: what
    a hub checkpoint is to the full-size model."""
    native = {key: value for key, value in model_kwargs.items() if key not in ("img_size", "window_size")}
    model = timm.create_model(name, num_classes=1000, **native)
    path = directory / f"{name}.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


def miniature(config: PipelineConfig, data_root: Path, output_dir: Path) -> PipelineConfig:
    """The shipped config with only its sizes shrunk; every switch is left as it is."""
    tree = config.model_dump(mode="json")
    # The CIFAR-10 images as they are, or resized when the shipped config trains at another size.
    image_size = SOURCE_SIZE if config.data.image_size in (None, SOURCE_SIZE) else MINIATURE_RESIZED
    tree["data"] |= {"data_root": str(data_root), "shard_dir": None, "shard_size": 100, "shard_workers": 1,
                     "loader_workers": min(tree["data"]["loader_workers"], 1), "val_size": VAL_IMAGES,
                     "shuffle_buffer": 100, "image_size": config.data.image_size and image_size}
    checkpoints = output_dir / "checkpoints"
    for spec in [tree["model"]["baseline"], *tree["model"]["transformers"]]:
        spec["model_kwargs"] = {**spec["model_kwargs"], **shrunk_model_kwargs(spec["name"], image_size)}
        if spec["pretrained"] or spec["pretrained_file"]:
            checkpoints.mkdir(parents=True, exist_ok=True)
            spec |= {"pretrained": False,
                     "pretrained_file": str(miniature_checkpoint(spec["name"], spec["model_kwargs"], checkpoints))}
    tree["training"] |= {"epochs": EPOCHS, "batch_size": BATCH_SIZE, "grad_accum_steps": 2,
                         "warmup_epochs": min(tree["training"]["warmup_epochs"], 1.0), "log_every_steps": 2}
    if config.training.lr_reference_batch is not None:
        # DeiT's scaling by the global batch would lower the LR with the miniature's batch, a size; the reference
        # shrinks with it instead, so the miniature trains at the shipped run's LR.
        shipped_batch = global_batch(config.training, config.scaling.num_workers)
        miniature_batch = global_batch(TrainingConfig.model_validate(tree["training"]), MINIATURE_WORKERS)
        tree["training"]["lr_reference_batch"] = max(
            1, round(config.training.lr_reference_batch * miniature_batch / shipped_batch))
    tree["scaling"] |= {"num_workers": MINIATURE_WORKERS, "use_gpu": False, "cpus_per_worker": 1,
                        "gpus_per_worker": 0, "ray_address": None, "ray_num_cpus": 4}
    tree["tracking"] |= {"output_dir": str(output_dir), "mode": "offline"}
    tree["orchestration"] |= {"retries": 0, "max_concurrent_trainings": 2}
    if tree.get("sweep"):
        # ASHA's first rung at the same share of the shorter budget, at least one epoch.
        scheduler = tree["sweep"]["scheduler"]
        scheduler["grace_period"] = max(1, round(scheduler["grace_period"] * EPOCHS / config.training.epochs))
        tree["sweep"] |= {"num_trials": min(tree["sweep"]["num_trials"], SWEEP_TRIALS), "max_concurrent_trials": 1}
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
    if config.sweep is not None:
        try:
            best = vit_sweep(config=config)
        finally:
            ray.shutdown()
        check_sweep(config, best)
        return
    try:
        result = vit_pipeline(config=config)
    finally:
        ray.shutdown()
    # The flow writes into a directory of its own flow run: look there.
    config = config.model_copy(deep=True)
    config.tracking.flow_run = Path(result["run_dir"]).name
    assert Path(config.run_dir) == Path(result["run_dir"])

    location = config.shard_location
    train, val, test = (_keys(location, split) for split in ("train", "val", "test"))
    assert len(val) == VAL_IMAGES and not val & train and not (val | train) & test
    assert len(train) + len(val) == len(read_cifar10(mini_cifar).splits["train"])
    assert read_manifest(location).splits["val"].held_out_from == "train"

    evaluation = {record.model: record for record in read_evaluation(config).models}
    assert set(evaluation) == {spec.name for spec in config.model.all_specs()}
    for name, record in evaluation.items():
        history = record_history(config, name)
        losses = [epoch["train_loss"] for epoch in history]
        assert all(math.isfinite(loss) for loss in losses), (name, losses)
        # Counted from the first epoch that trains the whole model: a frozen backbone runs in eval mode (BatchNorm
        # on running statistics, no drop-path), another function than the one trained after it.
        assert losses[-1] < losses[config.training.freeze_backbone_epochs], (name, losses)
        # The weights evaluate scores are the ones training selected, and score the same on validation.
        assert record.train_val_top1 == history[record.best_epoch - 1]["val_acc"]
        assert record.val_top1 == pytest.approx(record.train_val_top1, abs=1.5 / VAL_IMAGES), name
        assert record.test_samples == MINI_TEST_IMAGES
    assert (Path(config.run_dir) / "report" / "report.html").is_file()
    transformers = {spec.name for spec in config.model.transformers}
    assert {p.stem for p in (Path(config.run_dir) / "attention").glob("*.png")} == transformers
    distilled = [s for s in config.model.transformers if s.distillation != "none"]
    for spec in distilled:
        assert "train_loss_distillation" in record_history(config, spec.name)[0]
    # W&B offline: the publish step leaves what it would link, every model with its test score, for later.
    plan = json.loads((Path(config.run_dir) / "registry.json").read_text())
    assert result["published"] == {"registry_plan": str(Path(config.run_dir) / "registry.json"), "linked": {},
                                  "regressions": []}
    assert {entry["model"]: entry["metadata"]["test_top1"] for entry in plan["models"]} == \
        {name: record.top1 for name, record in evaluation.items()}


def check_sweep(config: PipelineConfig, best: PipelineConfig) -> None:
    """Every trial trained on the shards' own validation split and sampled the declared space; best.yaml is the
    best trial's configuration, the flow's result, and loads."""
    (run_dir,) = [path.parents[1] for path in Path(config.run_root).glob(f"*/sweep/{RESULTS_FILE}")
                  if not path.parents[1].is_symlink()]  # not runs/<run>/latest
    location = config.shard_location
    assert not _keys(location, "val") & _keys(location, "train")
    results = json.loads((run_dir / "sweep" / RESULTS_FILE).read_text())
    trials = results["trials"]
    assert len(trials) == SWEEP_TRIALS and results["metric"] == config.sweep.metric
    scores = [trial[f"best_{config.sweep.metric}"] for trial in trials]
    assert all(math.isfinite(score) for score in scores) and scores == sorted(scores, reverse=True)
    for trial in trials:
        assert trial["status"] in ("completed", "stopped early") and 1 <= trial["epochs"] <= EPOCHS, trial
        assert Path(trial["checkpoint"]).is_dir()
        assert set(trial["parameters"]) == set(config.sweep.parameters)
        for parameter, value in trial["parameters"].items():
            dimension = config.sweep.parameters[parameter]
            if dimension.choice is not None:
                assert value in dimension.choice, (parameter, value)
            else:
                low, high = dimension.uniform or dimension.loguniform
                assert low <= value <= high, (parameter, value)
    chosen = load_config(run_dir / "sweep" / BEST_CONFIG_FILE)
    assert chosen == best and chosen.sweep is None
    for parameter, value in trials[0]["parameters"].items():
        assert get_dotted(chosen.model_dump(mode="json"), parameter) == value, parameter


def record_history(config: PipelineConfig, name: str) -> list[dict]:
    return json.loads(RunLayout.of(config).metrics(name).read_text())["history"]


def test_miniature_keeps_every_switch(data_root, tmp_path, monkeypatch):
    """The shrinking touches sizes only: every boolean, choice and rate of each shipped config survives it."""
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    for path in CONFIGS:
        shipped = load_config(path)
        shrunk = miniature(shipped, data_root, tmp_path)
        assert shrunk.data.augment == shipped.data.augment, path.name
        for before, after in zip(shipped.model.all_specs(), shrunk.model.all_specs(), strict=True):
            kept = {"model_kwargs", "pretrained", "pretrained_file"}
            assert before.model_dump(exclude=kept) == after.model_dump(exclude=kept), path.name
            assert before.is_pretrained == after.is_pretrained, path.name
        resized = shipped.data.image_size not in (None, SOURCE_SIZE)
        assert (shrunk.data.image_size not in (None, SOURCE_SIZE)) == resized, path.name
        for field in ("ema_decay", "ema_warmup", "bf16", "compile", "channels_last", "grad_clip_norm", "lr",
                      "layer_decay", "backbone_lr_scale", "freeze_backbone_epochs"):
            assert getattr(shrunk.training, field) == getattr(shipped.training, field), (path.name, field)
        assert (shrunk.training.lr_reference_batch is None) == (shipped.training.lr_reference_batch is None)
        if shipped.sweep is not None:
            shrunk_fields = {"num_trials", "max_concurrent_trials", "scheduler"}
            assert shrunk.sweep.model_dump(exclude=shrunk_fields) == shipped.sweep.model_dump(exclude=shrunk_fields)
            assert shrunk.sweep.scheduler.name == shipped.sweep.scheduler.name, path.name
            assert shrunk.sweep.scheduler.reduction_factor == shipped.sweep.scheduler.reduction_factor, path.name
        assert effective_lr(shrunk.training, MINIATURE_WORKERS) == pytest.approx(
            effective_lr(shipped.training, shipped.scaling.num_workers), rel=0.01), path.name
