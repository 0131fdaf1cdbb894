"""The flow's wiring without training: cache keys, retries, parameters, deployments (Prefect test harness)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from prefect import flow, task
from prefect.testing.utilities import prefect_test_harness
from pydantic import BaseModel, ValidationError

from flows.deployments import DEPLOYMENT_CONFIGS, RETRAIN_CRON, SWEEP_DEPLOYMENT_CONFIGS, deployments
from flows.pipeline import (
    FLOW_NAME,
    REGRESSED_STATE,
    _retry_transient,
    flagged_if_regressed,
    prune_task,
    publish_task,
    shard_cache_key,
    shard_task,
    train_cache_key,
    verify_task,
    vit_pipeline,
)
from flows.sweep import vit_sweep
from tasks.config import (
    NOT_TRAINING_FIELDS,
    ConfigError,
    PipelineConfig,
    build_config,
    get_dotted,
    load_config,
    set_dotted,
)
from tasks.operations.sweep_space import SearchDimension, SweepConfig
from tests.conftest import REPO_ROOT
from tests.support.fake_trainings import (  # noqa: F401  (fake_trainings_fixture: the fixture fake_trainings)
    BASELINE,
    DEIT,
    SWIN,
    VIT,
    fake_trainings_fixture,
    flow_config,
    intervals_overlap,
    trainings,
)


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


def _fields(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, annotation) of every field of a configuration, sections walked into, list items by index."""
    for name, info in type(section).model_fields.items():
        value, path = getattr(section, name), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from _fields(value, f"{path}.")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            for index, item in enumerate(value):
                yield from _fields(item, f"{path}.{index}.")
        else:
            yield path, info.annotation


def _literals(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for argument in get_args(annotation) for value in _literals(argument)]


def _changed(config: PipelineConfig, path: str, annotation: Any, tmp_path: Path) -> PipelineConfig:
    """`config` with the field at `path` set to another value it accepts (every other field as it was)."""
    tree = config.model_dump(mode="json")
    value = get_dotted(tree, path)
    names = [spec.name for spec in config.model.all_specs()]
    existing_file = tmp_path / "a-file"
    existing_file.touch()
    if isinstance(value, bool):
        candidates: list[Any] = [not value]
    elif isinstance(value, int):
        candidates = [value + 1, value - 1, 2 * value]
    elif isinstance(value, float):
        candidates = [value / 2, value + 0.1]
    elif isinstance(value, str):
        # a timm RandAugment policy for data.augment.auto_augment, a string only timm's grammar accepts
        candidates = [*_literals(annotation), *names, str(tmp_path), f"{value}-changed", "rand-m7-mstd0.5-inc1"]
    elif isinstance(value, list):
        candidates = [[value[0] / 2, *value[1:]]]
    elif isinstance(value, dict):
        candidates = [{**value, "depth": 2}]
    else:
        candidates = [*_literals(annotation), 64, 0.5, True, str(existing_file), str(tmp_path), "changed",
                      "kind/changed", {"GPU": 8.0}, *names]  # names: serving.model, unset by default
    for candidate in candidates:
        changed = copy.deepcopy(tree)
        set_dotted(changed, path, candidate)
        try:
            result = PipelineConfig.model_validate(changed)
        except ValidationError:
            continue
        if get_dotted(result.model_dump(mode="json"), path) != value:
            return result
    pytest.fail(f"{path}: no other value of {candidates} is accepted; teach _changed one")


