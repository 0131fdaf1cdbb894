"""The `vit-pipeline` Prefect flow: the pipeline diagram, one task per box.

    shard -> verify -> train baseline (ResNet) -> train DeiT (distils from the baseline) -+
                    -> train ViT, train Swin (no teacher: they start at once) ------------+-> evaluate all
                                                  -> attention maps -> report -> publish [-> prune old runs]

Every task is a thin wrapper around a plain function in tasks/; the training and judging steps are imported in
their tasks, so deploying the flow (which imports this module) needs no torch, timm or Ray. Each flow run writes
its own directory, runs/<run>/<flow run>/, and its W&B runs form one group of the same name (flows/run_owner.py).
Shards are cached by what decides them, so every flow run reuses them while the data stays the same, and re-hashed once
per shard set (a training checks their sizes only). Trainings run
again in every flow run unless it is asked to reuse cached ones (`reuse_trainings`): then a training whose
configuration (all of it but where and how things run: tasks.config.training_fields), shards, checkpoint and
teacher match a finished one of the same run name is taken from the cache and
copied into this run's directory. The flow's result and its "trainings" artifact say which was which.
Publish links the best models in the W&B Registry when W&B is online; offline it leaves registry.json. A
retrained model far below the registered best ends the flow run Completed but named "Regressed", with an alert.
With orchestration.cluster.launcher set, the flow brings the Ray cluster up after the shards are verified
and takes it down once the last step that needs it (attention maps) ends, or the flow fails or is
cancelled (tasks/operations/cluster.py): the cluster costs nothing between scheduled runs.
With serving.deploy_after_publish, a last step puts one trained model behind HTTP with Ray Serve.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.runtime import flow_run
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.operations import TRAINING_TAG
from flows.run_owner import claim_run_directory, finish_run_directory
from tasks.config import ConfigError, OrchestrationConfig, PipelineConfig, is_url, load_config, training_fields
from tasks.data.manifest import Manifest, read_manifest, shard_listing, verify_shards
from tasks.data.shard import shard_cache_inputs, shard_from_config
from tasks.digests import file_sha256, json_sha256
from tasks.errors import ShardFormatError, TrainingError, is_deterministic
from tasks.layout import RunLayout
from tasks.operations.cluster import cluster_for_run, launcher_for
from tasks.operations.publish import PublishError
from tasks.operations.ray_jobs import TrainingCancelled, job_slots, jobs_api, jobs_stopped_on_exit, train_as_job
from tasks.operations.tracking import (
    dataset_artifact_name,
    files_artifact,
    manifest_snapshot,
    require_wandb_key,
    start_wandb_run,
    sync_command,
)

if TYPE_CHECKING:
    from tasks.judging.evaluate import EvaluationRecord
    from tasks.training.train import TrainOutcome

FLOW_NAME = "vit-pipeline"
# The final state's name of a flow run that published a model far below the registered best (Completed type).
REGRESSED_STATE = "Regressed"
DEFAULT_CONFIG_FILE = "configs/smoke.yaml"
# The thread pool only bounds bookkeeping threads; how many trainings really run at once is decided
# by the flow's training slots, sized by concurrent_trainings() against the Ray cluster.
MAX_TASK_THREADS = 16


def _digest(*parts: Any) -> str:
    return json_sha256(parts)[:32]


def _retry_transient(task, task_run, state) -> bool:
    error = state.result(raise_on_failure=False)
    if isinstance(error, (TrainingError, PublishError)):
        # Ray Train's own retries are spent, a retry would fail the same way, or someone stopped the training
        return error.retryable and not isinstance(error, TrainingCancelled)
    # Bad input or a bug does not get better by retrying; everything else (storage, network, a lost node) may.
    return not is_deterministic(error)


def shard_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    # v2: the task returns a Manifest, where it returned a dict; a result persisted as a dict must not be reused.
    return f"shard-v2-{_digest(shard_cache_inputs(parameters['config']))}"


def train_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Everything a training reads: its configuration (tasks.config.training_fields), the shards' fingerprint
    and the content of every weights file it starts from or distils from."""
    config: PipelineConfig = parameters["config"]
    name = parameters["model_name"]
    teacher = parameters.get("teacher_weights")
    spec = config.model.spec(name)
    decisive = {
        "config": training_fields(config, name),
        "manifest": parameters["manifest_fingerprint"],
        "teacher": file_sha256(Path(teacher)) if teacher else None,
        "checkpoints": [file_sha256(path) if path else None for path in (spec.pretrained_file, spec.teacher_file)],
        # The run name, not the flow run: a later flow run may reuse this training when asked to.
        "outputs": str(Path(config.run_root).absolute()),
    }
    return f"train-{name}-{_digest(decisive)}"


