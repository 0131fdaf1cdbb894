"""Training on real Ray clusters on this machine: two nodes (ray.cluster_utils.Cluster), one worker on each;
and trainings submitted as Ray Jobs to a `ray start --head` with token authentication, as the flow does
from KubeRay's head pod: submission, status, logs, outcome, and stopping them when the flow ends early."""

import functools
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.config import build_config
from tasks.training.train import train_model
from tests.conftest import SUBSET_VAL
from tests.support.ray_head import ray_head as start_ray_head

pytestmark = pytest.mark.slow

JOB_SECONDS = 240


def _record_node(epoch: int, step: int, rank: int, *, directory: str) -> None:
    import ray

    if step == 1:
        Path(directory, f"rank-{rank}").write_text(ray.get_runtime_context().get_node_id())


@pytest.fixture
def two_node_cluster():
    import ray
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook must reach the workers
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _tiny_config(tmp_path: Path, data_root: Path, shards: str, *, epochs: int = 1, workers: int = 2,
                 tracking: str = "disabled", **scaling):
    return build_config({
        "data": {"data_root": str(data_root), "shard_dir": shards, "loader_workers": 0},
        "model": {"transformers": [{"name": "vit_tiny_patch4_32", "drop_path_rate": 0.0,
                                    "model_kwargs": {"depth": 1}}]},
        "training": {"epochs": epochs, "batch_size": 128, "warmup_epochs": 0.2, "bf16": False},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1, **scaling},
        "tracking": {"run_name": "jobs", "output_dir": str(tmp_path / "runs"), "mode": tracking},
    })