def test_the_training_cache_key_follows_every_field_a_training_reads(tmp_path, data_root):
    """Every field of the configuration changes the key of a training, but for NOT_TRAINING_FIELDS (where and how
    it runs, how it is reported), other models' fields, and the model's name, which the key is named by."""
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"baseline weights")
    # Set so that every field can change alone: crop_pct needs an image size, random_resized_crop no padding,
    # multi_node a shared file system holding the outputs.
    config = build_config({
        "data": {"data_root": str(data_root), "image_size": 32, "augment": {"crop_padding": 0}},
        "tracking": {"output_dir": str(tmp_path / "runs"), "mode": "disabled"},
        "storage": {"shared_filesystem": str(tmp_path)},
    })
    student = config.model.transformers[1]
    assert student.teacher == "baseline"
    model_path = "model.transformers.1."
    fields = [(path, annotation) for path, annotation in _fields(config) if path != "sweep"
              and (not path.startswith("model.") or path.startswith(model_path)) and path != f"{model_path}name"]
    denied = {path for path, _ in fields if any(path == entry or path.startswith(f"{entry}.")
                                                 for entry in NOT_TRAINING_FIELDS)}
    assert {entry for entry in NOT_TRAINING_FIELDS if entry != "sweep"} <= \
        {entry for entry in NOT_TRAINING_FIELDS for path in denied if path == entry or path.startswith(f"{entry}.")}
    # The cache is scoped to the run name: a training is reused within runs/<run name>/, not across run names.
    run_root = {"tracking.output_dir", "tracking.run_name"}
    key = _train_key(config, student.name, str(teacher))
    for path, annotation in fields:
        changed = _train_key(_changed(config, path, annotation, tmp_path), student.name, str(teacher))
        if path in denied and path not in run_root:
            assert changed == key, f"{path} does not change a training, yet changes its cache key"
        else:
            assert changed != key, f"{path} changes the training, yet not its cache key"
    assert len(fields) - len(denied) >= 55  # the walk saw the configuration, not an empty section
    with_sweep = config.model_copy(update={"sweep": SweepConfig(model=student.name, parameters={
        "training.lr": SearchDimension(loguniform=(1e-4, 1e-3))})})
    assert _train_key(with_sweep, student.name, str(teacher)) == key


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
    assert second.result() == first.result()  # the Manifest, as persisted

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
    assert set(schema["properties"]) == {"config", "config_file", "overrides", "reuse_trainings"}
    config_schema = schema["definitions"]["PipelineConfig"]
    assert {"data", "model", "training", "scaling", "tracking", "orchestration"} <= set(config_schema["properties"])


def test_deployments_match_prefect_yaml_and_their_configs_load(data_root):
    declared = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    served = {deployment.name: deployment for deployment in deployments()}
    assert {d["name"] for d in declared} == set(served) == set(DEPLOYMENT_CONFIGS) | set(SWEEP_DEPLOYMENT_CONFIGS)
    assert set(DEPLOYMENT_CONFIGS) == {"cifar10", "smoke"}
    assert set(SWEEP_DEPLOYMENT_CONFIGS) == {"sweep", "sweep-cifar10"}
    for entry in declared:
        flow_of = vit_sweep if entry["name"] in SWEEP_DEPLOYMENT_CONFIGS else vit_pipeline
        module, function = entry["entrypoint"].split(":")
        assert (REPO_ROOT / module).is_file() and function == flow_of.fn.__name__
        assert served[entry["name"]].entrypoint == entry["entrypoint"]
        # The cluster's deployments add shared storage (tests/unit/test_infra.py) to what is served locally.
        local = dict(served[entry["name"]].parameters)
        assert set(local.pop("overrides", [])) <= set(entry["parameters"].get("overrides", []))
        assert local.items() <= entry["parameters"].items()
        assert set(entry["parameters"]) <= set(flow_of.parameters.properties)
        config = load_config(REPO_ROOT / entry["parameters"]["config_file"])
        assert (config.sweep is not None) == (flow_of is vit_sweep), entry["name"]
    cifar10 = next(d for d in declared if d["name"] == "cifar10")
    # No `active` on the cluster's schedule: a redeploy keeps an operator's pause (tests/unit/test_infra.py).
    assert [(s["cron"], s["slug"], "active" in s) for s in cifar10["schedules"]] == [
        (RETRAIN_CRON, "weekly-retraining", False)]
    served_schedule = served["cifar10"].schedules[0]
    assert served_schedule.schedule.cron == RETRAIN_CRON and served_schedule.active is False
    assert vit_pipeline.name == vit_sweep.name == FLOW_NAME  # deployments vit-pipeline/<name>, the sweeps' too


def test_the_scheduled_deployment_tracks_online_in_a_team_and_the_others_stay_offline(data_root):
    """The weekly run's publish must reach the W&B Registry: online, with an entity, both where it is declared for
    the work pool and where it is served, and it prunes old runs after; every other deployment keeps the local
    defaults, offline and keeping every run."""
    declared = {d["name"]: d["parameters"] for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
                ["deployments"]}
    served = {deployment.name: deployment.parameters for deployment in deployments()}
    for name in declared:
        for parameters in (declared[name], served[name]):
            config = load_config(REPO_ROOT / parameters["config_file"], parameters.get("overrides", []))
            scheduled = name == "cifar10"
            assert config.tracking.mode == ("online" if scheduled else "offline"), name
            assert (config.tracking.entity is not None) == scheduled, name
            assert config.storage.prune_after_run == scheduled, name  # retention after the weekly publish