@task(name="shard", cache_key_fn=shard_cache_key, persist_result=True, retry_condition_fn=_retry_transient)
def shard_task(config: PipelineConfig, group: str) -> Manifest:
    result = shard_from_config(config, progress=False)
    get_run_logger().info(
        "%s: %s (fingerprint %s)", result.location, "reused" if result.skipped else "written",
        result.manifest.fingerprint[:12],
    )
    run = start_wandb_run(config, "shard", config.data.dataset, group)
    if run is not None:
        summary = {f"{split}_samples": info.num_samples for split, info in result.manifest.splits.items()}
        run.summary.update(summary)
        manifest = manifest_snapshot(result.location, RunLayout.of(config).wandb_inputs)
        run.log_artifact(files_artifact(dataset_artifact_name(config), "dataset", [manifest],
                                        metadata={"location": result.location, **summary}))
        run.finish()
    return result.manifest


def verify_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """One full verification per shard set: its location, its manifest and what a listing says of every shard
    file (size, modification time or ETag), so a shard written or touched since is verified again. Trainings
    check only the shards' sizes (tasks.training.train)."""
    location = parameters["config"].shard_location
    manifest = read_manifest(location)
    return f"verify-{_digest(location, None if manifest is None else manifest.to_json(), shard_listing(location))}"


@task(name="verify-shards", cache_key_fn=verify_cache_key, persist_result=True, retry_condition_fn=_retry_transient)
def verify_task(config: PipelineConfig) -> dict[str, int]:
    report = verify_shards(config.shard_location)
    if not report.ok:
        raise ShardFormatError(f"shards in {report.location} failed verification:\n  " + "\n  ".join(report.problems))
    get_run_logger().info("%s: %d shards, %d samples verified", report.location, report.shards_checked,
                          report.samples_checked)
    return {"shards": report.shards_checked, "samples": report.samples_checked}


# The tag carries the concurrency limit across flow runs (flows/operations.py).
@task(name="train", task_run_name="train-{model_name}", cache_key_fn=train_cache_key, persist_result=True,
      retry_condition_fn=_retry_transient, tags=[TRAINING_TAG])
def train_task(
    config: PipelineConfig, model_name: str, manifest_fingerprint: str, teacher_weights: str | None, group: str
) -> TrainOutcome:
    """Train one model on the cluster this process drives, or as a Ray Job followed from here when the
    cluster is reached through its Jobs API."""
    from tasks.training.train import train_model

    address = jobs_api(config)
    if address:
        return train_as_job(address, config, model_name, teacher_weights=teacher_weights, group=group,
                            flow_run_id=str(flow_run.get_id()), emit=get_run_logger().info)
    return train_model(config, model_name, teacher_weights=teacher_weights, group=group)


@task(name="evaluate", retry_condition_fn=_retry_transient)
def evaluate_task(config: PipelineConfig, trained: dict[str, str], group: str) -> list[EvaluationRecord]:
    from tasks.judging.evaluate import evaluate_models, markdown_table
    from tasks.training.train import on_training_device

    # On a GPU node when training ran on GPUs, so the speed measured is the training hardware's.
    records = on_training_device(config, evaluate_models, config, {name: Path(path) for name, path in trained.items()},
                                 group=group)
    create_table_artifact(key="evaluation", table=[_flat(record) for record in records],
                          description="Test accuracy and compute of every model")
    create_markdown_artifact(key="evaluation-summary", markdown=markdown_table(records))
    return records


@task(name="attention-maps", retry_condition_fn=_retry_transient)
def attention_task(config: PipelineConfig, trained: dict[str, str], group: str) -> dict[str, str]:
    from tasks.judging.attention import attention_maps
    from tasks.training.train import on_training_device

    transformers = {spec.name for spec in config.model.transformers}
    grids = on_training_device(config, attention_maps, config,
                               {name: Path(path) for name, path in trained.items() if name in transformers},
                               group=group)
    for name, grid in grids.items():
        create_link_artifact(key=f"attention-{_artifact_key(name)}", link=Path(grid).absolute().as_uri(),
                             link_text=f"attention maps of {name}")
    return {name: str(grid) for name, grid in grids.items()}


