"""Hyperparameter search: Ray Tune drives the pipeline's own Ray Train training, one run per trial.

    sweep section -> search space -> trial: the config with the trial's parameters -> the pipeline's TorchTrainer
    (tasks.training.train.training_run), its epochs reported to Tune by TuneReportCallback -> ASHA stops the trials
    that fall behind on the validation metric -> results.json, best.yaml, one W&B run per trial and a summary

Each trial is a Tune function trainable that builds and runs the pipeline's TorchTrainer, as Ray's guide for
Train V2 prescribes: the trial only drives its Train run (on the head node, with no CPU of its own), the
training workers do the work, and every epoch's metrics and checkpoint path reach Tune. The per-worker loop is
tasks/training/train_loop.py's, unchanged: a trial trains exactly what `vit-pipeline train` would with its parameters.

State lives in Ray storage beside the pipeline's checkpoints, <checkpoint location>/sweep/: Tune's experiment
(tune/) and each trial's Train run (trials/<trial id>/). A sweep started again in the same run directory
restores the experiment: finished trials keep their results, unfinished ones resume from their last epoch
checkpoint. The outputs are runs/<run>/<flow run>/sweep/results.json and best.yaml.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.train import UserCallback
from ray.tune import Callback

from tasks.config import (
    ConfigError,
    PipelineConfig,
    build_config,
    is_url,
    set_dotted,
    with_absolute_paths,
)
from tasks.layout import RunLayout
from tasks.operations.sweep_space import SweepConfig
from tasks.operations.tracking import files_artifact, start_wandb_run
from tasks.training.checkpoints import latest_valid_checkpoint, read_checkpoint_metadata
from tasks.training.train import (
    TrainingError,
    cluster_maximum,
    concurrent_trainings,
    ensure_ray,
    fit_with_retries,
    training_run,
)

log = logging.getLogger(__name__)

TRIAL_JOB_TYPE = "sweep-trial"
SUMMARY_JOB_TYPE = "sweep"
RESULTS_FILE = "results.json"
BEST_CONFIG_FILE = "best.yaml"
# A trial's driver holds this much of the head node and no CPU: the Train run it starts holds the workers'
# resources, and Ray's guide keeps drivers off the nodes that training may lose.
TRIAL_DRIVER_RESOURCES = {"node:__internal_head__": 0.001}
COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped early", "failed"
# How long a stopped trial waits for its Train run to shut its workers down.
TRAIN_ABORT_SECONDS = 60


@dataclass(frozen=True)
class SweepJob:
    """What every trial needs besides its parameters; Tune hands it to the trials (tune.with_parameters)."""

    config: PipelineConfig  # the sweep's, with its run directory and absolute paths
    shard_location: str
    trials_storage: str  # Ray Train's storage_path for the trials' runs, each named by its trial id


@dataclass
class TrialRecord:
    """One trial as results.json lists it."""

    trial: str
    parameters: dict[str, Any]
    status: str  # completed, stopped early (by the scheduler) or failed
    best_value: float | None  # the sweep metric at the trial's best epoch
    best_epoch: int | None
    epochs: int  # epochs trained
    checkpoint: str | None  # the trial's last checkpoint: it holds its best epoch's weights too
    error: str | None = None
    history: list[dict] = field(default_factory=list, repr=False)  # every epoch's metrics, as reported

    @property
    def stopped_early(self) -> bool:
        return self.status == STOPPED_EARLY


@dataclass
class SweepOutcome:
    trials: list[TrialRecord]  # ranked: the best first
    best_config: PipelineConfig
    results_file: Path
    best_config_file: Path
    restored: bool  # continued an interrupted sweep
    seconds: float


def sweep_storage(config: PipelineConfig) -> str:
    """Ray storage of the sweep: beside the pipeline's checkpoints, on storage every node reaches."""
    return f"{config.checkpoint_location}/sweep"


def sweep_directory(config: PipelineConfig) -> Path:
    """runs/<run>/<flow run>/sweep/: results.json and best.yaml."""
    return RunLayout.of(config).sweep_dir


