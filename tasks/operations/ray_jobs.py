"""Trainings as Ray Jobs: how a flow outside the cluster (KubeRay's Prefect worker) trains on it.

Ray's Jobs API is what Ray recommends for running a Ray Train script on a cluster from elsewhere (Ray
Client is not). Each training is one job whose driver runs on the head node and calls
tasks.training.train.train_model there, a native driver like the flow on the head under the cluster launcher.
The flow process follows the job: its logs go to the flow's log, its status decides the task's, and
leaving the flow early (a Prefect cancellation is a SIGTERM, a failure an exception) stops the jobs it
submitted. The job's run directory is the flow's: both must see the same storage (infra/README.md).

`python -m tasks.operations.ray_jobs` is the job's entrypoint; its request travels in the job's environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import PipelineConfig, is_url
from tasks.errors import TrainingError

if TYPE_CHECKING:
    from tasks.training.train import TrainOutcome

log = logging.getLogger(__name__)

REQUEST_ENV = "VIT_PIPELINE_TRAINING_REQUEST"
# The job driver's last line: the outcome, for the follower to read from the job's logs.
OUTCOME_MARKER = "vit-pipeline-training-outcome: "
# Printed by a job whose training failed in a way a retry cannot fix, so the flow does not retry it either.
NOT_RETRYABLE_MARKER = "vit-pipeline-training-not-retryable"
# Metadata on every job, so the jobs of one flow run can be found (and stopped) again.
FLOW_RUN_KEY = "vit_pipeline_flow_run"
POLL_SECONDS = 2.0
# How long the Jobs API may stay unreachable (head restarting, network) before following gives up.
API_PATIENCE_SECONDS = 300.0


class TrainingCancelled(TrainingError):
    """The training's Ray Job was stopped before it finished."""


def jobs_api(config: PipelineConfig) -> str | None:
    """The Ray Jobs API address (http(s)://head:8265) when trainings are submitted as jobs, else None."""
    from tasks.training.train import ray_address  # the training step's torch stays out of the flows' imports

    address = ray_address(config)
    return address if address and is_url(address) else None


def client(address: str):
    """A Jobs API client; with RAY_AUTH_MODE=token it presents RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def cluster_resources(address: str) -> dict[str, float]:
    """Total resources of the cluster's live nodes, read through its dashboard."""
    from ray.util.state import list_nodes

    totals: dict[str, float] = {}
    for node in list_nodes(address=address, filters=[("state", "=", "ALIVE")]):
        for name, amount in node.resources_total.items():
            totals[name] = totals.get(name, 0.0) + amount
    return totals


def job_slots(config: PipelineConfig, address: str) -> int:
    from tasks.training.train import concurrent_trainings

    return concurrent_trainings(config, cluster_resources(address))


def training_request(config: PipelineConfig, model_name: str, teacher_weights: str | None,
                     group: str | None) -> dict:
    # The driver joins the cluster it runs on (Ray sets its RAY_ADDRESS), not the Jobs API.
    config = config.model_copy(update={"scaling": config.scaling.model_copy(update={"ray_address": None})})
    return {"config": config.model_dump_json(), "model": model_name, "teacher_weights": teacher_weights,
            "group": group}


def submit_training(address: str, config: PipelineConfig, model_name: str, *, teacher_weights: str | None,
                    group: str | None, flow_run_id: str | None) -> str:
    """Submit one training as a Ray Job; returns its submission id."""
    request = training_request(config, model_name, teacher_weights, group)
    submission_id = f"vit-pipeline-{group or config.tracking.run_name}-{model_name}-{uuid.uuid4().hex[:8]}"
    client(address).submit_job(
        entrypoint="python -m tasks.operations.ray_jobs",
        submission_id=submission_id,
        runtime_env={"env_vars": {REQUEST_ENV: json.dumps(request)}},
        metadata={FLOW_RUN_KEY: flow_run_id or "", "model": model_name, "run_dir": str(config.run_dir)},
    )
    return submission_id


