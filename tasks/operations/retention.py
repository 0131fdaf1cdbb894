"""Retention: which flow runs of a run name keep their files, and deleting the others'.

Every flow run leaves runs/<run>/<flow run>/ (models, reports, W&B files and, unless storage.checkpoints puts
them elsewhere, Ray Train's checkpoints) and, with storage.checkpoints set, <storage.checkpoints>/<run>/<flow
run>/ on any fsspec storage (s3://...): ~5 GB a weekly cifar10 run. `prune` keeps

- the flow runs whose models hold `best` or `latest` in a Registry collection, as their registry.json files
  say (for every collection and alias, the most recent link made with it);
- the last `keep` flow runs (by when their flow-run.json was last written: claimed, or finished);
- every unfinished flow run (running now, or dead and waiting to be continued: flows/run_owner.py) and the one
  runs/<run>/latest points at;

and deletes the rest, run directory and checkpoints together. Only directories with a flow-run.json are flow
runs: the shards, `latest` and anything else under runs/<run>/ are never touched. The Registry keeps its own
copy of every linked model (each link uploads the weights to W&B), so pruning never removes a registered model;
an alias moved by hand in W&B is not seen here, which can only cost the local copy of that run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from tasks.config import ConfigError, PipelineConfig
from tasks.layout import RUN_OWNER_FILE, RunLayout

log = logging.getLogger(__name__)

REGISTERED_ALIASES = ("best", "latest")
LATEST_LINK = "latest"  # runs/<run>/latest, written by flows/run_owner.py


@dataclass
class Retention:
    """What pruning keeps (flow run directory name -> why) and deletes (name -> the paths removed)."""

    kept: dict[str, str] = field(default_factory=dict)
    deleted: dict[str, list[str]] = field(default_factory=dict)


def _flow_run_dirs(run_root: Path) -> list[Path]:
    """The flow run directories of a run name, newest first."""
    found = [path.parent for path in run_root.glob(f"*/{RUN_OWNER_FILE}") if not path.parent.is_symlink()]
    return sorted(found, key=lambda directory: (directory / RUN_OWNER_FILE).stat().st_mtime, reverse=True)


def _read_json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def registered(run_dirs: list[Path]) -> dict[str, str]:
    """The flow runs (directory name -> why) whose models hold `best` or `latest` in a collection: for each
    collection and alias, the flow run of the most recent link made with that alias (registry.json)."""
    holders: dict[tuple[str, str], tuple[str, str, str]] = {}  # (target, alias) -> (at, flow run, version)
    for directory in run_dirs:
        for entry in _read_json(RunLayout(directory).registry).get("models", []):
            link = entry.get("linked") or {}
            for alias in set(link.get("aliases", [])) & set(REGISTERED_ALIASES):
                candidate = (link.get("at", ""), directory.name, link.get("version", entry["target"]))
                key = (entry["target"], alias)
                if key not in holders or candidate[0] > holders[key][0]:
                    holders[key] = candidate
    why: dict[str, list[str]] = {}
    for (_, alias), (_, name, version) in sorted(holders.items()):
        why.setdefault(name, []).append(f"'{alias}' {version}")
    return {name: "registered: " + ", ".join(reasons) for name, reasons in why.items()}


def checkpoint_location(config: PipelineConfig, flow_run: str) -> str | None:
    """Where a flow run's checkpoints are when not inside its run directory (storage.checkpoints), else None."""
    if config.storage.checkpoints is None:
        return None
    of_flow_run = config.model_copy(update={"tracking": config.tracking.model_copy(update={"flow_run": flow_run})})
    return of_flow_run.checkpoint_location


def plan(config: PipelineConfig, keep: int) -> Retention:
    """What `prune` would keep and delete for config.tracking.run_name (nothing is deleted here)."""
    if keep < 1:
        raise ConfigError(f"keep: {keep} would delete the newest flow run too; keep at least 1")
    run_root = Path(config.run_root)
    if not run_root.is_dir():
        raise FileNotFoundError(f"{run_root}: no runs of run name {config.tracking.run_name!r} under "
                                f"tracking.output_dir {config.tracking.output_dir}")
    run_dirs = _flow_run_dirs(run_root)
    latest = run_root / LATEST_LINK
    latest_name = latest.resolve().name if latest.is_symlink() else None
    retention = Retention(kept=registered(run_dirs))
    for position, directory in enumerate(run_dirs):
        name = directory.name
        if name in retention.kept:
            continue
        if position < keep:
            retention.kept[name] = f"one of the last {keep}"
        elif not _read_json(directory / RUN_OWNER_FILE).get("finished"):
            retention.kept[name] = "unfinished: running, or to be continued by the next flow run"
        elif name == latest_name:
            retention.kept[name] = f"{LATEST_LINK} points at it"
        else:
            checkpoints = checkpoint_location(config, name)
            retention.deleted[name] = [str(directory), *([checkpoints] if checkpoints else [])]
    return retention


def prune(config: PipelineConfig, keep: int | None = None, *, dry_run: bool = False) -> Retention:
    """Delete the run directories and checkpoints of the flow runs `plan` does not keep (keep: how many of the
    last flow runs stay, default storage.keep_runs); with dry_run, only say what would go."""
    retention = plan(config, config.storage.keep_runs if keep is None else keep)
    for name, paths in retention.deleted.items():
        for path in paths:
            if dry_run:
                continue
            fs, location = fsspec.core.url_to_fs(path)
            if fs.exists(location):
                fs.rm(location, recursive=True)
        log.info("%s %s: %s", "would delete" if dry_run else "deleted", name, ", ".join(paths))
    return retention