def test_training_places_one_worker_on_each_node(two_node_cluster, tmp_path, data_root, val_shards):
    import ray

    config = _tiny_config(tmp_path, data_root, val_shards)
    hook = functools.partial(_record_node, directory=str(tmp_path))
    outcome = train_model(config, "vit_tiny_patch4_32", step_hook=hook)
    assert outcome.history[0]["val_samples"] == SUBSET_VAL
    placed = {(tmp_path / f"rank-{rank}").read_text() for rank in (0, 1)}
    assert placed == {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(placed) == 2


# ------------------------------------------------------------------------------------- Ray Jobs


def _use_token(token_path: Path | None) -> None:
    """Make this process present (or not) the head's token, as the flow's environment would.

    Ray reads RAY_AUTH_MODE once into its config and caches the token; both are refreshed here."""
    from ray._raylet import AuthenticationTokenLoader, Config

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    if token_path is not None:
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head` with token authentication, and this process holding its token."""
    with start_ray_head() as head:
        _use_token(head.token_file)
        try:
            yield head.jobs_api, head.token_file
        finally:
            _use_token(None)


def test_the_head_refuses_clients_without_its_token(ray_head):
    from ray.job_submission import JobSubmissionClient

    address, token = ray_head
    _use_token(None)
    try:
        with pytest.raises(Exception, match="(?i)unauthori|401|auth"):
            JobSubmissionClient(address).list_jobs()
    finally:
        _use_token(token)


@pytest.mark.timeout(600)
def test_a_new_head_resumes_the_lost_heads_training_and_follows_it_to_its_outcome(ray_head, tmp_path, mini_cifar,
                                                                                   monkeypatch):
    """Losing the head is not starting over: a training a dead head left part way through resumes on a new head
    (another `ray start --head`, another hostname) from the checkpoints on shared storage, continued by the next
    flow run because Prefect says the dead one crashed, not because it is the same host; the new head's job is
    followed to its outcome, its epoch lines streamed to the flow."""
    from prefect import flow, get_client
    from prefect.states import Crashed, Running
    from prefect.testing.utilities import prefect_test_harness
    from ray.job_submission import JobSubmissionClient

    import flows.run_owner as run_owner
    from tasks.data.shard import ShardOptions, shard_dataset
    from tasks.operations.ray_jobs import FLOW_RUN_KEY, job_slots, stop_jobs, submit_training, train_as_job
    from tasks.training.checkpoints import latest_valid_checkpoint

    model, epochs = "vit_tiny_patch4_32", 3

    @flow(name="weekly")
    def weekly() -> None:
        pass

    shards = str(tmp_path / "shards")
    shard_dataset("cifar10", mini_cifar, shards, ShardOptions(shard_size=200, val_size=80), progress=False)
    shared = tmp_path / "shared"  # the EFS both heads mount
    config = build_config({
        "data": {"data_root": str(mini_cifar), "shard_dir": shards, "loader_workers": 0},
        "model": {"transformers": [{"name": model, "drop_path_rate": 0.0, "model_kwargs": {"depth": 1}}]},
        "training": {"epochs": epochs, "batch_size": 16, "warmup_epochs": 0.2, "bf16": False},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        # Offline W&B: rank 0 then prints its epoch lines, which must reach the flow through the job's logs.
        "tracking": {"run_name": "weekly", "output_dir": str(shared / "runs"), "mode": "offline"},
        "storage": {"shared_filesystem": str(shared)},
    })
    address, token = ray_head  # the new head

    with prefect_test_harness(server_startup_timeout=120), get_client(sync_client=True) as client:
        # Head A runs the flow run and its training, which checkpoints its first epoch; then the head is lost.
        lost = str(client.create_flow_run(weekly, state=Running()).id)
        monkeypatch.setattr(run_owner, "this_host", lambda: "head-a")
        first = run_owner.claim_run_directory(config, lost, "sunday").config
        run_path = Path(first.checkpoint_location) / model
        with start_ray_head() as head_a:
            _use_token(head_a.token_file)
            try:
                on_a = first.model_copy(update={"scaling": first.scaling.model_copy(
                    update={"ray_address": head_a.jobs_api})})
                job = submit_training(head_a.jobs_api, on_a, model, teacher_weights=None, group="g", flow_run_id=lost)
                deadline = time.monotonic() + JOB_SECONDS
                while latest_valid_checkpoint(run_path) is None:
                    assert time.monotonic() < deadline, f"no checkpoint in {run_path}"
                    time.sleep(0.2)
                stop_jobs(head_a.jobs_api, [job])  # the head goes, and its training with it
            finally:
                _use_token(token)
        # Prefect's heartbeat automation marks the dead head's flow run Crashed.
        client.set_flow_run_state(lost, Crashed(message="heartbeats stopped"), force=True)

        # Head B, on another machine: the next flow run continues the directory and the training resumes.
        monkeypatch.setattr(run_owner, "this_host", lambda: "head-b")
        claim = run_owner.claim_run_directory(config, str(client.create_flow_run(weekly, state=Running()).id),
                                              "monday")
        assert claim.continued == lost and claim.config.run_dir == first.run_dir
        on_b = claim.config.model_copy(update={"scaling": claim.config.scaling.model_copy(
            update={"ray_address": address})})
        flow_run_id = claim.config.tracking.flow_run
        assert job_slots(on_b, address) == 2  # the 2-CPU head holds two trainings of one 1-CPU worker
        lines: list[str] = []
        outcome = train_as_job(address, on_b, model, teacher_weights=None, group="g", flow_run_id=flow_run_id,
                               emit=lines.append)

    resumed = [int(m.group(1)) for line in lines if (m := re.search(rf"\[{model}\] resuming after epoch (\d+)", line))]
    assert resumed and 1 <= resumed[0] < epochs, lines[-30:]
    assert any(f"[{model}] epoch {epochs}/{epochs}" in line for line in lines), lines[-20:]
    assert not any(f"[{model}] epoch 1/{epochs}" in line for line in lines)  # epoch 1 was not trained again
    assert [entry["epoch"] for entry in outcome.history][-1] == epochs and outcome.history[-1]["val_samples"] == 80
    assert outcome.best_weights == Path(first.run_dir) / "models" / model / "best.safetensors"
    assert outcome.best_weights.is_file()
    assert lines[0].startswith(f"submitted Ray Job vit-pipeline-g-{model}-")
    (job_b,) = [job for job in JobSubmissionClient(address).list_jobs()
                if (job.metadata or {}).get(FLOW_RUN_KEY) == flow_run_id]
    assert str(job_b.status) == "SUCCEEDED" and job_b.metadata["model"] == model


def test_a_failing_training_job_fails_the_task_with_its_reason(ray_head, tmp_path, data_root, val_shards):
    from tasks.operations.ray_jobs import train_as_job
    from tasks.training.train import TrainingError

    address, _ = ray_head
    config = _tiny_config(tmp_path, data_root, str(tmp_path / "no-shards"), ray_address=address)
    with pytest.raises(TrainingError, match="(?s)FAILED.*refusing to train on bad shards"):
        train_as_job(address, config, "vit_tiny_patch4_32", teacher_weights=None, group="g",
                     flow_run_id="flow-2", emit=lambda line: None)


def test_leaving_the_flow_stops_its_jobs(ray_head, tmp_path, data_root, val_shards):
    """A Prefect cancellation raises TerminationSignal in the flow: the flow run's jobs are stopped, and
    the training following one of them ends as cancelled."""
    from prefect.exceptions import TerminationSignal
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    from tasks.operations.ray_jobs import TrainingCancelled, flow_run_jobs, jobs_stopped_on_exit, train_as_job

    address, _ = ray_head
    config = _tiny_config(tmp_path, data_root, val_shards, epochs=50, ray_address=address)
    lines, raised = [], []

    def follow() -> None:
        try:
            train_as_job(address, config, "vit_tiny_patch4_32", teacher_weights=None, group="g",
                         flow_run_id="flow-3", emit=lines.append)
        except BaseException as error:  # noqa: BLE001  (what the training task would see)
            raised.append(error)

    follower = threading.Thread(target=follow)
    follower.start()
    deadline = time.monotonic() + JOB_SECONDS
    checkpoints = Path(config.checkpoint_location) / "vit_tiny_patch4_32"
    while not list(checkpoints.glob("checkpoint_*")):  # training, one epoch in
        assert follower.is_alive() and time.monotonic() < deadline, (raised, lines[-20:])
        time.sleep(1)
    (submission_id,) = flow_run_jobs(address, "flow-3")

    with pytest.raises(TerminationSignal), jobs_stopped_on_exit(address, "flow-3"):
        raise TerminationSignal(signal.SIGTERM)

    follower.join(timeout=60)
    assert not follower.is_alive()
    assert [type(error) for error in raised] == [TrainingCancelled]
    assert str(JobSubmissionClient(address).get_job_status(submission_id)) == "STOPPED"
    assert flow_run_jobs(address, "flow-3") == []
    deadline = time.monotonic() + 60
    while list_actors(address=address, filters=[("state", "=", "ALIVE"), ("class_name", "=", "RayTrainWorker")]):
        assert time.monotonic() < deadline, "the training's workers outlived its stopped job"
        time.sleep(1)
