"""Train step: Ray Train DDP over the shards, resumable from checkpoints.

`train_worker` is the whole per-worker loop, top to bottom; `train_model` is the driver that
hands it to a TorchTrainer and exports the best and last weights under runs/<run>/models/<model>/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tasks.checkpoints import (
    WEIGHTS,
    find_resume_checkpoint,
    latest_valid_checkpoint,
    load_training_state,
    read_checkpoint_metadata,
    save_checkpoint,
    save_weights,
    unwrap,
)
from tasks.config import (
    RAY_CLIENT_REFUSED,
    RAY_CLIENT_SCHEME,
    ModelSpec,
    PipelineConfig,
    TrainingConfig,
    is_url,
    with_absolute_paths,
)
from tasks.loader import ShardStream, make_loader, normalize
from tasks.shard import read_manifest, verify_shards
from tasks.tracking import (
    dataset_artifact_name,
    detach_from_parent_wandb_service,
    manifest_snapshot,
    model_artifact_name,
    record_input,
    start_wandb_run,
)

log = logging.getLogger(__name__)

# Called as step_hook(epoch, step, rank) after each optimizer step; tests use it to inject faults.
StepHook = Callable[[int, int, int], None]


class TrainingError(RuntimeError):
    """Training cannot start or did not finish; the message says what to do about it."""


@dataclass
class TrainOutcome:
    model: str
    best_weights: Path
    last_weights: Path
    history: list[dict]
    best_test_acc: float
    checkpoint_dir: str
    train_seconds: float


def build_model(spec: ModelSpec, num_classes: int) -> nn.Module:
    import vitmodels

    # Regularisers are passed only when used: not every timm family takes every keyword.
    regularisers = {key: value for key in ("drop_rate", "drop_path_rate") if (value := getattr(spec, key))}
    return vitmodels.create_model(
        spec.name,
        num_classes=num_classes,
        pretrained=spec.pretrained,
        pretrained_file=spec.pretrained_file,
        **regularisers,
        **spec.model_kwargs,
    )


def trained_weights(config: PipelineConfig, model_name: str, which: str = "best") -> Path:
    return Path(config.run_dir) / "models" / model_name / f"{which}.safetensors"


def default_teacher_weights(config: PipelineConfig, model_name: str) -> str | None:
    """The run's trained baseline, when `model_name` distils from it and it has been trained."""
    spec = config.model.spec(model_name)
    weights = trained_weights(config, config.model.baseline.name)
    return str(weights) if spec.teacher == "baseline" and weights.is_file() else None


def build_teacher(config: PipelineConfig, spec: ModelSpec, num_classes: int, teacher_weights: str | None) -> nn.Module:
    """The distillation teacher: the pipeline's trained baseline, or any timm name plus a weights file."""
    from safetensors.torch import load_file

    if spec.teacher == "baseline":
        teacher = build_model(config.model.baseline, num_classes)
        teacher.load_state_dict(load_file(teacher_weights))
        return teacher
    teacher_spec = ModelSpec(name=spec.teacher, pretrained_file=spec.teacher_file, drop_path_rate=0.0)
    return build_model(teacher_spec, num_classes)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, tokens and position tables (1-d params and no_weight_decay())."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0, then cosine decay to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_criterion(config: PipelineConfig, spec: ModelSpec, teacher: nn.Module | None) -> nn.Module:
    from timm.loss import SoftTargetCrossEntropy

    import vitmodels

    augment = config.data.augment
    uses_mixup = augment.mixup_alpha > 0 or augment.cutmix_alpha > 0
    # Mixup already folds label smoothing into its soft targets.
    base = SoftTargetCrossEntropy() if uses_mixup else nn.CrossEntropyLoss(label_smoothing=augment.label_smoothing)
    return vitmodels.DistillationLoss(
        base, teacher, distillation_type=spec.distillation, alpha=spec.distillation_alpha, tau=spec.distillation_tau
    )


