"""Tiny configurations and random-init weights shared by the evaluate, attention and report tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tasks.config import PipelineConfig, build_config
from tasks.judging.evaluate import EvaluationRecord
from tasks.layout import RunLayout
from tasks.models import build_model

# timm's resnet10t stands in for the ResNet baseline: the ImageNet stem makes it cheap on 32x32 images.
TINY_BASELINE = {"name": "resnet10t", "drop_path_rate": 0.0}
TINY_TRANSFORMERS = [
    {"name": "vit_tiny_patch4_32", "drop_path_rate": 0.0, "model_kwargs": {"depth": 2}},
    {"name": "deit_tiny_distilled_patch4_32", "drop_path_rate": 0.0, "model_kwargs": {"depth": 2}},
    {"name": "swin_tiny_patch2_window4_32", "drop_path_rate": 0.0,
     "model_kwargs": {"depths": [2, 2], "num_heads": [3, 6]}},
]
NUM_CLASSES = 10
# Random init gives near-uniform attention; larger weights make maps that actually depend on the image.
SCRAMBLE_STD = 0.3
# What the report, publish and W&B read: these keys, in this order (the val_ ones only with a validation split).
RECORD_KEYS = ["model", "role", "weights", "top1", "top5", "per_class_accuracy", "confusion_matrix", "loss", "ece",
               "test_samples", "val_top1", "val_samples", "params", "gflops", "device", "images_per_s", "latency_ms",
               "speed_device", "train_seconds", "train_images_per_s", "device_hours", "device_kind", "epochs",
               "best_epoch", "train_val_top1"]


def tiny_config(tmp_path: Path, shards: str, mode: str = "disabled",
                transformers: list | None = None) -> PipelineConfig:
    transformers = TINY_TRANSFORMERS if transformers is None else transformers
    return build_config({
        "data": {"shard_dir": shards, "loader_workers": 0},
        "model": {"baseline": TINY_BASELINE, "transformers": transformers},
        "training": {"batch_size": 128, "bf16": False},
        "tracking": {"run_name": "eval", "output_dir": str(tmp_path / "runs"), "mode": mode},
    })


def save_random_weights(config: PipelineConfig, seed: int = 0, scramble: bool = False) -> dict[str, Path]:
    """Random-init weights for every configured model where the train step would put them."""
    torch.manual_seed(seed)
    written = {}
    for spec in config.model.all_specs():
        model = build_model(spec, NUM_CLASSES)
        if scramble:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.normal_(0, SCRAMBLE_STD)
        path = RunLayout.of(config).weights(spec.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        written[spec.name] = path
    return written


def evaluation_record(model: str, top1: float, **fields) -> EvaluationRecord:
    """A whole record as evaluate writes it, for tests of what reads evaluation.json; `fields` override."""
    values = {"model": model, "role": "transformer", "weights": f"models/{model}/best.safetensors", "top1": top1,
              "top5": 0.99, "per_class_accuracy": [top1] * NUM_CLASSES,
              "confusion_matrix": [[1] * NUM_CLASSES] * NUM_CLASSES, "loss": 0.6, "ece": 0.03,
              "test_samples": 200, "val_top1": top1 + 0.01, "val_samples": 80, "params": 1_000_000, "gflops": 0.1,
              "device": "cpu", "images_per_s": 1000.0, "latency_ms": 2.0, "speed_device": "cpu",
              "train_seconds": 60.0, "train_images_per_s": 500.0, "device_hours": 0.03, "device_kind": "cpu",
              "epochs": 3, "best_epoch": 2, "train_val_top1": top1 + 0.01}
    return EvaluationRecord(**(values | fields))
