"""storage.checkpoints on object storage (moto's S3 server on loopback): Ray Train writes every checkpoint to the
bucket, a killed worker resumes from the bucket's checkpoint, the driver exports best and last weights from it,
and the evaluate step scores them; no checkpoint is left on local disk."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks.config import build_config
from tasks.judging.evaluate import evaluate_models
from tasks.layout import BEST_WEIGHTS
from tasks.models import build_model
from tasks.training.checkpoints import METADATA
from tasks.training.train import train_model
from tests.conftest import SUBSET_VAL
from tests.support.s3_server import s3_server

pytestmark = pytest.mark.slow

MODEL = "vit_tiny_patch4_32"
TINY_VIT = {"name": MODEL, "drop_path_rate": 0.0, "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """The bucket's URL and the workers' temporary directory. Ray starts after the S3 variables are set, so its
    workers reach the server."""
    import ray
    import ray.cloudpickle

    worker_tmp = tmp_path_factory.mktemp("worker-tmp")
    with pytest.MonkeyPatch.context() as monkeypatch, s3_server(monkeypatch, "checkpoints"):
        # The fault hook defined here must reach the workers by value: the tests package is not on their path.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        # The workers' temporary files (a checkpoint before its upload, a download to resume from) go where the
        # test can look for what is left of them.
        ray.init(address="local", num_cpus=4, runtime_env={"env_vars": {"TMPDIR": str(worker_tmp)}})
        assert ray.get(ray.remote(tempfile.gettempdir).remote()) == str(worker_tmp)
        try:
            yield "s3://checkpoints/ray", worker_tmp
        finally:
            ray.shutdown()


def _note_epochs_and_kill_once(epoch: int, step: int, rank: int, *, epochs_seen: str, marker: str,
                               snapshot: str) -> None:
    """Rank 0 notes the epoch of every step; rank 1 dies once, in the second epoch, as soon as Ray has recorded
    the first epoch's checkpoint in its snapshot (a worker lost earlier resumes from the checkpoint before)."""
    if rank == 0:
        with open(epochs_seen, "a") as handle:
            handle.write(f"{epoch}\n")
    if epoch == 1 and rank == 1 and not os.path.exists(marker):
        import fsspec

        fs = fsspec.filesystem("s3")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (fs.exists(snapshot) and b"checkpoint_" in fs.cat_file(snapshot)):
            time.sleep(0.5)
            fs.invalidate_cache()
        Path(marker).touch()
        os._exit(1)


def _checkpoints_under(root: Path) -> list[Path]:
    return [path.parent for path in root.rglob(METADATA)]


def test_a_killed_worker_resumes_from_the_buckets_checkpoint_and_export_and_evaluate_read_it(
        bucket, tmp_path, data_root, val_shards):
    import fsspec

    storage, worker_tmp = bucket
    config = build_config({
        "data": {"data_root": str(data_root), "shard_dir": val_shards, "loader_workers": 0},
        "model": {"baseline": TINY_VIT, "transformers": []},
        "training": {"epochs": 2, "batch_size": 128, "warmup_epochs": 0.3, "bf16": False, "log_every_steps": 10,
                     "max_failures": 1},
        "scaling": {"num_workers": 2},
        "storage": {"checkpoints": storage},
        "tracking": {"run_name": "s3", "output_dir": str(tmp_path / "runs"), "mode": "disabled"},
    })
    run_path = f"checkpoints/ray/s3/{MODEL}"
    epochs_seen, marker = tmp_path / "epochs", tmp_path / "killed"
    hook = functools.partial(_note_epochs_and_kill_once, epochs_seen=str(epochs_seen), marker=str(marker),
                             snapshot=f"{run_path}/checkpoint_manager_snapshot.json")
    outcome = train_model(config, MODEL, step_hook=hook)

    assert marker.exists()
    assert [epoch["epoch"] for epoch in outcome.history] == [1, 2]
    seen = [int(line) for line in epochs_seen.read_text().split()]
    # Resumed at the second epoch from the bucket's checkpoint of the first, not started over: no epoch-0 step
    # after the first step of epoch 1 (the killed attempt's steps of epoch 1, then the resumed attempt's).
    first_of_epoch_1 = seen.index(1)
    assert 0 not in seen[first_of_epoch_1:] and seen.count(1) > seen.count(0)

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    kept = sorted(path for path in fs.glob(f"{run_path}/checkpoint_*") if fs.isdir(path))
    assert len(kept) == config.training.checkpoints_to_keep
    assert all(fs.exists(f"{path}/{METADATA}") and fs.exists(f"{path}/{BEST_WEIGHTS}") for path in kept)
    assert outcome.checkpoint_dir.startswith(f"s3://{run_path}/checkpoint_")
    # The exported best weights are the bucket's last checkpoint's best weights, byte for byte.
    assert fs.cat_file(f"{outcome.checkpoint_dir.removeprefix('s3://')}/{BEST_WEIGHTS}") == \
        outcome.best_weights.read_bytes()
    assert not _checkpoints_under(tmp_path) and not _checkpoints_under(worker_tmp), "a checkpoint left on local disk"

    model = build_model(config.model.spec(MODEL), 10)
    for weights in (outcome.best_weights, outcome.last_weights):
        model.load_state_dict(load_file(weights))  # strict
    [record] = evaluate_models(config, {MODEL: outcome.best_weights})
    assert record.best_epoch == outcome.best_epoch
    assert record.val_top1 == pytest.approx(outcome.best_val_acc, abs=1.5 / SUBSET_VAL)