@task(name="publish", retry_condition_fn=_retry_transient)
def publish_task(config: PipelineConfig) -> dict:
    """The best model of each family into the W&B Registry online; offline, the plan in registry.json."""
    from tasks.operations.publish import publish, publish_run_command

    path, linked = publish(config)
    if linked is None:
        get_run_logger().info("W&B is offline: what would be linked is in %s; after `%s`, run `%s`", path,
                              sync_command(config), publish_run_command(config))
        create_link_artifact(key="registry-plan", link=path.absolute().as_uri(),
                             link_text="models to link in the W&B Registry (offline)")
        return {"registry_plan": str(path), "linked": {}, "regressions": []}
    table = [{"model": e["model"], "version": e["linked"]["version"], "aliases": ", ".join(e["linked"]["aliases"]),
              "why": e["linked"]["reason"]} for e in linked]
    create_table_artifact(key="registry", table=table, description="Models linked in the W&B Registry")
    return {"registry_plan": str(path), "linked": {e["model"]: e["linked"]["version"] for e in linked},
            "regressions": [e["linked"]["regression"] for e in linked if e["linked"].get("regression")]}


@task(name="prune", retry_condition_fn=_retry_transient)
def prune_task(config: PipelineConfig) -> dict[str, Any]:
    """Retention after a finished run: delete old flow runs' directories and checkpoints (storage.keep_runs)."""
    from tasks.operations.retention import prune

    retention = prune(config)
    table = [{"flow run": name, "kept": "yes", "why": why} for name, why in sorted(retention.kept.items())]
    table += [{"flow run": name, "kept": "deleted", "why": ", ".join(paths)}
              for name, paths in sorted(retention.deleted.items())]
    create_table_artifact(key="retention", table=table, description=f"Flow runs of {config.tracking.run_name} "
                          f"kept and deleted (storage.keep_runs {config.storage.keep_runs})")
    return {"kept": retention.kept, "deleted": retention.deleted}


@task(name="serve")
def serve_task(config: PipelineConfig, model_name: str) -> str:
    """Deploy a trained model with Ray Serve on the run's Ray cluster (serving.deploy_after_publish)."""
    from tasks.inference.serve import PREDICT_PATH, serve_trained_model

    url = serve_trained_model(config, model_name)
    create_link_artifact(key="serving", link=f"{url}{PREDICT_PATH}", link_text=f"{model_name} on Ray Serve")
    return url


@task(name="report", retry_condition_fn=_retry_transient)
def report_task(config: PipelineConfig, records: list[EvaluationRecord], group: str) -> dict[str, str]:
    from tasks.judging.report import write_report

    paths = write_report(config, records, group=group)
    markdown = Path(paths["markdown"])
    create_markdown_artifact(key="report", markdown=markdown.read_text(),
                             description=f"vit-pipeline report; with plots: {Path(paths['html']).absolute()}")
    return {key: str(path) for key, path in paths.items()}


def _flat(record: EvaluationRecord) -> dict:
    """Prefect tables show scalars; nested fields (confusion matrix, per-class) stay in evaluation.json."""
    return {key: value for key, value in record.to_json().items() if not isinstance(value, (dict, list))}


def _artifact_key(name: str) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _links(config: PipelineConfig, dashboard: str | None) -> None:
    wandb_dir = RunLayout.of(config).wandb_dir.absolute()
    create_link_artifact(key="wandb-runs", link=wandb_dir.as_uri(), link_text="W&B run directories (offline)",
                         description=f"Upload with: {sync_command(config)}")
    if dashboard:
        url = dashboard if "://" in dashboard else f"http://{dashboard}"
        create_link_artifact(key="ray-dashboard", link=url, link_text="Ray dashboard")


def _result_storage(config: PipelineConfig) -> LocalFileSystem | RemoteFileSystem | None:
    """storage.results as a Prefect file system block (None: Prefect's default, local to this machine).

    Prefect accepts only blocks saved on its server; the name follows from the location, so every flow run
    writing there shares one block and finds the others' cached results."""
    location = config.storage.results
    if location is None:
        return None
    block = RemoteFileSystem(basepath=location) if is_url(location) else LocalFileSystem(basepath=location)
    block.save(f"vit-pipeline-results-{_digest(location)[:12]}", overwrite=True)
    return block


def _connect_cluster(config: PipelineConfig) -> tuple[str | None, int]:
    """Reach the Ray cluster that trains: its dashboard and how many trainings it holds at once."""
    from tasks.training.train import concurrent_trainings, ensure_ray

    address = jobs_api(config)
    dashboard = address or ensure_ray(config)
    limit = config.orchestration.max_concurrent_trainings
    return dashboard, limit or (job_slots(config, address) if address else concurrent_trainings(config))


