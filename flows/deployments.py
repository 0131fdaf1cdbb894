"""The flow's deployments, served from this process: `python -m flows.deployments`.

`smoke` runs configs/smoke.yaml (CPU, minutes); `cifar10` runs configs/cifar10.yaml and carries the
weekly retraining schedule, created paused so that nothing trains until someone turns it on
(`prefect deployment schedule resume vit-pipeline/cifar10 <schedule id>`, or the toggle in the UI).
prefect.yaml declares the same two deployments for the GPU cluster's work pool, with what the cluster adds
(shared storage for runs, checkpoints and Prefect results); tests keep the two in step.
"""

from __future__ import annotations

from prefect import serve
from prefect.schedules import Cron

from flows.pipeline import vit_pipeline

RETRAIN_CRON = "0 3 * * 0"  # Sundays 03:00 UTC
DEPLOYMENT_CONFIGS = {"smoke": "configs/smoke.yaml", "cifar10": "configs/cifar10.yaml"}


def deployments():
    return [
        vit_pipeline.to_deployment(
            name=name,
            parameters={"config_file": config_file},
            schedules=[Cron(RETRAIN_CRON, timezone="UTC", active=False)] if name == "cifar10" else None,
            description=f"vit-pipeline with {config_file}",
            tags=["vit-pipeline", name],
        )
        for name, config_file in DEPLOYMENT_CONFIGS.items()
    ]


if __name__ == "__main__":
    serve(*deployments())