def require_sweep(config: PipelineConfig, source: str) -> SweepConfig:
    if config.sweep is None:
        raise ConfigError(f"{source}: no sweep section to search with; configs/sweep-smoke.yaml shows one")
    return config.sweep


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """The sweep's parameters as Tune's search space, keyed by their dotted config paths."""
    from ray import tune

    space = {}
    for path, dimension in sweep.parameters.items():
        if dimension.choice is not None:
            space[path] = tune.choice(dimension.choice)
        elif dimension.uniform is not None:
            space[path] = tune.uniform(*dimension.bounds)
        else:
            space[path] = tune.loguniform(*dimension.bounds)
    return space


def plain(parameters: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as plain Python values (Tune may sample numpy scalars)."""
    return {path: value.item() if hasattr(value, "item") else value for path, value in parameters.items()}


def trial_config(config: PipelineConfig, parameters: dict[str, Any]) -> PipelineConfig:
    """The sweep's configuration with one trial's parameters set and no sweep section: what that trial trains,
    and, for the best trial, what best.yaml holds."""
    tree = config.model_dump(mode="json", exclude={"sweep"})
    for path, value in plain(parameters).items():
        set_dotted(tree, path, value)
    return build_config(tree, source=f"the sweep's trial with {plain(parameters)}")


class _SendsItsController(UserCallback):
    """Runs in the Train run's controller: hands the trial its controller's handle at the first report, so that
    a trial Tune stops can abort its run (_AbortsItsTrainRun)."""

    def __init__(self, mailbox):
        self.mailbox, self.sent = mailbox, False

    def after_report(self, run_context, metrics, checkpoint):
        if not self.sent:
            import ray

            self.mailbox.put(ray.get_runtime_context().current_actor)
            self.sent = True


# The trial's Train run, in the trial's own process (one trial per process: Tune does not reuse its actors here).
_TRAIN_RUN: dict[str, Any] = {}


class _AbortsItsTrainRun:
    """Mixed into a trial's Tune trainable: when Tune stops the trial (ASHA), the trial first aborts its Train run,
    which stops its workers and frees their placement group at once. Otherwise the run would be killed with the
    trial's process, its workers training on unseen for a while and its placement group left to a cleaner that
    cannot find its cluster on a machine running more than one Ray, so that later trials wait for CPUs forever."""

    def cleanup(self):
        from queue import Empty

        import ray

        mailbox = _TRAIN_RUN.pop("mailbox", None)
        _TRAIN_RUN["stopping"] = True
        try:
            if mailbox is not None:
                ray.get(mailbox.get_nowait().abort.remote(), timeout=TRAIN_ABORT_SECONDS)
        except (Empty, ray.exceptions.RayError):
            pass  # no report yet (nothing to stop), or the run had ended: its controller has exited
        super().cleanup()


def run_trial(parameters: dict[str, Any], *, job: SweepJob) -> None:
    """One trial, as Ray Tune runs it: the pipeline's TorchTrainer with the trial's parameters, each epoch's
    metrics passed on to Tune. A Train run named by the trial id resumes when Tune restores the trial."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    config = trial_config(job.config, parameters)
    # The trial's W&B run is the sweep's (SweepTracker): the training logs nothing of its own.
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"mode": "disabled"})})
    name = ray.tune.get_context().get_trial_id()
    _report_epochs_done(f"{job.trials_storage}/{name}")
    if _TRAIN_RUN.get("stopping"):
        return  # the epochs reported again were enough for ASHA to stop the trial
    _TRAIN_RUN["mailbox"] = mailbox = Queue(maxsize=1, actor_options={"num_cpus": 0})
    model = require_sweep(job.config, "the sweep's configuration").model
    run = training_run(config, model, shard_location=job.shard_location,
                       storage=job.trials_storage, name=name,
                       # The handle first: once Tune has an epoch's metrics, it may stop the trial at once.
                       callbacks=(_SendsItsController(mailbox), TuneReportCallback()))
    try:
        fit_with_retries(run.trainer, run.model_name, run.path, config.training.max_failures)
    except Exception:
        if _TRAIN_RUN.get("stopping"):
            return  # Tune stopped the trial and aborted its run on purpose
        raise


