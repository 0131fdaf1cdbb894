"""The pipeline flow with a cluster launcher whose commands are recorded, not run, and fake steps around it.

`python -m tests.support.launched_flow <record file> <directory>` runs that flow in a process of its own,
its trainings holding on until the process is stopped (tests/unit/flows/test_flow.py sends it SIGTERM)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prefect import task

from tasks.config import PipelineConfig, build_config

HOLD_ENV = "VIT_TEST_CLUSTER_STEPS_HOLD"  # seconds the trainings take
END_ENV = "VIT_TEST_CLUSTER_STEPS_END"  # how the trainings end: RuntimeError, KeyboardInterrupt (else they succeed)


class _PortForward:
    def terminate(self) -> None:
        pass

    def wait(self) -> int:
        return 0


def launched_config(directory: Path) -> PipelineConfig:
    return build_config({
        "tracking": {"output_dir": str(directory / "runs"), "mode": "disabled"},
        "orchestration": {"retries": 0, "cluster": {"launcher": "ray", "config_file": "infra/ray/cluster-aws.yaml"}},
    })


def fake_steps(record: Callable[[str], None], directory: Path) -> dict[tuple[object, str], object]:
    """{(module, attribute): replacement}: the flow's steps and the launcher's commands, each recorded by name."""
    import flows.pipeline
    from tasks.operations import cluster

    @task(name="shard")
    def shard(config, group):
        from tests.support.published_run import MANIFEST, manifest_of

        record("shard")
        return manifest_of(MANIFEST)

    @task(name="verify-shards")
    def verify(config):
        record("verify")

    @task(name="report")
    def report(config, records, group):
        record("report")
        return {"html": str(directory / "report.html")}

    def on_cluster(config, fingerprint, group, reuse):
        address = config.scaling.ray_address
        record(f"train, evaluate, attention maps on {'the Jobs API' if address.startswith('http') else address}")
        time.sleep(float(os.environ.get(HOLD_ENV, 0)))
        ending = os.environ.get(END_ENV)
        if ending:
            raise {"RuntimeError": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt}[ending]()
        return {}, {}, [], {}

    def run_command(argv, timeout):
        record(" ".join(argv[:2]))
        return ""

    def start_command(argv):
        record("forward the Jobs API")
        return _PortForward()

    return {(flows.pipeline, "shard_task"): shard, (flows.pipeline, "verify_task"): verify,
            (flows.pipeline, "report_task"): report, (flows.pipeline, "_cluster_steps"): on_cluster,
            (cluster, "run_command"): run_command, (cluster, "start_command"): start_command,
            (cluster, "wait_for_jobs_api"): lambda address, timeout: None}


def main(record_file: str, directory: str) -> None:
    from flows.pipeline import vit_pipeline

    with open(record_file, "a", buffering=1) as out:
        for (module, name), fake in fake_steps(lambda step: out.write(step + "\n"), Path(directory)).items():
            setattr(module, name, fake)
        os.environ[HOLD_ENV] = "120"
        vit_pipeline(config=launched_config(Path(directory)))


if __name__ == "__main__":
    main(*sys.argv[1:])
