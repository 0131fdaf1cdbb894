"""Which flow run writes which run directory, and what became of flow runs that died.

Each flow run writes its own directory, runs/<run>/<flow run name>-<id>/, recorded in its flow-run.json:
the flow run, the host and process writing it, the configuration's digest, what the flow run does (the
pipeline, a sweep), and whether it finished.
When a flow run starts, the records of its run name say what happened before it on this host:

- a flow run whose process is gone while Prefect still shows it Running was killed outright (SIGKILL,
  OOM killer, power loss) and never reported a final state: it is marked Crashed;
- a directory whose flow run never finished and whose process is gone is continued by the next flow run
  of the same configuration and kind, so its trainings resume from their checkpoints instead of starting over.

A directory whose process is alive, or that is on another host, is never written by a second flow run.
Runs on other hosts are left to Prefect's heartbeats.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.layout import LATEST_LINK, RUN_OWNER_FILE, RunLayout

CLAIM_LOCK = ".claim.lock"
PIPELINE_KIND = "pipeline"


@dataclass(frozen=True)
class Claim:
    config: PipelineConfig  # tracking.flow_run names the directory
    continued: str | None  # the flow run whose unfinished directory this one continues
    crashed: list[str]  # flow runs marked Crashed


def process_start(pid: int) -> str | None:
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
    start = process_start(owner["pid"])
    return start is not None and (start == "unknown" or owner.get("start") in (None, start))


def config_digest(config: PipelineConfig) -> str:
    """What a continued directory must have been written with: the configuration, less its directory."""
    tree = config.model_dump(mode="json", exclude={"tracking": {"flow_run"}})
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)


def _mark_crashed(owner: dict, current_id: str) -> bool:
    """Set the owner's flow run Crashed if Prefect still says it runs; whether it did."""
    from prefect import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            previous = client.read_flow_run(owner["flow_run_id"])
        except Exception:  # noqa: BLE001  (another API, or deleted since: nothing to mark)
            return False
        if previous.state is None or not previous.state.is_running():
            return False
        client.set_flow_run_state(
            previous.id,
            Crashed(message=f"process {owner['pid']} on {owner['host']} exited without reporting "
                            f"a final state; found by flow run {current_id}"),
            force=True,
        )
        return True


@contextlib.contextmanager
def _claim_lock(run_root: Path):
    """One flow run at a time decides on the directories of a run name (two must not continue the same one)."""
    run_root.mkdir(parents=True, exist_ok=True)
    with open(run_root / CLAIM_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def claim_run_directory(config: PipelineConfig, flow_run_id: str, flow_run_name: str,
                        kind: str = PIPELINE_KIND) -> Claim:
    """Choose and claim this flow run's directory under runs/<run>/, after dealing with dead predecessors.

    `kind` says what the flow run does (the pipeline, a sweep): only a flow run of the same kind continues
    a directory."""
    run_root = Path(config.run_root)
    host, digest = socket.gethostname(), config_digest(config)
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", flow_run_name).strip("-._")[:80] or "flow-run"
    own_label = f"{readable}-{flow_run_id.replace('-', '')[:8]}"
    crashed, continuable = [], []
    with _claim_lock(run_root):
        records = [path for path in run_root.glob(f"*/{RUN_OWNER_FILE}") if not path.parent.is_symlink()]
        for path in sorted(records, key=lambda p: p.stat().st_mtime):  # `latest` is a link to one of them
            owner = _read(path)
            if owner is None or owner.get("host") != host or owner.get("flow_run_id") == flow_run_id:
                continue
            if owner.get("finished") or _alive(owner):
                continue
            if _mark_crashed(owner, flow_run_id):
                crashed.append(owner["flow_run_id"])
            if owner.get("config") == digest and owner.get("kind", PIPELINE_KIND) == kind:
                continuable.append((path.parent.name, owner["flow_run_id"]))
        # A retry of this very flow run finds its own directory; otherwise the newest continuable one.
        label, continued = own_label, None
        if not RunLayout(run_root / own_label).run_owner.is_file() and continuable:
            label, continued = continuable[-1]
        claimed = config.model_copy(deep=True)
        claimed.tracking.flow_run = label
        _write(RunLayout.of(claimed).run_owner,
               {"flow_run_id": flow_run_id, "flow_run_name": flow_run_name, "host": host, "pid": os.getpid(),
                "start": process_start(os.getpid()), "config": digest, "kind": kind, "finished": False})
    return Claim(claimed, continued, crashed)


def finish_run_directory(config: PipelineConfig) -> None:
    """Record that the directory's flow run finished (it is never continued), and point runs/<run>/latest at it."""
    path = RunLayout.of(config).run_owner
    _write(path, {**(_read(path) or {}), "finished": True})
    link = Path(config.run_root) / LATEST_LINK
    temporary = link.with_name(f".{LATEST_LINK}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(config.tracking.flow_run, target_is_directory=True)
    os.replace(temporary, link)


def flow_run_directory(run_root: Path, flow_run_id: str) -> Path | None:
    """The directory a flow run of this run name wrote, found by its record (None if it claimed none here)."""
    for path in Path(run_root).glob(f"*/{RUN_OWNER_FILE}"):
        if not path.parent.is_symlink() and (_read(path) or {}).get("flow_run_id") == flow_run_id:  # not latest
            return path.parent
    return None
