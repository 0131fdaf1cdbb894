"""Trainings and sweeps as Ray Jobs: how a flow outside the cluster (an off-cluster Prefect worker) trains on it.

Ray's Jobs API is what Ray recommends for running a Ray Train script on a cluster from elsewhere (Ray
Client is not). Each training is one job whose driver runs on the head node and calls
tasks.training.train.train_model there, a native driver like the flow on the head under the cluster launcher.
The flow process follows the job: its logs stream (Ray's log tail, each line once) into the flow's log, its
status decides the task's, and leaving the flow early (a Prefect cancellation is a SIGTERM, a failure an
exception) stops the jobs it submitted; so does the follower's process ending with jobs still followed (an
uncaught signal, interpreter exit). A follower killed outright (SIGKILL: the sidecar's container killed) leaves
them running until the next flow run starts, which stops the jobs of flow runs that have ended. The job's run
directory is the flow's: both must see the same storage (infra/README.md).

A sweep is one job too: its driver runs Ray Tune on the head (tasks.operations.sweep.run_sweep), which
must join the cluster as a driver, and reports the sweep's outcome the same way.

`python -m tasks.operations.ray_jobs` is the job's entrypoint; its request travels in the job's environment.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from tasks.config import PipelineConfig, is_url
from tasks.errors import TrainingError
from tasks.operations.alerts import FORWARD_ENV, relay

if TYPE_CHECKING:
    from tasks.training.train import TrainOutcome

if TYPE_CHECKING:
    from tasks.operations.sweep import SweepOutcome

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
# Lines of a failed job's log that go into its error.
ERROR_TAIL_LINES = 20
# Signals that end a process without unwinding it (no `finally` runs): their handler stops the followed jobs.
FATAL_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# The jobs this process follows now (submission id -> Jobs API address), stopped if the process ends first.
_followed: dict[str, str] = {}
_followed_lock = threading.Lock()


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
    return {"config": _driver_config(config).model_dump_json(), "model": model_name,
            "teacher_weights": teacher_weights, "group": group}


def sweep_request(config: PipelineConfig, group: str | None) -> dict:
    return {"config": _driver_config(config).model_dump_json(), "sweep": True, "group": group}


def _driver_config(config: PipelineConfig) -> PipelineConfig:
    # The driver joins the cluster it runs on (Ray sets its RAY_ADDRESS), not the Jobs API.
    return config.model_copy(update={"scaling": config.scaling.model_copy(update={"ray_address": None})})


def submit_training(address: str, config: PipelineConfig, model_name: str, *, teacher_weights: str | None,
                    group: str | None, flow_run_id: str | None) -> str:
    """Submit one training as a Ray Job; returns its submission id."""
    return _submit(address, config, training_request(config, model_name, teacher_weights, group), model_name,
                   group=group, flow_run_id=flow_run_id)


def _submit(address: str, config: PipelineConfig, request: dict, what: str, *, group: str | None,
            flow_run_id: str | None) -> str:
    submission_id = f"vit-pipeline-{group or config.tracking.run_name}-{what}-{uuid.uuid4().hex[:8]}"
    client(address).submit_job(
        entrypoint="python -m tasks.operations.ray_jobs",
        submission_id=submission_id,
        runtime_env={"env_vars": {REQUEST_ENV: json.dumps(request)}},
        metadata={FLOW_RUN_KEY: flow_run_id or "", "model": what, "run_dir": str(config.run_dir)},
    )
    return submission_id


class JobLog:
    """A job's log as it arrives in chunks: each complete line goes to `emit` once; keeps what the outcome
    needs (the outcome line, the not-retryable marker, the last lines), never the whole log."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit
        self.received = 0  # characters of the log taken so far
        self.outcome_line: str | None = None
        self.not_retryable = False
        self.last_lines: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)
        self._partial = ""

    def take(self, text: str) -> None:
        self.received += len(text)
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            self._line(line)

    def close(self) -> None:
        """The log has ended: its last line may have no newline."""
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, line: str) -> None:
        self.emit(line)
        self.last_lines.append(line)
        if line.startswith(OUTCOME_MARKER):
            self.outcome_line = line.removeprefix(OUTCOME_MARKER)
        self.not_retryable = self.not_retryable or NOT_RETRYABLE_MARKER in line


async def _tail(jobs, submission_id: str, log: JobLog) -> None:
    """Stream the job's log into `log` until Ray closes the stream (the job ended). Ray's tail starts at the
    log's beginning on every connection, so after a reconnection what `log` has already taken is skipped."""
    streamed = 0
    async for chunk in jobs.tail_job_logs(submission_id):
        skip = max(0, log.received - streamed)
        streamed += len(chunk)
        if skip < len(chunk):
            log.take(chunk[skip:])


