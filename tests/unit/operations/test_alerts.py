"""tasks/operations/alerts.py: the W&B alert as recorded in an offline run's file, the Prefect event as the
server stores it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tasks.operations.alerts import FORWARD_ENV, FORWARD_MARKER, alert, relay
from tests.conftest import REPO_ROOT
from tests.support.wandb_records import read_records

RAISE_ALERT = """
import json, sys
import wandb
from tasks.operations.alerts import alert
run = wandb.init(project="alerts", mode="offline", dir=sys.argv[1], settings=wandb.Settings(silent=True, console="off"))
sent = alert("loss is NaN", "vit stopped at epoch 3; its last good checkpoint is kept", "ERROR",
             details={"model": "vit", "epoch": 3})
run.finish()
print(json.dumps({"wandb": sent.wandb, "event": sent.prefect_event is not None}))
"""


def test_an_alert_is_recorded_on_the_wandb_run_for_delivery(tmp_path):
    """Offline, the alert waits in the run's file; `wandb sync` delivers it (online runs send it at once)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "PREFECT_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run([sys.executable, "-c", RAISE_ALERT, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # No Prefect API and no flow run in that process: no event, and no Prefect server started for one.
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"wandb": True, "event": False}
    (run_file,) = tmp_path.glob("wandb/offline-run-*/*.wandb")
    alerts = [record.alert for record in read_records(run_file) if record.WhichOneof("record_type") == "alert"]
    assert [(a.title, a.level) for a in alerts] == [("loss is NaN", "ERROR")]
    assert "last good checkpoint" in alerts[0].text


def test_without_a_wandb_run_only_the_log_says_it(caplog, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    sent = alert("model below the registered best", "top-1 0.71 < 0.80 - 0.02", "WARN")
    assert (sent.wandb, sent.prefect_event) == (False, None)
    assert "model below the registered best: top-1 0.71" in caplog.text


def test_a_driver_forwards_its_alert_as_one_marked_line_and_the_follower_reads_it_back(capsys, monkeypatch):
    """A Ray Job's driver has no Prefect API: its alert is one line of its output, which the flow relays."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(FORWARD_ENV, "1")
    sent = alert("vit: loss is NaN", "stopped at epoch 3", "ERROR", details={"model": "vit", "epoch": 3})
    assert (sent.forwarded, sent.prefect_event) == (True, None)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(FORWARD_MARKER)]
    assert json.loads(line.removeprefix(FORWARD_MARKER)) == {
        "title": "vit: loss is NaN", "text": "stopped at epoch 3", "level": "ERROR",
        "details": {"model": "vit", "epoch": 3}}
    monkeypatch.delenv(FORWARD_ENV)
    relayed = relay(line)  # no Prefect API in this test: the event is skipped, the alert is logged here
    assert relayed is not None and not relayed.forwarded
    assert relay("epoch 3: loss nan") is None  # any other line of the job's log is the follower's to show


def test_a_damaged_forwarded_alert_is_said_to_have_reached_nobody(caplog):
    assert relay(FORWARD_MARKER + '{"title": "cut sh') is None
    assert "could not be read, so it reached nobody" in caplog.text


def test_an_unknown_level_is_refused():
    with pytest.raises(ValueError, match="INFO, WARN or ERROR"):
        alert("x", "y", "CRITICAL")


@pytest.mark.slow
def test_an_alert_in_a_flow_is_a_prefect_event_on_the_server():
    from prefect import flow, get_client
    from prefect.testing.utilities import prefect_test_harness

    @flow
    def notices() -> str:
        sent = alert("retrained vit below the registered best", "top-1 0.70 < 0.75", "WARN", details={"model": "vit"})
        return str(sent.prefect_event.id)

    with prefect_test_harness(server_startup_timeout=120):
        event_id = notices()
        with get_client(sync_client=True) as client:
            deadline, found = time.monotonic() + 60, []
            while not found and time.monotonic() < deadline:
                response = client.request("POST", "/events/filter",
                                          json={"filter": {"event": {"prefix": ["vit-pipeline.alert"]}}})
                found = [event for event in response.json()["events"] if event["id"] == event_id]
                time.sleep(1)
    (event,) = found
    assert event["event"] == "vit-pipeline.alert.warn"
    assert event["payload"] == {"title": "retrained vit below the registered best", "text": "top-1 0.70 < 0.75",
                                "level": "WARN", "model": "vit"}
    related_kinds = {item["prefect.resource.role"] for item in event["related"]}
    assert "flow-run" in related_kinds, event["related"]
