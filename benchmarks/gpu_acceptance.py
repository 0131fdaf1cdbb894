"""One call that tells whether the GPU path holds (issue 25): six parts, cheapest first, each in a time box,
results printed as each part ends and one table at the end.

  1 correctness  batched augmentation (crop/flip/RandAugment, erasing, Mixup/CutMix) on the device against the
                 same host draws on the CPU; the evaluate step's logits and the attention maps of the same weights
                 and images on the device against the CPU (fp32, TF32 off)
  2 compile      benchmarks/gpu.py over all nine registered models in one process, bf16 + fused AdamW + compile
  3 loop         benchmarks/train_loop.py's loop/step for resnet18_cifar and vit_small_patch4_32 at the recipe's
                 batch (goal >= 0.8)
  4 mfu          MFU of ViT-B/16 and ViT-S/16 at 224 px, the best of the settings tried in the box (goals >= 40%
                 and >= 30%)
  5 recipe       configs/cifar10.yaml on the subset, every model in turn (DeiT taught by the trained ResNet),
                 test top-1 of the best weights (goals: ResNet-18 >= 80%, best transformer within 5 points)
  6 peer         benchmarks/peer.py: our loop against the timm-library loop, images/s and top-1 (goal >= 2x at
                 equal top-1)

Everything runs in this process through `LocalContext` (no Ray, Prefect, W&B or matplotlib needed), except
parts 2 and 6, which run their scripts as child processes. A part that outlives its box stops at the next safe
point (between models, candidates, epochs) and is reported as cut, with what it measured; a part that raises is
reported as failed with the first line of the error, and the next part runs. The whole run ends by --deadline
(8 min 45 s by default): a watchdog writes the results and exits if an uninterruptible step (a compilation)
would overrun it. After every step the table (gpu_acceptance.md) and every figure (gpu_acceptance.json) are
rewritten under --out, so a run that is cut off still reports what it measured.

    python3 benchmarks/gpu_acceptance.py --device cuda --data-root .data/cifar10-subset --out $OUT
    python3 benchmarks/gpu_acceptance.py --device cuda --data-root .data/cifar10-subset --out $OUT \\
        --parts compile --box compile=500        # a second call: what the first one had to cut
    python3 benchmarks/gpu_acceptance.py --device cpu --tiny --data-root DIR --out DIR   # every part in miniature

Exit status: 0 when every part ran to its end, 3 when some were cut (none failed), 1 when some failed. Goals
missed do not change it: they are measurements, read in the table.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import yaml
from torch import nn

from tasks.config import PipelineConfig, build_config, set_dotted
from tasks.data.augment import AugmentPlan, BatchAugmenter
from tasks.data.auto_augment import OpRound
from tasks.data.crops import EvalResize
from tasks.data.loader import ShardStream, normalize
from tasks.data.manifest import require_manifest
from tasks.data.mixup import BatchMixer, MixDraw, random_cycle
from tasks.data.random_erasing import BatchEraser
from tasks.data.shard import ShardOptions, write_shards
from tasks.data.sources import Source, SplitSource, read_cifar10
from tasks.judging.attention import model_panels, select_images
from tasks.judging.evaluate import evaluate_model, predict
from tasks.layout import BEST_WEIGHTS
from tasks.models import build_model, uses_channels_last
from tasks.training.train_loop import TrainingJob, run_training
from tasks.training.worker_context import LocalContext

import gpu as gpu_benchmark
import train_loop as loop_benchmark

log = logging.getLogger("gpu_acceptance")

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_SCRIPT = REPO_ROOT / "benchmarks" / "gpu.py"
PEER_SCRIPT = REPO_ROOT / "benchmarks" / "peer.py"
PARTS = ("correctness", "compile", "loop", "mfu", "recipe", "peer")
TITLES = {
    "correctness": "device = CPU (augmentation, evaluate, attention)",
    "compile": "gpu.py: all models compiled in one process",
    "loop": "loop/step at the recipe's batch",
    "mfu": "MFU of ViT-B/16 and ViT-S/16 at 224 px",
    "recipe": "cifar10 recipe on the subset",
    "peer": "ours against the timm loop (peer.py)",
}
# Seconds per part on one H100/H200; they add up to 510, and with start-up and sharding the run ends by the
# deadline, under 9 minutes. Cold torch.compile dominates (tens of seconds per model), so a first call on a bare
# machine cuts part 2; `--parts compile --box compile=500` finishes it.
GPU_BOXES = {"correctness": 40, "compile": 100, "loop": 110, "mfu": 70, "recipe": 100, "peer": 90}
GPU_DEADLINE_S = 525.0
# --tiny on a loaded 2-core CPU: boxes that only stop a run gone wrong.
TINY_BOXES = dict.fromkeys(PARTS, 600)
TINY_DEADLINE_S = 3000.0
# The watchdog's margin past the deadline: results are written and the process exits.
HARD_STOP_GRACE_S = 10.0
# A unit that compiles a model (tens of seconds on a cold GPU machine) is not started with less than this left.
MIN_COMPILE_UNIT_S = 15.0

# Tolerances of part 1. uint8 augmentation: the share of values that may differ (float kernels on two devices
# may round a rare pixel to the other integer, or pick the other neighbour for a nearest sample on a .5 edge).
AUGMENT_DIFFERING_SHARE = 1e-3
MIXER_TOLERANCE = 1e-5  # normalised float images and soft targets: elementwise arithmetic only
EVAL_TOLERANCE = 1e-3  # logits, probabilities and attention maps of the same weights and images
AUGMENT_IMAGES, TINY_AUGMENT_IMAGES = 512, 64

LOOP_MODELS = ("resnet18_cifar", "vit_small_patch4_32")
LOOP_GOAL = 0.8
LOOP_EPOCHS = 2  # the first compiles and starts the loaders; the last counts
LOOP_STEPS = 30
# The subset's training split repeated to about CIFAR-10's 45,000 training images, so an epoch of the loop has as
# many steps as the real one (89 at batch 512) instead of 9, where the start of each epoch would weigh 10x.
LOOP_TILE = 10

MFU_GOALS = {"vp_vit_base_patch16_224": 0.40, "vp_vit_small_patch16_224": 0.30}
MFU_SHORT = {"vp_vit_base_patch16_224": "ViT-B/16", "vp_vit_small_patch16_224": "ViT-S/16"}
# Tried in this order until the box closes: the likely best first for both models, then the other attention
# kernel, then the compile modes that cost minutes of autotuning (a call of its own: --parts mfu --box mfu=500).
MFU_CANDIDATES = [
    ("vp_vit_base_patch16_224", 256, "bf16+fused+flash+compile"),
    ("vp_vit_small_patch16_224", 512, "bf16+fused+flash+compile"),
    ("vp_vit_small_patch16_224", 256, "bf16+fused+flash+compile"),
    ("vp_vit_base_patch16_224", 256, "bf16+fused+cudnn+compile"),
    ("vp_vit_small_patch16_224", 512, "bf16+fused+cudnn+compile"),
    ("vp_vit_base_patch16_224", 384, "bf16+fused+flash+compile"),
    ("vp_vit_base_patch16_224", 256, "bf16+fused+flash+compile+cudagraphs"),
    ("vp_vit_small_patch16_224", 512, "bf16+fused+flash+compile+cudagraphs"),
    ("vp_vit_base_patch16_224", 256, "bf16+fused+flash+compile+autotune"),
    ("vp_vit_small_patch16_224", 512, "bf16+fused+flash+compile+autotune"),
]
MFU_WARMUP, MFU_STEPS, MFU_ROUNDS = 3, 10, 2
# Dense bf16 tensor-core peaks (TFLOP/s) by a name in torch.cuda.get_device_name(); H200 is the H100's chip.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0}

RESNET_GOAL = 0.80
TRANSFORMER_GAP = 0.05
# Sized for an H200 in the default box: 9 steps an epoch at batch 512, about a second an epoch with validation and
# the checkpoint; the recipe's 200 epochs are a call of their own (--parts recipe --recipe-epochs 100 ...).
RECIPE_EPOCHS = 15
VAL_SIZE, SHARD_SIZE = 500, 1000

PEER_MODEL, PEER_EPOCHS = "vit_small_patch4_32", 4
PEER_GOAL = 2.0
PEER_TOP1_SLACK = 0.02  # "equal top-1": within 2 points (1,017 test images give about +-1.5 points of noise)

# --tiny: widths and depths that train in seconds on a CPU.
TINY_KWARGS = {
    "vit": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "deit": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "swin": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]},
    "resnet": {"channels": [8, 16, 32, 64]},
}
TINY_BATCH, TINY_VAL_SIZE, TINY_SHARD_SIZE = 64, 64, 200
TINY_PEER_IMAGES = {"--max-train-images": "300", "--max-eval-images": "64"}


def tiny_kwargs(model: str) -> dict:
    family = next(name for name in ("vit", "deit", "swin", "resnet") if model.startswith(name)
                  or model.startswith(f"vp_{name}"))
    return TINY_KWARGS[family]


class BoxClosed(Exception):
    """A part's time box closed at a safe point: the part is reported as cut, with what it measured."""


