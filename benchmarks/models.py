"""Throughput of our CIFAR models against timm's implementation of the same architecture.

For every model: images/s of a training step (forward, backward, AdamW step) and of inference, ours and
timm's with the same weights, batch and threads, as a ratio ours/timm; plus parameters and forward GFLOPs
per image (torch.utils.flop_counter). timm's twin is built from timm's own classes and must load our
state_dict strictly, which also proves it is the same architecture.

    python benchmarks/models.py --batch-size 32 --steps 5 --threads 2
"""
import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import timm
import torch
from torch import nn

import vitmodels  # noqa: F401  (registers our presets with timm)
from tasks.judging.evaluate import count_gflops

from harness import classification_loss, sync

CIFAR_IMAGE_SHAPE = (3, 32, 32)

CIFAR_MODELS = [
    "vit_tiny_patch4_32", "vit_small_patch4_32", "deit_tiny_distilled_patch4_32",
    "deit_small_distilled_patch4_32", "swin_tiny_patch2_window4_32", "resnet18_cifar", "resnet50_cifar",
]


def timm_resnet_with_cifar_stem(name: str) -> nn.Module:
    model = timm.create_model(name, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def timm_deit(name: str, **kwargs) -> nn.Module:
    model = timm.create_model(name, **kwargs)
    model.set_distilled_training(True)  # return both heads in training, like ours
    return model


# timm's implementation of each of our architectures; hyper-parameters come from our model
TIMM_TWINS: dict[str, Callable[[], nn.Module]] = {
    "vit_tiny_patch4_32": lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10),
    "vit_small_patch4_32": lambda: timm.create_model(
        "vit_small_patch16_224", img_size=32, patch_size=4, num_classes=10),
    "deit_tiny_distilled_patch4_32": lambda: timm_deit(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, num_classes=10),
    "deit_small_distilled_patch4_32": lambda: timm_deit(
        "deit_small_distilled_patch16_224", img_size=32, patch_size=4, num_classes=10),
    "swin_tiny_patch2_window4_32": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, depths=(2, 6, 4),
        num_heads=(3, 6, 12), num_classes=10),
    "resnet18_cifar": lambda: timm_resnet_with_cifar_stem("resnet18"),
    "resnet50_cifar": lambda: timm_resnet_with_cifar_stem("resnet50"),
}


def make_train_step(model: nn.Module, images, labels, autocast) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with autocast():
            loss = classification_loss(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def make_infer_step(model: nn.Module, images, autocast) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast():
            model(images)
    return step


def images_per_second(steps: dict[str, Callable[[], None]], batch_size: int, warmup: int, iters: int,
                      rounds: int, device: torch.device) -> dict[str, float]:
    """Alternates the candidates round by round so a slow spell of the machine hits both alike; keeps the
    best round of each (the least disturbed)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                step()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch_size * iters / seconds for name, seconds in best.items()}


def benchmark(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    ours = timm.create_model(name).to(device)
    reference = TIMM_TWINS[name]().to(device)
    reference.load_state_dict(ours.state_dict(), strict=True)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    gflops = count_gflops(ours.eval(), CIFAR_IMAGE_SHAPE)

    models = {"ours": ours, "timm": reference}
    if args.compile:
        models = {key: torch.compile(model) for key, model in models.items()}
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)

    timing = dict(batch_size=args.batch_size, warmup=args.warmup, iters=args.steps, rounds=args.rounds,
                  device=device)
    for model in models.values():
        model.train()
    train = images_per_second(
        {key: make_train_step(model, images, labels, autocast) for key, model in models.items()}, **timing)
    for model in models.values():
        model.eval()
    infer = images_per_second(
        {key: make_infer_step(model, images, autocast) for key, model in models.items()}, **timing)
    return dict(params=params, gflops=gflops, train_ours=train["ours"], train_timm=train["timm"],
                infer_ours=infer["ours"], infer_timm=infer["timm"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed iterations per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per model; the best one counts")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--models", nargs="+", default=CIFAR_MODELS, choices=CIFAR_MODELS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, timm {timm.__version__}, device {device}, threads {args.threads}, "
          f"batch {args.batch_size}, bf16 {args.bf16}, compile {args.compile}\n")
    print("| model | params (M) | GFLOPs/img | train img/s ours | timm | ours/timm "
          "| infer img/s ours | timm | ours/timm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for name in args.models:
        r = benchmark(name, args, device)
        ratios += [r["train_ours"] / r["train_timm"], r["infer_ours"] / r["infer_timm"]]
        print(f"| {name} | {r['params']:.2f} | {r['gflops']:.3f} "
              f"| {r['train_ours']:.1f} | {r['train_timm']:.1f} | {ratios[-2]:.2f} "
              f"| {r['infer_ours']:.1f} | {r['infer_timm']:.1f} | {ratios[-1]:.2f} |", flush=True)
    print(f"\ngeometric mean ours/timm: {statistics.geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    main()
