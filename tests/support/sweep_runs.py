"""The miniature sweep the end-to-end tests run, and what they check of its W&B runs."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.layout import OFFLINE_RUN_GLOB, RunLayout
from tests.support.wandb_records import read_records

GOOD_LR, BAD_LR = 3e-3, 1e-7  # BAD_LR leaves the weights where they started: ASHA stops it after one epoch
# The smoke sweep, only smaller: one training worker, a one-block ViT of width 32, four trials one at a time
# (so ASHA's decisions are fixed), and one parameter with a clearly bad value. Seed 6 samples the trials
# good, bad, bad, good: the last is the one killed mid-training.
SHRUNK = [
    "data.shard_size=100", "data.shard_workers=1", "data.val_size=80", "data.shuffle_buffer=100",
    "model.baseline={name: resnet18_cifar, model_kwargs: {channels: [8, 16, 32, 64], layers: [1, 1, 1, 1]}}",
    "model.transformers=[{name: vit_tiny_patch4_32, drop_path_rate: 0.0,"
    " model_kwargs: {embed_dim: 32, depth: 1, num_heads: 2}}]",
    "training.batch_size=16", "scaling.num_workers=1",
    "sweep.num_trials=4", "sweep.max_concurrent_trials=1", "sweep.seed=6",
    f"sweep.parameters={{training.lr: {{choice: [{GOOD_LR}, {BAD_LR}]}}}}",
]


def wandb_runs_by_job_type(run_dir: Path) -> dict[str, set[str]]:
    """The flow run's W&B run ids by job type, after checking what every sweep run must hold: the flow run's
    group; a trial's parameters in its config, as set in the configuration it trained; the summary's table."""
    runs: dict[str, set[str]] = {}
    unwritten = set()
    for directory in RunLayout(run_dir).wandb_dir.glob(OFFLINE_RUN_GLOB):
        records = read_records(next(directory.glob("*.wandb")))
        if not records:
            # W&B's writer had buffered everything when the kill took it; the run continued after the kill (same
            # id) logs the trial's every epoch again.
            unwritten.add(directory.name.split("-", 3)[3])
            continue
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == run_dir.name
        runs.setdefault(run.job_type, set()).add(run.run_id)
        if run.job_type == "sweep-trial":
            config = {item.key: json.loads(item.value_json) for item in run.config.update}
            assert config["training"]["lr"] == config["sweep_trial"]["parameters"]["training.lr"]
        if run.job_type == "sweep":
            artifacts = {r.artifact.type for r in records if r.WhichOneof("record_type") == "artifact"}
            assert {"run_table", "sweep"} <= artifacts
    assert unwritten <= set().union(*runs.values()), unwritten
    return runs
