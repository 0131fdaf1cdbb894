"""tasks/operations/ray_jobs.py against a stand-in Jobs API client that records its calls: the log streamed
once through Ray's tail (never downloaded whole), and jobs stopped when their follower's process ends early.
The same functions against a real Ray head are in tests/e2e/test_ray_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.operations import ray_jobs
from tasks.operations.ray_jobs import (
    OUTCOME_MARKER,
    TrainingCancelled,
    follow_job,
    outcome_from_json,
    outcome_to_json,
)
from tasks.training.train import TrainingError, TrainOutcome
from tests.conftest import REPO_ROOT

OUTCOME = TrainOutcome(model="vit", best_weights=Path("/runs/best.safetensors"),
                       last_weights=Path("/runs/last.safetensors"), history=[{"epoch": 1}], best_epoch=1,
                       best_val_acc=0.5, checkpoint_dir="/runs/ckpt", train_seconds=3.0)


class FakeJobs:
    """A JobSubmissionClient: each tail_job_logs call streams the job's log from its start, as Ray's does,
    in the given chunks; a stream may break (RuntimeError) after some chunks, as on a dashboard restart."""

    def __init__(self, streams: list[tuple[list[str], bool]], statuses: list[str], calls: list | None = None):
        self.streams, self.statuses = list(streams), list(statuses)
        self.calls = [] if calls is None else calls
        self.stopped: set[str] = set()

    async def tail_job_logs(self, submission_id):
        self.calls.append(("tail_job_logs", submission_id))
        chunks, breaks = self.streams.pop(0)
        for chunk in chunks:
            yield chunk
        if breaks:
            raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")

    def get_job_status(self, submission_id):
        from ray.job_submission import JobStatus

        self.calls.append(("get_job_status", submission_id))
        if submission_id in self.stopped:
            return JobStatus.STOPPED
        return JobStatus(self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0])

    def get_job_info(self, submission_id):
        self.calls.append(("get_job_info", submission_id))
        return type("Info", (), {"message": "driver exited with code 1"})()

    def stop_job(self, submission_id):
        self.calls.append(("stop_job", submission_id))
        self.stopped.add(submission_id)
        return True

    def get_job_logs(self, submission_id):  # the whole log: what following must not fetch
        raise AssertionError("follow_job downloaded the whole log")


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(ray_jobs, "POLL_SECONDS", 0.0)


def follow(monkeypatch, jobs: FakeJobs) -> tuple[list[str], TrainOutcome | BaseException]:
    monkeypatch.setattr(ray_jobs, "client", lambda address: jobs)
    lines: list[str] = []
    try:
        return lines, outcome_from_json(follow_job("http://127.0.0.1:8265", "job-1", lines.append))
    except TrainingError as error:
        return lines, error


def test_the_log_streams_once_through_a_broken_connection(monkeypatch):
    log = ["epoch 1/2\n", "epoch 2/", "2\nsaved\n", OUTCOME_MARKER + outcome_to_json(OUTCOME) + "\n"]
    # The first stream breaks in the middle of a line; the second starts again at the log's beginning.
    jobs = FakeJobs([(log[:2], True), (["".join(log)], False)], statuses=["SUCCEEDED"])
    lines, outcome = follow(monkeypatch, jobs)
    assert outcome == OUTCOME
    assert lines[:3] == ["epoch 1/2", "epoch 2/2", "saved"] and len(lines) == 4
    assert [name for name, _ in jobs.calls] == ["tail_job_logs", "tail_job_logs", "get_job_status"]


def test_a_stream_that_ends_before_the_job_is_reopened(monkeypatch):
    jobs = FakeJobs([(["a\n"], False), (["a\nb"], False)], statuses=["RUNNING", "FAILED"])
    lines, error = follow(monkeypatch, jobs)
    assert lines == ["a", "b"]  # the last line, without its newline, once the log has ended
    assert isinstance(error, TrainingError) and "FAILED: driver exited with code 1\na\nb" in str(error)
    assert error.retryable


def test_a_not_retryable_failure_and_a_stopped_job(monkeypatch):
    jobs = FakeJobs([(["boom\n", ray_jobs.NOT_RETRYABLE_MARKER + "\n"], False)], statuses=["FAILED"])
    _, error = follow(monkeypatch, jobs)
    assert isinstance(error, TrainingError) and not error.retryable
    _, error = follow(monkeypatch, FakeJobs([([], False)], statuses=["STOPPED"]))
    assert isinstance(error, TrainingCancelled)


def test_a_successful_job_without_its_outcome_fails(monkeypatch):
    _, error = follow(monkeypatch, FakeJobs([(["done\n"], False)], statuses=["SUCCEEDED"]))
    assert isinstance(error, TrainingError) and "did not report its outcome" in str(error)


def test_the_jobs_still_followed_are_stopped_when_the_process_ends(monkeypatch):
    jobs = FakeJobs([], statuses=["RUNNING"])
    monkeypatch.setattr(ray_jobs, "client", lambda address: jobs)
    monkeypatch.setattr(ray_jobs, "_followed", {"job-1": "http://head:8265", "job-2": "http://head:8265"})
    jobs.stopped.add("job-2")  # ended already: not stopped again
    assert ray_jobs.stop_followed_jobs() == ["job-1"]
    assert ("stop_job", "job-1") in jobs.calls and ("stop_job", "job-2") not in jobs.calls
    assert ray_jobs.stop_followed_jobs() == []


# A follower process whose training thread follows a job forever, then ends: by a SIGTERM nobody handles,
# or by the main thread returning past the (daemon) follower. The stand-in client writes its calls to a file.
FOLLOWER = """
import json, os, signal, sys, threading, time
from tasks.operations import ray_jobs

