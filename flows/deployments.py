"""The flow's deployments, served from this process: `python -m flows.deployments`.

`smoke` runs configs/smoke.yaml (CPU, minutes); `cifar10` runs configs/cifar10.yaml and carries the
weekly retraining schedule, created paused so that nothing trains until someone turns it on
(`prefect deployment schedule resume vit-pipeline/cifar10 <schedule id>`, or the toggle in the UI). The
scheduled deployment tracks W&B online in a team (SCHEDULED_OVERRIDES), so that its publish step reaches the
Registry; its key comes from WANDB_API_KEY or the Prefect Secret block wandb-api-key (tasks/operations/tracking.py),
and without one its runs fail at the start, naming both; after publishing it prunes old runs
(tasks/operations/retention.py). Everything else stays offline and keeps every run by default.
`sweep` searches hyperparameters with configs/sweep-smoke.yaml (CPU, minutes), `sweep-cifar10` with
configs/sweep-cifar10.yaml (GPU cluster); both run flows/sweep.py.
prefect.yaml declares the same deployments for the GPU cluster's work pool, with what the cluster adds
(shared storage for runs, checkpoints and Prefect results, and for cifar10 a cluster brought up and down around
each flow run: orchestration.cluster); tests keep the two in step.
"""

from __future__ import annotations

from prefect import serve
from prefect.schedules import Cron

from flows.pipeline import vit_pipeline
from flows.sweep import vit_sweep

RETRAIN_CRON = "0 3 * * 0"  # Sundays 03:00 UTC
DEPLOYMENT_CONFIGS = {"smoke": "configs/smoke.yaml", "cifar10": "configs/cifar10.yaml"}
SWEEP_DEPLOYMENT_CONFIGS = {"sweep": "configs/sweep-smoke.yaml", "sweep-cifar10": "configs/sweep-cifar10.yaml"}
# W&B links only artifacts logged in an organisation's team to its Registry: the weekly retraining logs online
# there (`acme-ml` is a placeholder for your team: infra/README.md, "Placeholders to replace"). And it prunes
# old runs once published, keeping the registered ones and the last storage.keep_runs.
SCHEDULED_OVERRIDES = ["tracking.mode=online", "tracking.entity=acme-ml", "storage.prune_after_run=true"]


def deployments():
    pipelines = [
        vit_pipeline.to_deployment(
            name=name,
            parameters={"config_file": config_file,
                        **({"overrides": SCHEDULED_OVERRIDES} if name == "cifar10" else {})},
            schedules=[Cron(RETRAIN_CRON, timezone="UTC", active=False)] if name == "cifar10" else None,
            description=f"vit-pipeline with {config_file}",
            tags=["vit-pipeline", name],
        )
        for name, config_file in DEPLOYMENT_CONFIGS.items()
    ]
    sweeps = [
        vit_sweep.to_deployment(
            name=name,
            parameters={"config_file": config_file},
            description=f"hyperparameter sweep with {config_file}",
            tags=["vit-pipeline", "sweep"],
        )
        for name, config_file in SWEEP_DEPLOYMENT_CONFIGS.items()
    ]
    return pipelines + sweeps


if __name__ == "__main__":
    serve(*deployments())
