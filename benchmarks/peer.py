"""Measured against what users would run instead: this pipeline's training against a timm training loop.

Same images (the train/val/test splits of one run of our shard step), same model and initial weights, same
epochs, batch and recipe (RandAugment, Mixup/CutMix, label smoothing, EMA, AdamW with warm-up + cosine,
gradient clipping, bf16, torch.compile and channels-last as --config sets them; distillation off):
  1. peer: the loop a timm user writes from timm's own pieces (`train_peer` below): a torch DataLoader over
     the images with timm's RandAugment per image, timm's Mixup, SoftTargetCrossEntropy, ModelEmaV3,
     create_optimizer_v2 and CosineLRScheduler stepped per update; the EMA is validated every epoch, the
     best epoch's weights are scored once on test;
  2. ours: `vit-pipeline train` with one Ray Train worker of the same batch, then the evaluate step's
     function (tasks.judging.evaluate.evaluate_models) on the exported best weights. With --in-process, the same
     training code runs in this process through a LocalContext instead (no Ray, Prefect or W&B needed).

    python benchmarks/peer.py --device cpu --data-root /work/shared/data/cifar10-subset \\
        --model vit_tiny_patch4_32 --model-kwargs '{"depth": 6}' --epochs 15 --batch-size 64
    python benchmarks/peer.py --device cuda --in-process --data-root DIR --model vit_small_patch4_32 \\
        --epochs 15 --batch-size 512

images/s is training images / seconds spent in training epochs (loader, augmentation, step, EMA; validation
and checkpoints excluded), over all epochs, and over epochs 2+ (without compilation and loader start-up).
wall s is the whole training command, start-up (Ray, compilation), validation and checkpoints included,
test scoring excluded. Both sides get the torch threads and loader processes ours fits to the cores.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import timm
import torch
import yaml
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import vitmodels  # noqa: F401  (registers our models with timm)
from tasks.config import PipelineConfig, parse_override, set_dotted
from tasks.data.manifest import require_manifest
from tasks.data.samples import decode_image, decode_label, iter_samples
from tasks.data.shard import shard_options, write_shards
from tasks.data.sources import Source, open_source
from tasks.judging.evaluate import evaluate_models
from tasks.layout import BEST_WEIGHTS, RunLayout
from tasks.models import uses_channels_last
from tasks.training.checkpoints import checkpoint_dirs
from tasks.training.recipe import effective_lr
from tasks.training.train_loop import TrainingJob, fit_to_cores, run_training
from tasks.training.worker_context import LocalContext

from harness import let_timm_posterize_to_no_bits, sync
from train_loop import benchmark_config

REPO_ROOT = Path(__file__).resolve().parents[1]
VAL_SIZE = 500
def unsupported(config: PipelineConfig, model: str) -> list[str]:
    """Recipe features the peer loop does not mirror (it trains one model from scratch)."""
    training, augment, spec = config.training, config.data.augment, config.model.spec(model)
    checks = {
        "training.grad_accum_steps > 1": training.grad_accum_steps > 1,
        "training.layer_decay": (spec.layer_decay or training.layer_decay or 1.0) != 1.0,
        "training.backbone_lr_scale != 1": training.backbone_lr_scale != 1.0,
        "training.freeze_backbone_epochs": training.freeze_backbone_epochs > 0,
        "data.augment.repeated_augmentation > 1": augment.repeated_augmentation > 1,
        "a pretrained model": spec.is_pretrained,
        "data.image_size other than the images' own (32 px)": config.data.image_size not in (None, 32)
        and not augment.random_resized_crop,
    }
    return [name for name, on in checks.items() if on]


def one_model_config(args: argparse.Namespace, work: Path) -> PipelineConfig:
    """train_loop.py's one-model recipe (no teacher, tracking off) with one Ray worker of --batch-size on
    --device, then the --set overrides."""
    tree = benchmark_config(args, work).model_dump(mode="json")
    cuda = args.device == "cuda"
    tree["scaling"] |= {"num_workers": 1, "use_gpu": cuda, "gpus_per_worker": 1 if cuda else 0,
                        "ray_address": None}
    # A local Ray with room for the worker's CPUs and Ray Train's own actor.
    tree["scaling"]["ray_num_cpus"] = math.ceil(tree["scaling"]["cpus_per_worker"]) + 1
    tree["data"]["val_size"] = args.val_size
    tree["tracking"]["run_name"] = "peer-benchmark"
    for override in args.overrides:
        path, value = parse_override(override)
        set_dotted(tree, ".".join(path), value)
    return PipelineConfig.model_validate(tree)


def first_images(source: Source, max_train: int | None, max_eval: int | None) -> Source:
    """The source with its training split cut to its first max_train images and the others to max_eval."""
    splits = {}
    for name, split in source.splits.items():
        limit = max_train if name == "train" else max_eval
        if limit is not None and limit < len(split):
            split = dataclasses.replace(split, labels=split.labels[:limit],
                                        pixels=None if split.pixels is None else split.pixels[:limit],
                                        files=None if split.files is None else split.files[:limit])
        splits[name] = split
    digest = hashlib.sha256(f"{source.digest} first {max_train} {max_eval}".encode()).hexdigest()
    return Source(source.dataset, source.classes, splits, digest)


def shard_once(config: PipelineConfig, args: argparse.Namespace) -> str:
    """Our shard step over --data-root (cut by --max-*-images): the train, val and test splits both sides read."""
    data = config.data
    source = first_images(open_source(data.dataset, data.data_root, data.download_dir),
                          args.max_train_images, args.max_eval_images)
    write_shards(source, config.shard_location, dataclasses.replace(shard_options(config), workers=1), progress=False)
    return config.shard_location


def read_split(location: str, split: str) -> tuple[list[np.ndarray], list[int]]:
    """Every image (H x W x 3 uint8) and label of one split of the shards, decoded once into memory."""
    images, labels = [], []
    for shard in require_manifest(location).splits[split].shards:
        with fsspec.open(f"{location}/{shard.name}", "rb") as stream:
            for sample in iter_samples(stream, shard.name):
                images.append(decode_image(sample))
                labels.append(decode_label(sample))
    return images, labels


# ---------------------------------------------------------------------------------------------------------
# The peer: a training loop written from timm's pieces, as a timm user would.
# ---------------------------------------------------------------------------------------------------------

class InMemoryImages(Dataset):
    def __init__(self, images: list[np.ndarray], labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def peer_transforms(config: PipelineConfig, image_size: int):
    """(train, eval) transforms: the recipe's augmentation with timm's pieces (torchvision's pad-and-crop and
    flip for CIFAR, timm's create_transform for RandomResizedCrop)."""
    data, augment = config.data, config.data.augment
    policy = None if augment.auto_augment == "none" else augment.auto_augment  # timm's own string
    let_timm_posterize_to_no_bits()
    if augment.random_resized_crop:
        common = dict(input_size=data.image_size, interpolation=data.interpolation, mean=data.mean, std=data.std)
        train = timm.data.create_transform(
            **common, is_training=True, scale=augment.rrc_scale, ratio=augment.rrc_ratio,
            hflip=0.5 if augment.hflip else 0.0, color_jitter=None, auto_augment=policy,
            re_prob=augment.random_erasing, re_mode=augment.random_erasing_mode)
        return train, timm.data.create_transform(**common, crop_pct=data.crop_pct)
    steps = []
    if augment.crop_padding:
        steps.append(transforms.RandomCrop(image_size, padding=augment.crop_padding))
    if augment.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if policy is not None:
        hparams = dict(translate_const=int(image_size * 0.45), img_mean=tuple(round(255 * m) for m in data.mean),
                       interpolation=str_to_pil_interp(data.interpolation))
        steps.append(rand_augment_transform(policy, hparams))  # the config accepts timm's rand- policies only
    to_tensor = [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
    erase = [RandomErasing(augment.random_erasing, mode=augment.random_erasing_mode, device="cpu")] \
        if augment.random_erasing else []
    return transforms.Compose(steps + to_tensor + erase), transforms.Compose(to_tensor)


@torch.no_grad()
def peer_top1(model: nn.Module, loader: DataLoader, device: torch.device, bf16: bool,
              channels_last: bool) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(images)
        correct += (outputs.argmax(1) == labels).sum()
    return correct.item() / len(loader.dataset)


def train_peer(config: PipelineConfig, args: argparse.Namespace, location: str) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    training, augment = config.training, config.data.augment
    spec = config.model.spec(args.model)
    threads, loader_workers = fit_to_cores(LocalContext(device), config)  # what ours runs with
    torch.set_num_threads(threads)

    splits = {split: read_split(location, split) for split in ("train", "val", "test")}
    num_classes = len(require_manifest(location).classes)
    train_transform, eval_transform = peer_transforms(config, splits["train"][0][0].shape[0])

    def loader(split: str, train: bool) -> DataLoader:
        return DataLoader(InMemoryImages(*splits[split], train_transform if train else eval_transform),
                          batch_size=training.batch_size, shuffle=train, drop_last=train,  # Mixup: even batches
                          num_workers=loader_workers, persistent_workers=loader_workers > 0,
                          pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(training.seed))

    train_loader, val_loader = loader("train", True), loader("val", False)

    torch.manual_seed(training.seed)  # as ours seeds before building: the same initial weights
    regularisers = {k: v for k in ("drop_rate", "drop_path_rate") if (v := getattr(spec, k)) is not None}
    model = timm.create_model(spec.name, num_classes=num_classes, **regularisers, **spec.model_kwargs)
    channels_last = uses_channels_last(training, spec)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ema = ModelEmaV3(model, decay=training.ema_decay, use_warmup=training.ema_warmup) \
        if training.ema_decay is not None else None
    step_model = torch.compile(model) if training.compile else model

    lr = effective_lr(training, world_size=1)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=training.weight_decay)
    updates_per_epoch = len(train_loader)
    warmup = max(1, round(training.warmup_epochs * updates_per_epoch))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, training.epochs * updates_per_epoch - warmup),
                                  lr_min=training.min_lr, warmup_t=warmup, warmup_lr_init=lr / warmup,
                                  warmup_prefix=True, t_in_epochs=False)
    mixing = augment.mixup_prob > 0 and (augment.mixup_alpha > 0 or augment.cutmix_alpha > 0)
    mixup = Mixup(mixup_alpha=augment.mixup_alpha, cutmix_alpha=augment.cutmix_alpha, prob=augment.mixup_prob,
                  switch_prob=0.5, mode="batch", label_smoothing=augment.label_smoothing,
                  num_classes=num_classes) if mixing else None
    criterion = SoftTargetCrossEntropy() if mixing else (
        LabelSmoothingCrossEntropy(augment.label_smoothing) if augment.label_smoothing else nn.CrossEntropyLoss())

    epochs, updates, best = [], 0, {"val_top1": -1.0}
    for epoch in range(training.epochs):
        step_model.train()
        loss_sum = torch.zeros((), device=device)
        epoch_started = time.perf_counter()
        for images, labels in train_loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=training.bf16):
                outputs = step_model(images)
                if isinstance(outputs, tuple):  # a DeiT's two heads: their mean is its prediction
                    outputs = (outputs[0] + outputs[1]) / 2
                loss = criterion(outputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if training.grad_clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip_norm)
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            if ema is not None:
                ema.update(model, step=updates)
            loss_sum += loss.detach()
        sync(device)
        seconds = time.perf_counter() - epoch_started
        scored = ema.module if ema is not None else model
        val_top1 = peer_top1(scored, val_loader, device, training.bf16, channels_last)
        epochs.append({"epoch": epoch + 1, "images": updates_per_epoch * training.batch_size, "seconds": seconds,
                       "train_loss": loss_sum.item() / updates_per_epoch, "val_top1": val_top1})
        if val_top1 > best["val_top1"]:
            best = {"val_top1": val_top1, "epoch": epoch + 1,
                    "weights": {k: v.detach().to("cpu", copy=True) for k, v in scored.state_dict().items()}}
        print(f"peer epoch {epoch + 1}/{training.epochs}: {epochs[-1]['images'] / seconds:.0f} img/s, "
              f"loss {epochs[-1]['train_loss']:.4f}, val top-1 {val_top1:.4f}", flush=True)
    wall = time.perf_counter() - started

    best_model = copy.deepcopy(scored)
    best_model.load_state_dict(best["weights"])
    test_top1 = peer_top1(best_model, loader("test", False), device, training.bf16, channels_last)
    return summary(epochs, wall, best["val_top1"], best["epoch"], test_top1)


