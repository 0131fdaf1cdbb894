"""The models' input size follows data.image_size: img_size (and a Swin's window) are derived from it, a checkpoint
of the preset's resolution is resampled to it, and a size a model cannot take fails at load naming the fields."""

from __future__ import annotations

import math

import pytest

from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.data.shard import ShardOptions, shard_dataset
from tasks.layout import BEST_WEIGHTS
from tasks.models import build_model
from tasks.training.checkpoints import checkpoint_dirs
from tasks.training.train_loop import TrainingJob, run_training
from tasks.training.worker_context import LocalContext
from tests.conftest import REPO_ROOT
from tests.e2e.test_configs_miniature import miniature_checkpoint, shrunk_model_kwargs

FINETUNE = REPO_ROOT / "configs" / "finetune.yaml"
VIT, DEIT, SWIN = "vp_vit_base_patch16_224", "vp_deit_small_distilled_patch16_224", "vp_swin_tiny_patch4_window7_224"
SIZE_KEYWORDS = ("img_size", "window_size")


def test_the_finetune_models_are_built_for_data_image_size(monkeypatch, data_root):
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    shipped = load_config(FINETUNE)
    assert all(spec.build_kwargs == spec.model_kwargs for spec in shipped.model.all_specs())  # 224 px: the presets'
    at_32 = load_config(FINETUNE, ["data.image_size=32"])
    assert at_32.model.spec("resnet50").build_kwargs == {}  # any input size
    assert at_32.model.spec(VIT).build_kwargs == at_32.model.spec(DEIT).build_kwargs == {"img_size": 32}
    # 32 px in 4 px patches is an 8 x 8 grid: Swin-T's 7 x 7 windows do not tile it, 4 x 4 ones do.
    assert at_32.model.spec(SWIN).build_kwargs == {"img_size": 32, "window_size": 4}
    # What Ray workers get: the configuration as JSON, validated again.
    assert PipelineConfig.model_validate_json(at_32.model_dump_json()).model.spec(SWIN).build_kwargs == \
        {"img_size": 32, "window_size": 4}


@pytest.mark.parametrize(("overrides", "messages"), [
    (["data.image_size=32", "model.transformers.0.model_kwargs.img_size=224"],
     ["model.transformers.0.model_kwargs.img_size (224) differs from data.image_size (32)"]),
    (["data.image_size=40"],
     ["model.transformers.0 (vp_vit_base_patch16_224) cannot take the images of data.image_size (40): 40 px is no "
      "whole number of its 16 px patches", "model.transformers.2 (vp_swin_tiny_patch4_window7_224) cannot take"]),
    (["data.image_size=32", "model.transformers.2.model_kwargs.window_size=7"],
     ["model.transformers.2 (vp_swin_tiny_patch4_window7_224) cannot take the images of data.image_size (32): "
      "window_size 7 does not tile every stage's token grid at 32 px",
      "change data.image_size or model.transformers.2.model_kwargs"]),
])
def test_a_size_a_model_cannot_take_fails_at_load_naming_both_fields(monkeypatch, data_root, overrides, messages):
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    with pytest.raises(ConfigError) as raised:
        load_config(FINETUNE, overrides)
    for message in messages:
        assert message in str(raised.value)


def test_unset_image_size_is_cifar10s_own(monkeypatch, data_root):
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    config = load_config(FINETUNE, ["data.image_size=null", "data.augment.random_resized_crop=false"])
    assert config.model.spec(VIT).build_kwargs == {"img_size": 32}
    with pytest.raises(ConfigError, match=r"img_size \(224\) differs from data.image_size \(unset: CIFAR-10's own "
                                          r"32 px\)"):
        load_config(FINETUNE, ["data.image_size=null", "data.augment.random_resized_crop=false",
                               "model.transformers.0.model_kwargs.img_size=224"])


@pytest.mark.slow
def test_the_finetune_recipe_trains_with_only_data_image_size_changed(tmp_path, mini_cifar, monkeypatch):
    """configs/finetune.yaml at 32 px instead of 224, its models shrunk in width and depth only (no size keyword),
    each from a checkpoint of its preset's resolution and window with 1000 classes: every model trains."""
    monkeypatch.setenv("DATA_ROOT", str(mini_cifar))
    tree = load_config(FINETUNE).model_dump(mode="json")
    shards = str(tmp_path / "shards")
    shard_dataset("cifar10", mini_cifar, shards, ShardOptions(shard_size=100, val_size=80, workers=1), progress=False)
    tree["data"] |= {"image_size": 32, "loader_workers": 0}
    for spec in [tree["model"]["baseline"], *tree["model"]["transformers"]]:
        widths = {key: value for key, value in shrunk_model_kwargs(spec["name"], 32).items()
                  if key not in SIZE_KEYWORDS}
        spec |= {"model_kwargs": widths, "pretrained": False,
                 "pretrained_file": str(miniature_checkpoint(spec["name"], widths, tmp_path))}
    # One epoch of the frozen backbone, one of the whole model; compile off: it only makes a CPU test slower.
    tree["training"] |= {"epochs": 2, "batch_size": 48, "warmup_epochs": 1.0, "log_every_steps": 5, "compile": False}
    tree["tracking"] |= {"mode": "disabled", "output_dir": str(tmp_path / "runs")}
    config = PipelineConfig.model_validate(tree)

    teacher = None
    for spec in config.model.all_specs():
        root = tmp_path / spec.name
        root.mkdir()
        job = TrainingJob(config, spec.name, shards, teacher_weights=teacher if spec.teacher == "baseline" else None)
        history = run_training(LocalContext("cpu", checkpoint_root=root), TrainingJob.from_loop_config(
            job.to_loop_config()))  # the configuration as a Ray worker gets it
        assert len(history) == 2 and all(math.isfinite(epoch["train_loss"]) for epoch in history), spec.name
        if spec.name == config.model.baseline.name:
            teacher = str(checkpoint_dirs(root)[0] / BEST_WEIGHTS)
    vit, swin = build_model(config.model.spec(VIT), 10), build_model(config.model.spec(SWIN), 10)
    assert vit.patch_embed.grid_size == (2, 2) and tuple(vit.pos_embed.shape[:2]) == (1, 5)
    assert swin.layers[0].blocks[0].window_size == (4, 4)



def test_a_teacher_named_by_timm_name_is_built_for_data_image_size(monkeypatch, data_root):
    import torch

    from tasks.training.recipe import build_teacher

    monkeypatch.setenv("DATA_ROOT", str(data_root))
    # vit_tiny_patch16_224 takes 224 px only, unless built for another size.
    config = load_config(FINETUNE, ["data.image_size=32", "model.transformers.1.teacher=vit_tiny_patch16_224",
                                    "model.transformers.1.model_kwargs.depth=1"])
    spec = config.model.spec(DEIT)
    assert spec.teacher_build_kwargs == {"img_size": 32}
    teacher = build_teacher(config, spec, 10, None)
    assert teacher(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("teacher", "message"), [
    ("vit_nonexistent", "unknown teacher 'vit_nonexistent'"),
    ("vit_tiny_patch16_224", "model.transformers.1.teacher (vit_tiny_patch16_224) cannot take the images of "
                             "data.image_size (40)"),
])
def test_a_teacher_that_cannot_be_built_fails_at_load_by_name(monkeypatch, data_root, teacher, message):
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    with pytest.raises(ConfigError, match=r"(?s)" + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(FINETUNE, ["data.image_size=40", f"model.transformers.1.teacher={teacher}"])
