"""The sweep section, its load-time errors and the sweep's bookkeeping, without training (fast).

The sweeps themselves run in tests/e2e/test_sweep_run.py (CLI, a kill and a resume) and tests/e2e/test_flow_e2e.py
(the deployment against a real Prefect server)."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pandas as pd
import pytest

from flows.cli import EXIT_BAD_INPUT, main
from tasks.config import ConfigError, build_config, load_config
from tasks.layout import RUN_OWNER_FILE
from tasks.operations.sweep import (
    COMPLETED,
    FAILED,
    STOPPED_EARLY,
    markdown_table,
    ranked,
    results_document,
    search_space,
    trial_config,
    trial_record,
    write_best_config,
)
from tasks.operations.sweep_space import VALIDATION_METRICS
from tests.conftest import REPO_ROOT

VIT = "vit_tiny_patch4_32"
SWEEP_CONFIGS = sorted((REPO_ROOT / "configs").glob("sweep-*.yaml"))


def _tree(**sweep) -> dict:
    return {"training": {"epochs": 3},
            "sweep": {"model": VIT, "parameters": {"training.lr": {"loguniform": [1e-4, 1e-2]}}, **sweep}}


@pytest.fixture(autouse=True)
def _no_data_root(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=[path.name for path in SWEEP_CONFIGS])
def test_shipped_sweep_configs_load_and_sweep_fields_of_their_model(path):
    config = load_config(path)
    assert config.sweep.num_trials >= 4 and config.sweep.metric == "val_acc" and config.sweep.direction == "max"
    assert config.sweep.scheduler.name == "asha"
    for name in config.sweep.parameters:
        assert name.startswith(("training.", "data.augment.", "model.transformers.0.")), name
    assert config.model.transformers[0].name == config.sweep.model


def test_the_smoke_sweep_is_small_enough_for_a_cpu():
    config = load_config(REPO_ROOT / "configs" / "sweep-smoke.yaml")
    assert not config.scaling.use_gpu and config.training.epochs <= 3
    assert config.model.transformers[0].model_kwargs["depth"] <= 2


@pytest.mark.parametrize(("sweep", "says"), [
    ({"parameters": {}}, "sweep.parameters: the search space is empty"),
    ({"parameters": {"training.lrr": {"choice": [1e-3]}}}, "sweep.parameters.training.lrr: no field 'lrr' in training"),
    ({"parameters": {"model.transformers.7.drop_path_rate": {"choice": [0.1]}}},
     "sweep.parameters.model.transformers.7.drop_path_rate: model.transformers is a list of 3"),
    ({"parameters": {"model.transformers.x.drop_path_rate": {"choice": [0.1]}}}, "address its items by index"),
    ({"parameters": {"model.transformers.2.drop_path_rate": {"choice": [0.1]}}},
     f"not a field of the swept model {VIT} (model.transformers.0.*)"),
    ({"parameters": {"model.transformers.0.name": {"choice": ["vit_small_patch4_32"]}}},
     "sweep.model names the model"),
    ({"parameters": {"training": {"choice": [{}]}}}, "sweep.parameters.training: is a section"),
    ({"parameters": {"training.lr.base": {"choice": [1]}}}, "training.lr is a value, not a section"),
    ({"parameters": {"scaling.num_workers": {"choice": [1, 2]}}}, "scaling.num_workers: only training.*, data.augment"),
    ({"parameters": {"data.val_size": {"choice": [100]}}}, "the shards are made once for every trial"),
    ({"parameters": {"training.epochs": {"choice": [2, 3]}}}, "ASHA decides how many epochs"),
    ({"parameters": {"training.lr": {"choice": [1e-3, -1.0]}}}, "the value -1.0 is refused: Input should be greater"),
    ({"parameters": {"training.batch_size": {"uniform": [32, 64]}}}, "choice lists whole numbers"),
    ({"parameters": {"training.lr": {"choice": [1e-3], "uniform": [1e-4, 1e-2]}}}, "exactly one of choice"),
    ({"parameters": {"training.lr": {"loguniform": [1e-2, 1e-4]}}}, "needs low < high"),
    ({"parameters": {"training.lr": {"loguniform": [0.0, 1e-2]}}}, "sweep.parameters.training.lr.loguniform"),
    ({"metric": "val_accuracy"}, "sweep.metric: no epoch reports 'val_accuracy'"),
    ({"metric": "train_loss"}, "sweep.metric: no epoch reports 'train_loss' about the validation split"),
    ({"mode": "min"}, "sweep.mode: val_acc is better when higher"),
    ({"model": "vit_huge_patch14_224"}, "sweep.model: 'vit_huge_patch14_224' is not a configured model"),
    ({"model": "deit_tiny_distilled_patch4_32"}, "distils from the pipeline's trained baseline"),
    ({"scheduler": {"grace_period": 4}}, "sweep.scheduler.grace_period: 4 epochs is more than training.epochs (3)"),
    ({"scheduler": {"reduction_factor": 1}}, "sweep.scheduler.reduction_factor"),
    ({"num_trials": 0}, "sweep.num_trials"),
])
def test_bad_sweeps_fail_at_load_time_naming_what_is_wrong(sweep, says):
    with pytest.raises(ConfigError) as error:
        build_config(_tree(**sweep))
    assert says in str(error.value)


def test_every_problem_of_a_sweep_is_named_at_once():
    with pytest.raises(ConfigError) as error:
        build_config(_tree(parameters={"training.lrr": {"choice": [1]}, "scaling.use_gpu": {"choice": [True]}}))
    assert "training.lrr" in str(error.value) and "scaling.use_gpu" in str(error.value)


def test_good_parameters_of_every_kind_are_accepted():
    config = build_config(_tree(metric="val_loss", scheduler={"name": "fifo"}, parameters={
        "training.lr": {"loguniform": [1e-4, 1e-2]},
        "training.epochs": {"choice": [2, 3]},  # without ASHA, the budget is a hyperparameter like another
        "data.augment.mixup_alpha": {"uniform": [0.0, 0.8]},
        "model.transformers.0.drop_path_rate": {"choice": [0.0, 0.1]},
        "model.transformers.0.model_kwargs.depth": {"choice": [1, 2]},
    }))
    assert config.sweep.direction == VALIDATION_METRICS["val_loss"] == "min"
    baseline = build_config(_tree(model="resnet18_cifar", parameters={"model.baseline.drop_rate": {"choice": [0.1]}}))
    assert baseline.sweep.model == "resnet18_cifar"


def test_the_cli_refuses_a_bad_sweep_and_a_config_without_one_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(_tree(parameters={"training.lrr": {"choice": [1e-3]}})))
    assert main(["sweep", "--config", str(bad)]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "sweep.parameters.training.lrr" in error and "Traceback" not in error
    assert main(["sweep", "--config", str(REPO_ROOT / "configs" / "smoke.yaml")]) == EXIT_BAD_INPUT
    assert "smoke.yaml: no sweep section" in capsys.readouterr().err
    assert main(["sweep", "--flow-run", "x"]) == EXIT_BAD_INPUT


def test_the_pipeline_configuration_ignores_the_sweep_section():
    with_sweep, without = build_config(_tree()), build_config({"training": {"epochs": 3}})
    assert with_sweep.model_dump(exclude={"sweep"}) == without.model_dump(exclude={"sweep"})


def test_search_space_maps_each_distribution_to_tunes():
    from ray.tune.search.sample import Categorical, Float, LogUniform, Uniform

    space = search_space(build_config(_tree(parameters={
        "training.lr": {"loguniform": [1e-4, 1e-2]}, "data.augment.mixup_alpha": {"uniform": [0.0, 0.8]},
        "model.transformers.0.model_kwargs.depth": {"choice": [1, 2]}})).sweep)
    assert isinstance(space["training.lr"], Float) and isinstance(space["training.lr"].sampler, LogUniform)
    assert (space["training.lr"].lower, space["training.lr"].upper) == (1e-4, 1e-2)
    assert isinstance(space["data.augment.mixup_alpha"].sampler, Uniform)
    assert isinstance(space["model.transformers.0.model_kwargs.depth"], Categorical)
    assert space["model.transformers.0.model_kwargs.depth"].categories == [1, 2]


def test_a_trials_config_has_its_parameters_set_and_no_sweep():
    import numpy as np

    config = build_config(_tree())
    trial = trial_config(config, {"training.lr": np.float64(3e-3), "model.transformers.0.drop_path_rate": 0.1,
                                  "model.transformers.0.model_kwargs.depth": np.int64(2)})
    assert trial.sweep is None and trial.training.lr == 3e-3
    swept = trial.model.transformers[0]
    assert swept.drop_path_rate == 0.1 and swept.model_kwargs == {"depth": 2}
    assert trial.model.transformers[1] == config.model.transformers[1]
    with pytest.raises(ConfigError, match="training.lr"):
        trial_config(config, {"training.lr": -1.0})


def _result(trial: str, parameters: dict, val_accs: list[float], error: str | None = None):
    rows = [{"epoch": epoch, "val_acc": acc, "val_loss": 2.0 - acc, "train_loss": 2.1, "training_iteration": epoch,
             "config/training.lr": parameters["training.lr"], "checkpoint_path": f"/ckpt/{trial}/{epoch}"}
            for epoch, acc in enumerate(val_accs, start=1)]
    return SimpleNamespace(path=f"/tune/{trial}", config=parameters, error=error,
                           metrics_dataframe=pd.DataFrame(rows) if rows else None)


def test_trials_are_recorded_ranked_and_written_with_the_best_config(tmp_path):
    config = build_config(_tree(num_trials=4))
    sweep = config.sweep
    results = [_result("t0", {"training.lr": 3e-3}, [0.20, 0.31, 0.29]),
               _result("t1", {"training.lr": 1e-7}, [0.10]),
               _result("t2", {"training.lr": 1e-2}, [], error="Traceback ...\nTrainingError: loss was NaN"),
               _result("t3", {"training.lr": 1e-3}, [0.25, 0.33, 0.35])]
    records = ranked([trial_record(result, sweep, epochs_budget=3) for result in results], sweep.direction)
    assert [r.trial for r in records] == ["t3", "t0", "t1", "t2"]
    best, second, stopped, failed = records
    assert (best.status, best.best_value, best.best_epoch, best.epochs) == (COMPLETED, 0.35, 3, 3)
    assert (second.best_value, second.best_epoch) == (0.31, 2)  # the best epoch, not the last
    assert (stopped.status, stopped.stopped_early, stopped.epochs) == (STOPPED_EARLY, True, 1)
    assert (failed.status, failed.error, failed.best_value) == (FAILED, "TrainingError: loss was NaN", None)
    assert best.checkpoint == "/ckpt/t3/3" and "config/training.lr" not in best.history[0]

    document = results_document(config, records, seconds=12.0)
    assert [t["rank"] for t in document["trials"]] == [1, 2, 3, 4]
    assert document["trials"][0]["best_val_acc"] == 0.35 and document["trials"][2]["stopped_early"] is True
    json.dumps(document)  # plain JSON

    path = tmp_path / "best.yaml"
    chosen = write_best_config(path, config, best, sweep.metric)
    loaded = load_config(path)
    assert loaded == chosen and loaded.sweep is None and loaded.training.lr == 1e-3
    assert loaded.tracking.flow_run is None and "t3" in path.read_text().splitlines()[0]

    table = markdown_table(records, sweep, 3)
    assert table.splitlines()[2].startswith("| 1 | t3 | 0.001 | 0.3500 | 3 | 3/3 | completed |")
    assert "stopped early" in table and "failed: TrainingError: loss was NaN" in table


def test_the_val_loss_sweep_ranks_the_lowest_first():
    config = build_config(_tree(metric="val_loss"))
    records = ranked([trial_record(_result(name, {"training.lr": 1e-3}, accs), config.sweep, 3)
                      for name, accs in (("low", [0.1, 0.2, 0.3]), ("high", [0.4, 0.5, 0.6]))], "min")
    assert [r.trial for r in records] == ["high", "low"] and records[0].best_value == pytest.approx(1.4)


def test_a_dead_sweeps_directory_is_continued_by_a_sweep_only(tmp_path, monkeypatch):
    import flows.run_owner as run_owner

    monkeypatch.setattr(run_owner, "_mark_crashed", lambda owner, current: False)  # no Prefect API here
    config = build_config({"tracking": {"output_dir": str(tmp_path), "run_name": "r", "mode": "disabled"}})
    dead = {"flow_run_id": "dead", "flow_run_name": "x", "host": socket.gethostname(), "pid": 2**22 + 1,
            "start": "1", "config": run_owner.config_digest(config), "finished": False}
    for label, kind in (("sweep-dead", "sweep"), ("old-dead", None)):  # records from before kinds: the pipeline's
        record = dead | ({"kind": kind} if kind else {}) | {"flow_run_id": label}
        (tmp_path / "r" / label).mkdir(parents=True)
        (tmp_path / "r" / label / RUN_OWNER_FILE).write_text(json.dumps(record))
    assert run_owner.claim_run_directory(config, "p1", "pipeline").continued == "old-dead"
    sweep = run_owner.claim_run_directory(config, "s1", "sweep", kind="sweep")
    assert sweep.continued == "sweep-dead"
    run_owner.finish_run_directory(sweep.config)
    assert (tmp_path / "r" / run_owner.LATEST_LINK).is_symlink()
    assert run_owner.flow_run_directory(tmp_path / "r", "s1") == tmp_path / "r" / "sweep-dead"


# ------------------------------------------------------------------------ on a cluster that scales


def _gpu_sweep(**sweep):
    tree = _tree(num_trials=8, **sweep)
    tree["scaling"] = {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 4}
    return tree


@pytest.fixture
def scaled_to_zero(monkeypatch):
    """A cluster of its CPU head alone (its GPU workers scaled to zero) whose autoscaler declares `declared`."""
    import ray
    from ray._private.state import state

    declared: dict[str, float] = {}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "memory": 1e10})
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: dict(declared))
    return declared


def test_trials_at_once_follow_the_autoscalers_maximum_not_the_nodes_up_now(scaled_to_zero):
    from tasks.operations.sweep import trials_at_once

    scaled_to_zero.update({"CPU": 4 + 6 * 16, "GPU": 6 * 2})  # 6 workers of 2 GPUs at most
    assert trials_at_once(build_config(_gpu_sweep())) == 6  # a trial trains on 2 GPUs
    assert trials_at_once(build_config(_gpu_sweep(max_concurrent_trials=2))) == 2
    scaled_to_zero.update({"GPU": 64})
    assert trials_at_once(build_config(_gpu_sweep())) == 8  # never more than the trials


def test_trials_at_once_follow_the_configured_maximum(scaled_to_zero):
    from tasks.operations.sweep import trials_at_once

    tree = _gpu_sweep()
    tree["scaling"]["max_cluster_resources"] = {"GPU": 8, "CPU": 64}
    assert trials_at_once(build_config(tree)) == 4
    assert trials_at_once(build_config(_gpu_sweep())) == 1  # declared nothing, configured nothing: the nodes now


def test_a_sweep_as_a_ray_job_runs_tune_on_the_cluster_and_reports_its_outcome(tmp_path, monkeypatch, capsys):
    """The job's driver side: the request the flow submits runs run_sweep there, joining the cluster the job
    runs on, and the outcome it prints is what the flow reads back."""
    import tasks.operations.sweep as sweep_module
    from tasks.operations import ray_jobs

    config = build_config(_tree() | {"scaling": {"ray_address": "http://head:8265"},
                                     "tracking": {"output_dir": str(tmp_path), "mode": "disabled"}})
    record = trial_record(_result("t0", {"training.lr": 3e-3}, [0.2, 0.3]), config.sweep, 3)
    outcome = sweep_module.SweepOutcome([record], trial_config(config, {"training.lr": 3e-3}),
                                        tmp_path / "results.json", tmp_path / "best.yaml", False, 9.5)
    ran = []
    monkeypatch.setattr(sweep_module, "run_sweep", lambda cfg, group: ran.append((cfg, group)) or outcome)
    monkeypatch.setenv(ray_jobs.REQUEST_ENV, json.dumps(ray_jobs.sweep_request(config, "weekly-1")))
    assert ray_jobs.main() == 0
    ((driver_config, group),) = ran
    assert group == "weekly-1" and driver_config.scaling.ray_address is None  # the job's own cluster
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(ray_jobs.OUTCOME_MARKER)]
    assert ray_jobs.sweep_outcome_from_json(line.removeprefix(ray_jobs.OUTCOME_MARKER)) == outcome
