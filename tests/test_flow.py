"""The flow's wiring without training: cache keys, retries, parameters, deployments (Prefect test harness)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from prefect import flow, task
from prefect.testing.utilities import prefect_test_harness

from flows.deployments import DEPLOYMENT_CONFIGS, RETRAIN_CRON, deployments
from flows.pipeline import (
    FLOW_NAME,
    _retry_transient,
    shard_cache_key,
    shard_task,
    train_cache_key,
    verify_task,
    vit_pipeline,
)
from tasks.config import ConfigError, build_config, load_config
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _config(tmp_path: Path, data_root: Path, **sections):
    tree = {
        "data": {"data_root": str(data_root), "shard_size": 1000, "shard_workers": 1},
        "tracking": {"output_dir": str(tmp_path / "runs"), "mode": "disabled"},
        **sections,
    }
    return build_config(tree)


def _train_key(config, name: str, teacher: str | None = None) -> str:
    parameters = {"config": config, "model_name": name, "manifest_fingerprint": "f" * 64, "teacher_weights": teacher}
    return train_cache_key(None, parameters)


def test_a_changed_model_config_changes_only_that_models_cache_key(tmp_path, data_root):
    before = _config(tmp_path, data_root)
    changed = before.model_copy(deep=True)
    changed.model.transformers[0].drop_path_rate = 0.3
    names = [spec.name for spec in before.model.all_specs()]
    moved = {name for name in names if _train_key(before, name) != _train_key(changed, name)}
    assert moved == {before.model.transformers[0].name}

    longer = before.model_copy(deep=True)
    longer.training.epochs += 1
    assert all(_train_key(before, name) != _train_key(longer, name) for name in names)


def test_a_retrained_teacher_changes_the_students_cache_key(tmp_path, data_root):
    config = _config(tmp_path, data_root)
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"weights v1")
    first = _train_key(config, "deit_tiny_distilled_patch4_32", str(teacher))
    assert first == _train_key(config, "deit_tiny_distilled_patch4_32", str(teacher))
    teacher.write_bytes(b"weights v2")
    assert _train_key(config, "deit_tiny_distilled_patch4_32", str(teacher)) != first


def test_shard_cache_key_follows_what_the_shards_depend_on(tmp_path, data_root):
    config = _config(tmp_path, data_root)
    key = shard_cache_key(None, {"config": config})
    loader_only = config.model_copy(deep=True)
    loader_only.data.loader_workers += 3
    assert shard_cache_key(None, {"config": loader_only}) == key
    resized = config.model_copy(deep=True)
    resized.data.shard_size = 500
    assert shard_cache_key(None, {"config": resized}) != key


def test_transient_faults_are_retried_and_bad_input_is_not():
    calls = {"os": 0, "config": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=_retry_transient)
    def flaky(kind: str) -> str:
        calls[kind] += 1
        if calls[kind] == 1:
            raise OSError("storage hiccup") if kind == "os" else ConfigError("data.shard_size: must be > 0")
        return "ok"

    @flow
    def both():
        return flaky("os"), flaky("config", return_state=True)

    recovered, refused = both()
    assert recovered == "ok" and calls["os"] == 2
    assert refused.is_failed() and calls["config"] == 1


def test_second_shard_task_is_cached_and_bad_shards_fail_verification_by_name(tmp_path, data_root):
    config = _config(tmp_path, data_root)

    @flow
    def shard_twice():
        first = shard_task(config, "test-group", return_state=True)
        second = shard_task(config, "test-group", return_state=True)
        return first, second

    first, second = shard_twice()
    assert first.name == "Completed" and second.name == "Cached"
    assert second.result()["fingerprint"] == first.result()["fingerprint"]

    broken = tmp_path / "broken"
    shutil.copytree(config.shard_location, broken)
    with open(broken / "train-000002.tar", "r+b") as shard:
        shard.truncate(4096)
    bad = config.model_copy(deep=True)
    bad.data.shard_dir = str(broken)

    @flow
    def verify_bad():
        state = verify_task(bad, return_state=True)
        return state.is_failed(), str(state.result(raise_on_failure=False))

    failed, message = verify_bad()
    assert failed and "train-000002.tar" in message and "truncated" in message


def test_flow_takes_the_typed_config_as_its_form():
    schema = vit_pipeline.parameters.model_dump()
    assert set(schema["properties"]) == {"config", "config_file", "overrides"}
    config_schema = schema["definitions"]["PipelineConfig"]
    assert {"data", "model", "training", "scaling", "tracking", "orchestration"} <= set(config_schema["properties"])


def test_deployments_match_prefect_yaml_and_their_configs_load(data_root):
    declared = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    served = {deployment.name: deployment for deployment in deployments()}
    assert {d["name"] for d in declared} == set(served) == set(DEPLOYMENT_CONFIGS) == {"cifar10", "smoke"}
    for entry in declared:
        module, function = entry["entrypoint"].split(":")
        assert (REPO_ROOT / module).is_file() and function == vit_pipeline.fn.__name__
        assert entry["parameters"] == served[entry["name"]].parameters
        load_config(REPO_ROOT / entry["parameters"]["config_file"])
    cifar10 = next(d for d in declared if d["name"] == "cifar10")
    assert [(s["cron"], s["active"]) for s in cifar10["schedules"]] == [(RETRAIN_CRON, False)]
    served_schedule = served["cifar10"].schedules[0]
    assert served_schedule.schedule.cron == RETRAIN_CRON and served_schedule.active is False
    assert vit_pipeline.name == FLOW_NAME


def test_training_never_starts_on_bad_shards(tmp_path, data_root, subset_shards):
    import ray

    from tasks.train import TrainingError, train_model

    broken = tmp_path / "shards"
    shutil.copytree(subset_shards, broken)
    (broken / "test-000000.tar").unlink()
    config = _config(tmp_path, data_root, model={"transformers": []})
    config.data.shard_dir = str(broken)
    with pytest.raises(TrainingError, match="(?s)refusing to train on bad shards.*test-000000.tar"):
        train_model(config, config.model.baseline.name)
    assert not ray.is_initialized()