calls_file, how = sys.argv[1], sys.argv[2]

class Jobs:
    def list_jobs(self):
        return []
    def get_job_status(self, submission_id):
        from ray.job_submission import JobStatus
        return JobStatus.RUNNING
    def stop_job(self, submission_id):
        with open(calls_file, "a") as f:
            f.write(json.dumps(["stop_job", submission_id]) + "\\n")
        return True

ray_jobs.client = lambda address: Jobs()
ray_jobs.submit_training = lambda *args, **kwargs: "job-1"
ray_jobs.follow_job = lambda address, submission_id, emit: time.sleep(3600)
train = lambda: ray_jobs.train_as_job("http://head:8265", None, "vit", teacher_weights=None, group="g",
                                      flow_run_id="flow-1", emit=print)
threading.Thread(target=train, daemon=True).start()
with ray_jobs.jobs_stopped_on_exit(None, "flow-1"):  # no jobs API: installs nothing
    pass
with ray_jobs.jobs_stopped_on_exit("http://head:8265", "flow-1"):
    while "job-1" not in ray_jobs._followed:
        time.sleep(0.01)
    if how == "signal":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
"""


@pytest.mark.parametrize("how", ["signal", "exit"])
def test_a_follower_that_dies_stops_its_job(tmp_path, how):
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", FOLLOWER, str(calls), how], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == (-signal.SIGTERM if how == "signal" else 0), result.stderr[-3000:]
    assert calls.exists(), f"the job was left running: {result.stderr[-2000:]}"
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [["stop_job", "job-1"]]


class Job:
    def __init__(self, submission_id: str, status: str, flow_run: str | None):
        from ray.job_submission import JobStatus

        self.submission_id, self.status = submission_id, JobStatus(status)
        self.metadata = {ray_jobs.FLOW_RUN_KEY: flow_run} if flow_run else {}


def test_a_new_flow_run_stops_the_jobs_of_flow_runs_that_have_ended(monkeypatch):
    """A follower killed outright (SIGKILL) stops nothing; the next flow run stops what it left running."""
    jobs = FakeJobs([], statuses=["RUNNING"])
    jobs.list_jobs = lambda: [Job("orphan", "RUNNING", "crashed-run"), Job("live", "RUNNING", "running-run"),
                              Job("mine", "RUNNING", "this-run"), Job("done", "SUCCEEDED", "crashed-run"),
                              Job("manual", "RUNNING", None)]
    monkeypatch.setattr(ray_jobs, "client", lambda address: jobs)
    asked = []
    monkeypatch.setattr(ray_jobs, "prefect_flow_run_ended",
                        lambda flow_run: asked.append(flow_run) or flow_run == "crashed-run")
    with ray_jobs.jobs_stopped_on_exit("http://head:8265", "this-run"):
        assert [call for call in jobs.calls if call[0] == "stop_job"] == [("stop_job", "orphan")]
    assert sorted(asked) == ["crashed-run", "running-run"], "only running jobs of other flow runs are looked up"


def test_a_job_not_from_a_flow_run_is_never_taken_for_an_orphan():
    assert ray_jobs.prefect_flow_run_ended("flow-1") is False


@pytest.mark.slow
def test_the_flow_run_state_is_read_from_prefect():
    from prefect import flow, get_client
    from prefect.states import Running
    from prefect.testing.utilities import prefect_test_harness

    @flow
    def finished() -> None:
        return None

    with prefect_test_harness(server_startup_timeout=120):
        ended = finished(return_state=True).state_details.flow_run_id
        with get_client(sync_client=True) as client:
            live = client.create_flow_run(flow=finished, state=Running())
        assert ray_jobs.prefect_flow_run_ended(str(ended)) is True
        assert ray_jobs.prefect_flow_run_ended(str(live.id)) is False
