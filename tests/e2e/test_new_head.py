"""Losing the head is not starting over: a training that a dead head left part way through resumes on a new
head (another `ray start --head`, another node, another hostname) from the checkpoints on shared storage,
continued by the next flow run because Prefect says the dead one crashed, not because it is the same host."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tasks.config import build_config
from tasks.data.shard import ShardOptions, shard_dataset
from tasks.training.checkpoints import latest_valid_checkpoint
from tests.support.ray_head import ray_head

pytestmark = pytest.mark.slow

MODEL = "vit_tiny_patch4_32"
EPOCHS = 3
CHECKPOINT_SECONDS = 180


def _use_token(token_path: Path | None) -> None:
    from tests.e2e.test_ray_cluster import _use_token as use

    use(token_path)


@pytest.mark.timeout(600)
def test_a_new_head_resumes_the_dead_heads_training_from_shared_storage(tmp_path, mini_cifar, monkeypatch):
    from prefect import flow, get_client
    from prefect.states import Crashed, Running
    from prefect.testing.utilities import prefect_test_harness

    import flows.run_owner as run_owner
    from tasks.operations.ray_jobs import stop_jobs, submit_training, train_as_job

    @flow(name="weekly")
    def weekly() -> None:
        pass

    shards = str(tmp_path / "shards")
    shard_dataset("cifar10", mini_cifar, shards, ShardOptions(shard_size=200, val_size=80), progress=False)
    shared = tmp_path / "shared"  # the EFS both heads mount
    config = build_config({
        "data": {"data_root": str(mini_cifar), "shard_dir": shards, "loader_workers": 0},
        "model": {"transformers": [{"name": MODEL, "drop_path_rate": 0.0, "model_kwargs": {"depth": 1}}]},
        "training": {"epochs": EPOCHS, "batch_size": 16, "warmup_epochs": 0.2, "bf16": False},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"run_name": "weekly", "output_dir": str(shared / "runs"), "mode": "disabled"},
        "storage": {"shared_filesystem": str(shared)},
    })

    with prefect_test_harness(server_startup_timeout=120), get_client(sync_client=True) as client:
        # Head A runs the flow run and its training, which checkpoints its first epoch; then the head is lost.
        lost = str(client.create_flow_run(weekly, state=Running()).id)
        monkeypatch.setattr(run_owner, "this_host", lambda: "head-a")
        first = run_owner.claim_run_directory(config, lost, "sunday").config
        run_path = Path(first.checkpoint_location) / MODEL
        with ray_head() as head_a:
            _use_token(head_a.token_file)
            on_a = first.model_copy(update={"scaling": first.scaling.model_copy(
                update={"ray_address": head_a.jobs_api})})
            job = submit_training(head_a.jobs_api, on_a, MODEL, teacher_weights=None, group="g", flow_run_id=lost)
            deadline = time.monotonic() + CHECKPOINT_SECONDS
            while latest_valid_checkpoint(run_path) is None:
                assert time.monotonic() < deadline, f"no checkpoint in {run_path}"
                time.sleep(0.2)
            stop_jobs(head_a.jobs_api, [job])  # the head goes, and its training with it
        _use_token(None)
        # Prefect's heartbeat automation marks the dead head's flow run Crashed.
        client.set_flow_run_state(lost, Crashed(message="heartbeats stopped"), force=True)

        # Head B, on another machine: the next flow run continues the directory and the training resumes.
        monkeypatch.setattr(run_owner, "this_host", lambda: "head-b")
        claim = run_owner.claim_run_directory(config, str(client.create_flow_run(weekly, state=Running()).id),
                                              "monday")
        assert claim.continued == lost and claim.config.run_dir == first.run_dir
        with ray_head() as head_b:
            assert head_b.jobs_api != head_a.jobs_api
            _use_token(head_b.token_file)
            try:
                on_b = claim.config.model_copy(update={"scaling": claim.config.scaling.model_copy(
                    update={"ray_address": head_b.jobs_api})})
                lines: list[str] = []
                outcome = train_as_job(head_b.jobs_api, on_b, MODEL, teacher_weights=None, group="g",
                                       flow_run_id=claim.config.tracking.flow_run, emit=lines.append)
            finally:
                _use_token(None)

    resumed = [int(m.group(1)) for line in lines if (m := re.search(rf"\[{MODEL}\] resuming after epoch (\d+)", line))]
    assert resumed and 1 <= resumed[0] < EPOCHS, lines[-30:]
    assert [entry["epoch"] for entry in outcome.history][-1] == EPOCHS
    assert not any(f"[{MODEL}] epoch 1/{EPOCHS}" in line for line in lines)  # epoch 1 was not trained again
    assert outcome.best_weights.is_file()
