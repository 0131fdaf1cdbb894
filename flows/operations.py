"""What running the pipeline as a team needs on the Prefect server, applied by one command:

    python -m flows.operations --config configs/cifar10.yaml [--set orchestration.notify_block=slack-webhook/x]
                               [--limit N]

- the concurrency limit `gpu-training` (the tag of every training task), so that trainings of all flow
  runs together, a scheduled one and a manual one, never exceed what the cluster holds: the others wait
  in AwaitingConcurrencySlot. Its size: --limit, else orchestration.max_concurrent_trainings;
- the automations of infra/prefect/automations.yaml: a notification (orchestration.notify_block) when a
  flow run fails or crashes, another for every alert (the events vit-pipeline.alert.*, whether raised in the
  flow's process or forwarded from a Ray Job's driver), and flow runs whose heartbeats stopped marked Crashed.

Re-running it updates what is there: each automation is found by its name, the limit by its tag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from tasks.config import EXIT_BAD_INPUT, ConfigError, PipelineConfig, load_config

TRAINING_TAG = "gpu-training"
AUTOMATIONS_FILE = Path(__file__).resolve().parents[1] / "infra" / "prefect" / "automations.yaml"


def automations(notify_block_id: str | None, *, zombie_seconds: float | None = None) -> list[dict[str, Any]]:
    """The automations of AUTOMATIONS_FILE as Prefect takes them; without a notification block, those that
    notify are left out. `zombie_seconds` replaces the heartbeat window (tests use a short one)."""
    found = []
    for automation in yaml.safe_load(AUTOMATIONS_FILE.read_text())["automations"]:
        notifications = [action for action in automation["actions"] if action["type"] == "send-notification"]
        if notifications and notify_block_id is None:
            continue
        for action in notifications:
            action["block_document_id"] = notify_block_id
        if zombie_seconds is not None and automation["trigger"].get("posture") == "Proactive":
            automation["trigger"]["within"] = zombie_seconds
        found.append(automation)
    return found


def apply(config: PipelineConfig, limit: int | None = None, *, zombie_seconds: float | None = None) -> list[str]:
    """Create or update the training concurrency limit and the automations; what was done, line by line."""
    from prefect import get_client
    from prefect.blocks.core import Block
    from prefect.events.schemas.automations import AutomationCore

    limit = limit or config.orchestration.max_concurrent_trainings
    if limit is None:
        raise ConfigError("the training concurrency limit needs --limit or orchestration.max_concurrent_trainings "
                          "(how many trainings the cluster holds at once)")
    block = config.orchestration.notify_block
    block_id = str(Block.load(block)._block_document_id) if block else None
    done = []
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=TRAINING_TAG, concurrency_limit=limit)
        done.append(f"concurrency limit {TRAINING_TAG}: {limit} trainings at once across flow runs")
        for automation in automations(block_id, zombie_seconds=zombie_seconds):
            core = AutomationCore.model_validate(automation)
            existing = client.read_automations_by_name(core.name)
            if existing:
                client.update_automation(existing[0].id, core)
                for duplicate in existing[1:]:
                    client.delete_automation(duplicate.id)
                done.append(f"automation {core.name}: updated")
            else:
                client.create_automation(core)
                done.append(f"automation {core.name}: created")
    if block_id is None:
        done.append("no notification on failures: set orchestration.notify_block to a saved Prefect notification "
                    "block (e.g. slack-webhook/<name>) and run this again")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.operations", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a configs/*.yaml file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--limit", type=int, help="trainings at once across flow runs (default: "
                                                  "orchestration.max_concurrent_trainings)")
    args = parser.parse_args(argv)
    try:
        for line in apply(load_config(args.config, args.overrides), args.limit):
            print(line)
    except ConfigError as error:
        print(f"flows.operations: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as error:  # Block.load of a block that does not exist
        print(f"flows.operations: error: orchestration.notify_block: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