def _report_epochs_done(run_path: str) -> None:
    """Report to Tune again the epochs the trial's Train run has checkpointed.

    Tune restarts a trial of a restored sweep from scratch and drops its results, as the trial holds no Tune
    checkpoint of its own (its Train run has them); the Train run, though, resumes from its last checkpoint
    and reports only the epochs after it. Reporting the checkpoint's history first gives Tune, ASHA and
    results.json the trial's every epoch, each once. On object storage the history stays with Ray's copy."""
    import ray.tune
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    latest = None if is_url(run_path) else latest_valid_checkpoint(Path(run_path))
    if latest is None:
        return
    history = read_checkpoint_metadata(latest)["history"]
    log.warning("trial %s resumes after epoch %d: its epochs so far are reported again", Path(run_path).name,
             len(history))
    for index, epoch in enumerate(history):
        ray.tune.report({**epoch, **({CHECKPOINT_PATH_KEY: str(latest)} if index == len(history) - 1 else {})})


# Tune builds the trial's trainable class with this mixin (ray.tune's wrap_function reads __mixins__).
run_trial.__mixins__ = (_AbortsItsTrainRun,)  # type: ignore[attr-defined]  # an attribute Tune defines, not Python


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _epoch_metrics(result: dict) -> dict[str, float]:
    """What the training loop reported for an epoch, without Tune's bookkeeping (its counters, the trial's
    config, flattened as config/<path> in a results table) or the blanks of a table's missing values."""
    from ray.tune.result import AUTO_RESULT_KEYS

    return {key: value for key, value in result.items()
            if key not in AUTO_RESULT_KEYS and "/" not in key and isinstance(value, int | float)
            and not isinstance(value, bool) and not (isinstance(value, float) and math.isnan(value))}


