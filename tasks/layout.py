"""Every path of a run directory, in one place.

A run directory is runs/<run_name>/ for the step commands, runs/<run_name>/<flow run>/ inside a flow
(`PipelineConfig.run_dir`). What the steps leave there:

    models/<model>/best.safetensors   the weights training chose on validation (what is scored and exported)
    models/<model>/last.safetensors   the last epoch's weights
    models/<model>/metrics.json       the training's history and summary
    models/<model>/config.json        what the model is and what it takes, in timm's hub layout (tasks/inference)
    ray/                              Ray Train's checkpoints, unless storage.checkpoints puts them elsewhere
    evaluation.json                   evaluate's records, one per model
    attention/<model>.png             attention maps
    report/report.html                the report, with its figures
    registry.json                     the publish plan and the links made
    sweep/                            a sweep's trials, results.json and best.yaml
    wandb/                            W&B's run files (offline runs wait here for `wandb sync`)
    wandb-inputs/                     the shards' manifest as logged to W&B
    flow-run.json                     which flow run owns the directory
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# The weights file of a chosen model, in a run's models/<model>/ and in each training checkpoint alike.
BEST_WEIGHTS = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"
REGISTRY_FILE = "registry.json"
RUN_OWNER_FILE = "flow-run.json"
# runs/<run>/latest: a link to the flow run directory that finished last (flows/run_owner.py).
LATEST_LINK = "latest"
REPORT_FILE = "report.html"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory. `RunLayout(config.run_dir)`, or `RunLayout.of(config)`."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of(cls, config) -> RunLayout:
        """The layout of a configuration's run directory (`PipelineConfig.run_dir`)."""
        return cls(config.run_dir)

    def model_dir(self, model_name: str) -> Path:
        return self.root / "models" / model_name

    def weights(self, model_name: str, which: Literal["best", "last"] = "best") -> Path:
        return self.model_dir(model_name) / (BEST_WEIGHTS if which == "best" else LAST_WEIGHTS)

    def metrics(self, model_name: str) -> Path:
        return self.model_dir(model_name) / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        """Ray Train's storage path when storage.checkpoints is not set."""
        return self.root / "ray"

    @property
    def evaluation(self) -> Path:
        return self.root / EVALUATION_FILE

    @property
    def attention_dir(self) -> Path:
        return self.root / "attention"

    def attention_map(self, model_name: str) -> Path:
        return self.attention_dir / f"{model_name}.png"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report(self) -> Path:
        return self.report_dir / REPORT_FILE

    @property
    def registry(self) -> Path:
        return self.root / REGISTRY_FILE

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweep"

    @property
    def wandb_dir(self) -> Path:
        return self.root / "wandb"

    @property
    def wandb_inputs(self) -> Path:
        return self.root / "wandb-inputs"

    @property
    def run_owner(self) -> Path:
        return self.root / RUN_OWNER_FILE
