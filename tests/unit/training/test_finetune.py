"""Fine-tuning: a timm checkpoint of another grid and class count through the training loop, layer-wise LR decay,
the frozen backbone, DeiT's linear LR scaling, the hub checkpoint of a vp_ preset, and `train --pretrained-file`.

The hub is unreachable here: checkpoints are timm models with random weights, saved by the tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from flows.cli import EXIT_BAD_INPUT, main
from tasks.config import ConfigError, build_config, load_config, with_pretrained_file
from tasks.models import build_model
from tasks.training.checkpoints import checkpoint_dirs
from tasks.training.recipe import (
    backbone_to_eval,
    build_optimizer,
    effective_lr,
    freeze_backbone,
    layer_ids,
    warmup_cosine,
)
from tasks.training.train_loop import TrainingJob, run_training, setup
from tasks.training.worker_context import LocalContext
from tests.conftest import REPO_ROOT
from vitmodels import create_model
from vitmodels.factory import hub_weights_id
from vitmodels.pretrained import resample_pos_embed

# timm's ViT-S/16 (224 px, 1000 classes), two blocks deep: the test's stand-in for a hub checkpoint.
CHECKPOINT_DEPTH = 2
FINETUNED = "vp_vit_small_patch16_224"  # our build of the same architecture
TINY_VIT = {"name": "vit_tiny_patch4_32", "drop_path_rate": 0.0,
            "model_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2}}


@pytest.fixture(scope="module")
def vit_s16_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", depth=CHECKPOINT_DEPTH)
    assert model.num_classes == 1000 and model.patch_embed.img_size == (224, 224)
    path = tmp_path_factory.mktemp("checkpoint") / "vit_small_patch16_224.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


def _finetune_config(tmp_path: Path, checkpoint: Path, **training):
    return build_config({
        "data": {"loader_workers": 0},
        "model": {"baseline": {"name": FINETUNED, "pretrained_file": str(checkpoint), "drop_path_rate": 0.1,
                               "model_kwargs": {"depth": CHECKPOINT_DEPTH, "img_size": 32}},
                  "transformers": []},
        "training": {"epochs": 1, "batch_size": 256, "warmup_epochs": 0.2, "bf16": False, "log_every_steps": 50,
                     **training},
        "tracking": {"mode": "disabled", "output_dir": str(tmp_path / "runs"), "run_name": "finetune"},
    })


def test_the_checkpoint_is_loaded_unchanged_but_for_the_head_and_the_resampled_grid(
        tmp_path, val_shards, vit_s16_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="vitmodels"):
        loop = setup(LocalContext("cpu"), TrainingJob(_finetune_config(tmp_path, vit_s16_checkpoint), FINETUNED,
                                                         val_shards))
    assert f"{FINETUNED} from {vit_s16_checkpoint}" in caplog.text and "pos_embed" in caplog.text  # the load report
    checkpoint, loaded = load_file(str(vit_s16_checkpoint)), loop.model.state_dict()
    assert loaded.keys() == checkpoint.keys()
    assert loaded["head.weight"].shape == (10, 384) and checkpoint["head.weight"].shape == (1000, 384)
    for key, value in checkpoint.items():
        if key.startswith("head.") or key == "pos_embed":
            continue
        assert torch.equal(loaded[key], value), key
    # 14 x 14 patch rows resampled to the 2 x 2 grid of 32 px images, the class token's row as it was
    assert torch.equal(loaded["pos_embed"], resample_pos_embed(checkpoint["pos_embed"], (2, 2), num_prefix_tokens=1))
    assert torch.equal(loaded["pos_embed"][:, 0], checkpoint["pos_embed"][:, 0])


@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_layer_decay_and_backbone_scale_give_the_expected_lr_per_parameter(layer_decay):
    training = build_config({"training": {"lr": 1e-3, "layer_decay": layer_decay, "backbone_lr_scale": 0.1,
                                          "batch_size": 64, "lr_reference_batch": 512}}).training
    spec = build_config({"model": {"baseline": TINY_VIT}}).model.baseline
    model = create_model(TINY_VIT["name"], num_classes=10, **TINY_VIT["model_kwargs"])
    optimizer = build_optimizer(model, training, spec, world_size=2)
    lr = 1e-3 * 64 * 2 / 512  # DeiT's linear scaling by the global batch
    # timm's grouping of a 3-block ViT: the stem 0, blocks 1-3 (the final norm with the last), the head 4
    expected_layers = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 1,
                       "blocks.2.mlp.fc2.bias": 3, "norm.weight": 3, "head.weight": 4, "head.bias": 4}
    names = {id(param): name for name, param in model.named_parameters()}
    group_of = {names[id(param)]: group for group in optimizer.param_groups for param in group["params"]}
    lr_of = {name: group["lr"] for name, group in group_of.items()}
    assert len(lr_of) == len(names)
    for name, layer in expected_layers.items():
        decay = 1.0 if layer_decay is None else layer_decay ** (4 - layer)
        backbone = 1.0 if name.startswith("head.") else 0.1
        assert lr_of[name] == pytest.approx(lr * decay * backbone), name
    assert {name: layer_ids(model)[name] for name in expected_layers} == expected_layers
    # The schedule scales every group alike: the ratios hold at every step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 10, 2, 0.01))
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    factor = warmup_cosine(4, 10, 2, 0.01)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(lr * group["lr_scale"] * factor)
    # No weight decay on 1-d parameters and tokens, whatever their LR group.
    decay_of = {name: group["weight_decay"] for name, group in group_of.items()}
    assert decay_of["cls_token"] == decay_of["norm.weight"] == decay_of["head.bias"] == 0.0
    assert decay_of["head.weight"] == decay_of["blocks.0.attn.qkv.weight"] == training.weight_decay


def test_lr_scales_with_the_global_batch_only_when_asked():
    unscaled = build_config({"training": {"lr": 5e-4, "batch_size": 128}}).training
    assert effective_lr(unscaled, world_size=8) == 5e-4
    scaled = unscaled.model_copy(update={"lr_reference_batch": 512, "grad_accum_steps": 2})
    assert effective_lr(scaled, world_size=4) == pytest.approx(5e-4 * 128 * 4 * 2 / 512)


def _backbone_and_head(weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    backbone = {key: value for key, value in weights.items() if not key.startswith("head.")}
    return backbone, {key: value for key, value in weights.items() if key.startswith("head.")}


class _Crash(RuntimeError):
    pass


def _crash_in_epoch_two(epoch: int, step: int, rank: int) -> None:
    if epoch == 1:
        raise _Crash(f"killed at step {step}")


def test_a_frozen_backbone_gets_no_updates_then_trains_and_resumes_across_the_switch(tmp_path, val_shards):
    config = build_config({
        "data": {"loader_workers": 0},
        "model": {"baseline": {**TINY_VIT, "drop_path_rate": 0.1}, "transformers": []},
        "training": {"epochs": 2, "batch_size": 512, "warmup_epochs": 0.2, "bf16": False, "log_every_steps": 50,
                     "freeze_backbone_epochs": 1, "layer_decay": 0.8},
        "tracking": {"mode": "disabled", "output_dir": str(tmp_path / "runs"), "run_name": "frozen"},
    })
    name = TINY_VIT["name"]
    initial = {key: value.clone() for key, value in setup(LocalContext("cpu"), TrainingJob(config, name, val_shards))
               .model.state_dict().items()}
    straight_root, resumed_root = tmp_path / "straight", tmp_path / "resumed"
    straight_root.mkdir(), resumed_root.mkdir()
    run_training(LocalContext("cpu", checkpoint_root=straight_root), TrainingJob(config, name, val_shards))
    second, first = (load_file(str(path / "model.safetensors")) for path in checkpoint_dirs(straight_root))
    frozen_backbone, first_head = _backbone_and_head(first)
    initial_backbone, initial_head = _backbone_and_head(initial)
    # Epoch 1: the backbone is exactly what it started from; the head moved.
    assert all(torch.equal(frozen_backbone[key], initial_backbone[key]) for key in initial_backbone)
    assert not torch.equal(first_head["head.weight"], initial_head["head.weight"])
    # Epoch 2: every backbone tensor trains.
    trained_backbone, _ = _backbone_and_head(second)
    assert all(not torch.equal(trained_backbone[key], initial_backbone[key]) for key in initial_backbone)

    # A run that dies in its first unfrozen step resumes from the frozen epoch's checkpoint (the optimizer holding
    # the head's moments alone) and ends with the straight run's weights.
    with pytest.raises(_Crash):
        run_training(LocalContext("cpu", checkpoint_root=resumed_root),
                     TrainingJob(config, name, val_shards, step_hook=_crash_in_epoch_two))
    run_training(LocalContext("cpu", checkpoint_root=resumed_root), TrainingJob(config, name, val_shards))
    resumed = load_file(str(checkpoint_dirs(resumed_root)[0] / "model.safetensors"))
    assert all(torch.equal(resumed[key], second[key]) for key in second)


def _frozen_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """What train_one_epoch does to a model whose backbone is frozen."""
    freeze_backbone(model, True)
    model.train()
    backbone_to_eval(model)
    return model


def _random_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Dropout, torch.nn.BatchNorm2d)) or type(module).__name__ == "DropPath"}


def test_a_frozen_deit_trains_its_two_heads_apart_with_its_backbone_in_eval_mode():
    model = _frozen_for_training(create_model("deit_tiny_distilled_patch4_32", num_classes=10, depth=2, embed_dim=32,
                                              num_heads=2, drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2))
    # the label loss and the teacher loss each get their head, not the average eval mode returns
    cls_logits, dist_logits = model(torch.randn(2, 3, 32, 32))
    assert cls_logits.shape == dist_logits.shape == (2, 10)
    assert model.training and model.head.training and model.head_dist.training
    backbone = _random_modules(model)
    assert {"head_drop", "blocks.0.mlp.drop1", "blocks.1.drop_path1"} <= backbone.keys()
    assert not any(module.training for module in backbone.values())


def test_a_frozen_cnn_keeps_its_batchnorm_statistics():
    model = _frozen_for_training(create_model("resnet18_cifar", num_classes=10, layers=(1, 1), channels=(8, 16)))
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(before[name], buffer) for name, buffer in model.named_buffers())
    assert {"bn1", "layer1.0.bn1"} <= _random_modules(model).keys()
    assert not any(module.training for module in _random_modules(model).values())
    assert model.fc.training and model.fc.weight.grad is not None and model.conv1.weight.grad is None


def test_a_frozen_deit_trains_two_heads_in_every_epoch_though_validation_switches_modes(
        tmp_path, val_shards, monkeypatch):
    deit = {"name": "deit_tiny_distilled_patch4_32", "drop_path_rate": 0.1,
            "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
    config = build_config({
        "data": {"loader_workers": 0},
        "model": {"baseline": deit, "transformers": []},
        "training": {"epochs": 2, "batch_size": 1024, "warmup_epochs": 0.2, "bf16": False, "log_every_steps": 50,
                     "freeze_backbone_epochs": 2, "ema_decay": None},  # no EMA: validation puts the model in eval
        "tracking": {"mode": "disabled", "output_dir": str(tmp_path / "runs"), "run_name": "frozen-deit"},
    })
    forwards: list[tuple[bool, bool, bool]] = []  # (training step, two heads, backbone drop-path on)

    def build_and_watch(spec, num_classes):
        model = build_model(spec, num_classes)
        model.register_forward_hook(lambda module, inputs, output: forwards.append(
            (torch.is_grad_enabled(), isinstance(output, tuple), module.blocks[1].drop_path1.training)))
        return model

    monkeypatch.setattr("tasks.training.train_loop.build_model", build_and_watch)
    history = run_training(LocalContext("cpu"), TrainingJob(config, deit["name"], val_shards))
    steps = [(heads, drop_path) for training, heads, drop_path in forwards if training]
    assert len(steps) == history[-1]["global_step"] == 2 * history[0]["global_step"]  # both epochs, every step
    assert all(heads and not drop_path for heads, drop_path in steps)
    assert not any(heads for training, heads, _ in forwards if not training)  # validation: the average


def test_pretrained_file_override_replaces_the_checkpoint_for_one_model(tmp_path, vit_s16_checkpoint, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    shipped = load_config(REPO_ROOT / "configs" / "finetune.yaml")
    config = with_pretrained_file(shipped, "vp_vit_base_patch16_224", vit_s16_checkpoint)
    spec = config.model.spec("vp_vit_base_patch16_224")
    assert spec.pretrained_file == vit_s16_checkpoint and not spec.pretrained
    assert config.model.spec("vp_swin_tiny_patch4_window7_224") == shipped.model.spec("vp_swin_tiny_patch4_window7_224")
    with pytest.raises(ConfigError, match="pretrained file does not exist: /no/such.safetensors"):
        with_pretrained_file(shipped, "vp_vit_base_patch16_224", "/no/such.safetensors")
    with pytest.raises(ConfigError, match="not in this configuration"):
        with_pretrained_file(shipped, "vit_tiny_patch4_32", vit_s16_checkpoint)


def test_train_cli_names_a_missing_pretrained_file(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    code = main(["train", "--config", str(REPO_ROOT / "configs" / "finetune.yaml"), "--model",
                 "vp_vit_base_patch16_224", "--pretrained-file", str(missing)])
    assert code == EXIT_BAD_INPUT
    assert f"pretrained file does not exist: {missing}" in capsys.readouterr().err


def test_every_pretrained_model_must_state_its_drop_path_rate():
    with pytest.raises(ConfigError, match=r"model.baseline: resnet50 starts from a checkpoint: set drop_path_rate"):
        build_config({"model": {"baseline": {"name": "resnet50", "pretrained": True}}})
    assert build_config({"model": {"baseline": {"name": "resnet50", "pretrained": True, "drop_path_rate": 0.0}}})


def test_a_vp_preset_takes_its_timm_twins_hub_checkpoint(tmp_path, vit_s16_checkpoint, monkeypatch, caplog):
    assert hub_weights_id("vp_vit_base_patch16_224") == "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert hub_weights_id("vp_swin_tiny_patch4_window7_224") == "timm/swin_tiny_patch4_window7_224.ms_in1k"
    assert hub_weights_id("resnet50") == "timm/resnet50.a1_in1k"
    assert hub_weights_id("vit_tiny_patch4_32") is None  # ours alone: no hub weights
    downloads = []

    def fake_download(repository, filename):
        downloads.append((repository, filename))
        return str(vit_s16_checkpoint)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    with caplog.at_level(logging.INFO, logger="vitmodels"):
        model = create_model(FINETUNED, pretrained=True, num_classes=10, depth=CHECKPOINT_DEPTH, img_size=32)
    assert downloads == [("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")]
    assert torch.equal(model.blocks[1].mlp.fc1.weight, load_file(str(vit_s16_checkpoint))["blocks.1.mlp.fc1.weight"])
    assert "replaced (another class count) head.bias, head.weight" in caplog.text


@pytest.mark.slow
def test_train_cli_fine_tunes_a_vit_s16_checkpoint_at_32_px(tmp_path, val_shards, vit_s16_checkpoint, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = tmp_path / "finetune.yaml"
    config.write_text(f"""
