"""The training loop one worker runs: setup, train_one_epoch, validate, report.

It runs inside a WorkerContext (tasks/training/worker_context.py): on every rank of the pipeline's Ray Train
TorchTrainer (`train_worker`), or in this process through `run_training(LocalContext(...), job)` for
benchmarks, tests and single-GPU debugging. The same code trains either way.

What keeps the device busy:
  - loader processes live across epochs, batches arrive in pinned memory and are copied one batch ahead;
  - normalisation, Mixup/CutMix (and, on GPUs, all augmentation) run on the device;
  - per-step numbers stay on the device: the host reads them at log steps and at the end of an epoch only;
  - a compiled model sees the batch dimension as dynamic, so the last, smaller batches reuse its graph.

What keeps the numbers honest:
  - the validation split, never the test split, scores every epoch;
  - with EMA on, the EMA weights are the ones validated, kept as best, exported and taught from;
  - epoch metrics are means over every sample of every rank, and say what they average.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tasks.config import PipelineConfig
from tasks.data.augment import BatchAugmenter
from tasks.data.crops import EvalResize
from tasks.data.loader import Normalizer, ShardStream, device_batches, make_loader
from tasks.data.manifest import VAL_SPLIT, read_manifest
from tasks.data.mixup import BatchMixer
from tasks.data.random_erasing import BatchEraser
from tasks.errors import NonFiniteLossError
from tasks.inference.model_ref import write_model_config
from tasks.layout import BEST_WEIGHTS
from tasks.models import autocast_context, build_model, uses_channels_last
from tasks.operations.tracking import (
    dataset_artifact_name,
    detach_from_parent_wandb_service,
    manifest_snapshot,
    model_artifact_name,
    record_input,
    start_wandb_run,
)
from tasks.training.checkpoints import (
    EMA_WEIGHTS,
    WEIGHTS,
    find_resume_checkpoint,
    load_training_state,
    read_checkpoint_metadata,
    save_checkpoint,
    unwrap,
)
from tasks.training.recipe import (
    backbone_frozen,
    backbone_to_eval,
    build_criterion,
    build_ema,
    build_optimizer,
    build_teacher,
    check_ema_horizon,
    effective_lr,
    freeze_backbone,
    steps_per_epoch,
    uses_mixing,
    warmup_cosine,
)
from tasks.training.worker_context import RayTrainContext, WorkerContext

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

    from vitmodels import DistillationLoss

log = logging.getLogger(__name__)

# Called as step_hook(epoch, step, rank) after each optimizer step; tests use it to inject faults.
StepHook = Callable[[int, int, int], None]


@dataclass(frozen=True)
class TrainingJob:
    """One model's training, as the driver hands it to every worker."""

    config: PipelineConfig
    model_name: str
    shard_location: str
    teacher_weights: str | None = None
    # W&B group of the run's steps.
    group: str | None = None
    # Where this run's checkpoints live; scanned for the furthest valid one when resuming.
    run_path: str | None = None
    step_hook: StepHook | None = None

    def to_loop_config(self) -> dict:
        """The form Ray Train passes to workers (train_loop_config)."""
        return {"config": self.config.model_dump_json(), "model": self.model_name,
                "shard_location": self.shard_location, "teacher_weights": self.teacher_weights,
                "group": self.group, "run_path": self.run_path, "step_hook": self.step_hook}

    @classmethod
    def from_loop_config(cls, loop_config: dict) -> TrainingJob:
        return cls(config=PipelineConfig.model_validate_json(loop_config["config"]),
                   model_name=loop_config["model"], shard_location=loop_config["shard_location"],
                   teacher_weights=loop_config.get("teacher_weights"), group=loop_config.get("group"),
                   run_path=loop_config.get("run_path"), step_hook=loop_config.get("step_hook"))


