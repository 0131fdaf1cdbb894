"""GPU training throughput and MFU of our models under bf16 autocast, fused AdamW, the SDPA flash kernel and
torch.compile, switched on one at a time.

For every model and variant: images/s of a training step (forward, backward, AdamW step) on synthetic data
already on the GPU (so the loader is out of the picture), the warm-up time (where torch.compile's compilation
lands), peak memory, and MFU = model FLOPs per step / step time / peak FLOPS. Model FLOPs per step are the
forward's matmul FLOPs (torch.utils.flop_counter, counted on the meta device) times 3 for forward + backward;
every variant, fp32 included, is held against the bf16 dense peak (--peak-tflops, default H100 SXM).

A variant names its features joined by '+': bf16 (autocast), fused (AdamW fused=True), flash (SDPA restricted to
the flash kernel; without it every other SDPA backend may run), compile (torch.compile); 'fp32' is none of them.
Variants alternate round by round so a slow spell of the GPU hits all alike; the best round counts.

    python benchmarks/gpu.py                       # on a CUDA machine
    python benchmarks/gpu.py --dry-run             # on CPU: model building, FLOP counts, one fp32 step each
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitmodels  # noqa: F401  (registers our presets with timm)

H100_SXM_DENSE_BF16_TFLOPS = 989.0
FWD_BWD_FLOPS_FACTOR = 3  # backward costs about twice the forward's matmul FLOPs
IMAGENET_CLASSES = 1000
CIFAR_CLASSES = 10
DRY_RUN_BATCH = 2
GIB = 2**30
FEATURES = ("bf16", "fused", "flash", "compile")
DEFAULT_VARIANTS = ["fp32", "bf16", "bf16+fused", "bf16+fused+flash", "bf16+fused+compile", "bf16+fused+flash+compile"]
BACKENDS_BUT_FLASH = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class ModelCase:
    name: str
    image_size: int
    batch_size: int
    num_classes: int


# Our registrations of the ImageNet ViTs (vp_*, the same architecture as timm's vit_*_patch16_224) and the
# CIFAR presets the pipeline trains.
MODEL_CASES = {
    case.name: case
    for case in [
        ModelCase("vp_vit_small_patch16_224", 224, 256, IMAGENET_CLASSES),
        ModelCase("vp_vit_base_patch16_224", 224, 256, IMAGENET_CLASSES),
        ModelCase("vit_tiny_patch4_32", 32, 1024, CIFAR_CLASSES),
        ModelCase("vit_small_patch4_32", 32, 1024, CIFAR_CLASSES),
        ModelCase("deit_tiny_distilled_patch4_32", 32, 1024, CIFAR_CLASSES),
        ModelCase("deit_small_distilled_patch4_32", 32, 1024, CIFAR_CLASSES),
        ModelCase("swin_tiny_patch2_window4_32", 32, 1024, CIFAR_CLASSES),
    ]
}


def parse_variant(text: str) -> frozenset[str]:
    features = frozenset() if text == "fp32" else frozenset(text.split("+"))
    unknown = features - set(FEATURES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown feature(s) {sorted(unknown)} in {text!r}; known: {FEATURES}")
    if "flash" in features and "bf16" not in features:
        raise argparse.ArgumentTypeError(f"{text!r}: the flash kernel takes only 16-bit inputs; add bf16")
    return features


def build(case: ModelCase, device: torch.device | str) -> nn.Module:
    with torch.device(device):
        return timm.create_model(case.name, num_classes=case.num_classes, img_size=case.image_size).train()


def model_flops_per_step(case: ModelCase, batch_size: int) -> float:
    """Forward matmul FLOPs of one training-mode batch x FWD_BWD_FLOPS_FACTOR; meta tensors, so no compute."""
    model = build(case, "meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.empty(batch_size, 3, case.image_size, case.image_size, device="meta"))
    return counter.get_total_flops() * FWD_BWD_FLOPS_FACTOR


def classification_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(outputs, tuple):  # DeiT in training mode: both heads learn
        return sum(F.cross_entropy(logits, labels) for logits in outputs)
    return F.cross_entropy(outputs, labels)


def attention_backends(features: frozenset[str]):
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if "flash" in features else sdpa_kernel(BACKENDS_BUT_FLASH)


def make_train_step(case: ModelCase, features: frozenset[str], batch_size: int,
                    device: torch.device) -> Callable[[], None]:
    model = build(case, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused="fused" in features)
    step_model = torch.compile(model) if "compile" in features else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "bf16" in features else nullcontext
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(batch_size, 3, case.image_size, case.image_size, generator=generator, device=device)
    labels = torch.randint(0, case.num_classes, (batch_size,), generator=generator, device=device)

    def step() -> None:
        # The backend choice also applies while torch.compile traces, so the compiled graph keeps it.
        with attention_backends(features), autocast():
            loss = classification_loss(step_model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@dataclass
class Timing:
    warmup_seconds: float = float("nan")
    best_seconds: float = float("inf")
    peak_memory_gib: float = 0.0
    error: str | None = None


def time_variants(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, Timing]:
    timings = {name: Timing() for name in steps}
    for name, step in steps.items():
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize()
            timings[name].warmup_seconds = time.perf_counter() - start
        except RuntimeError as error:  # e.g. no flash kernel for an attention mask (Swin), or out of memory
            timings[name].error = str(error).splitlines()[0][:80]
    for _ in range(args.rounds):
        for name, step in steps.items():
            if timings[name].error:
                continue
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            timing = timings[name]
            timing.best_seconds = min(timing.best_seconds, time.perf_counter() - start)
            timing.peak_memory_gib = max(timing.peak_memory_gib, torch.cuda.max_memory_allocated() / GIB)
    return timings


def benchmark(case: ModelCase, args: argparse.Namespace, device: torch.device) -> None:
    batch_size = args.batch_size or case.batch_size
    flops = model_flops_per_step(case, batch_size)
    steps = {variant: make_train_step(case, parse_variant(variant), batch_size, device) for variant in args.variants}
    for variant, timing in time_variants(steps, args).items():
        if timing.error:
            print(f"| {case.name} | {case.image_size} | {batch_size} | {variant} | failed: {timing.error} "
                  "| | | | |", flush=True)
            continue
        step_seconds = timing.best_seconds / args.steps
        mfu = flops / step_seconds / (args.peak_tflops * 1e12)
        print(f"| {case.name} | {case.image_size} | {batch_size} | {variant} | {batch_size / step_seconds:.0f} "
              f"| {1e3 * step_seconds:.1f} | {100 * mfu:.1f} | {timing.warmup_seconds:.1f} "
              f"| {timing.peak_memory_gib:.1f} |", flush=True)


def dry_run(cases: list[ModelCase], args: argparse.Namespace) -> None:
    """What runs without a GPU: variant parsing (argparse did it), FLOP counts, one fp32 eager step per model."""
    print("dry run on CPU: FLOP counts and one fp32 eager training step per model; no timing, no GPU features\n")
    print("| model | image | batch | model TFLOPs/step (fwd+bwd) | GFLOPs/img (fwd) | fp32 step on CPU |")
    print("|---|---:|---:|---:|---:|---|")
    for case in cases:
        batch_size = args.batch_size or case.batch_size
        flops = model_flops_per_step(case, batch_size)
        make_train_step(case, frozenset(), DRY_RUN_BATCH, torch.device("cpu"))()
        print(f"| {case.name} | {case.image_size} | {batch_size} | {flops / 1e12:.2f} "
              f"| {flops / FWD_BWD_FLOPS_FACTOR / batch_size / 1e9:.3f} | ok (batch {DRY_RUN_BATCH}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_CASES), choices=list(MODEL_CASES))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, type=str,
                        help=f"features from {FEATURES} joined by '+', or fp32")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="one batch for every model (default: 256 at 224 px, 1024 at 32 px)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant; the best one counts")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_DENSE_BF16_TFLOPS,
                        help="the GPU's dense bf16 peak for MFU (default: H100 SXM)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU needed: FLOP counts and a CPU fp32 step")
    args = parser.parse_args()
    for variant in args.variants:
        try:
            parse_variant(variant)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    cases = [MODEL_CASES[name] for name in args.models]

    if args.dry_run:
        dry_run(cases, args)
        return
    if not torch.cuda.is_available():
        sys.exit("gpu.py needs a CUDA GPU and torch.cuda.is_available() is False here; "
                 "run it with --dry-run to check model building and FLOP counting on CPU")
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name()}, "
          f"flash available {torch.backends.cuda.is_flash_attention_available()}, peak {args.peak_tflops} TFLOPS, "
          f"{args.steps} steps x best of {args.rounds} rounds after {args.warmup} warm-up steps\n")
    print("| model | image | batch | variant | img/s | ms/step | MFU % | warm-up s | peak GiB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for case in cases:
        benchmark(case, args, device)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