# ---------------------------------------------------------------------------------------------------------
# Ours: vit-pipeline train (a Ray Train worker), or the same loop in-process, then the evaluate step.
# ---------------------------------------------------------------------------------------------------------

def train_ours_with_ray(config: PipelineConfig, args: argparse.Namespace, work: Path) -> tuple[list[dict], float]:
    """`vit-pipeline train` on a config file of this recipe; (its epoch history, its wall seconds)."""
    config_file = work / "ours.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    command = [sys.executable, "-m", "flows.cli", "--quiet", "train", "--config", str(config_file),
               "--model", args.model]
    environment = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"vit-pipeline train failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-8000:]}")
    print(result.stdout.strip(), flush=True)
    metrics = json.loads(RunLayout.of(config).metrics(args.model).read_text())
    return metrics["history"], wall


def train_ours_in_process(config: PipelineConfig, args: argparse.Namespace, work: Path) -> tuple[list[dict], float]:
    """tasks.training.train_loop.run_training in a LocalContext; its best weights exported where the train step
    puts them."""
    checkpoints = work / "ours-checkpoints"
    job = TrainingJob(config=config, model_name=args.model, shard_location=config.shard_location)
    started = time.perf_counter()
    history = run_training(LocalContext(args.device, checkpoint_root=checkpoints), job)
    wall = time.perf_counter() - started
    weights = RunLayout.of(config).weights(args.model)
    weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint_dirs(checkpoints)[0] / BEST_WEIGHTS, weights)
    return history, wall


