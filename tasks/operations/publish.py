"""Publish step: the best model of each model family into the W&B Registry, with its model card.

A model family is one configured model (its timm name); its best model is the weights training selected on
validation and evaluate scored once on the test split (runs/<run>/<flow run>/models/<model>/best.safetensors).
Each is linked to the collection `<project>-<model>` of the registry `tracking.registry`
(`wandb-registry-model/vit-pipeline-vit_tiny_patch4_32` by default) with the alias `latest`, and `best` when
its validation top-1 beats the model aliased `best` there on the same validation split (same sha256 over the
validation split's shards; numbers from another split are not comparable, and `best` then stays where it is).
The registry chooses on validation, as training does; the test top-1 is reported on the card, never compared.
One that falls more than `tracking.regression_margin` below that best raises an alert (tasks/operations/alerts.py).

The plan, what is linked where with which card, is always written first to <run directory>/registry.json.
Online it is carried out at once; offline (or without network) it waits there until `wandb sync` has uploaded
the run's offline W&B runs and `vit-pipeline publish --run-dir DIR` carries it out. Each model's entry records
its link once made, so a publish cut short is finished by running it again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from tasks.config import PipelineConfig, training_fields
from tasks.data.manifest import TEST_SPLIT, VAL_SPLIT, Manifest, read_manifest
from tasks.digests import file_sha256, json_sha256
from tasks.inference.model_ref import MODEL_CONFIG_FILE, REGISTRY_PREFIX
from tasks.layout import RunLayout
from tasks.operations.alerts import alert
from tasks.operations.tracking import init_wandb_run, wandb_mode, wandb_run_id

if TYPE_CHECKING:
    from tasks.judging.evaluate import EvaluationRecord

log = logging.getLogger(__name__)

PLAN_VERSION = 1
BEST_ALIAS = "best"
LATEST_ALIAS = "latest"
# How long publishing waits for the W&B server to answer a connection before saying it cannot reach it.
CONNECT_SECONDS = 10.0


class PublishError(RuntimeError):
    """Publishing cannot go ahead; the message names what is missing and how to supply it.

    retryable: whether trying again later may succeed (the network was down) without anyone changing anything.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Decision:
    """Which aliases a model gets in its collection, why, and the alert text when it fell below the best."""

    aliases: list[str]
    reason: str
    regression: str | None = None


class Registry(Protocol):
    """What publishing needs from the W&B Registry (tests give a stand-in)."""

    def missing_runs(self, run_ids: list[str]) -> list[str]:
        """Those of the run's W&B runs that the server does not have (not synced yet)."""
        ...

    def registered_best(self, target: str) -> dict | None:
        """The metadata of the version aliased `best` in the collection `target`; None when there is none."""
        ...

    def link(self, entry: dict, weights: Path, aliases: list[str]) -> str:
        """Link the weights, with the entry's card, to entry["target"] under `aliases`; returns the version."""
        ...


def collection_name(config: PipelineConfig, model_name: str) -> str:
    return f"{config.tracking.project}-{model_name}"


def split_sha256(manifest: Manifest, split: str = TEST_SPLIT) -> str:
    """A split's identity (the test split's by default): the sha256 over its shards' names, sample counts and
    sha256s. Shards are byte-identical for the same source and shard options, so a retraining on the same data
    is scored on the same split."""
    shards = sorted((shard.name, shard.num_samples, shard.sha256) for shard in manifest.splits[split].shards)
    return json_sha256(shards)


def decide(card: dict, registered: dict | None, margin: float) -> Decision:
    """The aliases of a newly published model, given the card of the model registered as `best` (or None).

    Chosen on validation top-1 over the same validation split: a registry that moved `best` by test top-1 would
    select weekly retrainings on the test split, which then no longer measures them honestly."""
    if registered is None:
        return Decision([LATEST_ALIAS, BEST_ALIAS], "no model is registered as best yet")
    split, top1 = card["val_split_sha256"], card["val_top1"]
    best_split, best_top1 = registered.get("val_split_sha256"), registered.get("val_top1")
    if best_split != split or best_top1 is None:
        return Decision([LATEST_ALIAS], f"the registered best was validated on another split "
                                        f"({str(best_split)[:12]}, this one {split[:12]}): not comparable, "
                                        f"'{BEST_ALIAS}' stays (move it in the W&B Registry if that is meant)")
    if top1 > best_top1:
        return Decision([LATEST_ALIAS, BEST_ALIAS],
                        f"validation top-1 {top1:.4f} beats the registered best's {best_top1:.4f}")
    reason = f"validation top-1 {top1:.4f} does not beat the registered best's {best_top1:.4f}"
    if top1 < best_top1 - margin:
        regression = (f"{card['model']} retrained (flow run {card['flow_run']}): validation top-1 {top1:.4f} is "
                      f"{best_top1 - top1:.4f} below the registered best's {best_top1:.4f} on the same validation "
                      f"split (tracking.regression_margin {margin}); it is linked as '{LATEST_ALIAS}' only")
        return Decision([LATEST_ALIAS], reason, regression)
    return Decision([LATEST_ALIAS], reason)