class SweepTracker(Callback):
    """Each trial a W&B run in the sweep's group (job type sweep-trial), its parameters in the run's config and
    every epoch's metrics logged as they reach Tune, step = epoch. A restored trial continues its run."""

    def __init__(self, config: PipelineConfig, group: str, epochs: int):
        self.config, self.group, self.epochs = config, group, epochs
        self._runs: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runs": {}}  # open W&B runs belong to this process

    def _run(self, trial):
        if trial.trial_id not in self._runs:
            parameters = plain(trial.config)
            self._runs[trial.trial_id] = start_wandb_run(
                trial_config(self.config, parameters), TRIAL_JOB_TYPE, trial.trial_id, self.group,
                extra={"sweep_trial": {"trial": trial.trial_id, "parameters": parameters}},
            )
        return self._runs[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self._run(trial)
        if run is not None and "epoch" in result:
            run.log({f"epoch/{key}": value for key, value in _epoch_metrics(result).items()},
                    step=int(result["epoch"]), commit=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = int(trial.last_result.get("epoch", 0))
        self._finish(trial, COMPLETED if epochs >= self.epochs else STOPPED_EARLY, epochs)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, FAILED, int(trial.last_result.get("epoch", 0)))

    def _finish(self, trial, status: str, epochs: int) -> None:
        run = self._run(trial)
        if run is not None:
            run.summary.update({"status": status, "epochs": epochs})
            run.finish(exit_code=1 if status == FAILED else 0)
        self._runs.pop(trial.trial_id, None)

    def on_experiment_end(self, trials, **info):
        for run in self._runs.values():
            if run is not None:
                run.finish()
        self._runs.clear()


def trials_at_once(config: PipelineConfig) -> int:
    """sweep.max_concurrent_trials, else as many trials as the cluster holds at its largest: sized when the
    sweep starts, a cluster scaled to zero would otherwise run one trial at a time while the autoscaler could
    make room for more (Tune's pending trials are what asks it for nodes)."""
    sweep = require_sweep(config, "the configuration")
    return min(sweep.num_trials, sweep.max_concurrent_trials or concurrent_trainings(config, cluster_maximum(config)))


def _tuner(config: PipelineConfig, job: SweepJob, group: str):
    """The sweep's Tuner: a new one, or the interrupted sweep's, restored from its experiment directory."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    sweep = require_sweep(config, "the configuration")
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), TRIAL_DRIVER_RESOURCES)
    experiment = f"{sweep_storage(config)}/tune"
    if tune.Tuner.can_restore(experiment):
        log.warning("continuing the sweep in %s: finished trials are kept, unfinished ones resume from their "
                    "last checkpoint", experiment)
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True), True
    scheduler = FIFOScheduler()
    if sweep.scheduler.name == "asha":
        # time_attr "epoch": the training's own count, which a resumed trial continues (Tune's iteration
        # counter would restart with the trial's driver).
        scheduler = ASHAScheduler(time_attr="epoch", max_t=config.training.epochs,
                                  grace_period=sweep.scheduler.grace_period,
                                  reduction_factor=sweep.scheduler.reduction_factor, stop_last_trials=False)
    concurrent = trials_at_once(config)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.direction, scheduler=scheduler, num_samples=sweep.num_trials,
            # The generator limits concurrency itself: Tune ignores max_concurrent_trials beside a given one.
            search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=sweep_storage(config),
            callbacks=[SweepTracker(config, group, config.training.epochs)],
            # A trial's worker failures are retried inside it (fit_with_retries), by their kind; a trial driver
            # that dies took the head node, and the sweep, with it: starting the sweep again restores it.
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    return tuner, False


def trial_record(result, sweep: SweepConfig, epochs_budget: int) -> TrialRecord:
    """A finished trial from Tune's result: its best epoch on the sweep's metric, how far it got, and why it ended."""
    frame = result.metrics_dataframe
    rows = [] if frame is None or "epoch" not in frame else frame.to_dict("records")
    history = list({int(row["epoch"]): _epoch_metrics(row) for row in rows}.values())
    scored = [epoch for epoch in history if math.isfinite(epoch.get(sweep.metric, math.nan))]
    pick = max if sweep.direction == "max" else min
    best = pick(scored, key=lambda epoch: epoch[sweep.metric]) if scored else None
    checkpoints = [row["checkpoint_path"] for row in rows if isinstance(row.get("checkpoint_path"), str)]
    epochs = max((int(epoch["epoch"]) for epoch in history), default=0)
    status = FAILED if result.error else COMPLETED if epochs >= epochs_budget else STOPPED_EARLY
    error = str(result.error).strip().splitlines()[-1] if result.error else None
    return TrialRecord(trial=Path(result.path).name, parameters=plain(result.config), status=status,
                       best_value=best[sweep.metric] if best else None,
                       best_epoch=int(best["epoch"]) if best else None, epochs=epochs,
                       checkpoint=checkpoints[-1] if checkpoints else None, error=error, history=history)


def ranked(records: list[TrialRecord], direction: str) -> list[TrialRecord]:
    """Best first on the sweep's metric; trials without a score (failed before an epoch ended) last."""
    sign = -1.0 if direction == "max" else 1.0
    return sorted(records, key=lambda r: (r.best_value is None, sign * (r.best_value or 0.0), r.trial))


def results_document(config: PipelineConfig, records: list[TrialRecord], seconds: float) -> dict:
    sweep = require_sweep(config, "the configuration")
    metric = sweep.metric
    trials = []
    for rank, record in enumerate(records, start=1):
        entry = {key: value for key, value in asdict(record).items() if key not in ("best_value", "history")}
        trials.append({"rank": rank, **entry, f"best_{metric}": record.best_value,
                       "stopped_early": record.stopped_early})
    return {"model": sweep.model, "metric": metric, "mode": sweep.direction, "epochs": config.training.epochs,
            "scheduler": sweep.scheduler.model_dump(), "num_trials": sweep.num_trials, "seconds": seconds,
            "best_config": BEST_CONFIG_FILE, "trials": trials}


def write_best_config(path: Path, config: PipelineConfig, best: TrialRecord, metric: str) -> PipelineConfig:
    """best.yaml: the sweep's configuration with the best trial's parameters and without the sweep section, for
    `vit-pipeline run --config best.yaml` (each flow run takes a directory of its own: no flow_run in it)."""
    chosen = trial_config(config, best.parameters)
    chosen.tracking.flow_run = None
    swept = ", ".join(f"{key}={value}" for key, value in best.parameters.items())
    header = (f"# The best trial of the sweep in {path.parent}: {best.trial}, {metric} {best.best_value:.4f} at "
              f"epoch {best.best_epoch}\n# with {swept}. The sweep section is left out: this config trains.\n")
    path.write_text(header + yaml.safe_dump(chosen.model_dump(mode="json", exclude={"sweep"}), sort_keys=False))
    return chosen


def markdown_table(records: list[TrialRecord], sweep: SweepConfig, epochs_budget: int) -> str:
    """The ranked trials for Prefect's artifact and the CLI."""
    paths = list(sweep.parameters)
    header = ["rank", "trial", *paths, f"best {sweep.metric}", "best epoch", "epochs", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, record in enumerate(records, start=1):
        values = [_format(record.parameters.get(path)) for path in paths]
        score = "-" if record.best_value is None else f"{record.best_value:.4f}"
        status = f"{record.status}: {record.error}" if record.error else record.status
        lines.append("| " + " | ".join([str(rank), record.trial, *values, score, str(record.best_epoch or "-"),
                                        f"{record.epochs}/{epochs_budget}", status]) + " |")
    return "\n".join(lines) + "\n"


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table_column(values: list[Any]) -> list[Any]:
    """A parameter's values as one W&B column type: numbers as they are, anything else (lists of model_kwargs,
    strings) as text."""
    if all(value is None or isinstance(value, int | float) for value in values):
        return values
    return [None if value is None else str(value) for value in values]


def log_summary(config: PipelineConfig, records: list[TrialRecord], group: str, files: list[Path]) -> None:
    """The sweep's own W&B run: one row per trial (parameters, score, epochs, status), the table a parallel
    coordinates panel plots, with results.json and best.yaml as an artifact."""
    import wandb

    sweep = require_sweep(config, "the configuration")
    run = start_wandb_run(config, SUMMARY_JOB_TYPE, sweep.model, group)
    if run is None:
        return
    paths = list(sweep.parameters)
    columns: list[str | int] = ["trial", *paths, f"best_{sweep.metric}", "best_epoch", "epochs", "stopped_early",
                               "status"]
    swept = [_table_column([r.parameters.get(path) for r in records]) for path in paths]
    table = wandb.Table(columns=columns, data=[
        [r.trial, *[column[i] for column in swept], r.best_value, r.best_epoch, r.epochs, r.stopped_early, r.status]
        for i, r in enumerate(records)])
    run.log({"trials": table})
    best = records[0]
    run.summary.update({"best_trial": best.trial, f"best_{sweep.metric}": best.best_value,
                        "best_parameters": best.parameters,
                        "stopped_early": sum(r.stopped_early for r in records), "trials": len(records)})
    run.log_artifact(files_artifact(f"sweep-{sweep.model}", "sweep", files))
    run.finish()


def run_sweep(config: PipelineConfig, *, shard_location: str | None = None, group: str | None = None) -> SweepOutcome:
    """Search config.sweep's space on the shards with Ray Tune; continues an interrupted sweep of this run
    directory. Writes results.json and best.yaml under runs/<run>/<flow run>/sweep/."""
    config = with_absolute_paths(config)
    sweep = require_sweep(config, "the configuration")
    group = group or config.tracking.flow_run or config.tracking.run_name
    ensure_ray(config)
    job = SweepJob(config=config, shard_location=shard_location or config.shard_location,
                   trials_storage=f"{sweep_storage(config)}/trials")
    started = time.perf_counter()
    tuner, restored = _tuner(config, job, group)
    results = tuner.fit()
    seconds = time.perf_counter() - started
    records = ranked([trial_record(result, sweep, config.training.epochs) for result in results], sweep.direction)
    if not records or records[0].best_value is None:
        errors = "; ".join(f"{r.trial}: {r.error}" for r in records if r.error) or "no trial ran"
        raise TrainingError(f"no trial of the sweep finished an epoch ({errors})", retryable=False)
    out = sweep_directory(config)
    out.mkdir(parents=True, exist_ok=True)
    results_file, best_file = out / RESULTS_FILE, out / BEST_CONFIG_FILE
    results_file.write_text(json.dumps(results_document(config, records, seconds), indent=2))
    best_config = write_best_config(best_file, config, records[0], sweep.metric)
    log_summary(config, records, group, [results_file, best_file])
    return SweepOutcome(records, best_config, results_file, best_file, restored, seconds)
