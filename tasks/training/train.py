"""Train step, the driver side: hand one model's training to a Ray Train TorchTrainer, retry what a retry can
fix, and export the best and last weights under runs/<run>/models/<model>/.

The per-worker loop itself lives in tasks/training/train_loop.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tasks.config import (
    RAY_CLIENT_REFUSED,
    RAY_CLIENT_SCHEME,
    PipelineConfig,
    is_url,
    with_absolute_paths,
)
from tasks.data.manifest import VAL_SPLIT, check_shard_sizes, require_manifest, verify_shards
from tasks.errors import TrainingError, is_deterministic
from tasks.inference.model_ref import write_model_config
from tasks.layout import BEST_WEIGHTS, RunLayout
from tasks.operations.alerts import Sent, alert
from tasks.operations.tracking import require_wandb_key, start_wandb_run
from tasks.training.checkpoints import (
    WEIGHTS,
    latest_valid_checkpoint,
    read_checkpoint_metadata,
)
from tasks.training.recipe import check_ema_horizon, steps_per_epoch
from tasks.training.train_loop import NonFiniteLossError, StepHook, TrainingJob, train_worker

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class TrainOutcome:
    model: str
    best_weights: Path
    last_weights: Path
    history: list[dict]
    best_epoch: int
    best_val_acc: float
    checkpoint_dir: str
    train_seconds: float


def default_teacher_weights(config: PipelineConfig, model_name: str) -> str | None:
    """The run's trained baseline, when `model_name` distils from it and it has been trained."""
    spec = config.model.spec(model_name)
    weights = RunLayout.of(config).weights(config.model.baseline.name)
    return str(weights) if spec.teacher == "baseline" and weights.is_file() else None


def ray_address(config: PipelineConfig) -> str | None:
    """scaling.ray_address, else $RAY_ADDRESS; None means a Ray of this process's own."""
    return config.scaling.ray_address or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(config: PipelineConfig) -> str | None:
    """Use the running Ray, else join the cluster at ray_address() as a driver, else start one here.

    Returns the dashboard address when this call connected (None when Ray was already up)."""
    import ray

    if ray.is_initialized():
        return None
    address = ray_address(config)
    if address and address.startswith(RAY_CLIENT_SCHEME):
        raise TrainingError(f"RAY_ADDRESS={address}: {RAY_CLIENT_REFUSED}", retryable=False)
    if address and is_url(address):
        raise TrainingError(
            f"RAY_ADDRESS={address} is a Ray Jobs API, which the flow submits trainings to; training in this "
            "process needs a cluster it can join as a driver: 'auto' on a node of it, or <head>:6379",
            retryable=False,
        )
    if address:
        context = ray.init(address=address)
    else:
        # "local": a new Ray for this process, never one that `ray start` left running on the machine.
        context = ray.init(address="local", num_cpus=config.scaling.ray_num_cpus)
    return context.dashboard_url or None


def on_training_device(config: PipelineConfig, function: Callable[..., T], *args, **kwargs) -> T:
    """function(*args, **kwargs) on the kind of machine the training ran on.

    With scaling.use_gpu, a Ray task holding one training worker's resources (a GPU and its CPUs), so that
    evaluation and attention maps run, and measure speed, on a GPU node rather than on the CPU head node that
    drives the flow; without GPUs, in this process. Where trainings go to the cluster as Ray Jobs (a Jobs API
    address), this process is no Ray driver and the work stays here too.
    """
    address = ray_address(config)
    if not config.scaling.use_gpu or (address is not None and is_url(address)):
        return function(*args, **kwargs)
    import ray

    ensure_ray(config)
    scaling = config.scaling
    remote = ray.remote(num_gpus=scaling.gpus_per_worker or 1, num_cpus=scaling.cpus_per_worker)(_call)
    return ray.get(remote.remote(function, *args, **kwargs))


def _call(function: Callable[..., T], *args, **kwargs) -> T:
    return function(*args, **kwargs)