class TimeBox:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, what: str, needs: float = 0.0) -> None:
        """Raise BoxClosed before `what` unless `needs` seconds (at least some) are left."""
        if self.left() <= max(needs, 0.0):
            raise BoxClosed(f"the box closed before {what}")


@dataclass
class PartRecord:
    number: int
    name: str
    title: str
    box_s: float
    status: str = "not run"  # running | ok | cut: ... | failed: ...
    summary: str = ""
    goal: str = ""
    goal_met: bool | None = None
    seconds: float | None = None
    rows: list[dict] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


class Report:
    """The run's results, written to --out after every step (a JSON of every figure and the Markdown table)."""

    def __init__(self, out: Path, header: dict):
        self.out = out
        self.header = header
        self.parts: dict[str, PartRecord] = {}
        self._lock = threading.Lock()
        out.mkdir(parents=True, exist_ok=True)

    def table(self) -> str:
        lines = ["| # | part | status | result | goal | s (box) |", "|---:|---|---|---|---|---:|"]
        for part in self.parts.values():
            seconds = "" if part.seconds is None else f"{part.seconds:.0f}"
            lines.append(f"| {part.number} | {part.title} | {part.status} | {part.summary} | {part.goal} "
                         f"| {seconds} ({part.box_s:.0f}) |")
        return "\n".join(lines)

    def save(self) -> None:
        with self._lock:
            document = {**self.header, "parts": {name: asdict(part) for name, part in self.parts.items()}}
            for name, text in (("gpu_acceptance.json", json.dumps(document, indent=2, default=str)),
                               ("gpu_acceptance.md", self.table() + "\n")):
                partial = self.out / f".{name}.partial"
                partial.write_text(text)
                partial.replace(self.out / name)

    def row(self, part: PartRecord, **row: Any) -> None:
        """One measured line of a part: printed at once and saved."""
        part.rows.append(row)
        print("  " + "; ".join(f"{key} {format_value(value)}" for key, value in row.items()), flush=True)
        self.save()


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def goal_text(met: bool | None, what: str) -> str:
    return f"{what}: {'n/a' if met is None else 'met' if met else 'missed'}"