def follow_job(address: str, submission_id: str, emit: Callable[[str], None]) -> TrainOutcome:
    """Wait for the job to end, passing each new log line to `emit`; its outcome, or TrainingError."""
    from ray.job_submission import JobStatus

    jobs = client(address)
    shown, status, unreachable_since = 0, None, None
    while status is None or not status.is_terminal():
        time.sleep(POLL_SECONDS)
        try:
            status = jobs.get_job_status(submission_id)
            logs = jobs.get_job_logs(submission_id)
        except (ConnectionError, OSError, RuntimeError) as error:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > API_PATIENCE_SECONDS:
                raise TrainingError(f"Ray Job {submission_id}: the Jobs API at {address} has not answered for "
                                    f"{API_PATIENCE_SECONDS:.0f}s ({error}); the job may still be running") from error
            continue
        unreachable_since = None
        complete = logs[:logs.rfind("\n") + 1]  # a line still being written waits for the next poll
        for line in complete[shown:].splitlines():
            emit(line)
        shown = max(shown, len(complete))
    if status == JobStatus.SUCCEEDED:
        return _outcome_from_logs(submission_id, logs)
    message = jobs.get_job_info(submission_id).message or ""
    if status == JobStatus.STOPPED:
        raise TrainingCancelled(f"Ray Job {submission_id} was stopped before it finished")
    tail = "\n".join(logs.splitlines()[-20:])
    raise TrainingError(f"Ray Job {submission_id} {status}: {message}\n{tail}",
                        retryable=NOT_RETRYABLE_MARKER not in logs)


def _outcome_from_logs(submission_id: str, logs: str) -> TrainOutcome:
    for line in reversed(logs.splitlines()):
        if line.startswith(OUTCOME_MARKER):
            return outcome_from_json(line.removeprefix(OUTCOME_MARKER))
    raise TrainingError(f"Ray Job {submission_id} succeeded but did not report its outcome")


def outcome_to_json(outcome: TrainOutcome) -> str:
    return json.dumps(dataclasses.asdict(outcome), default=str)


def outcome_from_json(text: str) -> TrainOutcome:
    from tasks.training.train import TrainOutcome

    fields = json.loads(text)
    paths = {field.name for field in dataclasses.fields(TrainOutcome) if field.type in ("Path", Path)}
    arguments: dict[str, Any] = {key: Path(value) if key in paths else value for key, value in fields.items()}
    return TrainOutcome(**arguments)


def train_as_job(address: str, config: PipelineConfig, model_name: str, *, teacher_weights: str | None,
                 group: str | None, flow_run_id: str | None, emit: Callable[[str], None]) -> TrainOutcome:
    """Submit the training and follow it to its end; the job is stopped if following is interrupted."""
    submission_id = submit_training(address, config, model_name, teacher_weights=teacher_weights, group=group,
                                    flow_run_id=flow_run_id)
    emit(f"submitted Ray Job {submission_id} to {address}")
    try:
        return follow_job(address, submission_id, emit)
    except BaseException:
        stop_jobs(address, [submission_id])
        raise


def stop_jobs(address: str, submission_ids: list[str]) -> list[str]:
    """Stop those of the jobs still running; returns the ids stopped."""
    jobs, stopped = client(address), []
    for submission_id in submission_ids:
        if not jobs.get_job_status(submission_id).is_terminal() and jobs.stop_job(submission_id):
            stopped.append(submission_id)
    return stopped


def flow_run_jobs(address: str, flow_run_id: str) -> list[str]:
    """The submission ids of the jobs a flow run submitted that have not ended."""
    return [job.submission_id for job in client(address).list_jobs()
            if (job.metadata or {}).get(FLOW_RUN_KEY) == flow_run_id and not job.status.is_terminal()]


@contextlib.contextmanager
def jobs_stopped_on_exit(address: str | None, flow_run_id: str | None) -> Iterator[None]:
    """Stop the flow run's unfinished jobs when the block is left by an exception, a Prefect cancellation
    (TerminationSignal, raised by SIGTERM) or Ctrl-C: a job outlives the flow process otherwise."""
    try:
        yield
    except BaseException:
        if address and flow_run_id:
            stopped = stop_jobs(address, flow_run_jobs(address, flow_run_id))
            if stopped:
                log.warning("stopped the Ray Jobs of flow run %s: %s", flow_run_id, ", ".join(stopped))
        raise


def main() -> int:
    """The job's driver: train the requested model on the cluster it runs on, report the outcome."""
    from tasks.training.train import train_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    request = json.loads(os.environ[REQUEST_ENV])
    config = PipelineConfig.model_validate_json(request["config"])
    try:
        outcome = train_model(config, request["model"], teacher_weights=request["teacher_weights"],
                              group=request["group"])
    except TrainingError as error:
        if not error.retryable:
            print(NOT_RETRYABLE_MARKER, flush=True)
        raise
    print(OUTCOME_MARKER + outcome_to_json(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
