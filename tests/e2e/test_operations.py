"""flows/operations.py against a real `prefect server start`: the automations notify a webhook when a flow run
fails and for every alert, wherever it was raised (the flow's process, a Ray Job's driver), and mark a flow run
Crashed whose heartbeats stopped; the gpu-training limit makes a second flow run's trainings wait for the
first's."""

from __future__ import annotations

import contextvars
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from flows.operations import TRAINING_TAG, apply, main
from tasks.config import build_config
from tests.conftest import REPO_ROOT
from tests.support.fake_trainings import (  # noqa: F401  (fake_trainings_fixture: the fixture fake_trainings)
    fake_trainings_fixture,
    flow_config,
    intervals_overlap,
    trainings,
)
from tests.support.prefect_server import drain_this_process_clients, prefect_server, wait_until

pytestmark = pytest.mark.slow

HEARTBEAT_SECONDS = 30  # Prefect's smallest
ZOMBIE_SECONDS = 45


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server that re-offers a concurrency slot every second (30 s by default), and this process
    its client."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("operations")
    with prefect_server(home, PREFECT_TASK_RUN_TAG_CONCURRENCY_SLOT_WAIT_SECONDS="1") as env:
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield env
            drain_this_process_clients()


@pytest.fixture
def webhook():
    """A local HTTP endpoint that keeps what is POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802  (http.server's name)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    http = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_port}/hook", received
    http.shutdown()


def _config(**orchestration):
    return build_config({"tracking": {"mode": "disabled"}, "orchestration": orchestration})


def test_apply_is_repeatable_and_a_failed_flow_run_notifies(server, webhook, tmp_path):
    from prefect import flow, get_client
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    url, received = webhook
    CustomWebhookNotificationBlock(name="team", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
                                   ).save("vit-pipeline-test", overwrite=True)
    config = _config(notify_block="custom-webhook/vit-pipeline-test", max_concurrent_trainings=3)
    apply(config)
    assert any("updated" in line for line in apply(config))
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag(TRAINING_TAG).concurrency_limit == 3
        for name in ("vit-pipeline-notify-failures", "vit-pipeline-crash-zombies"):
            assert len(client.read_automations_by_name(name)) == 1, name

    @flow(name="vit-pipeline")
    def failing() -> None:
        raise RuntimeError("the training diverged")

    state = failing(return_state=True)
    assert state.is_failed()
    wait_until(lambda: received, 90, "the failure notification")
    assert "is Failed" in received[0]["subject"], received
    assert "the training diverged" in received[0]["body"], received


# A Ray Job's driver (tasks.operations.ray_jobs.main, which marks its alerts for forwarding) whose training raises
# the NaN alert and fails; like the real driver, it has no Prefect API and no W&B key.
DIVERGING_DRIVER = """
import tasks.operations.ray_jobs as jobs
import tasks.training.train as train
from tasks.operations.alerts import alert
from tasks.training.train import TrainingError

def diverging(config, model_name, **_):
    alert(f"{model_name}: the training loss became NaN or infinite", "stopped at epoch 3; the last good checkpoint "
          "is kept", "ERROR", details={"model": model_name})
    raise TrainingError(f"training {model_name} failed: non-finite loss", retryable=False)