data: {{loader_workers: 0}}
model:
  baseline: {{name: {FINETUNED}, pretrained: true, drop_path_rate: 0.1,
             model_kwargs: {{depth: {CHECKPOINT_DEPTH}, img_size: 32}}}}
  transformers: []
training: {{epochs: 1, batch_size: 128, warmup_epochs: 0.3, bf16: false, layer_decay: 0.75, log_every_steps: 10}}
scaling: {{num_workers: 2, ray_num_cpus: 4}}
tracking: {{mode: disabled, output_dir: {tmp_path / "runs"}, run_name: cli}}
""")
    try:
        # pretrained: true would ask the hub; --pretrained-file replaces it for this run
        code = main(["train", "--config", str(config), "--shards", val_shards, "--model", FINETUNED,
                     "--pretrained-file", str(vit_s16_checkpoint)])
    finally:
        ray.shutdown()
    assert code == 0
    exported = load_file(str(tmp_path / "runs" / "cli" / "models" / FINETUNED / "last.safetensors"))
    assert exported["head.weight"].shape == (10, 384) and exported["pos_embed"].shape == (1, 5, 384)
    checkpoint = load_file(str(vit_s16_checkpoint))
    # trained from the checkpoint: close to it after one short epoch, not to a random initialisation
    drift = (exported["blocks.0.attn.qkv.weight"] - checkpoint["blocks.0.attn.qkv.weight"]).abs().mean()
    assert 0 < drift < 0.1 * checkpoint["blocks.0.attn.qkv.weight"].abs().mean()