def model_card(config: PipelineConfig, record: EvaluationRecord, manifest: Manifest, weights: Path) -> dict:
    """The artifact's metadata: what the model is, what it was trained on, how it scored, where its report is."""
    return {
        "model": record.model,
        "role": record.role,
        "run_name": config.tracking.run_name,
        "flow_run": config.tracking.flow_run,
        "dataset": manifest.dataset,
        "data_fingerprint": manifest.fingerprint,
        "test_split_sha256": split_sha256(manifest),
        "val_split_sha256": split_sha256(manifest, VAL_SPLIT),
        "test_samples": record.test_samples,
        "test_top1": record.top1,
        "test_top5": record.top5,
        "test_loss": record.loss,
        "test_ece": record.ece,
        "val_top1": record.val_top1,
        "val_samples": record.val_samples,
        "train_val_top1": record.train_val_top1,
        "best_epoch": record.best_epoch,
        "epochs": record.epochs,
        "params": record.params,
        "gflops": record.gflops,
        "train_seconds": record.train_seconds,
        "device_hours": record.device_hours,
        "weights_sha256": file_sha256(weights),
        "report": _report_link(config),
        "config": training_fields(config, record.model),
    }


def _report_link(config: PipelineConfig) -> dict:
    """The report: its file in the run directory and its W&B run (a URL once linked online)."""
    layout = RunLayout.of(config)
    group = config.tracking.flow_run or config.tracking.run_name
    return {"file": layout.report.relative_to(layout.root).as_posix(),
            "wandb_run": wandb_run_id(group, "report", "comparison"), "url": None}


def describe(card: dict) -> str:
    """The model card as the Registry shows it (Markdown)."""
    def number(key: str, form: str = "{:.4f}") -> str:
        return "n/a" if card.get(key) is None else form.format(card[key])

    report = card["report"]
    where = report["url"] or f"{report['file']} in the run directory (W&B run {report['wandb_run']})"
    return "\n".join([
        f"# {card['model']}",
        f"Trained by vit-pipeline, run `{card['run_name']}`, flow run `{card['flow_run']}`.",
        "",
        f"- **Test top-1 {number('test_top1')}** (top-5 {number('test_top5')}, loss {number('test_loss')}, "
        f"ECE {number('test_ece')}) on the {card['test_samples']} images of the {card['dataset']} test split "
        f"`{card['test_split_sha256'][:12]}`, scored once.",
        f"- Validation top-1 {number('val_top1')} ({card.get('val_samples')} images of the validation split "
        f"`{card['val_split_sha256'][:12]}`); these weights are epoch {card.get('best_epoch')} of "
        f"{card.get('epochs')}, chosen on validation, and the registry's `{BEST_ALIAS}` moves on it too.",
        f"- Data fingerprint `{card['data_fingerprint'][:12]}`; weights sha256 `{card['weights_sha256'][:12]}`.",
        f"- {card['params'] / 1e6:.2f} M parameters, {number('gflops', '{:.3f}')} GFLOPs per image; trained in "
        f"{number('train_seconds', '{:.0f}')} s ({number('device_hours', '{:.3f}')} device hours).",
        f"- Report: {where}",
        "",
        "The full training configuration is in this version's metadata (`config`).",
    ])