train.train_model = diverging  # what the job's driver imports when it runs
jobs.main()
"""


def test_every_alert_reaches_the_notification_block_through_one_automation(server, webhook, tmp_path,
                                                                            monkeypatch):
    """The regression alert raised in the flow's process and the NaN alert raised in a Ray Job's driver (no
    Prefect API there: forwarded through the job's log, which the flow follows) both reach the webhook."""
    from prefect import flow
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from tasks.operations import ray_jobs
    from tasks.operations.alerts import alert
    from tasks.training.train import TrainingError

    url, received = webhook
    CustomWebhookNotificationBlock(name="team", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
                                   ).save("vit-pipeline-alerts", overwrite=True)
    config = _config(notify_block="custom-webhook/vit-pipeline-alerts", max_concurrent_trainings=1)
    assert any(line.startswith("automation vit-pipeline-notify-alerts: ") for line in apply(config))

    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "WANDB_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), **{ray_jobs.REQUEST_ENV: json.dumps(
        ray_jobs.training_request(config, "vit_tiny_patch4_32", None, "weekly"))})
    driver = subprocess.run([sys.executable, "-c", DIVERGING_DRIVER], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert driver.returncode != 0 and "non-finite loss" in driver.stderr, driver.stderr[-2000:]
    job_log = driver.stdout.splitlines()

    def follow_job(address, submission_id, emit):  # the job's log, as the Jobs API hands it to the flow
        for line in job_log:
            emit(line)
        raise TrainingError(f"Ray Job {submission_id} FAILED", retryable=False)

    monkeypatch.setattr(ray_jobs, "submit_training", lambda *args, **kwargs: "vit-pipeline-weekly-vit-0")
    monkeypatch.setattr(ray_jobs, "follow_job", follow_job)
    monkeypatch.setattr(ray_jobs, "stop_jobs", lambda address, ids: [])
    flow_log: list[str] = []

    @flow(name="vit-pipeline-alerting")
    def retraining() -> None:
        alert("vit_tiny_patch4_32 below the registered best", "validation top-1 0.70 is 0.05 below the best's",
              "WARN", details={"model": "vit_tiny_patch4_32"})
        try:
            ray_jobs.train_as_job("http://127.0.0.1:8265", config, "vit_tiny_patch4_32", teacher_weights=None,
                                  group="weekly", flow_run_id="f", emit=flow_log.append)
        except TrainingError:
            pass

    started = time.monotonic()
    retraining()
    def alerts() -> list[dict]:  # a failure notice of an earlier test's flow run may come here too
        return [message for message in received
                if message["subject"].startswith(("vit-pipeline WARN: ", "vit-pipeline ERROR: "))]

    wait_until(lambda: len(alerts()) >= 2, 45, "both alerts at the webhook")
    subjects = sorted(message["subject"] for message in alerts())
    assert subjects == ["vit-pipeline ERROR: vit_tiny_patch4_32: the training loss became NaN or infinite",
                        "vit-pipeline WARN: vit_tiny_patch4_32 below the registered best"], received
    assert any("last good checkpoint is kept" in message["body"] for message in alerts()), received
    assert not any("vit-pipeline-alert" in line for line in flow_log), "the marked line is relayed, not logged"
    assert time.monotonic() - started < 60


ZOMBIE_FLOW = """
import time
from prefect import flow

@flow(name="vit-pipeline")
def lasting() -> None:
    time.sleep(600)

lasting()
"""


def test_a_flow_run_whose_heartbeats_stop_is_marked_crashed(server, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    apply(_config(max_concurrent_trainings=1), zombie_seconds=ZOMBIE_SECONDS)
    env = {**server, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS), "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", ZOMBIE_FLOW], env=env, cwd=tmp_path, start_new_session=True)

    def running() -> list:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))

    def heartbeats(run_id) -> list:
        with get_client(sync_client=True) as client:
            found = client.request("POST", "/events/filter", json={"filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{run_id}"]}}})
        return found.json()["events"]

    try:
        wait_until(running, 120, "the flow run to start")
        (run,) = running()
        # The automation watches for the heartbeats that stop: the server must have seen one.
        wait_until(lambda: heartbeats(run.id), 60, "the flow run's first heartbeat")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # dies without a word: no final state
        process.wait()

    def state() -> str:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run.id).state.name

    assert state() == "Running"
    wait_until(lambda: state() == "Crashed", ZOMBIE_SECONDS + 3 * HEARTBEAT_SECONDS, "the zombie to be Crashed")


def test_trainings_of_two_flow_runs_share_one_limit(server, tmp_path, data_root, fake_trainings):
    """A scheduled and a manual run at once: with room for one training, they take turns."""
    apply(_config(), limit=1)
    config = build_config({"data": {"data_root": str(data_root)}, "tracking": {"output_dir": str(tmp_path),
                           "mode": "disabled"}, "model": {"transformers": [{"name": "vit_tiny_patch4_32"}]}})
    # Threads start with empty context variables: each gets this one's, where the server's address is.
    runs = [threading.Thread(target=contextvars.copy_context().run,
                             args=(trainings, flow_config(config, name), 2, False)) for name in ("scheduled", "manual")]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=300)
    assert sorted(call["flow_run"] for call in fake_trainings) == ["manual", "manual", "scheduled", "scheduled"]
    assert intervals_overlap(fake_trainings) == 1, fake_trainings


def test_the_command_names_what_is_missing(server, capsys):
    assert main(["--set", "tracking.mode=disabled"]) == 2
    assert "orchestration.max_concurrent_trainings" in capsys.readouterr().err
    assert main(["--set", "orchestration.notify_block=slack-webhook/nobody", "--limit", "2"]) == 2
    assert "orchestration.notify_block" in capsys.readouterr().err