def concurrent_trainings(config: PipelineConfig, resources: dict[str, float] | None = None) -> int:
    """How many trainings of this scaling config the cluster holds at once (at least 1).

    `resources` are the cluster's totals; by default those of the Ray this process is connected to."""
    import ray

    resources = resources if resources is not None else ray.cluster_resources()
    scaling = config.scaling
    fits = resources.get("CPU", 0) // (scaling.num_workers * scaling.cpus_per_worker)
    if scaling.use_gpu:
        fits = min(fits, resources.get("GPU", 0) // (scaling.num_workers * (scaling.gpus_per_worker or 1)))
    return max(1, int(fits))


def cluster_maximum(config: PipelineConfig) -> dict[str, float]:
    """The resources the connected Ray cluster may grow to: scaling.max_cluster_resources, else what its
    autoscaler declares, and at least what its nodes have now. Work sized by this waits for the autoscaler
    to add nodes instead of fitting a cluster scaled to zero."""
    import ray

    now = ray.cluster_resources()
    declared = config.scaling.max_cluster_resources or _declared_maximum()
    return {name: max(now.get(name, 0.0), declared.get(name, 0.0)) for name in now.keys() | declared.keys()}


def _declared_maximum() -> dict[str, float]:
    """The autoscaler's maximum, from the cluster configuration it keeps in the GCS (Ray's cluster launcher and
    KubeRay's autoscaler: every node group's max workers x its resources); {} without an autoscaler."""
    from ray._private.state import state  # Ray's own reader of that record; no public API has it

    try:
        declared = state.get_max_resources_from_cluster_config()
    except Exception as error:  # noqa: BLE001  (a private API: its absence only loses the estimate)
        log.warning("could not read the autoscaler's maximum from the cluster (%s): sizing by its nodes now", error)
        return {}
    return {name: float(amount) for name, amount in (declared or {}).items()}


@dataclass(frozen=True)
class TrainingRun:
    """One model's Ray Train run, built but not started: `trainer.fit()` (or fit_with_retries) starts it."""

    trainer: object  # ray.train.torch.TorchTrainer
    config: PipelineConfig  # with absolute paths, as the workers get it
    model_name: str
    path: str  # where its checkpoints go: <storage>/<name>


def training_run(
    config: PipelineConfig,
    model_name: str,
    *,
    shard_location: str | None = None,
    teacher_weights: str | None = None,
    group: str | None = None,
    step_hook: StepHook | None = None,
    storage: str | None = None,
    name: str | None = None,
    callbacks: tuple = (),
) -> TrainingRun:
    """The pipeline's TorchTrainer for one configured model, after every check that can fail before a worker
    starts. train_model runs it for the pipeline; a sweep runs one per trial (tasks/operations/sweep.py).

    Args:
        storage: Ray Train's storage_path; default config.checkpoint_location.
        name: the run's name under storage (a run of the same name resumes); default the model's name.
        callbacks: Ray Train callbacks, e.g. Tune's TuneReportCallback in a sweep's trial.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = with_absolute_paths(config)  # workers run in their own directories
    spec = config.model.spec(model_name)
    if spec.distillation != "none" and spec.teacher == "baseline" and teacher_weights is None:
        raise TrainingError(
            f"{model_name} distils from the baseline, whose weights are not there "
            f"({RunLayout.of(config).weights(config.model.baseline.name)}); train {config.model.baseline.name} first",
            retryable=False,
        )
    location = shard_location or config.shard_location
    _check_before_start(config, location)
    ensure_ray(config)
    storage = storage or config.checkpoint_location  # absolute or a URL: with_absolute_paths above
    name = name or model_name
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    job = TrainingJob(
        config=config, model_name=model_name,
        shard_location=location if is_url(location) else str(Path(location).absolute()),
        teacher_weights=str(Path(teacher_weights).absolute()) if teacher_weights else None,
        # A local run directory is scanned for the furthest valid checkpoint; object storage is Ray's alone.
        group=group, run_path=None if is_url(storage) else f"{storage}/{name}", step_hook=step_hook,
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job.to_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.training.checkpoints_to_keep,
                checkpoint_score_attribute="val_acc",
                checkpoint_score_order="max",
            ),
            # Retries are decided here (fit_with_retries), where the error's kind is known; Ray alone would
            # retry an AssertionError as readily as a lost node.
            failure_config=FailureConfig(max_failures=0),
            callbacks=list(callbacks),
        ),
    )
    return TrainingRun(trainer, config, model_name, f"{storage}/{name}")


def train_model(
    config: PipelineConfig,
    model_name: str,
    *,
    shard_location: str | None = None,
    teacher_weights: str | None = None,
    group: str | None = None,
    step_hook: StepHook | None = None,
) -> TrainOutcome:
    """Train one configured model on the shards with Ray Train; resumes a run of the same name.

    A worker that dies, a lost node or a transient I/O error restarts the worker group from the last
    checkpoint, up to training.max_failures times; a deterministic error (tasks.errors.is_deterministic) fails at
    once with its message, as a TrainingError that is not retryable.
    """
    require_wandb_key(config)  # the driver's check (the step command, a Ray Job's driver), before Ray starts
    run = training_run(config, model_name, shard_location=shard_location, teacher_weights=teacher_weights,
                       group=group, step_hook=step_hook)
    started = time.perf_counter()
    try:
        result = fit_with_retries(run.trainer, model_name, run.path, run.config.training.max_failures)
    except TrainingError as error:
        if isinstance(error.cause, NonFiniteLossError):
            alert_nonfinite_loss(run.config, model_name, error, group=group)
        raise
    location = shard_location or run.config.shard_location
    return _export(run.config, model_name, result, time.perf_counter() - started, location)


def alert_nonfinite_loss(config: PipelineConfig, model_name: str, error: TrainingError, *,
                         group: str | None) -> Sent:
    """A NaN/inf loss ended the training: a W&B alert and a Prefect event, sent from the driver, where the flow's
    Prefect API is (a Ray worker has none). The W&B alert goes on a run of its own in the training's group
    (job type "alert"): resuming the training's run here could open the same offline directory as the worker's
    run did, if the loss went bad within the second that run started."""
    run = start_wandb_run(config, "alert", model_name, group=group)
    try:
        return alert(f"{model_name}: the training loss became NaN or infinite", str(error), "ERROR", run=run,
                     details={"model": model_name, "run_name": config.tracking.run_name,
                              "flow_run": config.tracking.flow_run, "checkpoints": config.checkpoint_location})
    finally:
        if run is not None:
            run.finish(exit_code=1)


def _check_before_start(config: PipelineConfig, location: str) -> None:
    """What can be found wrong before a single worker starts: missing or resized shards (every shard re-hashed
    with data.verify_before_training), no validation split, an EMA that the run is too short for."""
    report = verify_shards(location) if config.data.verify_before_training else check_shard_sizes(location)
    if not report.ok:
        raise TrainingError(f"refusing to train on bad shards in {location}:\n  " + "\n  ".join(report.problems),
                            retryable=False)
    splits = require_manifest(location).splits
    if VAL_SPLIT not in splits:
        raise TrainingError(f"{location}: the shards have no {VAL_SPLIT!r} split to choose checkpoints on; shard "
                            f"again with data.val_size > 0", retryable=False)
    training = config.training
    steps = steps_per_epoch(config, splits["train"].num_samples, config.scaling.num_workers)
    if (problem := check_ema_horizon(training, steps * training.epochs)) is not None:
        raise TrainingError(problem, retryable=False)


def fit_with_retries(trainer, model_name: str, run_path: str, max_failures: int):
    """trainer.fit(), again from the last checkpoint after a failure a retry can fix, up to max_failures times."""
    from ray.train import TrainingFailedError

    for attempt in range(max_failures + 1):
        try:
            return trainer.fit()
        except TrainingFailedError as error:
            worker_errors = list(getattr(error, "worker_failures", {}).values())
            deterministic = [e for e in worker_errors if is_deterministic(e)]
            if deterministic:
                cause = deterministic[0]
                raise TrainingError(
                    _failure_message(model_name, run_path, cause) + "; not retried: it would fail the same way",
                    retryable=False, cause=cause,
                ) from error
            if attempt == max_failures:
                raise TrainingError(_failure_message(model_name, run_path, error)) from error
            log.warning("training %s failed (%s); retry %d of %d from the last checkpoint", model_name,
                        _first_line(error), attempt + 1, max_failures)
    raise AssertionError("unreachable")  # the loop returns or raises


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _failure_message(model_name: str, run_path: str, error: BaseException) -> str:
    if is_url(run_path):  # not scanned from here: Ray Train resumes from the latest one it recorded
        where = f"its checkpoints are under {run_path}"
    else:
        latest = latest_valid_checkpoint(Path(run_path))
        where = f"the last good checkpoint is {latest}" if latest else "no valid checkpoint was written"
    return f"training {model_name} failed ({type(error).__name__}: {error}); {where}"


def _export(config: PipelineConfig, model_name: str, result, seconds: float, shard_location: str) -> TrainOutcome:
    """Copy the best and last scored weights out of the run's last checkpoint into runs/<run>/models/<model>/,
    with the config.json that says what they are (tasks/inference/model_ref.py).

    The last checkpoint carries the best epoch's scored weights (EMA when on), so what is exported as best is
    exactly what was validated as best, whatever checkpoints Ray kept.
    """
    if result.checkpoint is None:
        raise TrainingError(f"training {model_name} finished without a checkpoint")
    layout = RunLayout.of(config)
    out = layout.model_dir(model_name)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        metadata = read_checkpoint_metadata(Path(directory))  # raises CheckpointError on a damaged checkpoint
        shutil.copyfile(Path(directory) / BEST_WEIGHTS, layout.weights(model_name))
        shutil.copyfile(Path(directory) / metadata.get("scored_weights", WEIGHTS), layout.weights(model_name, "last"))
    write_model_config(out, config, model_name, shard_location)
    history, best_epoch = metadata["history"], metadata["best_epoch"]
    best_val_acc = history[best_epoch - 1]["val_acc"]
    checkpoint_dir = _checkpoint_location(config, model_name, result.checkpoint)
    summary = {"model": model_name, "history": history, "best_epoch": best_epoch, "best_val_acc": best_val_acc,
               "train_seconds": seconds, "checkpoint_dir": checkpoint_dir}
    layout.metrics(model_name).write_text(json.dumps(summary, indent=2))
    return TrainOutcome(model_name, layout.weights(model_name), layout.weights(model_name, "last"), history, best_epoch,
                        best_val_acc, checkpoint_dir, seconds)


def _checkpoint_location(config: PipelineConfig, model_name: str, checkpoint) -> str:
    """The checkpoint's path, or its URL on object storage (Ray gives a bucket path without the scheme)."""
    storage = config.checkpoint_location
    return f"{storage}/{model_name}/{Path(checkpoint.path).name}" if is_url(storage) else checkpoint.path
