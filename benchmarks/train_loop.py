"""How close the real training loop runs to the speed of its own step: loop/step (goal >= 0.9 on CPU, >= 0.8 on GPUs).

Two measurements of one model, in one process, with the recipe's settings (--config: precision, compile,
channels-last, augmentation, Mixup/CutMix, EMA, loader processes):
  1. loop: tasks.training.train_loop.run_training in an in-process LocalContext on real shards of --data-root, as a Ray
     worker runs it (the loader, augmentation, device transfer, mixing, bookkeeping); the last epoch counts, so
     compilation and loader start-up stay out;
  2. step: the loop's own forward_backward + optimizer_step on synthetic data already on the device, same
     model, batch, precision and compile settings, after a warm-up.

    python benchmarks/train_loop.py --device cpu --data-root /work/shared/data/cifar10-subset \\
        --model vit_tiny_patch4_32 --model-kwargs '{"depth": 2}' --batch-size 64
    python benchmarks/train_loop.py --device cuda --data-root DIR --model vit_small_patch4_32 --batch-size 256

Distillation is switched off (a teacher would be a second model in both alike); everything else is the recipe's.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from tasks.config import PipelineConfig, load_config
from tasks.data.shard import ShardOptions, shard_dataset
from tasks.training.train_loop import TrainingJob, build_mixer, forward_backward, optimizer_step, run_training, setup
from tasks.training.worker_context import LocalContext

from harness import sync

SHARD_SIZE = 1000
VAL_SIZE = 500
WARMUP_STEPS = 5


def benchmark_config(args: argparse.Namespace, work: Path) -> PipelineConfig:
    """The recipe of --config for one model on one device: its spec (if the recipe names the model) with
    --model-kwargs, --batch-size per worker, tracking off, no teacher."""
    recipe = load_config(args.config)
    tree = recipe.model_dump(mode="json")
    named = {spec["name"]: spec for spec in [tree["model"]["baseline"], *tree["model"]["transformers"]]}
    spec = dict(named.get(args.model, {"name": args.model}))
    spec.update(distillation="none", teacher=None, teacher_file=None,
                model_kwargs={**spec.get("model_kwargs", {}), **args.model_kwargs})
    tree["model"] = {"baseline": spec, "transformers": []}
    tree["training"] |= {"epochs": args.epochs, "batch_size": args.batch_size}
    if args.loader_workers is not None:
        tree["data"]["loader_workers"] = args.loader_workers
    if args.device == "cpu":
        # On CPU the step's torch threads are the machine's cores; the recipe's count is for GPU workers.
        tree["scaling"]["cpus_per_worker"] = len(os.sched_getaffinity(0))
    tree["data"] |= {"data_root": str(args.data_root), "shard_dir": str(work / "shards")}
    tree["tracking"] |= {"mode": "disabled", "output_dir": str(work / "runs"), "run_name": "train-loop"}
    return PipelineConfig.model_validate(tree)


def loop_images_per_second(config: PipelineConfig, args: argparse.Namespace) -> tuple[float, list[dict]]:
    job = TrainingJob(config=config, model_name=args.model, shard_location=config.shard_location)
    history = run_training(LocalContext(args.device), job)
    return history[-1]["images_per_s"], history


def step_images_per_second(config: PipelineConfig, args: argparse.Namespace) -> float:
    """The loop's step alone: synthetic images and targets already on the device."""
    device = torch.device(args.device)
    loop = setup(LocalContext(device), TrainingJob(config=config, model_name=args.model,
                                                      shard_location=config.shard_location))
    images, _, _ = next(iter(loop.train_stream))
    shape = (args.batch_size, *images.shape[1:])
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = loop.normalizer(torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator))
    labels = torch.randint(0, loop.num_classes, (args.batch_size,), device=device, generator=generator)
    targets = labels
    if (mixer := build_mixer(config, loop.num_classes, seed=0)) is not None:
        inputs, targets = mixer(inputs, labels)
    loop.step_model.train()
    for step in range(WARMUP_STEPS + args.steps):
        if step == WARMUP_STEPS:
            sync(device)
            started = time.perf_counter()
        forward_backward(loop, inputs, targets, group_size=1, sync_gradients=True)
        optimizer_step(loop)
    sync(device)
    return args.batch_size * args.steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data-root", type=Path, default=os.environ.get("DATA_ROOT"),
                        help="directory holding cifar-10-batches-py/ (default $DATA_ROOT)")
    parser.add_argument("--config", type=Path, default=Path("configs/cifar10.yaml"), help="the recipe")
    parser.add_argument("--model", default="vit_tiny_patch4_32")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='JSON of extra timm.create_model keywords, e.g. \'{"depth": 2}\'')
    parser.add_argument("--batch-size", type=int, default=256, help="per worker, as training.batch_size")
    parser.add_argument("--epochs", type=int, default=2, help="loop epochs; the last one counts")
    parser.add_argument("--steps", type=int, default=30, help="timed bare steps")
    parser.add_argument("--loader-workers", type=int, default=None, help="override data.loader_workers")
    args = parser.parse_args()
    if args.data_root is None:
        parser.error("--data-root or $DATA_ROOT is required")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is the warm-up")

    with tempfile.TemporaryDirectory(prefix="train-loop-") as work:
        config = benchmark_config(args, Path(work))
        shard_dataset("cifar10", args.data_root, config.shard_location,
                      ShardOptions(shard_size=SHARD_SIZE, val_size=VAL_SIZE, workers=1), progress=False)
        training = config.training
        print(f"torch {torch.__version__}, device {args.device}"
              f"{f' ({torch.cuda.get_device_name()})' if args.device == 'cuda' else ''}, cpus {os.cpu_count()}, "
              f"model {args.model} {json.dumps(args.model_kwargs)}, batch {args.batch_size}, bf16 {training.bf16}, "
              f"compile {training.compile}, loader_workers {config.data.loader_workers}, "
              f"augment {config.data.augment.auto_augment}, ema {training.ema_decay}")
        loop, history = loop_images_per_second(config, args)
        step = step_images_per_second(config, args)
    print("\n| what | images/s |")
    print("|---|---:|")
    for epoch in history:
        print(f"| loop, epoch {epoch['epoch']} | {epoch['images_per_s']:.0f} |")
    print(f"| step alone, synthetic on-device data | {step:.0f} |")
    print(f"\nloop/step = {loop / step:.3f}")


if __name__ == "__main__":
    main()
