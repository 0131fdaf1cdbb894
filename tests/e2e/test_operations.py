"""flows/operations.py against a real `prefect server start`: the automations notify a webhook when a flow run
fails and mark a flow run Crashed whose heartbeats stopped; the gpu-training limit makes a second flow run's
trainings wait for the first's."""

from __future__ import annotations

import contextvars
import json
import os
import signal
import subprocess
import sys
import threading
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
