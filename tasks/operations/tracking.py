"""Weights & Biases runs for the pipeline's steps.

Offline unless configured otherwise, so every step can be tracked on a machine with no network and synced
later with `wandb sync`. Online (the scheduled deployments) needs an API key: WANDB_API_KEY from the platform's
secret store, or the Prefect Secret block `wandb-api-key`; without either the flow and the step commands refuse
to start, naming both, instead of training for hours offline. Run ids are derived from the group, step and
model, so a restarted step resumes its W&B run instead of starting another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

from tasks.config import ConfigError, PipelineConfig
from tasks.digests import file_sha256
from tasks.layout import RunLayout
from tasks.operations.alerts import prefect_api_configured

log = logging.getLogger(__name__)

WANDB_ID_LIMIT = 64
WandbMode = Literal["offline", "online", "disabled"]
API_KEY_ENV = "WANDB_API_KEY"
# The Prefect Secret block holding the key, for a flow process whose platform gives it no WANDB_API_KEY.
API_KEY_BLOCK = "wandb-api-key"


class WandbKeyMissing(ConfigError):
    """tracking.mode is online and no W&B API key is found; a ConfigError, so the CLI exits 2 and the flow does
    not retry."""


def wandb_mode(config: PipelineConfig) -> WandbMode:
    mode = config.tracking.mode
    if mode == "online" and not os.environ.get(API_KEY_ENV):
        raise WandbKeyMissing(_missing_key_message(config, looked_in_prefect=False))
    return mode


def _missing_key_message(config: PipelineConfig, *, looked_in_prefect: bool) -> str:
    where = (f"in the Prefect Secret block {API_KEY_BLOCK!r}" if looked_in_prefect
             else f"the Prefect Secret block {API_KEY_BLOCK!r} is not read here (no Prefect API)")
    return (f"tracking.mode is online (W&B project {config.tracking.project!r}) but no W&B API key is found: "
            f"{API_KEY_ENV} is not set "
            f"and {'there is none ' if looked_in_prefect else ''}{where}. Set {API_KEY_ENV} from the platform's "
            f"secret store, or save the key as the Secret block {API_KEY_BLOCK!r}, or run with "
            f"tracking.mode=offline")


def require_wandb_key(config: PipelineConfig) -> str | None:
    """Before any work: online W&B needs an API key in this process. WANDB_API_KEY wins; else the Prefect Secret
    block API_KEY_BLOCK, when a Prefect API is reached, is put into this process's environment (where W&B and a
    local Ray's workers read it; a cluster's nodes get WANDB_API_KEY from the platform's secret store).

    Returns where the key came from (None when W&B is not online); raises WandbKeyMissing naming both places."""
    if config.tracking.mode != "online":
        return None
    if os.environ.get(API_KEY_ENV):
        return f"${API_KEY_ENV}"
    if not prefect_api_configured():
        raise WandbKeyMissing(_missing_key_message(config, looked_in_prefect=False))
    from prefect.blocks.system import Secret

    try:
        # Called from synchronous code, load returns the block itself, not a coroutine.
        key = Secret.load(API_KEY_BLOCK).get()  # type: ignore[union-attr]
    except ValueError:  # Prefect's "Unable to find block document named ..."
        key = None
    if not isinstance(key, str) or not key:
        raise WandbKeyMissing(_missing_key_message(config, looked_in_prefect=True))
    os.environ[API_KEY_ENV] = key
    log.info("W&B online: the API key comes from the Prefect Secret block %s", API_KEY_BLOCK)
    return f"Prefect Secret block {API_KEY_BLOCK}"


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
    from tasks.data.manifest import MANIFEST_NAME, require_manifest

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(require_manifest(location).to_json(), indent=2, sort_keys=True))
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