class DeviceSums:
    """Named running sums kept on the device: adding to them never waits for it; `read` does, once."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.values = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, **terms: torch.Tensor | float) -> None:
        self.values += torch.stack([torch.as_tensor(terms[name], dtype=torch.float64, device=self.values.device)
                                    for name in self.names])

    def read(self) -> dict[str, float]:
        """The sums over every rank."""
        values = self.values.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
        return dict(zip(self.names, values.tolist(), strict=True))


@dataclass
class LoopState:
    """Everything the loop works with, built once per worker by `setup` (not Ray's TorchTrainer, which starts the
    workers that run the loop)."""

    job: TrainingJob
    context: WorkerContext
    model: nn.Module  # the plain model: its weights are what checkpoints hold
    step_model: nn.Module  # the model the step calls: DDP-wrapped, maybe compiled
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: DistillationLoss
    num_classes: int
    train_stream: ShardStream
    val_stream: ShardStream
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    normalizer: Normalizer
    device_augment: bool  # augmentation on the device (GPUs) instead of in the loader processes
    steps_per_epoch: int
    global_step: int = 0
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    # The scored weights of the best epoch so far (CPU), with that epoch's number; carried in every checkpoint.
    best_weights: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    # W&B rows logged so far, as (row, step); checkpoints carry them so a restart can replay them.
    wandb_rows: list[tuple[dict, int]] = field(default_factory=list)
    # Whether step_model was prepared with the backbone frozen (training.freeze_backbone_epochs).
    backbone_frozen: bool = False

    @property
    def config(self) -> PipelineConfig:
        return self.job.config

    @property
    def scored_model(self) -> nn.Module:
        """The weights that are validated, kept as best and exported: the EMA when EMA is on."""
        return self.ema.module if self.ema is not None else self.model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Every random stream of an epoch is a function of (seed, epoch, rank), so a resumed run replays exactly."""
    return seed + 1000 * (epoch + 1) + rank