def plan_publication(config: PipelineConfig) -> dict:
    """What publishing links, written to <run directory>/registry.json; the plan is returned.

    Every model of the run's evaluation.json, with its card; the shards' manifest gives the test split.
    """
    from tasks.judging.evaluate import read_evaluation  # torch: the flows import this module without it

    layout = RunLayout.of(config)
    run_dir = layout.root
    evaluation = read_evaluation(config)
    manifest = read_manifest(config.shard_location)
    if manifest is None:
        raise FileNotFoundError(f"{config.shard_location}: no manifest.json; the test split the models were "
                                f"scored on is not known")
    tracking = config.tracking
    # Links already made for the same weights into the same collection stay recorded: planning again never
    # makes a publish link them twice.
    previous = read_plan(run_dir)["models"] if layout.registry.is_file() else []
    done = {(entry["target"], entry["metadata"]["weights_sha256"]): entry["linked"] for entry in previous}
    models = []
    for record in evaluation.models:
        weights = layout.weights(record.model)
        if not weights.is_file():
            raise FileNotFoundError(f"{record.model}: evaluated, but its weights are not at {weights}")
        card = model_card(config, record, manifest, weights)
        target = f"{REGISTRY_PREFIX}{tracking.registry}/{collection_name(config, record.model)}"
        models.append({
            "model": record.model,
            "target": target,
            "artifact": f"model-{record.model}",  # the training run's artifact of the same bytes
            "weights": str(weights.relative_to(run_dir)),
            "metadata": card,
            "description": describe(card),
            "linked": done.get((target, card["weights_sha256"])),
        })
    plan = {
        "version": PLAN_VERSION,
        "wandb": {"project": tracking.project, "entity": tracking.entity,
                  "group": tracking.flow_run or tracking.run_name, "registry": tracking.registry,
                  "offline_runs": RunLayout(run_dir).offline_wandb_run_ids()},
        "regression_margin": tracking.regression_margin,
        "models": models,
    }
    write_plan(run_dir, plan)
    return plan


def write_plan(run_dir: Path, plan: dict) -> Path:
    path = RunLayout(run_dir).registry
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(plan, indent=2))
    os.replace(temporary, path)
    return path


def read_plan(run_dir: Path) -> dict:
    path = RunLayout(run_dir).registry
    if not path.is_file():
        raise PublishError(f"{path} does not exist: it is written by the flow's publish step or by "
                           f"`vit-pipeline publish --flow-run DIR` (tracking.publish must not be 'never')")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PublishError(f"{path}: not valid JSON ({error})") from None
    if plan.get("version") != PLAN_VERSION:
        raise PublishError(f"{path}: version {plan.get('version')!r}, this vit-pipeline reads version {PLAN_VERSION}")
    return plan


