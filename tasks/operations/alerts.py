"""Alerts: what a person must look at, sent where people look, from wherever it is noticed.

`alert(title, text, level)` sends a W&B alert on the W&B run in hand (online: W&B notifies by email or
Slack at once; offline: the alert is recorded in the run's files and delivered by `wandb sync`) and emits a
Prefect event `vit-pipeline.alert.<level>`, which the automation vit-pipeline-notify-alerts
(infra/prefect/automations.yaml) sends to the team's notification block. Either is skipped where it cannot
work: no W&B run, or a process that reaches no Prefect API (a Ray worker on a GPU node has no Prefect
settings, by design).

A process that has no Prefect API but is followed by one that has forwards the event instead: a Ray Job's
driver (tasks/operations/ray_jobs.py sets FORWARD_ENV there) prints the alert as one marked line of its output,
and the flow process following the job's log emits it with `relay`, in the flow run's context. The job's log is
already followed line by line, so no Prefect address or credentials need to reach the cluster.

Cheap enough to call from a training loop when something goes wrong; never call it per step.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Level = Literal["INFO", "WARN", "ERROR"]
EVENT_PREFIX = "vit-pipeline.alert"
# Set in a process whose alerts a follower re-emits (a Ray Job's driver); its alerts become FORWARD_MARKER lines.
FORWARD_ENV = "VIT_PIPELINE_FORWARD_ALERTS"
FORWARD_MARKER = "vit-pipeline-alert: "


@dataclass(frozen=True)
class Sent:
    """Where an alert went."""

    wandb: bool
    prefect_event: Any | None  # the prefect.events.Event emitted, if any
    forwarded: bool = False  # printed for the process following this one to emit (FORWARD_ENV)


def prefect_api_configured() -> bool:
    """Whether this process reaches a Prefect API: inside a flow or task run, or with PREFECT_API_URL set (in the
    environment, a profile or a test harness). Without one, Prefect would start a server of its own for each
    client just to drop what it is sent."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_API_URL

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None or bool(PREFECT_API_URL.value())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "alert"


def alert(title: str, text: str, level: Level = "WARN", *, run=None, details: dict | None = None) -> Sent:
    """Alert people: a W&B alert on `run` (else the process's current W&B run) and a Prefect event.

    Args:
        title: what happened, short (the W&B alert's title, the event's resource name).
        text: what it means and what to do, for the person reading it.
        level: INFO, WARN or ERROR.
        run: the W&B run to alert on; None takes `wandb.run`, if there is one.
        details: extra fields for the event's payload (the model, the epoch, a metric).
    """
    if level not in ("INFO", "WARN", "ERROR"):
        raise ValueError(f"alert level must be INFO, WARN or ERROR, not {level!r}")
    log.log(logging.ERROR if level == "ERROR" else logging.WARNING, "%s: %s", title, text)
    wandb_sent = _wandb_alert(title, text, level, run)
    if os.environ.get(FORWARD_ENV):
        print(FORWARD_MARKER + json.dumps({"title": title, "text": text, "level": level, "details": details or {}},
                                          default=str), flush=True)
        return Sent(wandb=wandb_sent, prefect_event=None, forwarded=True)
    return Sent(wandb=wandb_sent, prefect_event=_prefect_event(title, text, level, details))


def relay(line: str) -> Sent | None:
    """Emit the Prefect event of an alert that a followed process forwarded as `line` (its W&B alert, if any, was
    sent where it was raised); None when the line is not a forwarded alert."""
    if not line.startswith(FORWARD_MARKER):
        return None
    try:
        forwarded = json.loads(line.removeprefix(FORWARD_MARKER))
        title, text, level, details = (forwarded[key] for key in ("title", "text", "level", "details"))
    except (ValueError, KeyError, TypeError):
        log.error("a forwarded alert could not be read, so it reached nobody: %s", line)
        return None
    log.log(logging.ERROR if level == "ERROR" else logging.WARNING, "%s: %s", title, text)
    return Sent(wandb=False, prefect_event=_prefect_event(title, text, level, details))


def _wandb_alert(title: str, text: str, level: Level, run) -> bool:
    import wandb

    run = run if run is not None else wandb.run
    if run is None or run.disabled:
        return False
    run.alert(title=title, text=text, level=level)  # W&B takes the level's name as well as its AlertLevel
    return True


def _prefect_event(title: str, text: str, level: Level, details: dict | None):
    if not prefect_api_configured():
        return None
    from prefect.events import emit_event

    return emit_event(
        event=f"{EVENT_PREFIX}.{level.lower()}",
        resource={"prefect.resource.id": f"{EVENT_PREFIX}.{_slug(title)}", "prefect.resource.name": title},
        payload={"title": title, "text": text, "level": level, **(details or {})},
    )
