from pathlib import Path

import pytest

from tasks.config import ConfigError, build_config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


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