def _this_runs_copy(config: PipelineConfig, outcome: TrainOutcome) -> TrainOutcome:
    """A training reused from an earlier flow run, copied into this run's models/ (its directory is whole)."""
    out = RunLayout.of(config).model_dir(outcome.model)
    if outcome.best_weights.parent.resolve() == out.resolve():
        return outcome
    out.mkdir(parents=True, exist_ok=True)
    for source in outcome.best_weights.parent.iterdir():
        if source.is_file():
            shutil.copy2(source, out / source.name)
    return dataclasses.replace(outcome, best_weights=out / outcome.best_weights.name,
                               last_weights=out / outcome.last_weights.name)


def _train_models(config: PipelineConfig, fingerprint: str, group: str, slots: int,
                  reuse: bool) -> tuple[dict[str, TrainOutcome], dict[str, str]]:
    """Every model's training, each waiting for exactly what it needs: one of `slots` (the next starts as
    soon as one ends), and a DeiT its teacher. The baseline goes first: the DeiT waits for it.

    Returns the outcomes and, per model, "trained" or "reused from <the directory it was trained in>".
    """
    options = config.orchestration
    train = train_task.with_options(retries=options.retries, retry_delay_seconds=options.retry_delay_seconds,
                                     refresh_cache=not reuse, result_storage=_result_storage(config))
    free = threading.BoundedSemaphore(slots)
    outcomes: dict[str, TrainOutcome] = {}
    how: dict[str, str] = {}

    def start(name: str, teacher: str | None, wait_for=()):
        if not free.acquire(blocking=False):
            get_run_logger().info("%s waits for a training slot (%d at once)", name, slots)
            free.acquire()
        future = train.submit(config, name, fingerprint, teacher, group, wait_for=wait_for)
        future.add_done_callback(lambda _: free.release())
        return future

    def settle(name: str, future, teacher: str | None) -> TrainOutcome:
        outcome, cached = future.result(), future.state.name == "Cached"
        if not (outcome.best_weights.is_file() and outcome.last_weights.is_file()):
            get_run_logger().warning("%s: the cached training's weights are gone, training again", name)
            with free:
                outcome = train.with_options(refresh_cache=True)(config, name, fingerprint, teacher, group)
            cached = False
        how[name] = f"reused from {outcome.best_weights.parent}" if cached else "trained"
        outcomes[name] = _this_runs_copy(config, outcome)
        return outcomes[name]

    baseline = config.model.baseline.name
    students = [spec.name for spec in config.model.transformers if spec.teacher == "baseline"]
    futures = {baseline: start(baseline, None)}
    for spec in config.model.transformers:
        if spec.name not in students:
            futures[spec.name] = start(spec.name, None)
    teacher = str(settle(baseline, futures[baseline], None).best_weights)
    for name in students:
        futures[name] = start(name, teacher, wait_for=[futures[baseline]])
    for name, future in futures.items():
        if name != baseline:
            settle(name, future, teacher if name in students else None)
    return {name: outcomes[name] for name in futures}, {name: how[name] for name in futures}


def _cluster_steps(config: PipelineConfig, fingerprint: str, group: str, reuse: bool
                   ) -> tuple[dict[str, TrainOutcome], dict[str, str], list[EvaluationRecord], dict[str, str]]:
    """What runs on the Ray cluster: the trainings, then evaluation and attention maps of their models."""
    options = config.orchestration
    dashboard, slots = _connect_cluster(config)
    _links(config, dashboard)
    with jobs_stopped_on_exit(jobs_api(config), str(flow_run.get_id())):
        outcomes, how = _train_models(config, fingerprint, group, slots, reuse)
    create_table_artifact(key="trainings", table=[{"model": name, "training": text} for name, text in how.items()],
                          description="Which models this flow run trained and which it reused")

    trained = {name: str(outcome.best_weights) for name, outcome in outcomes.items()}
    evaluate_options = _evaluate_options(options)
    records = evaluate_task.with_options(**evaluate_options)(config, trained, group)
    grids = attention_task.with_options(**evaluate_options)(config, trained, group)
    return outcomes, how, records, grids


