"""The `vit-pipeline` Prefect flow: the pipeline diagram, one task per box.

    shard -> verify -> train baseline -> train transformers (DeiT distils from the baseline)
          -> evaluate all -> attention maps -> report

Every task is a thin wrapper around a plain function in tasks/. Cache keys hash exactly what decides a
step's output (the data section for the shards; the manifest fingerprint, the model's config and the
teacher's weights for a training), and results are persisted, so re-running the same parameters skips
finished steps and a changed model config retrains only that model.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.checkpoints import CheckpointError
from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.samples import ShardFormatError
from tasks.shard import shard_from_config, verify_shards
from tasks.sources import SourceError
from tasks.tracking import (
    dataset_artifact_name,
    file_digest,
    files_artifact,
    manifest_snapshot,
    start_wandb_run,
    sync_command,
)
from tasks.train import TrainingError, TrainOutcome, concurrent_trainings, ensure_ray, train_model

FLOW_NAME = "vit-pipeline"
DEFAULT_CONFIG_FILE = "configs/smoke.yaml"
# Bad input does not get better by retrying; everything else (storage, network, a lost node) may.
PERMANENT_ERRORS = (ConfigError, SourceError, ShardFormatError, CheckpointError, ValueError, TypeError, KeyError)
# The thread pool only bounds bookkeeping threads; how many trainings really run at once is decided
# by concurrent_trainings() against the Ray cluster.
MAX_TASK_THREADS = 16
# runs/<run>/ names the flow run writing it and its process, so a later run can tell one that died.
RUN_OWNER_FILE = "flow-run.json"


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _retry_transient(task, task_run, state) -> bool:
    error = state.result(raise_on_failure=False)
    if isinstance(error, TrainingError):
        return error.retryable  # Ray Train's own retries are spent, or a retry would fail the same way
    return not isinstance(error, PERMANENT_ERRORS)


def shard_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    config: PipelineConfig = parameters["config"]
    data = config.data.model_dump(
        mode="json",
        include={"dataset", "data_root", "shard_size", "image_format", "image_size", "shuffle_seed", "val_size",
                 "split_seed"},
    )
    return f"shard-{_digest(data, config.shard_location)}"


def train_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    config: PipelineConfig = parameters["config"]
    name = parameters["model_name"]
    teacher = parameters.get("teacher_weights")
    decisive = {
        "model": config.model.spec(name).model_dump(mode="json"),
        "training": config.training.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json", include={"augment", "mean", "std", "shuffle_buffer"}),
        "num_workers": config.scaling.num_workers,
        "manifest": parameters["manifest_fingerprint"],
        "teacher": file_digest(Path(teacher)) if teacher else None,
        "outputs": str(Path(config.run_dir).absolute()),
    }
    return f"train-{name}-{_digest(decisive)}"


@task(name="shard", cache_key_fn=shard_cache_key, persist_result=True, retry_condition_fn=_retry_transient)
def shard_task(config: PipelineConfig, group: str) -> dict:
    result = shard_from_config(config, progress=False)
    get_run_logger().info(
        "%s: %s (fingerprint %s)", result.location, "reused" if result.skipped else "written",
        result.manifest["fingerprint"][:12],
    )
    run = start_wandb_run(config, "shard", config.data.dataset, group)
    if run is not None:
        summary = {f"{split}_samples": info["num_samples"] for split, info in result.manifest["splits"].items()}
        run.summary.update(summary)
        manifest = manifest_snapshot(result.location, Path(config.run_dir) / "wandb-inputs")
        run.log_artifact(files_artifact(dataset_artifact_name(config), "dataset", [manifest],
                                        metadata={"location": result.location, **summary}))
        run.finish()
    return result.manifest


@task(name="verify-shards", retry_condition_fn=_retry_transient)
def verify_task(config: PipelineConfig) -> None:
    report = verify_shards(config.shard_location)
    if not report.ok:
        raise ShardFormatError(f"shards in {report.location} failed verification:\n  " + "\n  ".join(report.problems))
    get_run_logger().info("%s: %d shards, %d samples verified", report.location, report.shards_checked,
                          report.samples_checked)


@task(name="train", task_run_name="train-{model_name}", cache_key_fn=train_cache_key, persist_result=True,
      retry_condition_fn=_retry_transient)
def train_task(
    config: PipelineConfig, model_name: str, manifest_fingerprint: str, teacher_weights: str | None, group: str
) -> TrainOutcome:
    return train_model(config, model_name, teacher_weights=teacher_weights, group=group)


@task(name="evaluate", retry_condition_fn=_retry_transient)
def evaluate_task(config: PipelineConfig, trained: dict[str, str], group: str) -> list[dict]:
    from tasks.evaluate import evaluate_models, markdown_table

    records = evaluate_models(config, {name: Path(path) for name, path in trained.items()}, group=group)
    create_table_artifact(key="evaluation", table=[_flat(record) for record in records],
                          description="Test accuracy and compute of every model")
    create_markdown_artifact(key="evaluation-summary", markdown=markdown_table(records))
    return records


@task(name="attention-maps", retry_condition_fn=_retry_transient)
def attention_task(config: PipelineConfig, trained: dict[str, str], group: str) -> dict[str, str]:
    from tasks.attention import attention_maps

    transformers = {spec.name for spec in config.model.transformers}
    grids = attention_maps(config, {name: Path(path) for name, path in trained.items() if name in transformers},
                           group=group)
    for name, grid in grids.items():
        create_link_artifact(key=f"attention-{_artifact_key(name)}", link=Path(grid).absolute().as_uri(),
                             link_text=f"attention maps of {name}")
    return {name: str(grid) for name, grid in grids.items()}


@task(name="report", retry_condition_fn=_retry_transient)
def report_task(config: PipelineConfig, records: list[dict], group: str) -> dict[str, str]:
    from tasks.report import write_report

    paths = write_report(config, records, group=group)
    markdown = Path(paths["markdown"])
    create_markdown_artifact(key="report", markdown=markdown.read_text(),
                             description=f"vit-pipeline report; with plots: {Path(paths['html']).absolute()}")
    return {key: str(path) for key, path in paths.items()}


def _flat(record: dict) -> dict:
    """Prefect tables show scalars; nested fields (confusion matrix, per-class) stay in evaluation.json."""
    return {key: value for key, value in record.items() if not isinstance(value, (dict, list))}


def _artifact_key(name: str) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _train(config: PipelineConfig, name: str, fingerprint: str, teacher: str | None, group: str):
    options = config.orchestration
    return train_task.with_options(
        retries=options.retries, retry_delay_seconds=options.retry_delay_seconds
    ).submit(config, name, fingerprint, teacher, group)


def _usable(outcome: TrainOutcome) -> bool:
    """A cached training whose exported weights were deleted since must run again."""
    return outcome.best_weights.is_file() and outcome.last_weights.is_file()


def _train_all(config: PipelineConfig, teachers: dict[str, str | None], fingerprint: str, group: str,
               slots: int) -> dict[str, TrainOutcome]:
    """Train every model in `teachers` (name -> teacher weights) with at most `slots` in flight."""
    names = list(teachers)
    outcomes: dict[str, TrainOutcome] = {}
    for start in range(0, len(names), slots):
        batch = names[start:start + slots]
        futures = {name: _train(config, name, fingerprint, teachers[name], group) for name in batch}
        for name, future in futures.items():
            outcome = future.result()
            if not _usable(outcome):
                get_run_logger().warning("%s: cached weights are gone, training again", name)
                outcome = train_task.with_options(refresh_cache=True)(
                    config, name, fingerprint, teachers[name], group
                )
            outcomes[name] = outcome
    return outcomes


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"


def _alive(owner: dict) -> bool:
    start = _process_start(owner["pid"])
    return start is not None and (start == "unknown" or owner.get("start") in (None, start))


def crash_orphaned_run(config: PipelineConfig, current_id: str | None) -> str | None:
    """Mark the previous flow run of this run directory Crashed if its process is gone; then claim it.

    A flow killed outright (SIGKILL, OOM killer, power loss) never reports a final state, so Prefect
    shows it Running forever. The run directory records which flow run and process last wrote it; a
    later run on the same host checks that process and, when it is gone while Prefect still says
    Running, sets that flow run Crashed. Runs on other hosts are left to Prefect's heartbeats.
    Returns the id of the flow run marked Crashed, if any.
    """
    from prefect import get_client
    from prefect.states import Crashed

    path = Path(config.run_dir) / RUN_OWNER_FILE
    crashed = None
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        owner = None
    if owner and owner.get("flow_run_id") not in (None, current_id) and owner.get("host") == socket.gethostname():
        if not _alive(owner):
            with get_client(sync_client=True) as client:
                try:
                    previous = client.read_flow_run(owner["flow_run_id"])
                except Exception:  # noqa: BLE001  (another API, or deleted since: nothing to mark)
                    previous = None
                if previous is not None and previous.state is not None and previous.state.is_running():
                    client.set_flow_run_state(
                        previous.id,
                        Crashed(message=f"process {owner['pid']} on {owner['host']} exited without reporting "
                                        f"a final state; found by flow run {current_id}"),
                        force=True,
                    )
                    crashed = str(previous.id)
    if current_id is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"flow_run_id": current_id, "host": socket.gethostname(), "pid": os.getpid(),
                  "start": _process_start(os.getpid())}
        temporary = path.with_name(f".{RUN_OWNER_FILE}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, path)
    return crashed


def _links(config: PipelineConfig, dashboard: str | None) -> None:
    wandb_dir = (Path(config.run_dir) / "wandb").absolute()
    create_link_artifact(key="wandb-runs", link=wandb_dir.as_uri(), link_text="W&B run directories (offline)",
                         description=f"Upload with: {sync_command(config)}")
    if dashboard:
        url = dashboard if "://" in dashboard else f"http://{dashboard}"
        create_link_artifact(key="ray-dashboard", link=url, link_text="Ray dashboard")


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASK_THREADS), log_prints=True)
def vit_pipeline(
    config: PipelineConfig | None = None,
    config_file: str = DEFAULT_CONFIG_FILE,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Shard, verify, train the baseline and the transformers, evaluate, map attention, report.

    `config` (the form in the Prefect UI) wins; otherwise `config_file` plus `section.field=value` overrides.
    """
    config = config or load_config(config_file, overrides or [])
    options = config.orchestration
    group = flow_run.get_name() or config.tracking.run_name
    limits = dict(retries=options.retries, retry_delay_seconds=options.retry_delay_seconds)
    crashed = crash_orphaned_run(config, flow_run.get_id())
    if crashed:
        get_run_logger().warning("flow run %s of %s had died without a final state: marked Crashed", crashed,
                                 config.run_dir)

    manifest = shard_task.with_options(timeout_seconds=options.shard_timeout_minutes * 60, **limits)(config, group)
    verify_task.with_options(timeout_seconds=options.shard_timeout_minutes * 60, **limits)(config)

    dashboard = ensure_ray(config)
    _links(config, dashboard)
    slots = options.max_concurrent_trainings or concurrent_trainings(config)
    fingerprint = manifest["fingerprint"]
    baseline = config.model.baseline.name
    outcomes = _train_all(config, {baseline: None}, fingerprint, group, slots)
    teacher = str(outcomes[baseline].best_weights)
    distils = {spec.name: teacher if spec.teacher == "baseline" else None for spec in config.model.transformers}
    outcomes |= _train_all(config, distils, fingerprint, group, slots)

    trained = {name: str(outcome.best_weights) for name, outcome in outcomes.items()}
    evaluate_options = dict(timeout_seconds=options.evaluate_timeout_minutes * 60, **limits)
    records = evaluate_task.with_options(**evaluate_options)(config, trained, group)
    grids = attention_task.with_options(**evaluate_options)(config, trained, group)
    report = report_task.with_options(**evaluate_options)(config, records, group)
    print(f"report: {Path(report['html']).absolute()}")
    print(f"W&B runs are offline unless tracking.mode is online with WANDB_API_KEY set; upload with: "
          f"{sync_command(config)}")
    return {"run_dir": str(Path(config.run_dir).absolute()), "report": report, "attention": grids,
            "models": {name: outcome.best_val_acc for name, outcome in outcomes.items()}}
