import re
from pathlib import Path

import pytest

from tasks.config import ConfigError, build_config, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["smoke.yaml", "cifar10.yaml"])
def test_shipped_configs_load(name, monkeypatch, data_root):
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    config = load_config(REPO_ROOT / "configs" / name)
    assert config.data.data_root == data_root
    assert config.model.baseline.name == "resnet18_cifar"


def test_overrides_and_run_dir(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    config = build_config({}, ["training.epochs=3", "tracking.run_name=abc", "data.shard_size=7"])
    assert (config.training.epochs, config.data.shard_size) == (3, 7)
    assert config.run_dir == Path("runs/abc")
    assert config.shard_location == "runs/abc/shards"
    assert config.data.data_root is None


def test_data_root_env_is_only_a_default(monkeypatch, tmp_path, data_root):
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    assert build_config({}).data.data_root == data_root
    assert build_config({"data": {"data_root": str(tmp_path)}}).data.data_root == tmp_path


@pytest.mark.parametrize(
    ("tree", "field", "value"),
    [
        ({"data": {"shard_size": 0}}, "data.shard_size", "0"),
        ({"training": {"epochs": -1}}, "training.epochs", "-1"),
        ({"training": {"epochs": "many"}}, "training.epochs", "'many'"),
        ({"data": {"data_root": "/no/such/dir"}}, "data.data_root", "/no/such/dir"),
        ({"data": {"shard_sise": 10}}, "data.shard_sise", "10"),
        ({"trainer": {}}, "trainer", "{}"),
        ({"data": {"augment": {"mixup_prob": 2}}}, "data.augment.mixup_prob", "2"),
        ({"tracking": {"run_name": "../escape"}}, "tracking.run_name", "../escape"),
        ({"data": {"shard_dir": "pipe:curl x"}}, "data.shard_dir", "pipe:curl x"),
        ({"model": {"baseline": {"name": "resnet18_cifar", "channels_last": "nhwc"}}}, "model.baseline.channels_last",
         "'nhwc'"),
        ({"data": {"augment": {"random_erasing": 1.5}}}, "data.augment.random_erasing", "1.5"),
        ({"data": {"augment": {"random_erasing_mode": "noise"}}}, "data.augment.random_erasing_mode", "'noise'"),
        ({"data": {"augment": {"repeated_augmentation": 0}}}, "data.augment.repeated_augmentation", "0"),
        ({"data": {"augment": {"rrc_scale": [0.0, 1.0]}}}, "data.augment.rrc_scale.0", "0.0"),
        ({"data": {"crop_pct": 1.2}}, "data.crop_pct", "1.2"),
        ({"data": {"interpolation": "lanczos"}}, "data.interpolation", "'lanczos'"),
        ({"training": {"layer_decay": 1.5}}, "training.layer_decay", "1.5"),
        ({"training": {"backbone_lr_scale": 0}}, "training.backbone_lr_scale", "0"),
        ({"training": {"freeze_backbone_epochs": -1}}, "training.freeze_backbone_epochs", "-1"),
        ({"training": {"lr_reference_batch": 0}}, "training.lr_reference_batch", "0"),
        ({"model": {"baseline": {"name": "resnet18_cifar", "layer_decay": 0}}}, "model.baseline.layer_decay", "0"),
    ],
)
def test_bad_values_name_field_and_value(tree, field, value, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(ConfigError) as error:
        build_config(tree)
    message = str(error.value)
    assert f"{field}:" in message
    assert value in message


def test_unknown_model_lists_choices(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(ConfigError) as error:
        build_config({"model": {"baseline": {"name": "resnet_nope"}}})
    message = str(error.value)
    assert "model.baseline.name" in message and "resnet_nope" in message
    assert "vit_tiny_patch4_32" in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_flow_runs_directory_and_what_its_runs_share(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    config = build_config({}, ["tracking.run_name=weekly", "tracking.flow_run=crimson-fox-0a1b2c3d"])
    assert config.run_dir == Path("runs/weekly/crimson-fox-0a1b2c3d")
    assert config.shard_location == "runs/weekly/shards"  # shards are shared by the run name's flow runs
    assert config.checkpoint_location == "runs/weekly/crimson-fox-0a1b2c3d/ray"
    remote = build_config({}, ["tracking.run_name=weekly", "tracking.flow_run=x", "storage.checkpoints=s3://b/ckpt/"])
    assert remote.checkpoint_location == "s3://b/ckpt/weekly/x"
    with pytest.raises(ConfigError, match="tracking.flow_run"):
        build_config({}, ["tracking.flow_run=../elsewhere"])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ([], "tracking.output_dir"),
        (["storage.checkpoints=/home/me/ckpt"], "storage.checkpoints"),
        (["storage.shared_filesystem=/mnt/shared", "storage.checkpoints=/home/me/ckpt"], "storage.checkpoints"),
    ],
)
def test_multi_node_checkpoints_on_a_local_path_fail_at_load_time(monkeypatch, overrides, field):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match=rf"{field}: .* is local to one machine"):
        build_config({}, ["scaling.multi_node=true", *overrides])


@pytest.mark.parametrize(
    "overrides",
    [
        ["storage.checkpoints=s3://bucket/ckpt"],
        ["storage.shared_filesystem=/mnt/shared", "tracking.output_dir=/mnt/shared/runs"],
        ["storage.shared_filesystem=/mnt/shared", "storage.checkpoints=/mnt/shared/ckpt"],
    ],
)
def test_multi_node_checkpoints_on_shared_storage_load(monkeypatch, overrides):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    assert build_config({}, ["scaling.multi_node=true", *overrides]).scaling.multi_node


def test_ray_client_addresses_are_refused(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"scaling.ray_address: Ray Client \(ray://\) is not used"):
        build_config({}, ["scaling.ray_address=ray://head:10001"])
    assert build_config({}, ["scaling.ray_address=http://head:8265"]).scaling.ray_address == "http://head:8265"


@pytest.mark.parametrize("tree", [["data", "model"], "data: 1", 3])
def test_a_top_level_that_is_not_a_mapping_is_named(tree):
    with pytest.raises(ConfigError, match="the top level must be a mapping of sections"):
        build_config(tree)


def test_validation_split_size_is_a_count_or_a_fraction(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    assert build_config({"data": {"val_size": 5000}}).data.val_size == 5000
    assert build_config({"data": {"val_size": 0.2}}).data.val_size == 0.2
    for bad in (0, -3, 1.5, "half"):
        with pytest.raises(ConfigError, match="data.val_size"):
            build_config({"data": {"val_size": bad}})


def test_the_fine_tuning_and_deit_switches_are_off_in_the_smoke_config(monkeypatch, data_root):
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    smoke = load_config(REPO_ROOT / "configs" / "smoke.yaml")
    augment, training = smoke.data.augment, smoke.training
    assert not augment.random_resized_crop and augment.random_erasing == 0 and augment.repeated_augmentation == 1
    assert training.layer_decay is None and training.backbone_lr_scale == 1 and training.freeze_backbone_epochs == 0
    assert training.lr_reference_batch is None and smoke.data.image_size is None and smoke.data.crop_pct == 1
    assert not any(spec.is_pretrained for spec in smoke.model.all_specs())


def test_cross_field_mistakes_fail_at_load_naming_the_fields(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    cases = [
        ({"data": {"image_size": 64, "augment": {"random_resized_crop": True}}}, "crop_padding must be 0"),
        ({"data": {"augment": {"random_resized_crop": True, "crop_padding": 0}}}, "needs data.image_size"),
        ({"data": {"crop_pct": 0.875}}, "needs data.image_size"),
        ({"data": {"augment": {"repeated_augmentation": 3}}, "training": {"batch_size": 2}},
         "data.augment.repeated_augmentation (3) is more than training.batch_size (2)"),
        ({"training": {"epochs": 2, "freeze_backbone_epochs": 3}},
         "freeze_backbone_epochs (3) is more than epochs (2)"),
        ({"data": {"image_size": 64, "augment": {"random_resized_crop": True, "crop_padding": 0,
                                                 "rrc_ratio": [1.5, 0.5]}}}, "rrc_ratio: the lower bound 1.5"),
    ]
    for tree, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_config(tree)


# Full CIFAR-10: 50,000 training images, of which data.val_size holds out 10% for validation.
CIFAR10_TRAIN_IMAGES = 45_000


def test_the_cifar10_recipe_takes_the_steps_the_public_vit_recipes_take(monkeypatch):
    """Public CIFAR-10 ViT recipes that reach 90%+ train 35,000-70,000 steps at a global batch of 128-256 with
    AdamW at 1e-3; the LR follows the worker count (DeiT's linear rule), so more GPUs keep the LR per sample."""
    from tasks.training.recipe import effective_lr, global_batch

    monkeypatch.delenv("DATA_ROOT", raising=False)
    training = load_config(REPO_ROOT / "configs" / "cifar10.yaml").training
    batch = global_batch(training, 2)
    steps = -(-CIFAR10_TRAIN_IMAGES // batch) * training.epochs
    assert batch <= 256 and steps >= 35_000, f"{steps} optimizer steps at a global batch of {batch}"
    assert effective_lr(training, 2) == pytest.approx(1e-3)
    assert effective_lr(training, 4) == pytest.approx(2e-3)