def build_mixup(config: PipelineConfig, num_classes: int):
    from timm.data import Mixup

    augment = config.data.augment
    if augment.mixup_alpha == 0 and augment.cutmix_alpha == 0:
        return None
    return Mixup(
        mixup_alpha=augment.mixup_alpha,
        cutmix_alpha=augment.cutmix_alpha,
        prob=augment.mixup_prob,
        label_smoothing=augment.label_smoothing,
        num_classes=num_classes,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_accuracy(model: nn.Module, stream: ShardStream, config: PipelineConfig, device: torch.device,
                      channels_last: bool = False) -> dict:
    """Top-1 accuracy and loss over this rank's share of the test split, summed over all ranks."""
    model.eval()
    correct = total = loss_sum = 0.0
    with torch.no_grad(), autocast_context(config, device):
        for images, labels, _ in make_loader(stream, config.data.loader_workers):
            images = normalize(images, config.data.mean, config.data.std, device, channels_last)
            labels = labels.to(device)
            logits = model(images).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += len(labels)
    correct, total, loss_sum = _all_reduce_sum([correct, total, loss_sum], device)
    return {"test_acc": correct / total, "test_loss": loss_sum / total, "test_samples": int(total)}


def autocast_context(config: PipelineConfig, device: torch.device):
    """bf16 autocast on any device when training.bf16 is on. CPUs with native bf16 (AVX512-BF16, AMX) gain as
    GPUs do; on CPUs without it bf16 is emulated and slower, which is why the CPU configs leave it off."""
    if config.training.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def uses_channels_last(training: TrainingConfig, spec: ModelSpec) -> bool:
    return training.channels_last if spec.channels_last is None else spec.channels_last


def train_worker(loop_config: dict) -> None:
    """The per-worker loop Ray Train runs on every rank."""
    import ray.train
    import ray.train.torch
    from timm.utils import ModelEmaV3

    config = PipelineConfig.model_validate_json(loop_config["config"])
    spec = config.model.spec(loop_config["model"])
    step_hook: StepHook | None = loop_config.get("step_hook")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    training = config.training
    _seed_everything(training.seed)  # one seed on every rank: identical initial weights

    location = loop_config["shard_location"]
    num_classes = len(read_manifest(location)["classes"])
    train_stream = ShardStream(location, "train", training.batch_size, train=True, augment=config.data.augment,
                               seed=training.seed, rank=rank, world_size=world_size,
                               shuffle_buffer=config.data.shuffle_buffer)
    test_stream = ShardStream(location, "test", training.batch_size, train=False, rank=rank, world_size=world_size)

    model = build_model(spec, num_classes).to(device)
    channels_last = uses_channels_last(training, spec)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = None
    if spec.distillation != "none":
        teacher = build_teacher(config, spec, num_classes, loop_config.get("teacher_weights")).to(device)
    criterion = build_criterion(config, spec, teacher)
    mixup = build_mixup(config, num_classes)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, training.weight_decay), lr=training.lr, fused=True
    )
    steps_per_epoch = math.ceil(len(train_stream) / training.grad_accum_steps)
    total_steps = steps_per_epoch * training.epochs
    warmup_steps = max(1, round(training.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, training.min_lr / training.lr)
    )
    ema = ModelEmaV3(model, decay=training.ema_decay) if training.ema_decay else None

    # W&B rows logged so far, as (row, step); checkpoints carry them so a restart can replay them.
    start_epoch, global_step, history, wandb_rows = 0, 0, [], []
    ray_checkpoint = ray.train.get_checkpoint()
    resume_from = find_resume_checkpoint(
        Path(ray_checkpoint.path) if ray_checkpoint is not None else None, Path(loop_config["run_path"])
    )
    if resume_from is not None:
        state = load_training_state(resume_from, model, optimizer, scheduler, ema)
        start_epoch, global_step, history = state["epoch"] + 1, state["global_step"], state["history"]
        wandb_rows = [tuple(pair) for pair in read_checkpoint_metadata(resume_from).get("wandb_rows", [])]
        if rank == 0:
            print(f"[{spec.name}] resuming after epoch {start_epoch} from {resume_from}", flush=True)

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    step_model = torch.compile(ddp_model) if training.compile else ddp_model
    detach_from_parent_wandb_service()
    tracker = start_wandb_run(config, "train", spec.name, group=loop_config.get("group"),
                              extra={"world_size": world_size}) if rank == 0 else None
    if tracker is not None:
        with tempfile.TemporaryDirectory() as directory:
            manifest = manifest_snapshot(location, Path(directory))
            record_input(tracker, dataset_artifact_name(config), "dataset", manifest)
        # A restarted attempt's W&B file repeats the history up to its checkpoint: what the killed attempt
        # had logged may never have reached its file. Online, steps W&B already has are not sent again.
        _log_rows(tracker, [(row, step) for row, step in wandb_rows if step >= tracker.step])

    for epoch in range(start_epoch, training.epochs):
        # W&B rows wait until the epoch's checkpoint is committed: a restart resumes from that
        # checkpoint and replays the unfinished epoch, so logging its steps live would record them twice.
        pending_rows: list[tuple[dict, int]] = []
        # Every random stream is a function of (seed, epoch, rank), so a resumed run replays exactly.
        _seed_everything(training.seed + 1000 * (epoch + 1) + rank)
        train_stream.set_epoch(epoch)
        step_model.train()
        epoch_start = time.perf_counter()
        loss_sum = correct = seen = 0.0
        for batch_index, (images, labels, _) in enumerate(make_loader(train_stream, config.data.loader_workers)):
            images = normalize(images, config.data.mean, config.data.std, device, channels_last)
            labels = labels.to(device)
            hard_labels = labels
            if mixup is not None:
                images, labels = mixup(images, labels)
            last_micro_step = (batch_index + 1) % training.grad_accum_steps == 0 or batch_index + 1 == len(train_stream)
            sync = nullcontext() if last_micro_step or world_size == 1 else ddp_model.no_sync()
            with sync, autocast_context(config, device):
                outputs = step_model(images)
                loss = criterion(images, outputs, labels)
                (loss / training.grad_accum_steps).backward()
            if last_micro_step:
                if training.grad_clip_norm:
                    nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(model, step=global_step)
                global_step += 1
                if step_hook is not None:
                    step_hook(epoch, global_step, rank)
            logits = (outputs[0] + outputs[1]) / 2 if isinstance(outputs, tuple) else outputs
            loss_sum += loss.item() * len(hard_labels)
            correct += (logits.argmax(1) == hard_labels).sum().item()
            seen += len(hard_labels)
            if tracker is not None and last_micro_step and global_step % training.log_every_steps == 0:
                terms = {f"train/loss_{k}": v.item() for k, v in criterion.last_terms.items()}
                pending_rows.append(
                    ({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0], **terms}, global_step)
                )
        epoch_seconds = time.perf_counter() - epoch_start
        loss_sum, correct, seen_total = _all_reduce_sum([loss_sum, correct, seen], device)
        evaluated = evaluate_accuracy(ema.module if ema is not None else model, test_stream, config, device,
                                      channels_last)
        terms = {f"train_loss_{k}": v.item() for k, v in criterion.last_terms.items()}
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen_total,
            "train_acc": correct / seen_total,
            **terms,
            **evaluated,
            "lr": scheduler.get_last_lr()[0],
            "images_per_s_worker": seen / epoch_seconds,
            "images_per_s": seen_total / epoch_seconds,
            "epoch_seconds": epoch_seconds,
            "peak_memory_mb": _peak_memory_mb(device),
            "global_step": global_step,
        }
        history.append(metrics)
        pending_rows.append(({f"epoch/{k}": v for k, v in metrics.items()}, global_step))
        wandb_rows += pending_rows
        _report(metrics, history, rank, model, optimizer, scheduler, ema, spec.name, config, wandb_rows)
        if tracker is not None:
            _log_rows(tracker, pending_rows)
            remaining = (training.epochs - epoch - 1) * epoch_seconds
            print(
                f"[{spec.name}] epoch {epoch + 1}/{training.epochs} loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_acc']:.3f} test_acc {metrics['test_acc']:.3f} "
                f"{metrics['images_per_s']:.0f} img/s eta {time.strftime('%H:%M:%S', time.gmtime(remaining))}",
                flush=True,
            )
    if tracker is not None:
        _log_model_artifact(tracker, model, spec.name)
        tracker.finish()