def test_training_never_starts_on_bad_shards(tmp_path, data_root, subset_shards):
    import ray

    from tasks.training.train import TrainingError, train_model

    broken = tmp_path / "shards"
    shutil.copytree(subset_shards, broken)
    (broken / "test-000000.tar").unlink()
    config = _config(tmp_path, data_root, model={"transformers": []})
    config.data.shard_dir = str(broken)
    with pytest.raises(TrainingError, match="(?s)refusing to train on bad shards.*test-000000.tar"):
        train_model(config, config.model.baseline.name)
    assert not ray.is_initialized()


@pytest.fixture
def shard_reads(monkeypatch) -> list[str]:
    """Every shard file opened for reading in this process (listings and sizes open nothing)."""
    from fsspec.implementations.local import LocalFileSystem

    reads: list[str] = []
    opened = LocalFileSystem._open

    def spy(self, path, mode="rb", *args, **kwargs):
        if str(path).endswith(".tar"):
            reads.append(Path(path).name)
        return opened(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", spy)
    return reads


def test_a_training_checks_shard_sizes_without_reading_them_unless_asked_to_verify(
        tmp_path, data_root, val_shards, shard_reads, monkeypatch, capsys):
    from flows.cli import EXIT_BAD_INPUT, main
    from tasks.data.manifest import read_manifest
    from tasks.training.train import TrainingError, train_model

    def ray_would_start(config):  # every check before the workers is done by then
        raise TrainingError("the workers would start here")

    monkeypatch.setattr("tasks.training.train.ensure_ray", ray_would_start)
    config = _config(tmp_path, data_root, model={"transformers": []})
    config.data.shard_dir = val_shards
    with pytest.raises(TrainingError, match="the workers would start here"):
        train_model(config, config.model.baseline.name)
    assert shard_reads == []

    code = main(["train", "--verify-shards", "--shards", val_shards, "--set", f"data.data_root={data_root}",
                 "--set", f"tracking.output_dir={tmp_path / 'runs'}", "--set", "tracking.mode=disabled"])
    assert code == EXIT_BAD_INPUT and "the workers would start here" in capsys.readouterr().err
    every_shard = [shard.name for shard in read_manifest(val_shards).shards()]
    assert sorted(shard_reads) == sorted(every_shard)


def test_the_flow_verifies_a_shard_set_once_and_again_when_a_shard_changes(tmp_path, data_root, val_shards,
                                                                          shard_reads):
    import os

    from flows.pipeline import _result_storage

    shards = tmp_path / "shards"
    shutil.copytree(val_shards, shards)
    config = _config(tmp_path, data_root, storage={"results": str(tmp_path / "prefect-results")})
    config.data.shard_dir = str(shards)

    @flow
    def verify_step():
        return verify_task.with_options(result_storage=_result_storage(config))(config, return_state=True)

    # Two flow runs, one verification.
    assert (verify_step().name, verify_step().name) == ("Completed", "Cached")
    shard_count = len(list(shards.glob("*.tar")))
    assert len(shard_reads) == shard_count
    os.utime(shards / "train-000001.tar")  # a shard written again, byte for byte
    assert verify_step().name == "Completed" and len(shard_reads) == 2 * shard_count


# ------------------------------------------------------------------ trainings: order, slots, reuse


def _flow_config(tmp_path: Path, data_root: Path, flow_run: str):
    config = _config(tmp_path, data_root, storage={"results": str(tmp_path / "prefect-results")})
    return flow_config(config, flow_run)


def test_each_training_waits_for_a_slot_and_a_deit_for_its_teacher_only(tmp_path, data_root, fake_trainings):
    config = _flow_config(tmp_path, data_root, "first")
    outcomes, how = trainings(config, slots=2, reuse=False)
    calls = {call["model"]: call for call in fake_trainings}
    assert set(how.values()) == {"trained"} and set(outcomes) == set(calls) == {BASELINE, VIT, DEIT, SWIN}
    # ViT and Swin do not wait for the baseline: ViT starts beside it, Swin as soon as ViT frees its slot.
    assert calls[VIT]["start"] < calls[BASELINE]["end"] and calls[SWIN]["start"] < calls[BASELINE]["end"]
    assert calls[SWIN]["start"] >= calls[VIT]["end"]
    # The DeiT waits for the baseline and distils from its weights.
    assert calls[DEIT]["start"] >= calls[BASELINE]["end"]
    assert calls[DEIT]["teacher"] == str(outcomes[BASELINE].best_weights)
    assert {call["teacher"] for name, call in calls.items() if name != DEIT} == {None}
    assert intervals_overlap(fake_trainings) == 2, "never more trainings at once than slots"
    assert {call["group"] for call in fake_trainings} == {"first"}


def test_the_flow_graph_shows_what_each_training_waits_for(tmp_path, data_root, fake_trainings):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    config = _flow_config(tmp_path, data_root, "graph")
    state = trainings(config, slots=4, reuse=False, return_state=True)
    with get_client(sync_client=True) as client:
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = client.read_task_runs(flow_run_filter=this_run)
    by_name = {run.name: run for run in runs}
    waits = {name: {str(item.id) for item in run.task_inputs.get("wait_for", [])} for name, run in by_name.items()}
    assert waits[f"train-{DEIT}"] == {str(by_name[f"train-{BASELINE}"].id)}
    assert waits[f"train-{VIT}"] == waits[f"train-{SWIN}"] == waits[f"train-{BASELINE}"] == set()


def test_a_new_flow_run_trains_again_unless_asked_to_reuse(tmp_path, data_root, fake_trainings):
    first = _flow_config(tmp_path, data_root, "first")
    trainings(first, slots=4, reuse=False)
    again = _flow_config(tmp_path, data_root, "second")
    _, how = trainings(again, slots=4, reuse=False)
    assert set(how.values()) == {"trained"} and len(fake_trainings) == 8

    reusing = _flow_config(tmp_path, data_root, "third")
    outcomes, how = trainings(reusing, slots=4, reuse=True)
    assert len(fake_trainings) == 8, "nothing trained"
    # Reused from the latest identical trainings: runs/<run>/second/models/<model>
    assert {Path(text.removeprefix("reused from ")).parts[-3] for text in how.values()} == {"second"}, how
    for name, outcome in outcomes.items():  # copied: this run's directory holds every model it evaluates
        assert outcome.best_weights == Path(reusing.run_dir) / "models" / name / "best.safetensors"
        assert outcome.best_weights.read_text() == f"{name} of second"
    assert list((tmp_path / "prefect-results").iterdir()), "cached results live in storage.results"

    (Path(again.run_dir) / "models" / VIT / "best.safetensors").unlink()
    fourth = _flow_config(tmp_path, data_root, "fourth")
    _, how = trainings(fourth, slots=4, reuse=True)
    assert how[VIT] == "trained" and how[BASELINE].startswith("reused from ")


# ------------------------------------------------------------------------------- run directories


def test_every_flow_run_gets_its_own_directory_and_a_finished_one_is_never_continued(tmp_path):
    from flows.run_owner import LATEST_LINK, claim_run_directory, finish_run_directory
    from tasks.layout import RUN_OWNER_FILE

    config = build_config({"tracking": {"output_dir": str(tmp_path), "run_name": "weekly", "mode": "disabled"}})
    scheduled = claim_run_directory(config, "0a1b2c3d-0000", "crimson-fox")
    manual = claim_run_directory(config, "9f8e7d6c-0000", "crimson-fox")  # same name, both alive
    assert Path(scheduled.config.run_dir) == tmp_path / "weekly" / "crimson-fox-0a1b2c3d"
    assert Path(manual.config.run_dir) == tmp_path / "weekly" / "crimson-fox-9f8e7d6c"
    assert scheduled.config.shard_location == manual.config.shard_location == str(tmp_path / "weekly" / "shards")
    assert scheduled.continued is manual.continued is None

    finish_run_directory(scheduled.config)
    assert (tmp_path / "weekly" / LATEST_LINK).resolve() == Path(scheduled.config.run_dir)
    record = json.loads((Path(scheduled.config.run_dir) / RUN_OWNER_FILE).read_text())
    assert record["finished"] is True and record["flow_run_id"] == "0a1b2c3d-0000"
    # A retry of the same flow run (same id) is the same directory: its trainings resume there.
    assert claim_run_directory(config, "9f8e7d6c-0000", "crimson-fox").config.run_dir == manual.config.run_dir


def test_run_refuses_a_hold_out_that_swallows_the_training_split_by_name(tmp_path, data_root, capsys):
    """`vit-pipeline run` on the subset with full CIFAR-10's 5,000-image hold-out: exit 2, the error named once,
    and Prefect's record of the failed flow run without a traceback."""
    import logging

    from flows.cli import EXIT_BAD_INPUT, main

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    flow_runs = logging.getLogger("prefect.flow_runs")
    flow_runs.addHandler(handler)
    try:
        code = main(["-q", "run", "--set", f"data.data_root={data_root}", "--set", "data.val_size=5000",
                     "--set", "data.shard_workers=1", "--set", f"tracking.output_dir={tmp_path / 'runs'}",
                     "--set", "tracking.mode=disabled"])
    finally:
        flow_runs.removeHandler(handler)
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "vit-pipeline run: error: data.val_size 5000 holds out 5000 of the 5085 training images" in err
    assert "leaving 85 to train on" in err and "Traceback" not in err
    failures = [record for record in records if record.levelno >= logging.ERROR]
    assert failures and not any(record.exc_info for record in failures)
    assert not list((tmp_path / "runs").glob("*/shards/*.tar"))


def test_bad_run_directories_are_refused_by_the_cli(capsys):
    from flows.cli import EXIT_BAD_INPUT, main

    assert main(["run", "--flow-run", "x"]) == EXIT_BAD_INPUT
    assert "--flow-run" in capsys.readouterr().err
    assert main(["evaluate", "--flow-run", "../elsewhere"]) == EXIT_BAD_INPUT
    assert "tracking.flow_run" in capsys.readouterr().err


@pytest.mark.parametrize(("address", "says"), [("ray://head:10001", "Ray Client"), ("http://head:8265", "Jobs API")])
def test_a_training_in_this_process_refuses_addresses_it_cannot_drive(monkeypatch, address, says):
    import ray

    from tasks.training.train import TrainingError, ensure_ray

    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(TrainingError, match=says):
        ensure_ray(build_config({"tracking": {"mode": "disabled"}}))
    assert not ray.is_initialized()


def test_cached_trainings_live_in_object_storage(tmp_path, data_root, fake_trainings, request):
    """storage.results=s3://...: a flow run on another machine finds the cached trainings (moto's S3 here)."""
    import fsspec

    bucket = request.getfixturevalue("s3_bucket").rsplit("/", 1)[0]  # s3://shards
    config = _config(tmp_path, data_root, storage={"results": f"{bucket}/prefect-results"})
    trainings(flow_config(config, "first"), slots=4, reuse=False)
    _, how = trainings(flow_config(config, "second"), slots=4, reuse=True)
    assert len(fake_trainings) == 4 and all(text.startswith("reused from ") for text in how.values()), how
    assert len(fsspec.filesystem("s3").ls(f"{bucket}/prefect-results")) >= 4


def test_online_without_a_wandb_key_fails_before_anything_trains(tmp_path, data_root, fake_trainings, monkeypatch):
    """Neither WANDB_API_KEY nor the Secret block wandb-api-key on the flow's Prefect server: the flow run fails
    at its start, naming both, instead of training for hours offline."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for publish in ("auto", "always"):
        config = _config(tmp_path, data_root, tracking={"output_dir": str(tmp_path / "runs"), "mode": "online",
                                                        "publish": publish})
        state = vit_pipeline(config=config, return_state=True)
        assert state.is_failed()
        error = str(state.result(raise_on_failure=False))
        assert "WANDB_API_KEY is not set and there is none in the Prefect Secret block 'wandb-api-key'" in error
        assert fake_trainings == [] and not (tmp_path / "runs").exists()


def test_a_publish_regression_ends_the_flow_run_completed_but_named_regressed():
    """The operator sees the week that regressed in the flow runs' list, with the "regressions" artifact, and the
    flow's result is whole (the CLI prints it); a week without a regression is a plain Completed."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    regression = "vit retrained: validation top-1 0.7600 is 0.0500 below the registered best's 0.8100"

    @flow
    def weekly(regressions: list[str]):
        return flagged_if_regressed({"models": {"vit": 0.76}}, regressions)

    state = weekly([regression], return_state=True)
    assert state.is_completed() and state.name == REGRESSED_STATE and regression in state.message
    assert state.result() == {"models": {"vit": 0.76}}
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["regressions"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert regression in artifact.data
    plain = weekly([], return_state=True)
    assert plain.name == "Completed" and plain.result() == {"models": {"vit": 0.76}}


def test_the_prune_step_deletes_old_runs_and_says_so_in_an_artifact(tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    config = build_config({"tracking": {"output_dir": str(tmp_path), "run_name": "weekly", "mode": "disabled"},
                           "storage": {"keep_runs": 1, "prune_after_run": True}})
    for name, finished_at in (("old", 1_700_000_000), ("new", 1_800_000_000)):
        owner = tmp_path / "weekly" / name / "flow-run.json"
        owner.parent.mkdir(parents=True)
        owner.write_text(json.dumps({"flow_run_id": name, "finished": True}))
        os.utime(owner, (finished_at, finished_at))

    @flow
    def after_publish() -> dict:
        return prune_task(config)

    assert after_publish()["deleted"] == {"old": [str(tmp_path / "weekly" / "old")]}
    assert sorted(path.name for path in (tmp_path / "weekly").iterdir()) == ["new"]
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retention"])))
    assert {(row["flow run"], row["kept"]) for row in json.loads(artifact.data)} == {("new", "yes"),
                                                                                    ("old", "deleted")}


def test_serving_after_publish_through_a_jobs_api_fails_before_anything_trains(tmp_path, data_root,
                                                                              fake_trainings):
    config = _config(tmp_path, data_root, serving={"deploy_after_publish": True},
                     scaling={"ray_address": "http://head:8265"})
    state = vit_pipeline(config=config, return_state=True)
    assert state.is_failed()
    assert "serving.deploy_after_publish" in str(state.result(raise_on_failure=False))
    assert fake_trainings == [] and not (tmp_path / "runs").exists()


def test_the_publish_step_offline_leaves_the_plan_for_later(request):
    config = request.getfixturevalue("evaluated_run")

    @flow
    def publish_only() -> dict:
        return publish_task(config)

    plan = Path(config.run_dir) / "registry.json"
    assert publish_only() == {"registry_plan": str(plan), "linked": {}, "regressions": []}
    assert {entry["model"] for entry in json.loads(plan.read_text())["models"]} == {BASELINE, VIT}


def test_a_dead_flow_runs_directory_is_continued_from_another_host_by_its_identity(tmp_path, monkeypatch):
    """A head that dies takes its hostname with it: a directory is continued by whichever host runs next,
    once Prefect says its flow run is over, and the same flow run again always finds the directory it wrote."""
    from prefect import get_client
    from prefect.states import Crashed, Running

    import flows.run_owner as run_owner

    @flow(name="lost-head")
    def noop() -> None:
        pass

    config = build_config({"tracking": {"output_dir": str(tmp_path), "run_name": "weekly", "mode": "disabled"}})
    with get_client(sync_client=True) as client:
        lost = str(client.create_flow_run(noop, state=Running()).id)
        monkeypatch.setattr(run_owner, "this_host", lambda: "head-a")
        first = run_owner.claim_run_directory(config, lost, "sunday")

        monkeypatch.setattr(run_owner, "this_host", lambda: "head-b")
        # Still Running for Prefect (its heartbeats not yet missed): it may be alive, so it is left alone.
        probe = run_owner.claim_run_directory(config, str(client.create_flow_run(noop).id), "probe")
        assert probe.continued is None and probe.config.run_dir != first.config.run_dir
        run_owner.finish_run_directory(probe.config)
        client.set_flow_run_state(lost, Crashed(message="heartbeats stopped"), force=True)
        next_id = str(client.create_flow_run(noop, state=Running()).id)
        resumed = run_owner.claim_run_directory(config, next_id, "monday")
        assert resumed.continued == lost and resumed.config.run_dir == first.config.run_dir

    monkeypatch.setattr(run_owner, "this_host", lambda: "head-c")  # that one's head dies too; Prefect retries it
    again = run_owner.claim_run_directory(config, next_id, "monday")
    assert again.continued is None and again.config.run_dir == first.config.run_dir


def test_a_sweep_reaching_the_cluster_through_its_jobs_api_runs_as_a_ray_job(tmp_path, monkeypatch):
    """KubeRay's sidecar and an off-cluster worker set RAY_ADDRESS to the head's Jobs API: the sweep is
    submitted there, not refused."""
    import flows.sweep
    from tasks.operations.sweep import SweepOutcome, TrialRecord

    config = build_config({"training": {"epochs": 2}, "tracking": {"output_dir": str(tmp_path), "mode": "disabled"},
                           "sweep": {"model": VIT, "parameters": {"training.lr": {"choice": [1e-3]}}}})
    best = TrialRecord("t0", {"training.lr": 1e-3}, "completed", 0.4, 2, 2, None)
    submitted = []

    def sweep_as_job(address, cfg, *, group, flow_run_id, emit):
        submitted.append((address, group, flow_run_id))
        return SweepOutcome([best], cfg, tmp_path / "results.json", tmp_path / "best.yaml", False, 1.0)

    monkeypatch.setattr(flows.sweep, "sweep_as_job", sweep_as_job)
    monkeypatch.setattr("tasks.operations.sweep.run_sweep", lambda *args, **kwargs: pytest.fail("Tune ran in the flow"))
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")

    @flow
    def sweep_step():
        return flows.sweep.sweep_task(config, "g")

    assert sweep_step().trials == [best]
    ((address, group, flow_run_id),) = submitted
    assert address == "http://head:8265" and group == "g" and flow_run_id not in ("", "None")


# ------------------------------------------------------------------------------- the cluster's life


@pytest.fixture
def cluster_steps(tmp_path, monkeypatch) -> list[str]:
    """The flow's steps, and the cluster launcher's commands among them, recorded; nothing trains."""
    from tests.support.launched_flow import fake_steps

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a flow on no Ray cluster, as a launcher's must be
    steps: list[str] = []
    for (module, name), fake in fake_steps(steps.append, tmp_path).items():
        monkeypatch.setattr(module, name, fake)
    return steps


UP_AND_DOWN = ["shard", "verify", "ray up", "forward the Jobs API", "train, evaluate, attention maps on the Jobs API",
               "ray down"]


def test_the_flow_brings_the_cluster_up_for_its_trainings_and_down_before_the_report(tmp_path, cluster_steps):
    from tests.support.launched_flow import launched_config

    vit_pipeline(config=launched_config(tmp_path))
    assert cluster_steps == [*UP_AND_DOWN, "report"]


@pytest.mark.parametrize("ending", [RuntimeError("a training failed"), KeyboardInterrupt()],
                         ids=["failure", "ctrl-c"])
def test_a_flow_run_that_fails_or_is_interrupted_takes_the_cluster_down(tmp_path, cluster_steps, ending, monkeypatch):
    from tests.support.launched_flow import launched_config

    monkeypatch.setenv("VIT_TEST_CLUSTER_STEPS_END", type(ending).__name__)
    with pytest.raises(type(ending)):
        vit_pipeline(config=launched_config(tmp_path))
    assert cluster_steps == UP_AND_DOWN  # and no report


def test_a_cancelled_flow_run_takes_the_cluster_down(tmp_path):
    """Prefect cancels a flow run with SIGTERM to its process, which the flow engine raises in the flow as
    TerminationSignal and then re-delivers: the flow run's own process, killed half way through training."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    record = tmp_path / "steps"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO_ROOT), PREFECT_API_URL=PREFECT_API_URL.value())
    process = subprocess.Popen([sys.executable, "-m", "tests.support.launched_flow", str(record), str(tmp_path)],
                               cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + 120
    while not (record.is_file() and "train" in record.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the flow did not reach its trainings"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    assert record.read_text().splitlines() == UP_AND_DOWN


def test_shard_cache_key_follows_the_shard_fingerprint_and_its_version(tmp_path, data_root, monkeypatch):
    import tasks.data.shard

    config = _config(tmp_path, data_root)
    key = shard_cache_key(None, {"config": config})
    reseeded = config.model_copy(deep=True)
    reseeded.data.split_seed += 1
    assert shard_cache_key(None, {"config": reseeded}) != key
    monkeypatch.setattr(tasks.data.shard, "MANIFEST_VERSION", tasks.data.shard.MANIFEST_VERSION + 1)
    assert shard_cache_key(None, {"config": config}) != key
