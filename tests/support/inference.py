"""Trained-looking runs for the inference tests (predict, export, serve): random tiny models exported as training
exports them (weights and config.json), on small real CIFAR-10 shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.config import PipelineConfig
from tasks.data.loader import ShardStream
from tasks.data.shard import ShardOptions, shard_dataset
from tasks.inference.model_ref import write_model_config
from tasks.layout import RunLayout
from tests.support.evaluation import save_random_weights, tiny_config

TINY_VIT = {"name": "vit_tiny_patch4_32", "drop_path_rate": 0.0, "model_kwargs": {"depth": 2}}


@pytest.fixture(scope="session")
def mini_shards(tmp_path_factory, mini_cifar) -> str:
    """mini_cifar's 480 training (48 held out for validation) and 200 test images, sharded."""
    location = str(tmp_path_factory.mktemp("mini-shards") / "cifar10")
    shard_dataset("cifar10", mini_cifar, location, ShardOptions(shard_size=100, val_size=48), progress=False)
    return location


def trained_run(tmp_path: Path, shards: str, transformers: list | None = None,
                flow_run: str | None = None) -> PipelineConfig:
    """A run directory (runs/eval/, or runs/eval/<flow_run>/ as a flow writes it) whose models are trained as far
    as inference can tell: scrambled random weights and config.json in models/<model>/, for the baseline and
    `transformers` (default a 2-block ViT-Tiny)."""
    config = tiny_config(tmp_path, shards, transformers=[TINY_VIT] if transformers is None else transformers)
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"flow_run": flow_run})})
    for name, weights in save_random_weights(config, scramble=True).items():
        write_model_config(weights.parent, config, name, shards)
    return config


def png_test_images(shards: str, directory: Path, count: int) -> tuple[list[Path], np.ndarray, list[str]]:
    """The first `count` test images of the shards as PNG files, with their labels and shard keys."""
    batches = list(ShardStream(shards, "test", count, train=False))  # batches of at most `count`, in order
    images, labels = torch.cat([b[0] for b in batches])[:count], torch.cat([b[1] for b in batches])[:count]
    keys = [key for b in batches for key in b[2]][:count]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        path = directory / f"{index:03d}-{keys[index]}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths, labels.numpy(), keys


def model_dir(config: PipelineConfig, name: str) -> Path:
    return RunLayout.of(config).model_dir(name)