@dataclass
class Session:
    """What the parts share: the arguments, the device, a work directory and the shards of the subset."""

    args: argparse.Namespace
    device: torch.device
    work: Path
    report: Report
    children: list[subprocess.Popen] = field(default_factory=list)
    # The part running now and when it started (time.monotonic), for the watchdog.
    running: tuple[PartRecord, float] | None = None

    @property
    def tiny(self) -> bool:
        return self.args.tiny

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @cached_property
    def source(self) -> Source:
        return read_cifar10(self.args.data_root)

    @cached_property
    def subset_shards(self) -> str:
        """The subset sharded as the recipe's runs use it: a validation split held out of training."""
        return self.shard(self.source, "subset")

    def shard(self, source: Source, name: str, shard_size: int | None = None) -> str:
        location = str(self.work / name)
        val_size = TINY_VAL_SIZE if self.tiny else VAL_SIZE
        size = shard_size or (TINY_SHARD_SIZE if self.tiny else SHARD_SIZE)
        write_shards(source, location, ShardOptions(shard_size=size, val_size=val_size, workers=1), progress=False)
        return location

    @cached_property
    def recipe_tree(self) -> dict:
        return yaml.safe_load(self.args.config.read_text())

    def recipe_config(self, shard_location: str, fields: dict[str, Any] | None = None) -> PipelineConfig:
        """--config with the subset's shards, tracking off and `fields` (dotted names) set; under --tiny also the
        tiny widths, a small batch, no loader processes and no compilation."""
        tree = copy.deepcopy(self.recipe_tree)
        settings: dict[str, Any] = {
            "data.data_root": str(self.args.data_root), "data.shard_dir": shard_location,
            "data.val_size": TINY_VAL_SIZE if self.tiny else VAL_SIZE,
            "data.shard_size": TINY_SHARD_SIZE if self.tiny else SHARD_SIZE,
            "tracking.mode": "disabled", "tracking.output_dir": str(self.work / "runs"),
            "tracking.run_name": "gpu-acceptance",
        }
        if self.tiny:
            settings |= {"data.loader_workers": 0, "training.batch_size": TINY_BATCH, "training.compile": False,
                         "scaling.cpus_per_worker": len(os.sched_getaffinity(0))}
            model = tree.setdefault("model", {})
            for spec in [model["baseline"], *model.get("transformers", [])]:
                spec["model_kwargs"] = {**spec.get("model_kwargs", {}), **tiny_kwargs(spec["name"])}
        settings |= fields or {}
        for path, value in settings.items():
            set_dotted(tree, path, value)
        return build_config(tree, source=f"{self.args.config} (gpu_acceptance)")


# --- the parts ---------------------------------------------------------------------------------------------------