def train_ours(config: PipelineConfig, args: argparse.Namespace, work: Path) -> dict:
    train = train_ours_in_process if args.in_process else train_ours_with_ray
    history, wall = train(config, args, work)
    epochs = [{"epoch": e["epoch"], "images": round(e["images_per_s"] * e["epoch_seconds"]),
               "seconds": e["epoch_seconds"], "train_loss": e["train_loss"], "val_top1": e["val_acc"]}
              for e in history]
    best = max(epochs, key=lambda e: e["val_top1"])  # the first of equals, as the loop keeps it
    [record] = evaluate_models(config, {args.model: RunLayout.of(config).weights(args.model)})
    return summary(epochs, wall, best["val_top1"], best["epoch"], record.top1)


def summary(epochs: list[dict], wall: float, val_top1: float, best_epoch: int, test_top1: float) -> dict:
    def rate(chosen: list[dict]) -> float | None:
        return sum(e["images"] for e in chosen) / sum(e["seconds"] for e in chosen) if chosen else None

    return {"images_per_s": rate(epochs), "images_per_s_after_first_epoch": rate(epochs[1:]),
            "train_seconds": sum(e["seconds"] for e in epochs), "wall_seconds": wall, "val_top1": val_top1,
            "best_epoch": best_epoch, "test_top1": test_top1, "epochs": epochs}


