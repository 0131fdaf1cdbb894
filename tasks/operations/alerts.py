"""Alerts: what a person must look at, sent where people look, from wherever it is noticed.

`alert(title, text, level)` sends a W&B alert on the W&B run in hand (online: W&B notifies by email or
Slack at once; offline: the alert is recorded in the run's files and delivered by `wandb sync`) and emits a
Prefect event `vit-pipeline.alert.<level>` that automations can act on (infra/prefect/). Either is skipped
where it cannot work: no W&B run, or a process that reaches no Prefect API (a Ray worker on a GPU node has
no Prefect settings, by design). Cheap enough to call from a training loop when something goes wrong;
never call it per step.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Level = Literal["INFO", "WARN", "ERROR"]
EVENT_PREFIX = "vit-pipeline.alert"


@dataclass(frozen=True)
class Sent:
    """Where an alert went."""

    wandb: bool
    prefect_event: Any | None  # the prefect.events.Event emitted, if any


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
    return Sent(wandb=_wandb_alert(title, text, level, run), prefect_event=_prefect_event(title, text, level, details))


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