def _evaluate_options(options: OrchestrationConfig) -> dict[str, Any]:
    return dict(timeout_seconds=options.evaluate_timeout_minutes * 60, retries=options.retries,
                retry_delay_seconds=options.retry_delay_seconds)


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASK_THREADS))
def vit_pipeline(
    config: PipelineConfig | None = None,
    config_file: str = DEFAULT_CONFIG_FILE,
    overrides: list[str] | None = None,
    reuse_trainings: bool = False,
) -> dict[str, Any] | State:
    """Shard, verify, train the baseline and the transformers, evaluate, map attention, report.

    `config` (the form in the Prefect UI) wins; otherwise `config_file` plus `section.field=value` overrides.
    `reuse_trainings`: take trainings from the cache when an identical one finished before, instead of
    training every model again.
    """
    logger = get_run_logger()
    config = config or load_config(config_file, overrides or [])
    if (key := require_wandb_key(config)) is not None:  # before hours of training, not after
        logger.info("W&B online (entity %s, project %s), API key from %s",
                    config.tracking.entity or "the key's default", config.tracking.project, key)
    if config.serving.deploy_after_publish and (jobs_api(config) or config.orchestration.cluster.launcher is not None):
        raise ConfigError("serving.deploy_after_publish deploys from the flow's own process, which must join a Ray "
                          "cluster that outlives the flow run as a driver: scaling.ray_address is a Jobs API URL or "
                          "orchestration.cluster.launcher takes the cluster down after the run; give a standing "
                          "cluster's <head>:6379 (or 'auto' on one of its nodes) instead")
    options = config.orchestration
    claim = claim_run_directory(config, str(flow_run.get_id()), flow_run.get_name())
    config = claim.config
    for crashed in claim.crashed:
        logger.warning("flow run %s of %s had died without a final state: marked Crashed", crashed,
                       config.run_root)
    if claim.continued:
        logger.warning("continuing %s, left unfinished by flow run %s: its trainings resume from their "
                       "checkpoints", config.run_dir, claim.continued)
    group = config.tracking.flow_run
    limits = dict(retries=options.retries, retry_delay_seconds=options.retry_delay_seconds)
    shard_limits = dict(timeout_seconds=options.shard_timeout_minutes * 60, **limits)

    manifest = shard_task.with_options(result_storage=_result_storage(config), **shard_limits)(config, group)
    verify_task.with_options(result_storage=_result_storage(config), **shard_limits)(config)

    launcher = launcher_for(options.cluster)
    with cluster_for_run(config, launcher, emit=logger.info) as on_cluster:
        outcomes, how, records, grids = _cluster_steps(on_cluster, manifest.fingerprint, group, reuse_trainings)
    report = report_task.with_options(**_evaluate_options(options))(config, records, group)
    finish_run_directory(config)
    logger.info("report: %s", Path(report["html"]).absolute())
    logger.info("W&B runs are offline unless tracking.mode is online with WANDB_API_KEY set; upload with: %s",
                sync_command(config))
    # Last, after the run directory is complete: a publish that cannot reach W&B fails the flow run (someone
    # must know the Registry was not updated) and is redone from registry.json with `vit-pipeline publish`.
    published = None
    if config.tracking.publish != "never" and config.tracking.mode != "disabled":
        published = publish_task.with_options(**limits)(config)
    # After publish, so that registry.json says which runs hold `best` and `latest` (those are kept).
    pruned = prune_task.with_options(**limits)(config) if config.storage.prune_after_run else None
    accuracies = {name: outcome.best_val_acc for name, outcome in outcomes.items()}
    served = None
    if config.serving.deploy_after_publish:  # lives as long as the Ray cluster (a local one ends with the flow)
        from tasks.inference.serve import model_to_serve

        served = serve_task(config, model_to_serve(config, accuracies))
    result = {"run_dir": str(RunLayout.of(config).root.absolute()), "report": report, "attention": grids,
              "trainings": how, "models": accuracies, "published": published, "pruned": pruned, "served": served}
    return flagged_if_regressed(result, published["regressions"] if published else [])


def flagged_if_regressed(result: dict[str, Any], regressions: list[str]) -> dict[str, Any] | State:
    """The flow's result, or with a retrained model far below the registered best, a Completed state named
    REGRESSED_STATE that carries it: the run did all it should (the model is linked as `latest`, `best` stays),
    so it neither fails (which would page as a failure and invite a retry that trains again) nor looks like any
    other week. The publish step's alert has already gone to the notification block; the "regressions" artifact
    says which models and by how much."""
    if not regressions:
        return result
    create_markdown_artifact(key="regressions", markdown="\n".join(f"- {text}" for text in regressions),
                             description="Retrained models more than tracking.regression_margin below the "
                                         "registered best")
    return Completed(name=REGRESSED_STATE, message="; ".join(regressions), data=result)