def publish_plan(plan: dict, run_dir: Path, registry: Registry, *, run=None) -> list[dict]:
    """Link every model of the plan not linked yet, deciding `best` against the registry; returns the entries.

    The plan in registry.json records each link as soon as it is made. `run` is the W&B run alerts go to.
    """
    missing = registry.missing_runs(plan["wandb"]["offline_runs"])
    if missing:
        raise PublishError(f"W&B does not have the run(s) {', '.join(missing)} of {run_dir} yet (their cards link "
                           f"them): upload them first with `wandb sync {RunLayout(run_dir).offline_wandb_runs}`")
    for entry in plan["models"]:
        if entry["linked"]:
            log.info("%s: already linked to %s", entry["model"], entry["linked"]["version"])
            continue
        weights = run_dir / entry["weights"]
        if not weights.is_file():
            raise PublishError(f"{entry['model']}: {weights} is missing")
        if file_sha256(weights) != entry["metadata"]["weights_sha256"]:
            raise PublishError(f"{entry['model']}: {weights} differs from the weights registry.json was planned "
                               f"with (sha256); plan again with `vit-pipeline publish --flow-run DIR`")
        card = entry["metadata"]
        decision = decide(card, registry.registered_best(entry["target"]), plan["regression_margin"])
        if decision.regression:
            alert(f"{entry['model']} below the registered best", decision.regression, "WARN", run=run,
                  details={"model": entry["model"], "val_top1": card["val_top1"], "collection": entry["target"]})
        version = registry.link(entry, weights, decision.aliases)
        entry["linked"] = {"version": version, "aliases": decision.aliases, "reason": decision.reason,
                           "regression": decision.regression,
                           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_plan(run_dir, plan)
        log.info("%s: linked to %s as %s (%s)", entry["model"], version, ", ".join(decision.aliases), decision.reason)
    return plan["models"]


def check_online(base_url: str) -> None:
    """Publishing talks to W&B: an API key and a server that answers, or a PublishError saying which is missing
    (at once, rather than after the W&B client's retries)."""
    if not os.environ.get("WANDB_API_KEY"):
        raise PublishError("WANDB_API_KEY is not set: publishing links models in the W&B Registry and needs W&B "
                           "online (registry.json keeps the plan)")
    address = urlsplit(base_url)
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        socket.create_connection((address.hostname, port), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise PublishError(f"cannot reach W&B at {base_url} ({error}): publishing needs the network; "
                           f"registry.json keeps the plan for `vit-pipeline publish --run-dir` later",
                           retryable=True) from None


def wandb_base_url() -> str:
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


class WandbRegistry:
    """The W&B Registry, written through the publish step's W&B run (the links' producer) and read through the
    public API."""

    def __init__(self, run, api) -> None:
        self.run = run
        self.api = api

    def missing_runs(self, run_ids: list[str]) -> list[str]:
        from wandb.apis.public.runs import RunNotFoundError

        missing = []
        for run_id in run_ids:
            try:
                self.api.run(f"{self.run.entity}/{self.run.project}/{run_id}")
            except RunNotFoundError:
                missing.append(run_id)
        return missing

    def registered_best(self, target: str) -> dict | None:
        name = f"{target}:{BEST_ALIAS}"
        return dict(self.api.artifact(name).metadata) if self.api.artifact_exists(name) else None

    def link(self, entry: dict, weights: Path, aliases: list[str]) -> str:
        import wandb

        card = {**entry["metadata"], "report": self._report_with_url(entry["metadata"]["report"])}
        artifact = wandb.Artifact(entry["artifact"], type="model", description=describe(card), metadata=card)
        artifact.add_file(str(weights), name=weights.name)
        # config.json says what the weights are (tasks/inference/model_ref.py): a downloaded version is usable.
        if (model_config := weights.parent / MODEL_CONFIG_FILE).is_file():
            artifact.add_file(str(model_config), name=MODEL_CONFIG_FILE)
        # The training run logged the same bytes under the same name, so W&B keeps that one version (lineage to
        # the training run); the card is set on it either way.
        logged = self.run.log_artifact(artifact).wait()
        logged.description, logged.metadata = describe(card), card
        logged.save()
        linked = self.run.link_artifact(logged, entry["target"], aliases=aliases)
        return f"{entry['target']}:{linked.version}"

    def _report_with_url(self, report: dict) -> dict:
        # A run's URL is <app>/<entity>/<project>/runs/<id>; the report run is in the same project.
        return {**report, "url": f"{self.run.url.rsplit('/runs/', 1)[0]}/runs/{report['wandb_run']}"}


def publish_run_dir(run_dir: Path) -> list[dict]:
    """Carry out <run_dir>/registry.json online: the `vit-pipeline publish --run-dir` of a run planned offline,
    and the flow's publish step online."""
    run_dir = Path(run_dir).resolve()
    plan = read_plan(run_dir)
    check_online(wandb_base_url())
    import wandb

    settings = plan["wandb"]
    run = init_wandb_run(project=settings["project"], entity=settings["entity"], group=settings["group"],
                         job_type="publish", name="registry", mode="online", directory=run_dir,
                         config={"registry": settings["registry"], "models": [m["model"] for m in plan["models"]]})
    try:
        api = wandb.Api(overrides={"entity": run.entity, "project": run.project}, timeout=60)
        return publish_plan(plan, run_dir, WandbRegistry(run, api), run=run)
    finally:
        run.finish()


def publish_run_command(config: PipelineConfig) -> str:
    return f"vit-pipeline publish --run-dir {RunLayout.of(config).root.absolute()}"


def publish(config: PipelineConfig) -> tuple[Path, list[dict] | None]:
    """The publish step: plan into registry.json, then link when W&B is online.

    Returns registry.json and the linked entries (None when the plan waits for `vit-pipeline publish --run-dir`).
    """
    plan = plan_publication(config)
    path = RunLayout.of(config).registry
    if wandb_mode(config) != "online":  # online without a key raises WandbKeyMissing, naming where to put one
        log.info("W&B is offline: what would be linked is in %s (%d models)", path, len(plan["models"]))
        return path, None
    return path, publish_run_dir(RunLayout.of(config).root)
