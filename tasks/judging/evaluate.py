"""Evaluate step: every trained model on the whole test split, side by side with the ResNet baseline.

`classification_metrics` is the pure part (logits and labels in, numbers out); `evaluate_models` adds
what needs the model itself (parameters, FLOPs, speed on this machine) and the training cost recorded
by the train step, and writes runs/<run>/evaluation.json.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tasks.config import PipelineConfig
from tasks.contracts import parse_record, record_json
from tasks.data.crops import EvalResize
from tasks.data.loader import Normalizer, ShardStream, device_batches, make_loader
from tasks.data.manifest import VAL_SPLIT, Manifest, require_manifest
from tasks.layout import METRICS_FILE, RunLayout
from tasks.models import autocast_context, build_model, uses_channels_last
from tasks.operations.tracking import files_artifact, record_model_inputs, start_wandb_run

log = logging.getLogger(__name__)

EVALUATION_ARTIFACT = "evaluation"
ECE_BINS = 15
TOP_K = 5
# Speed is measured on random inputs: it depends on shapes, not pixel values. A few iterations after a
# warm-up give a stable enough figure for a comparison without slowing the step down.
WARMUP_ITERATIONS = 2
THROUGHPUT_ITERATIONS = 3
LATENCY_ITERATIONS = 10
SECONDS_PER_HOUR = 3600
# Columns of the summary table, with how each value is printed.
TABLE_COLUMNS = {
    "model": ("model", "{}"),
    "val_top1": ("val top-1", "{:.4f}"),
    "top1": ("test top-1", "{:.4f}"),
    "top5": ("test top-5", "{:.4f}"),
    "loss": ("test loss", "{:.4f}"),
    "ece": ("test ECE", "{:.4f}"),
    "params": ("params (M)", "{:.2f}"),
    "gflops": ("GFLOPs", "{:.3f}"),
    "images_per_s": ("images/s", "{:.0f}"),
    "latency_ms": ("latency (ms)", "{:.2f}"),
    "train_seconds": ("train time (s)", "{:.0f}"),
    "device_hours": ("device hours", "{:.3f}"),
}
PARAMS_PER_MILLION = 1e6
# Written only when the shards have a validation split.
VALIDATION_FIELDS = ("val_top1", "val_samples")


@dataclass(frozen=True, kw_only=True)
class EvaluationRecord:
    """One model's record in evaluation.json, which the report, publish and W&B read: its keys are these
    fields, in this order."""

    model: str
    role: str  # baseline or transformer
    weights: str
    # classification_metrics, on the test split
    top1: float
    top5: float
    per_class_accuracy: list[float | None]  # None for a class the test split lacks
    confusion_matrix: list[list[int]]  # rows true, columns predicted
    loss: float
    ece: float
    test_samples: int
    # the same weights on the validation split; absent on disk without one (VALIDATION_FIELDS)
    val_top1: float | None = None
    val_samples: int | None = None
    params: int
    gflops: float
    device: str
    # measure_speed
    images_per_s: float
    latency_ms: float
    speed_device: str
    # training_cost: None when the weights have no metrics.json beside them
    train_seconds: float | None
    train_images_per_s: float | None
    device_hours: float | None
    device_kind: str | None
    epochs: int | None
    best_epoch: int | None
    train_val_top1: float | None

    def to_json(self) -> dict:
        return record_json(self, omit_when_none=VALIDATION_FIELDS)


@dataclass(frozen=True)
class Evaluation:
    """evaluation.json: every model's record and the class names the confusion matrices are indexed by."""

    models: list[EvaluationRecord]
    classes: list[str]

    def to_json(self) -> dict:
        return record_json(self, omit_when_none=VALIDATION_FIELDS)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int,
                           ece_bins: int = ECE_BINS) -> dict:
    """Top-1/top-5, per-class accuracy, confusion matrix (rows true, columns predicted), mean
    cross-entropy and expected calibration error for [N, C] logits and [N] integer labels."""
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if logits_t.ndim != 2 or logits_t.shape[0] != labels_t.shape[0]:
        raise ValueError(f"logits {tuple(logits_t.shape)} do not match labels {tuple(labels_t.shape)}")
    predictions = logits_t.argmax(1)
    correct = predictions == labels_t
    top_k = logits_t.topk(min(TOP_K, num_classes), dim=1).indices
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((labels_t, predictions), torch.ones_like(labels_t), accumulate=True)
    per_class_total = confusion.sum(1)
    per_class = [
        None if total == 0 else confusion[c, c].item() / total.item() for c, total in enumerate(per_class_total)
    ]
    probabilities = logits_t.softmax(1)
    return {
        "top1": correct.double().mean().item(),
        "top5": (top_k == labels_t[:, None]).any(1).double().mean().item(),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "loss": nn.functional.cross_entropy(logits_t, labels_t).item(),
        "ece": expected_calibration_error(probabilities.max(1).values.numpy(), correct.numpy(), ece_bins),
        "test_samples": int(labels_t.shape[0]),
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # right-closed bins (lo, hi]: a confidence of exactly 1 belongs to the last bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def load_trained_model(config: PipelineConfig, name: str, weights: Path, num_classes: int) -> nn.Module:
    """The configured architecture with the trained weights (never the hub's or a pretrained file's)."""
    _require_weights(name, weights)
    spec = config.model.spec(name).model_copy(update={"pretrained": False, "pretrained_file": None})
    model = build_model(spec, num_classes)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def _require_weights(name: str, weights: Path) -> None:
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{name}: trained weights not found at {weights}; "
                                f"run `vit-pipeline train --model {name}`")