COLUMNS = {"images_per_s": ("images/s", "{:.1f}"), "images_per_s_after_first_epoch": ("images/s epochs 2+", "{:.1f}"),
           "wall_seconds": ("wall s", "{:.1f}"), "val_top1": ("val top-1", "{:.4f}"),
           "test_top1": ("test top-1", "{:.4f}")}
RATIO_ROW, RATIO_FORM = "ours/peer", "{:.3f}"


def ratios(peer: dict, ours: dict) -> dict:
    return {key: ours[key] / peer[key] if ours[key] is not None and peer[key] else None for key in COLUMNS}


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| loop | " + " | ".join(header for header, _ in COLUMNS.values()) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, row in rows.items():
        forms = {key: RATIO_FORM if name == RATIO_ROW else form for key, (_, form) in COLUMNS.items()}
        cells = ["n/a" if row[key] is None else forms[key].format(row[key]) for key in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=os.environ.get("DATA_ROOT"),
                        help="directory holding cifar-10-batches-py/ (default $DATA_ROOT)")
    parser.add_argument("--config", type=Path, default=Path("configs/cifar10.yaml"),
                        help="the recipe: its data.augment and training sections decide both sides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the one-model config, e.g. training.compile=false (repeatable)")
    parser.add_argument("--model", default="vit_tiny_patch4_32")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='JSON of extra timm.create_model keywords, e.g. \'{"depth": 6}\'')
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker, as training.batch_size")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--val-size", type=int, default=VAL_SIZE,
                        help="training images held out for validation (at most --max-eval-images)")
    parser.add_argument("--max-train-images", type=int, help="use only the first N training images (val included)")
    parser.add_argument("--max-eval-images", type=int, help="use only the first N test images; caps --val-size")
    parser.add_argument("--loader-workers", type=int, default=None, help="override data.loader_workers")
    parser.add_argument("--in-process", action="store_true",
                        help="train ours in this process (LocalContext) instead of `vit-pipeline train` on Ray")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    if args.data_root is None:
        parser.error("--data-root or $DATA_ROOT is required")
    if args.max_eval_images is not None:
        args.val_size = min(args.val_size, args.max_eval_images)

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="peer-") as directory:
        work = Path(directory)
        config = one_model_config(args, work)
        if problems := unsupported(config, args.model):
            parser.error(f"the peer loop does not mirror: {', '.join(problems)}")
        training = config.training
        settings = {"model": args.model, "model_kwargs": args.model_kwargs, "config": str(args.config),
                    "overrides": args.overrides, "epochs": training.epochs, "batch_size": training.batch_size,
                    "device": args.device, "bf16": training.bf16, "compile": training.compile,
                    "timm_policy": config.data.augment.auto_augment, "ema_decay": training.ema_decay,
                    "torch_threads_and_loader_workers": fit_to_cores(LocalContext(args.device), config),
                    "ours": "in-process LocalContext" if args.in_process else "vit-pipeline train (Ray Train)"}
        location = shard_once(config, args)
        splits = {name: split.num_samples for name, split in require_manifest(location).splits.items()}
        machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__,
                   "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
        print(f"{json.dumps(settings)}\nsplits {splits}; {json.dumps(machine)}", flush=True)
        # Each side compiles from scratch: its own inductor cache on disk, and no graph of the other's in dynamo.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-peer")
        peer = train_peer(config, args, location)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-ours")
        torch.compiler.reset()
        ours = train_ours(config, args, work)
    load_end = os.getloadavg()
    ratio = ratios(peer, ours)
    ours_name = "ours: LocalContext, in-process" if args.in_process else "ours: vit-pipeline train (Ray)"
    print("\n" + markdown({"peer: timm loop": peer, ours_name: ours, RATIO_ROW: ratio}))
    print(f"\nload average (1, 5, 15 min): {load_start} at the start, {load_end} at the end")
    if args.out is not None:
        args.out.write_text(json.dumps({"command": sys.argv, "settings": settings, "splits": splits,
                                        "machine": machine, "load_average": {"start": load_start, "end": load_end},
                                        "peer": peer, "ours": ours, "ratios": ratio}, indent=2))


if __name__ == "__main__":
    main()