def _log_rows(tracker, rows: list[tuple[dict, int]]) -> None:
    for index, (row, step) in enumerate(rows):
        # commit the last row: W&B holds a step's row until a later step arrives, and a crash would lose it.
        tracker.log(row, step=step, commit=True if index == len(rows) - 1 else None)


def _log_model_artifact(tracker, model: nn.Module, model_name: str) -> None:
    import wandb

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / WEIGHTS
        save_weights(unwrap(model), path)
        artifact = wandb.Artifact(model_artifact_name(model_name), type="model", metadata={"model": model_name})
        artifact.add_file(str(path))
        tracker.log_artifact(artifact)


def _report(metrics, history, rank, model, optimizer, scheduler, ema, model_name, config, wandb_rows) -> None:
    """Every rank reports (it is a barrier); rank 0 alone attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-") as directory:
        save_checkpoint(
            Path(directory), model=unwrap(model), optimizer=optimizer, scheduler=scheduler, ema=ema,
            epoch=metrics["epoch"] - 1, global_step=metrics["global_step"], history=history,
            extra={"model": model_name, "config": config.model_dump(mode="json"), "wandb_rows": wandb_rows},
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def ray_address(config: PipelineConfig) -> str | None:
    """scaling.ray_address, else $RAY_ADDRESS; None means a Ray of this process's own."""
    return config.scaling.ray_address or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(config: PipelineConfig) -> str | None:
    """Use the running Ray, else join the cluster at ray_address() as a driver, else start one here.

    Returns the dashboard address when this call connected (None when Ray was already up)."""
    import ray

    if ray.is_initialized():
        return None
    address = ray_address(config)
    if address and address.startswith(RAY_CLIENT_SCHEME):
        raise TrainingError(f"RAY_ADDRESS={address}: {RAY_CLIENT_REFUSED}")
    if address and is_url(address):
        raise TrainingError(
            f"RAY_ADDRESS={address} is a Ray Jobs API, which the flow submits trainings to; training in this "
            "process needs a cluster it can join as a driver: 'auto' on a node of it, or <head>:6379"
        )
    if address:
        context = ray.init(address=address)
    else:
        # "local": a new Ray for this process, never one that `ray start` left running on the machine.
        context = ray.init(address="local", num_cpus=config.scaling.ray_num_cpus)
    return context.dashboard_url or None