def first_images(location: str, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch of a split planned at `count` images (the stream evens its batches out, so a few less),
    uint8 images and labels, in shard order."""
    images, labels = next(iter(ShardStream(location, split, count, train=False)))[:2]
    return images, labels


def plan_slice(plan: AugmentPlan, index: int) -> AugmentPlan:
    """One image's share of a batch's draws."""
    one = slice(index, index + 1)

    def part(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[one]

    rounds = [OpRound(r.ops[one], r.applied[one], r.levels[one], r.negative[one]) for r in plan.rounds]
    return AugmentPlan(part(plan.crop_offsets), part(plan.flips), rounds, part(plan.crops))


def uint8_difference(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    difference = (reference.int() - candidate.cpu().int()).abs()
    return {"differing_share": float((difference > 0).double().mean()), "max_abs_diff": int(difference.max())}


def float_difference(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference.double() - candidate.detach().cpu().double()).abs().max())


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """fp32 matmuls and convolutions in TF32 (or IEEE fp32) for the block, as gpu.py sets them; restored after."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    gpu_benchmark.set_tf32(enabled)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


class Float64Reference(nn.Module):
    """The CPU self-check's reference: the same weights in float64, float32 logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).double()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.double()).float()


def part_correctness(session: Session, box: TimeBox, record: PartRecord) -> None:
    report, device, cuda = session.report, session.device, session.cuda
    versus = "cuda vs cpu" if cuda else "CPU self-check (no second device)"
    config = session.recipe_config(session.subset_shards, {"training.bf16": False})
    data = config.data
    checks: dict[str, bool] = {}

    # Augmentation: the plan is drawn once on the host; on CUDA both devices carry it out, on CPU the batch is
    # held against the same draws applied image by image.
    images, labels = first_images(session.subset_shards, "train",
                                  TINY_AUGMENT_IMAGES if session.tiny else AUGMENT_IMAGES)
    count = len(images)
    augmenter = BatchAugmenter(data.augment, torch.Generator().manual_seed(0), image_size=data.image_size,
                               interpolation=data.interpolation)
    plan = augmenter.draw(count, (images.shape[-2], images.shape[-1]))
    reference = augmenter.apply(images, plan)
    if cuda:
        candidate = augmenter.apply(images.to(device), plan)
        against = "same plan on cpu"
    else:
        candidate = torch.cat([augmenter.apply(images[i : i + 1], plan_slice(plan, i)) for i in range(count)])
        against = "same plan image by image (CPU self-check)"
    figures = uint8_difference(reference, candidate)
    checks["augment"] = figures["differing_share"] <= AUGMENT_DIFFERING_SHARE
    report.row(record, check=f"BatchAugmenter {data.augment.auto_augment} {count} images", versus=against,
               **figures, tolerance=f"share <= {AUGMENT_DIFFERING_SHARE}", within=checks["augment"])
    if cuda:  # not a check: what turning TF32 on (gpu.py does) would do to the affine grid of the geometric ops
        with tf32(True):
            figures = uint8_difference(reference, augmenter.apply(images.to(device), plan))
        report.row(record, check="BatchAugmenter under TF32 (information)", versus=against, **figures)

    # Erasing and mixing act on normalised float batches.
    box.check("erasing and mixing")
    floats = normalize(images, data.mean, data.std)
    other = floats.to(device) if cuda else floats.double()
    boxes = BatchEraser(0.5, "const", torch.Generator().manual_seed(1)).draw(count, *floats.shape[-2:])
    for mode in ("const", "pixel"):
        erased = BatchEraser(0.5, mode, torch.Generator().manual_seed(2)).apply(floats, boxes)
        erased_other = BatchEraser(0.5, mode, torch.Generator().manual_seed(2)).apply(other, boxes)
        same_boxes = torch.equal(erased != floats, (erased_other != other).cpu())
        exact = mode != "const" or float_difference(erased, erased_other) == 0.0
        checks[f"erase {mode}"] = same_boxes and exact
        report.row(record, check=f"BatchEraser {mode}", versus=versus if cuda else "float64 (CPU self-check)",
                   same_erased_pixels=same_boxes, const_fill_exact=exact if mode == "const" else "n/a (random fill)",
                   within=checks[f"erase {mode}"])
    mixer = BatchMixer(data.augment, num_classes=len(session.source.classes), rng=np.random.default_rng(0))
    height, width = floats.shape[-2:]
    partners = random_cycle(floats.shape[0], np.random.default_rng(1))
    draws = {"mixup": MixDraw(lam=0.7, partners=partners),
             "cutmix": MixDraw(lam=1 - (height // 2) * (width // 2) / (height * width),
                               box=(height // 4, height // 4 + height // 2, width // 4, width // 4 + width // 2),
                               partners=partners)}
    for kind, draw in draws.items():
        mixed, targets = mixer.apply(floats, labels, draw)
        mixed_other, targets_other = mixer.apply(other, labels.to(other.device), draw)
        worst = max(float_difference(mixed, mixed_other), float_difference(targets, targets_other))
        checks[f"mix {kind}"] = worst <= MIXER_TOLERANCE
        report.row(record, check=f"BatchMixer {kind}", versus=versus if cuda else "float64 (CPU self-check)",
                   max_abs_diff=worst, tolerance=MIXER_TOLERANCE, within=checks[f"mix {kind}"])

    # Evaluation and attention maps of the same (seeded, untrained) weights and images, fp32 with TF32 off.
    manifest = require_manifest(session.subset_shards)
    num_classes = len(manifest.classes)
    selected, _, _ = select_images(session.subset_shards)
    inputs = normalize(EvalResize.from_config(data)(selected), data.mean, data.std)
    evaluated = [config.model.baseline.name, config.model.transformers[0].name]
    for spec in config.model.all_specs():
        box.check(f"{spec.name}'s evaluation")
        torch.manual_seed(0)
        model = build_model(spec.model_copy(update={"pretrained": False, "pretrained_file": None}), num_classes)
        model = model.eval()
        channels_last = uses_channels_last(config.training, spec)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        with tf32(False):
            if spec.name in evaluated:
                stream = ShardStream(session.subset_shards, "test", config.training.batch_size, train=False)
                logits, test_labels = predict(model, stream, config, torch.device("cpu"), channels_last)
                other_model = copy.deepcopy(model).to(device) if cuda else Float64Reference(model)
                other_logits, _ = predict(other_model, stream, config, device, channels_last)
                logits_t, other_t = torch.from_numpy(logits), torch.from_numpy(other_logits)
                logit_diff = float_difference(logits_t, other_t)
                probability_diff = float_difference(logits_t.softmax(1), other_t.softmax(1))
                checks[f"evaluate {spec.name}"] = max(logit_diff, probability_diff) <= EVAL_TOLERANCE
                report.row(record, check=f"evaluate.predict {spec.name}, {len(test_labels)} test images",
                           versus=versus if cuda else "float64 (CPU self-check)", logits_max_abs_diff=logit_diff,
                           probabilities_max_abs_diff=probability_diff, logit_std=float(logits_t.std()),
                           same_top1=float((logits_t.argmax(1) == other_t.argmax(1)).double().mean()),
                           tolerance=EVAL_TOLERANCE, within=checks[f"evaluate {spec.name}"])
            if spec.name != config.model.baseline.name:  # the transformers have attention maps
                logits, panels = model_panels(model, inputs)
                if cuda:
                    other_logits, other_panels = model_panels(copy.deepcopy(model).to(device), inputs.to(device))
                else:
                    other_logits, other_panels = model_panels(copy.deepcopy(model).double(), inputs.double())
                map_diff = max(float_difference(a.maps, b.maps) for a, b in zip(panels, other_panels, strict=True))
                checks[f"attention {spec.name}"] = map_diff <= EVAL_TOLERANCE
                report.row(record, check=f"attention.model_panels {spec.name}, {len(inputs)} images, "
                                         f"{len(panels)} panels", versus=versus if cuda else "float64 (CPU self-check)",
                           maps_max_abs_diff=map_diff, logits_max_abs_diff=float_difference(logits, other_logits),
                           tolerance=EVAL_TOLERANCE, within=checks[f"attention {spec.name}"])
    if cuda:  # information: the recipe's precision, bf16 autocast on both devices
        box.check("the bf16 comparison")
        spec = config.model.spec(evaluated[1])
        torch.manual_seed(0)
        model = build_model(spec, num_classes).eval()
        bf16 = session.recipe_config(session.subset_shards, {"training.bf16": True})
        stream = ShardStream(session.subset_shards, "test", bf16.training.batch_size, train=False)
        logits, _ = predict(model, stream, bf16, torch.device("cpu"))
        other_logits, _ = predict(copy.deepcopy(model).to(device), stream, bf16, device)
        logits_t, other_t = torch.from_numpy(logits), torch.from_numpy(other_logits)
        report.row(record, check=f"evaluate.predict {spec.name} in bf16 (information)", versus=versus,
                   probabilities_max_abs_diff=float_difference(logits_t.softmax(1), other_t.softmax(1)),
                   same_top1=float((logits_t.argmax(1) == other_t.argmax(1)).double().mean()))

    missed = [name for name, ok in checks.items() if not ok]
    record.figures["checks"] = checks
    record.summary = (f"{len(checks) - len(missed)}/{len(checks)} checks within tolerance ({versus})"
                      + (f"; outside: {', '.join(missed)}" if missed else ""))
    record.goal_met = not missed
    record.goal = goal_text(record.goal_met, f"uint8 share <= {AUGMENT_DIFFERING_SHARE}, floats <= {EVAL_TOLERANCE}")


def run_child(session: Session, command: list[str], box: TimeBox, on_line: Callable[[str], None]) -> tuple[int, bool,
                                                                                                            list[str]]:
    """Run `command`, handing each output line to `on_line` as it comes; killed (with its children) when the box
    closes. Returns (exit status, whether it was killed, the last lines of its output)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=environment, start_new_session=True)
    session.children.append(child)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    tail: list[str] = []
    killed = False
    while True:
        try:
            line = lines.get(timeout=max(0.05, min(1.0, box.left())))
        except queue.Empty:
            if box.left() <= 0:
                kill_group(child)
                killed = True
                break
            continue
        if line is None:
            break
        tail = (tail + [line])[-20:]
        on_line(line)
    status = child.wait()
    session.children.remove(child)
    return status, killed, tail


def kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def part_compile(session: Session, box: TimeBox, record: PartRecord) -> None:
    args = session.args
    models = ["vit_tiny_patch4_32"] if session.tiny else args.compile_models
    variant = "bf16+fused+compile"
    command = [sys.executable, str(GPU_SCRIPT), "--device", session.device.type, "--models", *models,
               "--variants", variant, "--rounds", "1"]
    if session.tiny:  # one small model compiled on the CPU, as a check of the plumbing; the nine are the GPU's
        command += ["--model-kwargs", json.dumps(TINY_KWARGS["vit"]), "--batch-size", "2", "--steps", "1",
                    "--warmup", "1"]
    else:
        command += ["--steps", "10", "--warmup", "3"]
    print("  " + " ".join(command), flush=True)
    measured: dict[str, dict] = {}

    def on_line(line: str) -> None:
        cells = table_cells(line)
        if line.startswith("| ") and cells[0] in models and len(cells) >= 5:
            names = ("model", "image", "batch", "variant", "images_per_s", "speedup", "ms_per_step", "mfu_percent",
                     "warmup_s", "peak_gib")
            row = dict(zip(names, cells, strict=False))
            measured[cells[0]] = row
            session.report.row(record, **row)
        elif line.startswith("torch "):
            record.figures["gpu.py header"] = line

    status, killed, tail = run_child(session, command, box, on_line)
    compiled = [name for name, row in measured.items() if not row["images_per_s"].startswith("failed")]
    failed = {name: row["images_per_s"] for name, row in measured.items() if name not in compiled}
    remaining = [name for name in models if name not in measured]
    record.figures |= {"compiled": compiled, "failed": failed, "not_reached": remaining, "exit_status": status}
    record.summary = f"{len(compiled)}/{len(models)} compiled and stepped ({variant})"
    if failed:
        record.summary += "; failed: " + ", ".join(f"{name} ({why})" for name, why in failed.items())
    record.goal_met = None if remaining else len(compiled) == len(models)
    record.goal = goal_text(record.goal_met, "every model in one process")
    if killed:
        record.summary += f"; not reached (rerun: --parts compile --compile-models {' '.join(remaining)})"
        raise BoxClosed(f"gpu.py was stopped at the box, after {len(measured)} of {len(models)} models")
    if status != 0:
        raise RuntimeError(f"gpu.py exited with {status}: {next((t for t in reversed(tail) if t.strip()), '')}")


class BoxedContext(LocalContext):
    """LocalContext that keeps the best weights of the run in one file and ends the run at the first epoch
    boundary past `deadline` (the loop's safe point: that epoch is validated and checkpointed)."""

    def __init__(self, device: torch.device, deadline: float, epochs: int, best_weights: Path | None = None):
        super().__init__(device)
        self.deadline, self.epochs, self.best_weights = deadline, epochs, best_weights

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        super().report(metrics, checkpoint_dir)
        if self.best_weights is not None and checkpoint_dir is not None:
            self.best_weights.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint_dir / BEST_WEIGHTS, self.best_weights)
        if metrics["epoch"] < self.epochs and time.monotonic() > self.deadline:
            raise BoxClosed(f"stopped after epoch {metrics['epoch']} of {self.epochs}")


def tiled(source: Source, times: int) -> Source:
    """The source with its training split repeated `times` over (for throughput, not for accuracy)."""
    train = source.splits["train"]
    assert train.pixels is not None
    repeated = SplitSource(labels=np.tile(train.labels, times), pixels=np.tile(train.pixels, (times, 1, 1, 1)))
    return replace(source, splits={**source.splits, "train": repeated}, digest=f"{source.digest}-x{times}")


def part_loop(session: Session, box: TimeBox, record: PartRecord) -> None:
    args, device = session.args, session.device
    tile = 1 if session.tiny else LOOP_TILE
    batch = TINY_BATCH if session.tiny else session.recipe_tree["training"]["batch_size"]
    work = session.work / "loop"
    shard_size = TINY_SHARD_SIZE if session.tiny else session.recipe_tree["data"]["shard_size"]
    session.shard(tiled(session.source, tile), "loop/shards", shard_size)
    ratios = {}
    for model in LOOP_MODELS:
        box.check(f"{model}'s loop", MIN_COMPILE_UNIT_S if session.cuda else 0)
        options = argparse.Namespace(
            config=args.config, model=model, model_kwargs=tiny_kwargs(model) if session.tiny else {},
            epochs=LOOP_EPOCHS, batch_size=batch, loader_workers=0 if session.tiny else None,
            device=device.type, data_root=args.data_root, steps=2 if session.tiny else LOOP_STEPS)
        config = loop_benchmark.benchmark_config(options, work)
        if session.tiny:
            config = with_fields(config, {"training.compile": False})
        torch.compiler.reset()
        job = TrainingJob(config=config, model_name=model, shard_location=config.shard_location)
        history = run_training(BoxedContext(device, box.deadline, LOOP_EPOCHS), job)
        box.check(f"{model}'s bare step")
        step = loop_benchmark.step_images_per_second(config, options)
        loop = history[-1]["images_per_s"]
        ratios[model] = loop / step
        session.report.row(record, model=model, batch=batch, steps_per_epoch=history[-1]["global_step"] // LOOP_EPOCHS,
                           first_epoch_images_per_s=history[0]["images_per_s"], loop_images_per_s=loop,
                           step_images_per_s=step, loop_over_step=ratios[model], compile=config.training.compile)
        release_memory(device)
    record.figures["loop_over_step"] = ratios
    record.summary = ", ".join(f"{model} {ratio:.2f}" for model, ratio in ratios.items()) + (
        f" (batch {batch}; subset x{tile}, last of {LOOP_EPOCHS} epochs)")
    record.goal_met = all(ratio >= LOOP_GOAL for ratio in ratios.values())
    record.goal = goal_text(record.goal_met, f">= {LOOP_GOAL}")