def default_models(config: PipelineConfig) -> dict[str, Path]:
    return {spec.name: RunLayout.of(config).weights(spec.name) for spec in config.model.all_specs()}


def evaluation_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict(model: nn.Module, stream: ShardStream, config: PipelineConfig, device: torch.device,
            channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits and labels for every sample of the stream, in stream order, in the precision the model
    was trained and validated in (training.bf16) and at its resolution (`EvalResize`, as validation), so
    evaluate scores exactly what training selected."""
    normalizer = Normalizer(config.data.mean, config.data.std, device, channels_last=channels_last)
    loader = make_loader(stream, config.data.loader_workers)
    all_logits, all_labels = [], []
    with autocast_context(config, device):
        for images, labels in device_batches(loader, device, normalizer, EvalResize.from_config(config.data)):
            all_logits.append(model(images).float().cpu())
            all_labels.append(labels.cpu())
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def count_gflops(model: nn.Module, image_shape: tuple[int, int, int]) -> float:
    """GFLOPs for one image as torch's FlopCounterMode counts them (2 per multiply-accumulate).

    Counted on a copy on the meta device: there attention dispatches to kernels the counter knows,
    while on CPU it runs a fused kernel that the counter scores as zero (about 5% low for a ViT-Ti).
    """
    meta_model = copy.deepcopy(model).to("meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        meta_model(torch.zeros(1, *image_shape, device="meta"))
    return counter.get_total_flops() / 1e9


def _timed_calls(model: nn.Module, inputs: torch.Tensor, iterations: int) -> list[float]:
    """Seconds per call, after a warm-up (lazy init, allocator, cuDNN autotuning)."""
    synchronize = torch.cuda.synchronize if inputs.device.type == "cuda" else (lambda: None)
    seconds = []
    with torch.inference_mode():
        for index in range(WARMUP_ITERATIONS + iterations):
            synchronize()
            start = time.perf_counter()
            model(inputs)
            synchronize()
            if index >= WARMUP_ITERATIONS:
                seconds.append(time.perf_counter() - start)
    return seconds


def measure_speed(model: nn.Module, image_shape: tuple[int, int, int], batch_size: int,
                  device: torch.device) -> dict:
    """Inference images/s at `batch_size` and median latency (ms) for a single image, on `device`."""
    batch = torch.randn(batch_size, *image_shape, device=device)
    batch_seconds = _timed_calls(model, batch, THROUGHPUT_ITERATIONS)
    single_seconds = _timed_calls(model, batch[:1], LATENCY_ITERATIONS)
    return {
        "images_per_s": batch_size * len(batch_seconds) / sum(batch_seconds),
        "latency_ms": statistics.median(single_seconds) * 1000,
        "speed_device": str(device),
    }


def training_cost(config: PipelineConfig, name: str, weights: Path) -> dict:
    """Training time and throughput from the metrics.json beside the weights (None values when absent).

    Device hours = train_seconds x workers x devices per worker / 3600, where a worker's devices are its
    GPUs when training used GPUs (1 when gpus_per_worker is 0, as the train step then asks for 1), else its
    CPU cores. metrics.json does not record the scaling, so it is read from the current configuration.
    """
    metrics_file = Path(weights).parent / METRICS_FILE
    if not metrics_file.is_file():
        return {"train_seconds": None, "train_images_per_s": None, "device_hours": None, "device_kind": None,
                "epochs": None, "best_epoch": None, "train_val_top1": None}
    metrics = json.loads(metrics_file.read_text())
    history = metrics.get("history") or []
    scaling = config.scaling
    per_worker = (scaling.gpus_per_worker or 1) if scaling.use_gpu else scaling.cpus_per_worker
    seconds = metrics.get("train_seconds")
    return {
        "train_seconds": seconds,
        "train_images_per_s": statistics.fmean(e["images_per_s"] for e in history) if history else None,
        "device_hours": None if seconds is None else seconds * scaling.num_workers * per_worker / SECONDS_PER_HOUR,
        "device_kind": "gpu" if scaling.use_gpu else "cpu",
        "epochs": len(history),
        # The epoch training selected on validation, and the validation top-1 it recorded for those weights.
        "best_epoch": metrics.get("best_epoch"),
        "train_val_top1": metrics.get("best_val_acc"),
    }


def evaluate_model(config: PipelineConfig, name: str, weights: Path, location: str, manifest: Manifest,
                   device: torch.device) -> EvaluationRecord:
    """One model's record for evaluation.json: test metrics (the one time the test split is scored), the
    validation top-1 of the same weights beside them, compute, speed and training cost."""
    classes = manifest.classes
    spec = config.model.spec(name)
    channels_last = uses_channels_last(config.training, spec)
    model = load_trained_model(config, name, weights, len(classes)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # rank 0 of 1: this process reads every sample of a split exactly once
    stream = ShardStream(location, "test", config.training.batch_size, train=False, rank=0, world_size=1)
    logits, labels = predict(model, stream, config, device, channels_last)
    validation: dict[str, Any] = {}
    if VAL_SPLIT in manifest.splits:
        val_stream = ShardStream(location, VAL_SPLIT, config.training.batch_size, train=False)
        val_logits, val_labels = predict(model, val_stream, config, device, channels_last)
        validation = {"val_top1": float((val_logits.argmax(1) == val_labels).mean()),
                      "val_samples": int(len(val_labels))}
    image_shape = EvalResize.from_config(config.data).output_shape(_image_shape(stream))
    record = EvaluationRecord(
        model=name,
        role="baseline" if name == config.model.baseline.name else "transformer",
        weights=str(weights),
        **classification_metrics(logits, labels, len(classes)),
        **validation,
        params=sum(p.numel() for p in model.parameters()),
        gflops=count_gflops(model, image_shape),
        device=str(device),
        **measure_speed(model, image_shape, config.training.batch_size, device),
        **training_cost(config, name, weights),
    )
    log.info("%s: top-1 %.4f over %d test images", name, record.top1, record.test_samples)
    return record


def _image_shape(stream: ShardStream) -> tuple[int, int, int]:
    """C x H x W of the split's images (the manifest does not record it), from its first batch."""
    images, _, _ = next(iter(stream))
    _, channels, height, width = images.shape
    return channels, height, width


def evaluate_models(config: PipelineConfig, models: dict[str, Path] | None = None,
                    shard_location: str | None = None, group: str | None = None, *,
                    merge: bool = False) -> list[EvaluationRecord]:
    """Evaluate the baseline and every transformer (or `models`: name -> weights) on the test split.

    merge: keep evaluation.json's records of the other models (scored on the same classes), so models trained
    one at a time are compared side by side; otherwise the file holds the models evaluated now. Returns the
    records written, in the configuration's model order."""
    models = models if models is not None else default_models(config)
    for name, weights in models.items():
        config.model.spec(name)  # fail on an unknown name or missing file before evaluating anything
        _require_weights(name, weights)
    location = shard_location or config.shard_location
    manifest = require_manifest(location)
    device = evaluation_device()
    records = [evaluate_model(config, name, Path(weights), location, manifest, device)
               for name, weights in models.items()]
    out = RunLayout.of(config).evaluation
    if merge and out.is_file():
        records = _merged(config, records, _read_evaluation_file(out), manifest.classes)
    write_evaluation(out, Evaluation(records, manifest.classes))
    _log_to_wandb(config, records, group, models, out)
    return records


def _merged(config: PipelineConfig, records: list[EvaluationRecord], stored: Evaluation,
            classes: list[str]) -> list[EvaluationRecord]:
    """`records` with the stored records of other models, in the configuration's model order (others last)."""
    if stored.classes != classes:
        log.warning("%s was scored on other classes (%s); its records are replaced", RunLayout.of(config).evaluation,
                    stored.classes)
        return records
    evaluated = {record.model for record in records}
    kept = [record for record in stored.models if record.model not in evaluated]
    order = [spec.name for spec in config.model.all_specs()]
    return sorted([*kept, *records], key=lambda r: order.index(r.model) if r.model in order else len(order))


def write_evaluation(path: Path, evaluation: Evaluation) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluation.to_json(), indent=2))


