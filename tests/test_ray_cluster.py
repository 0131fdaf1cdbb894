"""Training across two Ray nodes on this machine (ray.cluster_utils.Cluster): one worker per node."""

import functools
import sys
from pathlib import Path

import pytest

from tasks.config import build_config
from tasks.train import train_model

pytestmark = pytest.mark.slow


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


def test_training_places_one_worker_on_each_node(two_node_cluster, tmp_path, data_root, subset_shards):
    import ray

    config = build_config({
        "data": {"data_root": str(data_root), "shard_dir": subset_shards, "loader_workers": 0},
        "model": {"transformers": [{"name": "vit_tiny_patch4_32", "drop_path_rate": 0.0,
                                    "model_kwargs": {"depth": 1}}]},
        "training": {"epochs": 1, "batch_size": 128, "warmup_epochs": 0.2, "bf16": False},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"run_name": "two-nodes", "output_dir": str(tmp_path / "runs"), "mode": "disabled"},
    })
    hook = functools.partial(_record_node, directory=str(tmp_path))
    outcome = train_model(config, "vit_tiny_patch4_32", step_hook=hook)
    assert outcome.history[0]["test_samples"] == 1017
    placed = {(tmp_path / f"rank-{rank}").read_text() for rank in (0, 1)}
    assert placed == {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(placed) == 2
