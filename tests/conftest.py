"""Shared fixtures: the CIFAR-10 subset beside the project and shards of it, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.shard import ShardOptions, shard_dataset
from tasks.sources import read_cifar10

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SUBSET = REPO_ROOT.parent / "shared" / "data" / "cifar10-subset"
SUBSET_TRAIN, SUBSET_TEST = 5085, 1017
SUBSET_VAL = 500  # held out of the training split by `val_shards`


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