def with_fields(config: PipelineConfig, fields: dict[str, Any]) -> PipelineConfig:
    tree = config.model_dump(mode="json")
    for path, value in fields.items():
        set_dotted(tree, path, value)
    return PipelineConfig.model_validate(tree)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_bf16_tflops(session: Session) -> float | None:
    """--peak-tflops, else the known peak of this GPU; None on a CPU or an unknown GPU (MFU n/a)."""
    if session.args.peak_tflops is not None:
        return session.args.peak_tflops
    if not session.cuda:
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if key in name),
                None)


def part_mfu(session: Session, box: TimeBox, record: PartRecord) -> None:
    device, peak = session.device, peak_bf16_tflops(session)
    if session.tiny:  # the same machinery, eager and tiny: on a CPU there is no MFU to speak of
        candidates = [(model, 2, "bf16+fused") for model in MFU_GOALS]
        counts = argparse.Namespace(warmup=1, steps=1, rounds=1)
    else:
        candidates = MFU_CANDIDATES
        counts = argparse.Namespace(warmup=MFU_WARMUP, steps=MFU_STEPS, rounds=MFU_ROUNDS)
    best: dict[str, dict] = {}
    errors = []
    for model, batch, variant in candidates:
        compiled = "compile" in variant
        box.check(f"{MFU_SHORT[model]} {variant} at batch {batch}", MIN_COMPILE_UNIT_S if compiled else 0)
        torch.compiler.reset()
        case = replace(gpu_benchmark.MODEL_CASES[model], model_kwargs=tiny_kwargs(model) if session.tiny else {})
        flops = gpu_benchmark.model_flops_per_step(case, batch)
        try:  # a setting this device or torch cannot run (a kernel, a compile mode, memory) is a row, not the end
            step = gpu_benchmark.make_train_step(case, gpu_benchmark.parse_variant(variant), batch, device)
            timing = gpu_benchmark.time_variants({variant: step}, counts, device)[variant]
            del step
        except Exception as error:
            timing = gpu_benchmark.Timing(error=first_line(error))
        release_memory(device)
        if timing.error:
            errors.append(f"{MFU_SHORT[model]} {variant}: {timing.error}")
            session.report.row(record, model=model, batch=batch, variant=variant, result=f"failed: {timing.error}")
            continue
        step_seconds = timing.best_seconds / counts.steps
        mfu = None if peak is None else flops / step_seconds / (peak * 1e12)
        row = {"model": model, "batch": batch, "variant": variant, "images_per_s": batch / step_seconds,
               "ms_per_step": 1e3 * step_seconds, "mfu": "n/a" if mfu is None else mfu,
               "warmup_s": timing.warmup_seconds, "peak_gib": timing.peak_memory_gib}
        session.report.row(record, **row)
        if model not in best or row["images_per_s"] / batch > best[model]["images_per_s"] / best[model]["batch"]:
            best[model] = row  # per image: the fastest step per image has the highest MFU
    record.figures |= {"best": best, "peak_bf16_tflops": peak, "errors": errors}
    record.summary = ", ".join(
        f"{MFU_SHORT[model]} " + ("n/a" if row["mfu"] == "n/a" else f"{100 * row['mfu']:.1f}%")
        + f" ({row['variant']}, batch {row['batch']})" for model, row in best.items())
    if peak is None:
        record.summary += " (MFU n/a: " + ("CPU" if not session.cuda else "unknown GPU: pass --peak-tflops") + ")"
        record.goal_met = None
    else:
        record.goal_met = all(model in best and best[model]["mfu"] >= goal for model, goal in MFU_GOALS.items())
    record.goal = goal_text(record.goal_met, "ViT-B/16 >= 40%, ViT-S/16 >= 30%")
    if missing := [MFU_SHORT[model] for model in MFU_GOALS if model not in best]:
        raise RuntimeError(f"no setting ran for {', '.join(missing)}: {'; '.join(errors)}")