def read_evaluation(config: PipelineConfig) -> Evaluation:
    """The run's evaluation.json; a missing or wrongly typed field raises ValueError naming it and the file."""
    path = RunLayout.of(config).evaluation
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `vit-pipeline evaluate` first")
    return _read_evaluation_file(path)


def _read_evaluation_file(path: Path) -> Evaluation:
    return parse_record(Evaluation, path.read_text(), str(path))


def table_rows(records: list[EvaluationRecord]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the summary table; missing values print as n/a."""
    headers = [header for header, _ in TABLE_COLUMNS.values()]
    rows = []
    for record in records:
        row = []
        for key, (_, form) in TABLE_COLUMNS.items():
            value = getattr(record, key)
            if key == "params" and value is not None:
                value = value / PARAMS_PER_MILLION
            row.append("n/a" if value is None else form.format(value))
        rows.append(row)
    return headers, rows


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(records: list[EvaluationRecord]) -> str:
    """The evaluation as a Markdown table, one row per model."""
    return markdown(*table_rows(records))


def _log_to_wandb(config: PipelineConfig, records: list[EvaluationRecord], group: str | None, models: dict[str, Path],
                  evaluation_file: Path) -> None:
    run = start_wandb_run(config, "evaluate", "comparison", group=group)
    if run is None:
        return
    import wandb

    stored = [record.to_json() for record in records]
    scalar_keys = [key for key, value in stored[0].items() if isinstance(value, (int, float, str)) or value is None]
    table = wandb.Table(columns=scalar_keys, data=[[entry.get(key) for key in scalar_keys] for entry in stored])
    record_model_inputs(run, models)
    run.log({"evaluation": table})
    for record in records:
        run.summary[f"{record.model}/top1"] = record.top1
    run.log_artifact(files_artifact(EVALUATION_ARTIFACT, "evaluation", [evaluation_file]))
    run.finish()
