"""Shared fixtures: the CIFAR-10 subset beside the project, shards of it and a few hundred of its images, made
once per session."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tasks.data.shard import ShardOptions, shard_dataset
from tasks.data.sources import CIFAR10_DIRNAME, read_cifar10
from tests.support.published_run import evaluated_run  # noqa: F401  (a fixture: a run directory after evaluate)
from tests.support.s3_server import s3_bucket  # noqa: F401  (a fixture: a bucket on moto's S3 server)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SUBSET = REPO_ROOT.parent / "shared" / "data" / "cifar10-subset"
SUBSET_TRAIN, SUBSET_TEST = 5085, 1017
SUBSET_VAL = 500  # held out of the training split by `val_shards`
MINI_TRAIN_PER_BATCH_FILE, MINI_TEST_IMAGES = 96, 200  # `mini_cifar`: 480 training and 200 test images
MINI_TRAIN_IMAGES = 5 * MINI_TRAIN_PER_BATCH_FILE


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("DATA_ROOT") or DEFAULT_SUBSET)
    if not (root / "cifar-10-batches-py").is_dir():
        pytest.fail(f"the CIFAR-10 subset is not at {root}; set DATA_ROOT to it")
    return root


@pytest.fixture(scope="session")
def cifar_source(data_root):
    return read_cifar10(data_root)


@pytest.fixture(scope="session")
def subset_shards(tmp_path_factory, data_root) -> str:
    """The subset sharded into uneven shards (5085 = 5 x 1000 + 85), shared read-only by tests."""
    location = str(tmp_path_factory.mktemp("shards") / "cifar10")
    shard_dataset("cifar10", data_root, location, ShardOptions(shard_size=1000), progress=False)
    return location


@pytest.fixture(scope="session")
def val_shards(tmp_path_factory, data_root) -> str:
    """The subset with SUBSET_VAL training images held out for validation, as the train step needs it."""
    location = str(tmp_path_factory.mktemp("val-shards") / "cifar10")
    shard_dataset("cifar10", data_root, location, ShardOptions(shard_size=1000, val_size=SUBSET_VAL), progress=False)
    return location


@pytest.fixture(scope="session")
def mini_cifar(tmp_path_factory, cifar_source) -> Path:
    """A few hundred real CIFAR-10 images in the original python-batch layout (written for this run only)."""
    root = tmp_path_factory.mktemp("mini-cifar")
    batches = root / CIFAR10_DIRNAME
    batches.mkdir()
    train, test = cifar_source.splits["train"], cifar_source.splits["test"]

    def write(name: str, pixels: np.ndarray, labels: np.ndarray) -> None:
        data = pixels.transpose(0, 3, 1, 2).reshape(len(pixels), -1)
        (batches / name).write_bytes(pickle.dumps({"data": data, "labels": labels.tolist()}, protocol=2))

    for index in range(5):
        chosen = slice(index * MINI_TRAIN_PER_BATCH_FILE, (index + 1) * MINI_TRAIN_PER_BATCH_FILE)
        write(f"data_batch_{index + 1}", train.pixels[chosen], train.labels[chosen])
    write("test_batch", test.pixels[:MINI_TEST_IMAGES], test.labels[:MINI_TEST_IMAGES])
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": list(cifar_source.classes)}, protocol=2))
    return root