def part_recipe(session: Session, box: TimeBox, record: PartRecord) -> None:
    args, device = session.args, session.device
    epochs = 1 if session.tiny else args.recipe_epochs
    recipe_training = session.recipe_tree["training"]
    warmup = recipe_training["warmup_epochs"] * epochs / recipe_training["epochs"]  # the recipe's share
    fields: dict[str, Any] = {"training.epochs": epochs, "training.warmup_epochs": warmup}
    if not session.tiny:
        fields["training.compile"] = args.recipe_compile
    config = session.recipe_config(session.subset_shards, fields)
    manifest = require_manifest(session.subset_shards)
    specs = config.model.all_specs()
    teacher: Path | None = None
    results: dict[str, dict] = {}
    failures = []
    cut = None
    for index, spec in enumerate(specs):
        box.check(f"training {spec.name}", MIN_COMPILE_UNIT_S if session.cuda else 0)
        weights = session.work / "recipe" / spec.name / BEST_WEIGHTS
        # Each model's own box: an equal share of what is left, so a slow model cannot starve the ones after it.
        deadline = time.monotonic() + box.left() / (len(specs) - index)
        started = time.perf_counter()
        status = "ok"
        try:
            if spec.distillation != "none" and teacher is None:
                raise RuntimeError(f"{spec.name}: its teacher ({spec.teacher}) has no trained weights")
            torch.compiler.reset()
            job = TrainingJob(config=config, model_name=spec.name, shard_location=session.subset_shards,
                              teacher_weights=str(teacher) if spec.distillation != "none" and teacher else None)
            context = BoxedContext(device, deadline, epochs, best_weights=weights)
            try:
                run_training(context, job)
            except BoxClosed as closed:
                status = f"cut: {closed}"
                cut = cut or status
            train_seconds = time.perf_counter() - started
            if not context.reports:
                raise RuntimeError(f"{spec.name}: no epoch finished")
            evaluated = evaluate_model(config, spec.name, weights, session.subset_shards, manifest, device)
        except Exception as error:  # one model's failure is reported; the next model still trains
            traceback.print_exc()
            failures.append(f"{spec.name}: {first_line(error)}")
            session.report.row(record, model=spec.name, result=f"failed: {first_line(error)}")
            release_memory(device)
            continue
        if spec.name == config.model.baseline.name:
            teacher = weights
        best = max(context.reports, key=lambda epoch: epoch["val_acc"])
        results[spec.name] = {"status": status, "epochs": len(context.reports), "best_epoch": best["epoch"],
                              "val_top1": evaluated.val_top1, "test_top1": evaluated.top1,
                              "test_top5": evaluated.top5, "train_seconds": train_seconds,
                              "train_images_per_s": float(np.mean([e["images_per_s"] for e in context.reports])),
                              "params_m": evaluated.params / 1e6, "gflops": evaluated.gflops}
        session.report.row(record, model=spec.name, **results[spec.name])
        release_memory(device)
    record.figures |= {"models": results, "epochs": epochs, "compile": config.training.compile}
    record.summary = ", ".join(f"{name} {r['test_top1']:.3f} in {r['train_seconds']:.0f} s" for name, r in
                               results.items()) + f" (test top-1, {epochs} epochs; recipe: {recipe_training['epochs']})"
    baseline = results.get(config.model.baseline.name)
    transformers = [r["test_top1"] for name, r in results.items() if name != config.model.baseline.name]
    if baseline and transformers:
        record.goal_met = baseline["test_top1"] >= RESNET_GOAL and max(transformers) >= baseline["test_top1"] - \
            TRANSFORMER_GAP
    record.goal = goal_text(record.goal_met, f"ResNet-18 >= {RESNET_GOAL:.0%}, best transformer within "
                                             f"{100 * TRANSFORMER_GAP:.0f} points")
    if failures:
        raise RuntimeError("; ".join(failures))
    if cut:
        raise BoxClosed(cut)


def part_peer(session: Session, box: TimeBox, record: PartRecord) -> None:
    if not PEER_SCRIPT.is_file():
        raise FileNotFoundError("peer.py missing (benchmarks/peer.py, written on branch wt-peer)")
    args = session.args
    out = session.work / "peer.json"
    # peer.py reads the recipe from --config: the same one, with what this run changes written into a copy.
    tree = copy.deepcopy(session.recipe_tree)
    set_dotted(tree, "training.compile", False if session.tiny else args.peer_compile)
    if session.tiny:
        set_dotted(tree, "data.loader_workers", 0)
    config_file = session.work / "peer-config.yaml"
    config_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    model = "vit_tiny_patch4_32" if session.tiny else args.peer_model
    batch = TINY_BATCH if session.tiny else tree["training"]["batch_size"]
    command = [sys.executable, str(PEER_SCRIPT), "--data-root", str(args.data_root), "--config", str(config_file),
               "--model", model, "--model-kwargs", json.dumps(tiny_kwargs(model) if session.tiny else {}),
               "--epochs", str(1 if session.tiny else args.peer_epochs), "--batch-size", str(batch),
               "--device", session.device.type, "--in-process", "--out", str(out)]
    if session.tiny:
        command += [item for pair in TINY_PEER_IMAGES.items() for item in pair]
    print("  " + " ".join(command), flush=True)
    status, killed, tail = run_child(session, command, box, lambda line: print(f"  peer.py: {line}", flush=True))
    if killed:
        raise BoxClosed("peer.py was stopped at the box")
    if status != 0 or not out.is_file():
        raise RuntimeError(f"peer.py exited with {status}: {next((t for t in reversed(tail) if t.strip()), '')}")
    figures = json.loads(out.read_text())
    record.figures |= figures
    peer, ours, ratios = figures["peer"], figures["ours"], figures["ratios"]
    key = "images_per_s_after_first_epoch" if ratios.get("images_per_s_after_first_epoch") else "images_per_s"
    ratio = ratios[key]
    record.summary = (f"ours/peer {ratio:.2f}x images/s ({key}: ours {ours[key]:.0f}, peer {peer[key]:.0f}); "
                      f"test top-1 ours {ours['test_top1']:.3f}, peer {peer['test_top1']:.3f} ({model}, "
                      f"compile {tree['training']['compile']})")
    session.report.row(record, ratio=ratio, ours_images_per_s=ours[key], peer_images_per_s=peer[key],
                       ours_test_top1=ours["test_top1"], peer_test_top1=peer["test_top1"])
    record.goal_met = ratio >= PEER_GOAL and ours["test_top1"] >= peer["test_top1"] - PEER_TOP1_SLACK
    record.goal = goal_text(record.goal_met, f">= {PEER_GOAL:.0f}x at top-1 within {100 * PEER_TOP1_SLACK:.0f} points")


PART_FUNCTIONS: dict[str, Callable[[Session, TimeBox, PartRecord], None]] = {
    "correctness": part_correctness, "compile": part_compile, "loop": part_loop, "mfu": part_mfu,
    "recipe": part_recipe, "peer": part_peer,
}


# --- running them --------------------------------------------------------------------------------------------------

