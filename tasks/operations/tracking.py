"""Weights & Biases runs for the pipeline's steps.

Offline unless configured otherwise (and always offline without an API key), so every step can be
tracked on a machine with no network and synced later with `wandb sync`. Run ids are derived from
the group, step and model, so a restarted step resumes its W&B run instead of starting another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from tasks.config import PipelineConfig
from tasks.digests import file_sha256
from tasks.layout import RunLayout

WANDB_ID_LIMIT = 64
WandbMode = Literal["offline", "online", "disabled"]


def wandb_mode(config: PipelineConfig) -> WandbMode:
    mode = config.tracking.mode
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        return "offline"
    return mode


def detach_from_parent_wandb_service() -> None:
    """Make this process start its own W&B service on its first run.

    A local Ray's workers inherit the environment of the process that started Ray, including the
    address of its W&B service (WANDB_SERVICE) once that process has logged a run, as the flow does in
    its shard step. Sharing it, a killed worker's run stays "in use" there and its restarted worker
    cannot resume the same run id.
    """
    os.environ.pop("WANDB_SERVICE", None)


def wandb_run_id(group: str, job_type: str, name: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{group}-{job_type}-{name}").strip("-")
    digest = hashlib.sha256(f"{group}\0{job_type}\0{name}".encode()).hexdigest()[:10]
    return f"{readable[: WANDB_ID_LIMIT - len(digest) - 1]}-{digest}"


def config_for_logging(config: PipelineConfig) -> dict[str, Any]:
    """The configuration as W&B shows it; it holds no secrets (the API key only ever lives in the env)."""
    return config.model_dump(mode="json")


def start_wandb_run(
    config: PipelineConfig, job_type: str, name: str, group: str | None = None, extra: dict | None = None
):
    """A W&B run for one step (None when tracking is disabled)."""
    mode = wandb_mode(config)
    if mode == "disabled":
        return None
    return init_wandb_run(project=config.tracking.project, entity=config.tracking.entity,
                          group=group or config.tracking.run_name, job_type=job_type, name=name, mode=mode,
                          directory=RunLayout.of(config).root, config={**config_for_logging(config), **(extra or {})})


def init_wandb_run(*, project: str, entity: str | None, group: str, job_type: str, name: str, mode: WandbMode,
                   directory: Path, config: dict):
    """The W&B run of one step of a group, resumed if it exists: its id follows from group, step and name."""
    import wandb

    wandb_dir = Path(directory).absolute()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project,
        entity=entity,
        group=group,
        job_type=job_type,
        name=f"{job_type}-{name}",
        id=wandb_run_id(group, job_type, name),
        resume="allow",
        mode=mode,
        dir=str(wandb_dir),
        config=config,
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        reinit="create_new",
    )


def sync_command(config: PipelineConfig) -> str:
    return f"wandb sync {RunLayout.of(config).offline_wandb_runs.absolute()}"


def manifest_snapshot(location: str, directory: Path) -> Path:
    """The shards' manifest as a local file, written the same way everywhere so its digest names the
    dataset version in W&B lineage (the shards themselves may live on s3://)."""
    from tasks.data.shard import MANIFEST_NAME, read_manifest

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(read_manifest(location), indent=2, sort_keys=True))
    return path


def dataset_artifact_name(config: PipelineConfig) -> str:
    return f"shards-{config.data.dataset}"


def files_artifact(name: str, kind: str, files: list[Path], metadata: dict | None = None):
    import wandb

    artifact = wandb.Artifact(name, type=kind, metadata=metadata or {})
    for path in files:
        artifact.add_file(str(path))
    return artifact


def record_input(run, name: str, kind: str, path: Path) -> None:
    """Lineage of a step's input: the artifact an upstream step logged from the same file.

    Online, the step uses that artifact (same content, same version), so W&B draws the edge. Offline,
    W&B refuses use_artifact, so the run's config records the file's sha256 instead; it identifies the
    upstream version after `wandb sync`.
    """
    if run.offline:
        run.config.update({f"input/{name}": file_sha256(path)}, allow_val_change=True)
    else:
        run.use_artifact(files_artifact(name, kind, [path]))


def model_artifact_name(model_name: str) -> str:
    return f"model-{model_name}"


def record_model_inputs(run, models: dict[str, Path]) -> None:
    """Lineage from the trained models (name -> weights file) a step read."""
    for name, weights in models.items():
        record_input(run, model_artifact_name(name), "model", Path(weights))