def fit_to_cores(context: WorkerContext, config: PipelineConfig) -> tuple[int, int]:
    """(torch threads, loader processes) for this worker: what the config asks for, but at most the cores
    this process may really run on (its affinity), shared among the workers on this machine."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = max(1, usable // context.local_world_size)
    wanted_threads, wanted_loaders = max(1, int(config.scaling.cpus_per_worker)), config.data.loader_workers
    threads, loaders = min(wanted_threads, cores), min(wanted_loaders, cores)
    if (threads, loaders) != (wanted_threads, wanted_loaders):
        log.warning(
            "rank %d: %d usable cores for %d local workers leave %d per worker; using %d torch threads (asked "
            "%d by scaling.cpus_per_worker) and %d loader processes (asked %d by data.loader_workers)",
            context.rank, usable, context.local_world_size, cores, threads, wanted_threads, loaders, wanted_loaders,
        )
    return threads, loaders


def build_mixer(config: PipelineConfig, num_classes: int, seed: int) -> BatchMixer | None:
    """Mixup/CutMix on the device for any batch size, or None when the recipe does not mix."""
    if not uses_mixing(config):
        return None
    return BatchMixer(config.data.augment, num_classes=num_classes, rng=np.random.default_rng(seed))


def setup(context: WorkerContext, job: TrainingJob) -> LoopState:
    """Build the model, optimiser, schedule, EMA, loss and loaders; resume from the latest checkpoint."""
    config, training, device = job.config, job.config.training, context.device
    spec = config.model.spec(job.model_name)
    threads, loader_workers = fit_to_cores(context, config)
    torch.set_num_threads(threads)
    seed_everything(training.seed)  # one seed on every rank: identical initial weights

    manifest = read_manifest(job.shard_location)
    if manifest is None or VAL_SPLIT not in manifest.splits:
        raise ValueError(f"{job.shard_location}: the shards have no {VAL_SPLIT!r} split to choose checkpoints on; "
                         f"shard again with data.val_size > 0")
    num_classes = len(manifest.classes)
    device_augment = device.type == "cuda"
    pin = device.type == "cuda"
    train_stream = ShardStream(job.shard_location, "train", training.batch_size, train=True,
                               augment=config.data.augment, augment_in_workers=not device_augment,
                               seed=training.seed, rank=context.rank, world_size=context.world_size,
                               shuffle_buffer=config.data.shuffle_buffer,
                               repeats=config.data.augment.repeated_augmentation,
                               image_size=config.data.image_size, interpolation=config.data.interpolation,
                               mean=config.data.mean)
    val_stream = ShardStream(job.shard_location, VAL_SPLIT, training.batch_size, train=False,
                             rank=context.rank, world_size=context.world_size)

    channels_last = uses_channels_last(training, spec)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(spec, num_classes).to(device).to(memory_format=memory_format)
    teacher = None
    if spec.distillation != "none":
        teacher = build_teacher(config, spec, num_classes, job.teacher_weights)
        teacher = teacher.to(device).to(memory_format=memory_format)
    optimizer = build_optimizer(model, training, spec, context.world_size)
    epoch_steps = steps_per_epoch(config, train_stream.num_samples, context.world_size)
    total_steps = epoch_steps * training.epochs
    if (problem := check_ema_horizon(training, total_steps)) is not None:
        raise ValueError(problem)
    warmup_steps = max(1, round(training.warmup_epochs * epoch_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps,
                                              training.min_lr / effective_lr(training, context.world_size))
    )
    loop = LoopState(
        job=job, context=context, model=model, step_model=model, ema=build_ema(model, training),
        optimizer=optimizer, scheduler=scheduler, criterion=build_criterion(config, spec, teacher),
        num_classes=num_classes, train_stream=train_stream, val_stream=val_stream,
        train_loader=make_loader(train_stream, loader_workers, persistent=True, pin_memory=pin),
        val_loader=make_loader(val_stream, loader_workers, persistent=True, pin_memory=pin),
        normalizer=Normalizer(config.data.mean, config.data.std, device, channels_last=channels_last),
        device_augment=device_augment, steps_per_epoch=epoch_steps,
    )
    _resume(loop)
    _prepare_step_model(loop, frozen=backbone_frozen(training, loop.start_epoch))
    return loop


def _prepare_step_model(loop: LoopState, *, frozen: bool) -> None:
    """The model the step calls, DDP-wrapped (maybe compiled) with the backbone frozen or not. DDP reduces the
    gradients of the parameters that required them when it was wrapped, so unfreezing wraps again."""
    if loop.config.training.freeze_backbone_epochs:
        freeze_backbone(loop.model, frozen)
    loop.backbone_frozen = frozen
    loop.step_model = loop.model  # the previous wrapper (and its gradient hooks) goes before the new one comes
    ddp_model = loop.context.prepare_model(loop.model)
    # torch.compile of a module is an nn.Module (OptimizedModule); torch types its result as a plain callable
    loop.step_model = cast(nn.Module, torch.compile(ddp_model)) if loop.config.training.compile else ddp_model


def _resume(loop: LoopState) -> None:
    run_path = Path(loop.job.run_path) if loop.job.run_path else None
    # Everything is read inside the block: a checkpoint on object storage is a download that ends with it.
    with loop.context.latest_checkpoint() as latest:
        resume_from = find_resume_checkpoint(latest, run_path)
        if resume_from is None:
            return
        state = load_training_state(resume_from, loop.model, loop.optimizer, loop.scheduler, loop.ema)
        metadata = read_checkpoint_metadata(resume_from)
        loop.start_epoch, loop.global_step = state["epoch"] + 1, state["global_step"]
        loop.history = state["history"]
        loop.wandb_rows = [tuple(pair) for pair in metadata.get("wandb_rows", [])]
        loop.best_epoch = metadata.get("best_epoch")
        if (resume_from / BEST_WEIGHTS).is_file():
            from safetensors.torch import load_file

            loop.best_weights = load_file(str(resume_from / BEST_WEIGHTS))
        if loop.context.rank == 0:
            log.info("[%s] resuming after epoch %d from %s", loop.job.model_name, loop.start_epoch, resume_from)


def forward_backward(loop: LoopState, images: torch.Tensor, targets: torch.Tensor, *, group_size: int,
                     sync_gradients: bool):
    """One micro-batch of an accumulation group of `group_size`: forward, loss, backward of loss / group_size, so
    that the group's gradient is the mean of its micro-batches' (averaged across ranks when sync_gradients).
    Returns (loss, outputs), both still on the device."""
    training = loop.config.training
    if training.compile:
        torch._dynamo.mark_dynamic(images, 0)  # one graph for every batch size the loader plans
    no_sync = not sync_gradients and loop.context.world_size > 1
    # With several ranks the step model is DDP (compiled, it passes no_sync on to DDP); nn.Module types
    # attributes it does not declare as Tensor | Module.
    gradient_sync = loop.step_model.no_sync() if no_sync else nullcontext()  # type: ignore[operator]
    with gradient_sync, autocast_context(loop.config, loop.context.device):
        outputs = loop.step_model(images)
        loss = loop.criterion(images, outputs, targets)
        (loss / group_size).backward()
    return loss, outputs


def optimizer_step(loop: LoopState) -> None:
    """Clip, step, advance the schedule and the EMA."""
    training = loop.config.training
    if training.grad_clip_norm:
        nn.utils.clip_grad_norm_(loop.model.parameters(), training.grad_clip_norm)
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    if loop.ema is not None:
        loop.ema.update(loop.model, step=loop.global_step)
    loop.global_step += 1


def train_one_epoch(loop: LoopState, epoch: int) -> tuple[dict, list[tuple[dict, int]]]:
    """Train on this rank's share of the epoch. Returns the epoch's metrics (means over every sample of every
    rank) and the W&B rows of its log steps."""
    config, training, context = loop.config, loop.config.training, loop.context
    distilling = loop.criterion.distillation_type != "none"
    seed = epoch_seed(training.seed, epoch, context.rank)
    seed_everything(seed)
    loop.train_stream.set_epoch(epoch)
    data, generator = config.data, torch.Generator().manual_seed(seed)  # the host draws of both, in turn
    augmenter = BatchAugmenter(data.augment, generator, image_size=data.image_size,
                               interpolation=data.interpolation, mean=data.mean) if loop.device_augment else None
    eraser = BatchEraser(data.augment.random_erasing, data.augment.random_erasing_mode, generator) \
        if data.augment.random_erasing > 0 else None
    mixer = build_mixer(config, loop.num_classes, seed)
    accuracy_name = "train_acc_dominant_label" if mixer is not None else "train_acc"
    sums = DeviceSums(("loss", "correct", "samples", "base", "distillation", "nonfinite"), context.device)
    rows: list[tuple[dict, int]] = []
    num_batches = len(loop.train_stream)

    if backbone_frozen(training, epoch) != loop.backbone_frozen:
        _prepare_step_model(loop, frozen=backbone_frozen(training, epoch))
    loop.step_model.train()
    if loop.backbone_frozen:
        backbone_to_eval(loop.model)
    started = time.perf_counter()
    batches = device_batches(loop.train_loader, context.device, loop.normalizer, augmenter)
    for index, (images, labels) in enumerate(batches):
        # Under Mixup/CutMix the targets are soft; accuracy is then counted against each mixed target's
        # dominant label (the one holding the larger share), which is what the name says.
        targets = labels
        if eraser is not None:
            images = eraser(images)
        if mixer is not None:
            images, targets = mixer(images, labels)
            labels = targets.argmax(1)
        # Groups of grad_accum_steps micro-batches; the epoch's last one may be shorter (known on the host).
        group_start = index - index % training.grad_accum_steps
        group_size = min(training.grad_accum_steps, num_batches - group_start)
        last_micro_batch = index + 1 == group_start + group_size
        loss, outputs = forward_backward(loop, images, targets, group_size=group_size,
                                         sync_gradients=last_micro_batch)
        logits = (outputs[0] + outputs[1]) / 2 if isinstance(outputs, tuple) else outputs
        loss = loss.detach().float()
        batch_size = labels.shape[0]
        terms = loop.criterion.last_terms
        sums.add(loss=loss * batch_size, correct=(logits.argmax(1) == labels).sum(), samples=batch_size,
                 base=terms["base"] * batch_size, distillation=terms["distillation"] * batch_size,
                 nonfinite=(~torch.isfinite(loss)).float())
        if not last_micro_batch:
            continue
        optimizer_step(loop)
        if loop.job.step_hook is not None:
            loop.job.step_hook(epoch, loop.global_step, context.rank)
        if loop.global_step % training.log_every_steps == 0:
            # One host read per log step, on every rank: the row for W&B and the NaN watch together.
            loss_now, base_now, distillation_now, nonfinite = torch.stack(
                [loss, terms["base"].float(), terms["distillation"].float(), sums.values[-1].float()]
            ).tolist()
            _stop_if_nonfinite(loop, nonfinite, epoch)
            row = {"train/loss": loss_now, "train/lr": max(loop.scheduler.get_last_lr())}  # the heads' LR
            if distilling:
                row |= {"train/loss_base": base_now, "train/loss_distillation": distillation_now}
            rows.append((row, loop.global_step))

    totals = sums.read()  # waits for the device: the epoch's time is measured after it
    seconds = time.perf_counter() - started
    _stop_if_nonfinite(loop, totals["nonfinite"], epoch)
    samples = totals["samples"]
    metrics = {"train_loss": totals["loss"] / samples, accuracy_name: totals["correct"] / samples}
    if distilling:
        metrics |= {"train_loss_base": totals["base"] / samples,
                    "train_loss_distillation": totals["distillation"] / samples}
    local_samples = sums.values[2].item()
    metrics |= {"lr": float(max(loop.scheduler.get_last_lr())), "images_per_s_worker": local_samples / seconds,
                "images_per_s": samples / seconds, "epoch_seconds": seconds}
    return metrics, rows


def _stop_if_nonfinite(loop: LoopState, nonfinite: float, epoch: int) -> None:
    if nonfinite:
        raise NonFiniteLossError(
            f"{loop.job.model_name}: the training loss was NaN or infinite in {int(nonfinite)} batch(es) of "
            f"epoch {epoch + 1} (by optimizer step {loop.global_step}); training stopped, its last good "
            f"checkpoint is kept (lower training.lr, keep training.grad_clip_norm, or check the data)"
        )


# The BatchNorm buffers each rank's forward passes move on their own (num_batches_tracked is left as it is).
BATCHNORM_STATISTICS = ("running_mean", "running_var")


@torch.no_grad()
def average_batchnorm_statistics(loop: LoopState) -> None:
    """Average the BatchNorm running statistics of the model and of the EMA over the ranks (timm's distribute_bn
    with reduce=True), so that every rank validates, and rank 0 checkpoints, statistics of every rank's batches
    rather than of its own. Nothing to do, and torch.distributed untouched, on one rank."""
    world_size = loop.context.world_size
    if world_size == 1:
        return
    modules = [loop.model] + ([loop.ema.module] if loop.ema is not None else [])
    for module in modules:
        for name, buffer in module.named_buffers():
            if name.rpartition(".")[2] in BATCHNORM_STATISTICS:
                dist.all_reduce(buffer)
                buffer /= world_size


@torch.no_grad()
def validate(loop: LoopState) -> dict:
    """Top-1 and cross-entropy of the scored weights over the whole validation split (every rank its share)."""
    model = loop.scored_model.eval()
    device = loop.context.device
    sums = DeviceSums(("loss", "correct", "samples"), device)
    with autocast_context(loop.config, device):
        for images, labels in device_batches(loop.val_loader, device, loop.normalizer,
                                             EvalResize.from_config(loop.config.data)):
            logits = model(images).float()
            sums.add(loss=nn.functional.cross_entropy(logits, labels, reduction="sum"),
                     correct=(logits.argmax(1) == labels).sum(), samples=labels.shape[0])
    totals = sums.read()
    return {"val_acc": totals["correct"] / totals["samples"], "val_loss": totals["loss"] / totals["samples"],
            "val_samples": int(totals["samples"])}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report_epoch(loop: LoopState, metrics: dict) -> None:
    """Every rank reports (it is a barrier); rank 0 alone writes and attaches the checkpoint, which carries
    the best scored weights so far, so the driver exports best and last from the last checkpoint alone."""
    context = loop.context
    if context.rank != 0:
        context.report(metrics)
        return
    if loop.best_epoch is None or metrics["val_acc"] > _best_val_acc(loop):
        loop.best_epoch = metrics["epoch"]
        # A snapshot in plain row-major layout (channels-last weights are not contiguous; safetensors wants them so).
        loop.best_weights = {
            name: tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for name, tensor in unwrap(loop.scored_model).state_dict().items()
        }
    with tempfile.TemporaryDirectory(prefix="ckpt-") as directory:
        save_checkpoint(
            Path(directory), model=unwrap(loop.model), optimizer=loop.optimizer, scheduler=loop.scheduler,
            ema=loop.ema, best_weights=loop.best_weights, epoch=metrics["epoch"] - 1,
            global_step=metrics["global_step"], history=loop.history,
            extra={"model": loop.job.model_name, "config": loop.config.model_dump(mode="json"),
                   "wandb_rows": loop.wandb_rows, "best_epoch": loop.best_epoch,
                   "scored_weights": EMA_WEIGHTS if loop.ema is not None else WEIGHTS},
        )
        context.report(metrics, checkpoint_dir=Path(directory))


def _best_val_acc(loop: LoopState) -> float:
    return next(epoch["val_acc"] for epoch in loop.history if epoch["epoch"] == loop.best_epoch)


def run_training(context: WorkerContext, job: TrainingJob) -> list[dict]:
    """Train job.model_name for the configured epochs in this worker; returns the per-epoch history."""
    loop = setup(context, job)
    tracker = _start_tracker(loop)
    for epoch in range(loop.start_epoch, loop.config.training.epochs):
        train_metrics, rows = train_one_epoch(loop, epoch)
        average_batchnorm_statistics(loop)
        metrics = {"epoch": epoch + 1, **train_metrics, **validate(loop),
                   "peak_memory_mb": _peak_memory_mb(context.device), "global_step": loop.global_step}
        loop.history.append(metrics)
        # W&B rows wait until the epoch's checkpoint is committed: a restart resumes from that checkpoint
        # and replays the unfinished epoch, so logging its steps live would record them twice.
        rows.append(({f"epoch/{key}": value for key, value in metrics.items()}, loop.global_step))
        loop.wandb_rows += rows
        report_epoch(loop, metrics)
        if tracker is not None:
            _log_rows(tracker, rows)
        _log_progress(loop, metrics)
    if tracker is not None:
        _log_best_weights_artifact(tracker, loop)
        tracker.finish()
    return loop.history


def train_worker(loop_config: dict) -> None:
    """The function Ray Train's TorchTrainer runs on every rank."""
    # A Ray worker is a fresh process: give the loop's messages a handler (Ray forwards them to the driver).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_training(RayTrainContext(), TrainingJob.from_loop_config(loop_config))