def machine(device: torch.device) -> dict:
    described = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                 "platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "device": str(device)}
    if device.type == "cuda":
        described |= {"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                      "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
                      "flash_attention": torch.backends.cuda.is_flash_attention_available()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
        described["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        described["commit"] = None
    return described


def start_watchdog(session: Session, started: float) -> None:
    """At the hard stop, whatever is running is recorded as cut, the results are written and the process exits:
    a compilation cannot be interrupted at a safe point, and the run must end in time."""
    hard_stop = session.args.deadline + HARD_STOP_GRACE_S

    def stop() -> None:
        for child in list(session.children):
            kill_group(child)
        if session.running is not None:
            part, part_started = session.running
            part.status = "cut: the run's deadline passed inside an uninterruptible step"
            part.seconds = time.monotonic() - part_started
        session.report.save()
        print("\n" + session.report.table(), flush=True)
        os._exit(3)

    timer = threading.Timer(max(0.0, hard_stop - (time.monotonic() - started)), stop)
    timer.daemon = True
    timer.start()


def run_parts(session: Session, parts: list[str], boxes: dict[str, float], started: float) -> int:
    report = session.report
    for name in parts:
        report.parts[name] = PartRecord(PARTS.index(name) + 1, name, TITLES[name], boxes[name])
    report.save()
    for name in parts:
        record = report.parts[name]
        left = session.args.deadline - (time.monotonic() - started)
        box = TimeBox(min(boxes[name], left))
        record.box_s = max(0.0, box.seconds)
        print(f"\n== part {record.number}: {record.title} (box {record.box_s:.0f} s) ==", flush=True)
        part_started = time.monotonic()
        record.status = "running"
        session.running = (record, part_started)
        report.save()
        try:
            box.check("it started")
            PART_FUNCTIONS[name](session, box, record)
            record.status = "ok"
        except BoxClosed as closed:
            record.status = f"cut: {closed}"
        except Exception as error:
            traceback.print_exc()
            record.status = f"failed: {first_line(error)}"
        record.seconds = time.monotonic() - part_started
        session.running = None
        release_memory(session.device)
        report.save()
        print(f"-> part {record.number} {record.status}: {record.summary} | {record.goal}", flush=True)
    print("\n" + report.table(), flush=True)
    statuses = [part.status for part in report.parts.values()]
    if any(status.startswith("failed") for status in statuses):
        return 1
    return 3 if any(status.startswith("cut") for status in statuses) else 0


def parse_parts(values: list[str]) -> list[str]:
    chosen = set()
    for value in values:
        name = PARTS[int(value) - 1] if value.isdigit() and 1 <= int(value) <= len(PARTS) else value
        if name not in PARTS:
            raise argparse.ArgumentTypeError(f"unknown part {value!r}; parts: 1-6 or {', '.join(PARTS)}")
        chosen.add(name)
    return [name for name in PARTS if name in chosen]


def parse_box(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    try:
        [name] = parse_parts([name])
        return name, float(seconds)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"--box takes PART=SECONDS, e.g. compile=500; got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--data-root", type=Path, default=os.environ.get("DATA_ROOT"),
                        help="directory holding cifar-10-batches-py/ (the subset; default $DATA_ROOT)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/out/gpu-acceptance"),
                        help="where gpu_acceptance.md and gpu_acceptance.json go (default $OUT, else "
                             "benchmarks/out/gpu-acceptance)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), metavar="PART",
                        help=f"a subset, by number or name: {', '.join(f'{i + 1} {p}' for i, p in enumerate(PARTS))}")
    parser.add_argument("--box", action="append", type=parse_box, default=[], metavar="PART=SECONDS",
                        help=f"a part's time box (repeatable); defaults on a GPU: "
                             f"{', '.join(f'{k} {v}' for k, v in GPU_BOXES.items())}")
    parser.add_argument("--deadline", type=float, default=None,
                        help=f"seconds from the start by which the run ends (default {GPU_DEADLINE_S:.0f}; "
                             f"--tiny {TINY_DEADLINE_S:.0f})")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "cifar10.yaml", help="the recipe")
    parser.add_argument("--tiny", action="store_true",
                        help="every part in miniature (a few hundred images, tiny widths, one epoch, compilation "
                             "only in part 2): the check that runs in `make test`")
    parser.add_argument("--compile-models", nargs="+", default=list(gpu_benchmark.MODEL_CASES),
                        choices=list(gpu_benchmark.MODEL_CASES), help="part 2's models (default: all nine)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: known for H100/H200/A100)")
    parser.add_argument("--recipe-epochs", type=int, default=RECIPE_EPOCHS, help="part 5's epochs per model")
    parser.add_argument("--recipe-compile", action=argparse.BooleanOptionalAction, default=False,
                        help="part 5 with torch.compile as the recipe has it; off by default, because on 9-step "
                             "epochs compilation costs more time than it saves (parts 2 and 3 compile)")
    parser.add_argument("--peer-model", default=PEER_MODEL)
    parser.add_argument("--peer-epochs", type=int, default=PEER_EPOCHS)
    parser.add_argument("--peer-compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile on both sides of part 6 (off by default, for the box)")
    args = parser.parse_args()
    try:
        parts = parse_parts(args.parts)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.data_root is None or not (args.data_root / "cifar-10-batches-py").is_dir():
        parser.error(f"--data-root must hold cifar-10-batches-py/ (got {args.data_root}); copy the subset there")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False here; --device cpu --tiny runs on a CPU")
    args.config = args.config.resolve()
    args.data_root = args.data_root.resolve()
    boxes = {**(TINY_BOXES if args.tiny else GPU_BOXES), **dict(args.box)}
    if args.deadline is None:
        args.deadline = TINY_DEADLINE_S if args.tiny else GPU_DEADLINE_S

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    started = time.monotonic()
    header = {"command": sys.argv, "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine(device), "settings": {**vars(args), "boxes": boxes, "parts": parts}}
    print(json.dumps(header, default=str), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as work:
        session = Session(args, device, Path(work), Report(args.out, header))
        start_watchdog(session, started)
        status = run_parts(session, parts, boxes, started)
    print(f"\ntable: {args.out / 'gpu_acceptance.md'}, figures: {args.out / 'gpu_acceptance.json'}; "
          f"{time.monotonic() - started:.0f} s in all", flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