def follow_job(address: str, submission_id: str, emit: Callable[[str], None]) -> str:
    """Wait for the job to end, passing each new log line to `emit`; the outcome it reported (JSON), or
    TrainingError."""
    import aiohttp
    from ray.job_submission import JobStatus

    jobs, job_log = client(address), JobLog(emit)
    unreachable_since = None
    while True:
        try:
            asyncio.run(_tail(jobs, submission_id, job_log))
            status = jobs.get_job_status(submission_id)
        except (ConnectionError, OSError, RuntimeError, TimeoutError, aiohttp.ClientError) as error:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > API_PATIENCE_SECONDS:
                raise TrainingError(f"Ray Job {submission_id}: the Jobs API at {address} has not answered for "
                                    f"{API_PATIENCE_SECONDS:.0f}s ({error}); the job may still be running") from error
            time.sleep(POLL_SECONDS)
            continue
        unreachable_since = None
        if status.is_terminal():
            break
        time.sleep(POLL_SECONDS)  # the stream closed with the job still running (the dashboard restarted)
    job_log.close()
    if status == JobStatus.SUCCEEDED:
        if job_log.outcome_line is None:
            raise TrainingError(f"Ray Job {submission_id} succeeded but did not report its outcome")
        return job_log.outcome_line
    message = jobs.get_job_info(submission_id).message or ""
    if status == JobStatus.STOPPED:
        raise TrainingCancelled(f"Ray Job {submission_id} was stopped before it finished")
    tail = "\n".join(job_log.last_lines)
    raise TrainingError(f"Ray Job {submission_id} {status}: {message}\n{tail}", retryable=not job_log.not_retryable)


def outcome_to_json(outcome: TrainOutcome) -> str:
    return json.dumps(dataclasses.asdict(outcome), default=str)


def outcome_from_json(text: str) -> TrainOutcome:
    from tasks.training.train import TrainOutcome

    fields = json.loads(text)
    paths = {field.name for field in dataclasses.fields(TrainOutcome) if field.type in ("Path", Path)}
    arguments: dict[str, Any] = {key: Path(value) if key in paths else value for key, value in fields.items()}
    return TrainOutcome(**arguments)


def sweep_outcome_to_json(outcome: SweepOutcome) -> str:
    return json.dumps({"trials": [dataclasses.asdict(trial) for trial in outcome.trials],
                       "best_config": outcome.best_config.model_dump(mode="json"),
                       "results_file": str(outcome.results_file), "best_config_file": str(outcome.best_config_file),
                       "restored": outcome.restored, "seconds": outcome.seconds})


def sweep_outcome_from_json(text: str) -> SweepOutcome:
    from tasks.operations.sweep import SweepOutcome, TrialRecord

    fields = json.loads(text)
    return SweepOutcome([TrialRecord(**trial) for trial in fields["trials"]],
                        PipelineConfig.model_validate(fields["best_config"]), Path(fields["results_file"]),
                        Path(fields["best_config_file"]), fields["restored"], fields["seconds"])


def train_as_job(address: str, config: PipelineConfig, model_name: str, *, teacher_weights: str | None,
                 group: str | None, flow_run_id: str | None, emit: Callable[[str], None]) -> TrainOutcome:
    """Submit the training and follow it to its end; the job is stopped if following is interrupted."""
    submission_id = submit_training(address, config, model_name, teacher_weights=teacher_weights, group=group,
                                    flow_run_id=flow_run_id)
    return outcome_from_json(_follow_submitted(address, submission_id, emit))


def sweep_as_job(address: str, config: PipelineConfig, *, group: str | None, flow_run_id: str | None,
                 emit: Callable[[str], None]) -> SweepOutcome:
    """Submit the sweep (Ray Tune driven from the head) and follow it to its end, as train_as_job does."""
    submission_id = _submit(address, config, sweep_request(config, group), "sweep", group=group,
                            flow_run_id=flow_run_id)
    return sweep_outcome_from_json(_follow_submitted(address, submission_id, emit))


def _follow_submitted(address: str, submission_id: str, emit: Callable[[str], None]) -> str:
    # Imported now: stop_followed_jobs may have to stop this job at interpreter exit, when an import that
    # registers exit hooks (Ray's do) is refused.
    import ray.job_submission  # noqa: F401

    emit(f"submitted Ray Job {submission_id} to {address}")
    with _followed_lock:
        _followed[submission_id] = address

    def emit_or_relay(line: str) -> None:  # the driver's alerts become events here (tasks/operations/alerts.py)
        if relay(line) is None:
            emit(line)

    try:
        return follow_job(address, submission_id, emit_or_relay)
    except BaseException:
        stop_jobs(address, [submission_id])
        raise
    finally:
        with _followed_lock:
            _followed.pop(submission_id, None)