def concurrent_trainings(config: PipelineConfig, resources: dict[str, float] | None = None) -> int:
    """How many trainings of this scaling config the cluster holds at once (at least 1).

    `resources` are the cluster's totals; by default those of the Ray this process is connected to."""
    import ray

    resources = resources if resources is not None else ray.cluster_resources()
    scaling = config.scaling
    fits = resources.get("CPU", 0) // (scaling.num_workers * scaling.cpus_per_worker)
    if scaling.use_gpu:
        fits = min(fits, resources.get("GPU", 0) // (scaling.num_workers * (scaling.gpus_per_worker or 1)))
    return max(1, int(fits))


def train_model(
    config: PipelineConfig,
    model_name: str,
    *,
    shard_location: str | None = None,
    teacher_weights: str | None = None,
    group: str | None = None,
    step_hook: StepHook | None = None,
) -> TrainOutcome:
    """Train one configured model on the shards with Ray Train; resumes a run of the same name."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = with_absolute_paths(config)  # workers run in their own directories
    spec = config.model.spec(model_name)
    if spec.distillation != "none" and spec.teacher == "baseline" and teacher_weights is None:
        raise TrainingError(
            f"{model_name} distils from the baseline, whose weights are not there "
            f"({trained_weights(config, config.model.baseline.name)}); train {config.model.baseline.name} first"
        )
    location = shard_location or config.shard_location
    report = verify_shards(location)
    if not report.ok:
        raise TrainingError(f"refusing to train on bad shards in {location}:\n  " + "\n  ".join(report.problems))
    ensure_ray(config)
    storage = config.checkpoint_location  # absolute or a URL: with_absolute_paths above
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.model_dump_json(),
            "model": model_name,
            "shard_location": location if "://" in location else str(Path(location).absolute()),
            "teacher_weights": str(Path(teacher_weights).absolute()) if teacher_weights else None,
            "group": group,
            "step_hook": step_hook,
            "run_path": f"{storage}/{model_name}",
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=model_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.training.checkpoints_to_keep,
                checkpoint_score_attribute="test_acc",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=config.training.max_failures),
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as error:
        raise TrainingError(_failure_message(model_name, f"{storage}/{model_name}", error)) from error
    return _export(config, model_name, result, time.perf_counter() - started)


def _failure_message(model_name: str, run_path: str, error: Exception) -> str:
    latest = None if is_url(run_path) else latest_valid_checkpoint(Path(run_path))
    where = f"the last good checkpoint is {latest}" if latest else "no valid checkpoint was written"
    return f"training {model_name} failed ({type(error).__name__}: {error}); {where}"


def _export(config: PipelineConfig, model_name: str, result, seconds: float) -> TrainOutcome:
    """Copy the best and last weights out of Ray's storage into runs/<run>/models/<model>/."""
    if result.checkpoint is None:
        raise TrainingError(f"training {model_name} finished without a checkpoint")
    out = trained_weights(config, model_name).parent
    out.mkdir(parents=True, exist_ok=True)
    best_checkpoint = max(result.best_checkpoints, key=lambda pair: pair[1]["test_acc"])[0]
    for label, checkpoint in (("best", best_checkpoint), ("last", result.checkpoint)):
        with checkpoint.as_directory() as directory:
            read_checkpoint_metadata(Path(directory))  # raises CheckpointError on a damaged checkpoint
            shutil.copyfile(Path(directory) / WEIGHTS, out / f"{label}.safetensors")
            if label == "last":
                history = read_checkpoint_metadata(Path(directory))["history"]
    best_acc = max(epoch["test_acc"] for epoch in history)
    summary = {"model": model_name, "history": history, "best_test_acc": best_acc, "train_seconds": seconds,
               "checkpoint_dir": result.checkpoint.path}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return TrainOutcome(model_name, out / "best.safetensors", out / "last.safetensors", history, best_acc,
                        result.checkpoint.path, seconds)

