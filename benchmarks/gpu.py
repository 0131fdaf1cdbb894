"""GPU training throughput and MFU of our models under bf16 autocast, fused AdamW, the SDPA flash kernel,
torch.compile and channels-last memory format, switched on one at a time.

For every model and variant: images/s of a training step (forward, backward, AdamW step) on synthetic data
already on the GPU (so the loader is out of the picture), the warm-up time (where torch.compile's compilation
lands), peak memory, and MFU = model FLOPs per step / step time / peak FLOPS. Model FLOPs per step are the
forward FLOPs per image (tasks.judging.evaluate.count_gflops, as the evaluate step counts them, on the meta device)
times the batch and 3 for forward + backward; every variant, fp32 included, is held against the bf16 dense
peak (--peak-tflops, default H100 SXM). On CUDA, fp32 matmuls and convolutions run in TF32 (--no-tf32: IEEE fp32).

A variant names its features joined by '+': bf16 (autocast), fused (AdamW fused=True), flash (SDPA restricted to
the flash kernel; without it and without cudnn every other SDPA backend may run), cudnn (SDPA restricted to
cuDNN's attention kernel), compile (torch.compile), autotune (compile in mode max-autotune-no-cudagraphs: Triton
matmul templates tried against cuBLAS), cudagraphs (compile in mode reduce-overhead: the compiled forward and
backward replayed as CUDA graphs; with autotune, mode max-autotune), channels_last (model and images in NHWC
memory format); 'fp32' is none of them. Variants alternate round by round so a slow spell of
the device hits all alike; the best round counts. Compilation state is reset between models, so each model
compiles as it would alone and all of them run in one process.

    python benchmarks/gpu.py                       # on a CUDA machine
    python benchmarks/gpu.py --dry-run             # on CPU: model building, FLOP counts, one fp32 step each
    python benchmarks/gpu.py --device cpu --models resnet18_cifar --variants fp32 channels_last compile
                                                   # the same variants timed on CPU (no MFU unless --peak-tflops)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import vitmodels  # noqa: F401  (registers our presets with timm)
from tasks.judging.evaluate import count_gflops

from harness import classification_loss, sync

H100_SXM_DENSE_BF16_TFLOPS = 989.0
FWD_BWD_FLOPS_FACTOR = 3  # backward costs about twice the forward's matmul FLOPs
IMAGENET_CLASSES = 1000
CIFAR_CLASSES = 10
DRY_RUN_BATCH = 2
GIB = 2**30
FEATURES = ("bf16", "fused", "flash", "cudnn", "compile", "autotune", "cudagraphs", "channels_last")
DEFAULT_VARIANTS = ["fp32", "bf16", "bf16+fused", "bf16+fused+flash", "bf16+fused+compile", "bf16+fused+flash+compile"]
BACKENDS_BUT_FLASH = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class ModelCase:
    name: str
    image_size: int
    batch_size: int
    num_classes: int
    sized_by_img_size: bool = True  # transformers take img_size; ResNets adapt to any input size
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model keywords (e.g. a smaller depth)


# Our registrations of the ImageNet ViTs (vp_*, the same architecture as timm's vit_*_patch16_224) and the
# CIFAR models the pipeline trains (the ResNets are the baseline and DeiT's teacher).
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
        ModelCase("resnet18_cifar", 32, 1024, CIFAR_CLASSES, sized_by_img_size=False),
        ModelCase("resnet50_cifar", 32, 1024, CIFAR_CLASSES, sized_by_img_size=False),
    ]
}


def parse_variant(text: str) -> frozenset[str]:
    features = frozenset() if text == "fp32" else frozenset(text.split("+"))
    unknown = features - set(FEATURES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown feature(s) {sorted(unknown)} in {text!r}; known: {FEATURES}")
    for kernel in ("flash", "cudnn"):
        if kernel in features and "bf16" not in features:
            raise argparse.ArgumentTypeError(f"{text!r}: the {kernel} kernel takes only 16-bit inputs; add bf16")
    if {"flash", "cudnn"} <= features:
        raise argparse.ArgumentTypeError(f"{text!r}: flash and cudnn each restrict SDPA to one kernel; pick one")
    for mode in ("autotune", "cudagraphs"):
        if mode in features and "compile" not in features:
            raise argparse.ArgumentTypeError(f"{text!r}: {mode} is a torch.compile mode; add compile")
    return features


def build(case: ModelCase, device: torch.device | str) -> nn.Module:
    size_kwargs = {"img_size": case.image_size} if case.sized_by_img_size else {}
    with torch.device(device):
        return timm.create_model(case.name, num_classes=case.num_classes, **size_kwargs, **case.model_kwargs).train()


def model_flops_per_step(case: ModelCase, batch_size: int) -> float:
    """Forward FLOPs of a batch x FWD_BWD_FLOPS_FACTOR, counted as the evaluate step counts them (meta device)."""
    gflops_per_image = count_gflops(build(case, "meta"), (3, case.image_size, case.image_size))
    return gflops_per_image * 1e9 * batch_size * FWD_BWD_FLOPS_FACTOR


def attention_backends(features: frozenset[str]):
    if "flash" in features:
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    if "cudnn" in features:
        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    return sdpa_kernel(BACKENDS_BUT_FLASH)


def compile_mode(features: frozenset[str]) -> str | None:
    """torch.compile's mode for the variant's features; None is its default mode."""
    autotune, cudagraphs = "autotune" in features, "cudagraphs" in features
    if autotune and cudagraphs:
        return "max-autotune"
    if autotune:
        return "max-autotune-no-cudagraphs"
    return "reduce-overhead" if cudagraphs else None


def make_train_step(case: ModelCase, features: frozenset[str], batch_size: int,
                    device: torch.device) -> Callable[[], None]:
    model = build(case, device)
    memory_format = torch.channels_last if "channels_last" in features else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused="fused" in features)
    step_model = torch.compile(model, mode=compile_mode(features)) if "compile" in features else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "bf16" in features else nullcontext
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(batch_size, 3, case.image_size, case.image_size, generator=generator, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, case.num_classes, (batch_size,), generator=generator, device=device)

    def step() -> None:
        if "cudagraphs" in features:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
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
    peak_memory_gib: float | None = None  # CUDA only
    error: str | None = None


def time_variants(steps: dict[str, Callable[[], None]], args: argparse.Namespace,
                  device: torch.device) -> dict[str, Timing]:
    timings = {name: Timing() for name in steps}
    for name, step in steps.items():
        try:
            sync(device)
            start = time.perf_counter()
            for _ in range(args.warmup):
                step()
            sync(device)
            timings[name].warmup_seconds = time.perf_counter() - start
        except RuntimeError as error:  # e.g. no flash kernel for an attention mask (Swin), or out of memory
            timings[name].error = str(error).splitlines()[0][:80]
    for _ in range(args.rounds):
        for name, step in steps.items():
            if timings[name].error:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            timing = timings[name]
            timing.best_seconds = min(timing.best_seconds, time.perf_counter() - start)
            if device.type == "cuda":
                timing.peak_memory_gib = max(timing.peak_memory_gib or 0.0, torch.cuda.max_memory_allocated() / GIB)
    return timings


def set_tf32(enabled: bool) -> None:
    """fp32 matmuls (cuBLAS) and convolutions (cuDNN) on CUDA in TF32, or in IEEE fp32.

    Set through the two calls that keep both of torch 2.14's interfaces readable: afterwards the per-backend
    `fp32_precision` attributes read "tf32" (or "ieee") and the legacy getters answer too. Inductor still calls
    the legacy ones (torch.get_float32_matmul_precision() for its autotuning cache keys,
    torch.backends.cudnn.allow_tf32 in its convolution template), and in torch 2.14.1 they raise once the
    per-backend attributes are assigned directly: after torch.backends.cuda.matmul.fp32_precision = "tf32",
    torch.get_float32_matmul_precision() raises; after torch.backends.cudnn.conv.fp32_precision = "ieee",
    torch.backends.cudnn.allow_tf32 does.
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def benchmark(case: ModelCase, args: argparse.Namespace, device: torch.device) -> None:
    # Every model compiles as if it ran alone. Dynamo's caches and its record of which input sizes changed
    # outlive a model: without this reset, the 32 px models that follow the 224 px ones were recompiled with
    # symbolic batch and image sizes (other code than a training run gets), and an H100 run over all models
    # failed inside torch.compile at the fifth (issue 13). The previous model's steps are not called again.
    torch.compiler.reset()
    batch_size = args.batch_size or case.batch_size
    flops = model_flops_per_step(case, batch_size)
    steps = {variant: make_train_step(case, parse_variant(variant), batch_size, device) for variant in args.variants}
    timings = time_variants(steps, args, device)
    baseline = timings[args.variants[0]]
    for variant, timing in timings.items():
        if timing.error:
            print(f"| {case.name} | {case.image_size} | {batch_size} | {variant} | failed: {timing.error} "
                  "| | | | | |", flush=True)
            continue
        step_seconds = timing.best_seconds / args.steps
        mfu = "-" if args.peak_tflops is None else f"{100 * flops / step_seconds / (args.peak_tflops * 1e12):.1f}"
        memory = "-" if timing.peak_memory_gib is None else f"{timing.peak_memory_gib:.1f}"
        speedup = "-" if baseline.error else f"{baseline.best_seconds / timing.best_seconds:.2f}"
        print(f"| {case.name} | {case.image_size} | {batch_size} | {variant} | {batch_size / step_seconds:.0f} "
              f"| {speedup} | {1e3 * step_seconds:.1f} | {mfu} | {timing.warmup_seconds:.1f} | {memory} |",
              flush=True)


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
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='JSON of extra timm.create_model keywords for every model, e.g. \'{"depth": 1}\'')
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, type=str,
                        help=f"features from {FEATURES} joined by '+', or fp32")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="one batch for every model (default: 256 at 224 px, 1024 at 32 px)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant; the best one counts")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"the device's dense bf16 peak for MFU (default on cuda: H100 SXM, "
                             f"{H100_SXM_DENSE_BF16_TFLOPS}; on cpu: no MFU)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu times the same variants where there is no GPU (MFU only with --peak-tflops)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA: fp32 matmuls and convolutions in TF32 (the fp32 parts of every variant); "
                             "--no-tf32 keeps them in IEEE fp32")
    parser.add_argument("--dry-run", action="store_true", help="no GPU needed: FLOP counts and a CPU fp32 step")
    args = parser.parse_args()
    for variant in args.variants:
        try:
            parse_variant(variant)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    cases = [replace(MODEL_CASES[name], model_kwargs=args.model_kwargs) for name in args.models]

    if args.dry_run:
        dry_run(cases, args)
        return
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu.py needs a CUDA GPU and torch.cuda.is_available() is False here; run it with --dry-run "
                     "to check model building and FLOP counting on CPU, or --device cpu to time the variants on CPU")
        if args.peak_tflops is None:
            args.peak_tflops = H100_SXM_DENSE_BF16_TFLOPS
        set_tf32(args.tf32)
        flash = torch.backends.cuda.is_flash_attention_available()
        device_name = (f"{torch.cuda.get_device_name()}, flash available {flash}, fp32 matmuls in "
                       f"{torch.backends.cuda.matmul.fp32_precision}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}")
    else:
        device_name = f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, timm {timm.__version__}, {device_name}, peak {args.peak_tflops} TFLOPS, "
          f"{args.steps} steps x best of {args.rounds} rounds after {args.warmup} warm-up steps; "
          f"speed-up is against {args.variants[0]}\n")
    print("| model | image | batch | variant | img/s | speed-up | ms/step | MFU % | warm-up s | peak GiB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        benchmark(case, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