@atexit.register
def stop_followed_jobs() -> list[str]:
    """Stop the jobs this process still follows: it is ending without having unwound their followers (the
    interpreter exiting past a following thread, a fatal signal). Returns the ids stopped."""
    with _followed_lock:
        followed = dict(_followed)
        _followed.clear()
    stopped = []
    for submission_id, address in followed.items():
        try:
            stopped += stop_jobs(address, [submission_id])
        except Exception as error:  # noqa: BLE001  (the process is ending: stop what can be stopped)
            log.error("could not stop Ray Job %s at %s: %s", submission_id, address, error)
    if stopped:
        log.warning("stopped the Ray Jobs this process followed: %s", ", ".join(stopped))
    return stopped


def _stop_followed_jobs_then_die(signum: int, frame: FrameType | None) -> None:
    stop_followed_jobs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # end as the signal would have ended the process


def stop_followed_jobs_on_fatal_signals() -> None:
    """In the main thread: a SIGTERM or SIGHUP that would end the process (no handler of Prefect's or anyone's
    for it) first stops the followed jobs. Signals with a handler already are left to it."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in FATAL_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _stop_followed_jobs_then_die)


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


def stop_orphaned_jobs(address: str, flow_run_ended: Callable[[str], bool]) -> list[str]:
    """Stop the running jobs whose flow run has ended: their follower died without stopping them (its process
    killed with SIGKILL, as when the sidecar's container is), and they would train on beside a flow run that
    continues theirs, into the same checkpoints. Returns the ids stopped."""
    orphans = [job.submission_id for job in client(address).list_jobs()
               if not job.status.is_terminal() and (job.metadata or {}).get(FLOW_RUN_KEY)
               and flow_run_ended(job.metadata[FLOW_RUN_KEY])]
    return stop_jobs(address, orphans) if orphans else []


def prefect_flow_run_ended(flow_run_id: str) -> bool:
    """Whether Prefect has the flow run in a final state (Completed, Failed, Cancelled, Crashed: a flow run
    whose heartbeats stopped is marked Crashed by infra/prefect/automations.yaml)."""
    from prefect import get_client

    try:
        run_id = uuid.UUID(flow_run_id)
    except ValueError:
        return False  # not submitted by a Prefect flow run
    try:
        with get_client(sync_client=True) as prefect:
            state = prefect.read_flow_run(run_id).state
    except Exception as error:  # noqa: BLE001  (unknown to this server, API down: leave the job alone)
        log.debug("flow run %s: state unknown (%s)", flow_run_id, error)
        return False
    return state is not None and state.is_final()


@contextlib.contextmanager
def jobs_stopped_on_exit(address: str | None, flow_run_id: str | None) -> Iterator[None]:
    """Stop the flow run's unfinished jobs when the block is left by an exception, a Prefect cancellation
    (TerminationSignal, raised by SIGTERM) or Ctrl-C: a job outlives the flow process otherwise. A fatal
    signal without a handler stops the followed jobs as well. On entry, the jobs of other flow runs that have
    ended are stopped (see stop_orphaned_jobs)."""
    if address:
        stop_followed_jobs_on_fatal_signals()
        orphans = stop_orphaned_jobs(address, lambda other: other != flow_run_id and prefect_flow_run_ended(other))
        if orphans:
            log.warning("stopped Ray Jobs left running by flow runs that have ended: %s", ", ".join(orphans))
    try:
        yield
    except BaseException:
        if address and flow_run_id:
            stopped = stop_jobs(address, flow_run_jobs(address, flow_run_id))
            if stopped:
                log.warning("stopped the Ray Jobs of flow run %s: %s", flow_run_id, ", ".join(stopped))
        raise


def main() -> int:
    """The job's driver: train the requested model, or run the sweep, on the cluster it runs on; report the
    outcome."""
    from tasks.training.train import train_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    request = json.loads(os.environ[REQUEST_ENV])
    os.environ[FORWARD_ENV] = "1"  # no Prefect API here: the flow following this job's log emits its alerts
    config = PipelineConfig.model_validate_json(request["config"])
    try:
        if request.get("sweep"):
            from tasks.operations.sweep import run_sweep

            text = sweep_outcome_to_json(run_sweep(config, group=request["group"]))
        else:
            text = outcome_to_json(train_model(config, request["model"], teacher_weights=request["teacher_weights"],
                                               group=request["group"]))
    except TrainingError as error:
        if not error.retryable:
            print(NOT_RETRYABLE_MARKER, flush=True)
        raise
    print(OUTCOME_MARKER + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