def _start_tracker(loop: LoopState):
    """Rank 0's W&B run, with the dataset's lineage and the rows a restarted attempt must replay."""
    if loop.context.rank != 0:
        return None
    detach_from_parent_wandb_service()
    job = loop.job
    tracker = start_wandb_run(loop.config, "train", job.model_name, group=job.group,
                              extra={"world_size": loop.context.world_size})
    if tracker is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        manifest = manifest_snapshot(job.shard_location, Path(directory))
        record_input(tracker, dataset_artifact_name(loop.config), "dataset", manifest)
    # A restarted attempt's W&B file repeats the history up to its checkpoint: what the killed attempt
    # had logged may never have reached its file. Online, steps W&B already has are not sent again.
    _log_rows(tracker, [(row, step) for row, step in loop.wandb_rows if step >= tracker.step])
    return tracker


def _log_rows(tracker, rows: list[tuple[dict, int]]) -> None:
    for index, (row, step) in enumerate(rows):
        # commit the last row: W&B holds a step's row until a later step arrives, and a crash would lose it.
        tracker.log(row, step=step, commit=True if index == len(rows) - 1 else None)


def _log_best_weights_artifact(tracker, loop: LoopState) -> None:
    """The best scored weights as a W&B model artifact: the same bytes the driver exports as best.safetensors."""
    import wandb
    from safetensors.torch import save_file

    if loop.best_weights is None:
        raise RuntimeError(f"{loop.job.model_name}: no epoch was scored, so there are no best weights to log")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / BEST_WEIGHTS
        save_file(loop.best_weights, str(path))
        artifact = wandb.Artifact(model_artifact_name(loop.job.model_name), type="model",
                                  metadata={"model": loop.job.model_name, "epoch": loop.best_epoch})
        artifact.add_file(str(path))
        # The same config.json as the export's beside the weights, so a downloaded version can be used as it is.
        artifact.add_file(str(write_model_config(Path(directory), loop.config, loop.job.model_name,
                                                 loop.job.shard_location)))
        tracker.log_artifact(artifact)


def _log_progress(loop: LoopState, metrics: dict) -> None:
    if loop.context.rank != 0:
        return
    training = loop.config.training
    remaining = (training.epochs - metrics["epoch"]) * metrics["epoch_seconds"]
    accuracy = metrics.get("train_acc", metrics.get("train_acc_dominant_label"))
    log.info("[%s] epoch %d/%d loss %.4f acc %.3f val_acc %.4f %.0f img/s eta %s", loop.job.model_name,
             metrics["epoch"], training.epochs, metrics["train_loss"], accuracy, metrics["val_acc"],
             metrics["images_per_s"], time.strftime("%H:%M:%S", time.gmtime(remaining)))

