"""Throughput cost of the Ray Train path, and how it scales with the number of workers.

Two measurements on the same model, shards, global batch, loss and optimizer:
  1. overhead: train_model (TorchTrainer, --compare-workers DDP workers x 1 torch thread, 1 CPU each) against the
     same training loop in one process without Ray (tasks.training.train_loop with a LocalContext) and as many torch
     threads, as the ratio ray/plain (goal >= 0.95);
  2. scaling: train_model with each of --workers (1 thread each), efficiency = rate(N) / (N * rate(1)).

Steady state only: every run trains --epochs epochs (default 2) and the last epoch counts, so Ray and worker
start-up, first-touch allocation and the first pass over the shards are left out. An epoch's images/s is the
loader and the training steps together (train_worker's epoch_seconds); evaluation and checkpoints between
epochs are not in it. The global batch stays fixed, so each of N workers gets global/N images per step.

    python benchmarks/train_overhead.py --data-root /work/shared/data/cifar10-subset
    python benchmarks/train_overhead.py --model vit_small_patch4_32 --model-kwargs '{"depth": 4}' --workers 1,2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import ray
import torch

from tasks.config import PipelineConfig, build_config
from tasks.data.shard import ShardOptions, shard_dataset
from tasks.training.train import train_model
from tasks.training.train_loop import TrainingJob, run_training
from tasks.training.worker_context import LocalContext

VAL_SIZE = 500
SHARD_SIZE = 1000  # 5 train shards for the 5k-image subset, so up to 4 ranks each read whole shards
RAY_CPUS = 4  # logical CPUs Ray may hand out: room for the largest default scaling run on this 2-core machine
CPUS_PER_WORKER = 1
SEED = 0
# Loader work in the training process, as in both candidates alike: DataLoader worker processes would add
# cores that the 1-CPU-per-worker budget does not count, and blur what the comparison is about.
LOADER_WORKERS = 0


def benchmark_config(args: argparse.Namespace, num_workers: int, output_dir: Path, run_name: str) -> PipelineConfig:
    """The pipeline config both candidates read: one model, tracking off, `num_workers` Ray workers."""
    return build_config({
        "data": {"loader_workers": LOADER_WORKERS},
        "model": {"baseline": {"name": args.model, "model_kwargs": args.model_kwargs}, "transformers": []},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size // num_workers, "seed": SEED,
                     "bf16": args.bf16},
        "scaling": {"num_workers": num_workers, "cpus_per_worker": CPUS_PER_WORKER},
        "tracking": {"mode": "disabled", "output_dir": str(output_dir), "run_name": run_name},
    })


def ray_images_per_second(args: argparse.Namespace, shards: str, num_workers: int, output_dir: Path,
                          run_name: str) -> float:
    # A fresh run name per call: the same one would resume the previous run's checkpoint instead of training.
    config = benchmark_config(args, num_workers, output_dir, run_name)
    outcome = train_model(config, args.model, shard_location=shards)
    return outcome.history[-1]["images_per_s"]


def plain_images_per_second(args: argparse.Namespace, shards: str, output_dir: Path) -> float:
    """The same training loop in one process without Ray (LocalContext), `compare_workers` torch threads."""
    config = benchmark_config(args, 1, output_dir, "plain")
    config.scaling.cpus_per_worker = args.compare_workers * CPUS_PER_WORKER  # the loop's torch threads
    history = run_training(LocalContext("cpu"), TrainingJob(config=config, model_name=args.model,
                                                            shard_location=shards))
    return history[-1]["images_per_s"]


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def measure(args: argparse.Namespace, shards: str, work: Path) -> tuple[list[float], dict[int, list[float]]]:
    """Alternates the candidates round by round so a slow spell of the machine hits both alike. The plain loop
    runs while Ray is down, so Ray's idle daemons are charged to Ray alone."""
    ray_counts = sorted({args.compare_workers, *args.workers})
    plain_rates, ray_rates = [], {count: [] for count in ray_counts}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}: plain loop (load average {load_average()})", flush=True)
        plain_rates.append(plain_images_per_second(args, shards, work))
        print(f"  plain loop: {plain_rates[-1]:.1f} images/s", flush=True)
        # address="local": a fresh cluster of our own, never one that `ray start` or a test left running here.
        ray.init(address="local", num_cpus=RAY_CPUS)
        try:
            for count in ray_counts:
                print(f"round {round_index + 1}: Ray Train, {count} workers (load average {load_average()})",
                      flush=True)
                run_name = f"ray-w{count}-r{round_index}"
                ray_rates[count].append(ray_images_per_second(args, shards, count, work, run_name))
                print(f"  Ray Train, {count} workers: {ray_rates[count][-1]:.1f} images/s", flush=True)
        finally:
            ray.shutdown()
    return plain_rates, ray_rates


def print_overhead(args: argparse.Namespace, plain_rates: list[float], ray_rates: dict[int, list[float]]) -> None:
    plain, ray_rate = max(plain_rates), max(ray_rates[args.compare_workers])
    threads = args.compare_workers * CPUS_PER_WORKER
    print(f"\n| path | images/s (best of {args.rounds}) | all rounds |")
    print("|---|---:|---|")
    print(f"| plain loop, 1 process x {threads} threads | {plain:.1f} | "
          f"{', '.join(f'{rate:.1f}' for rate in plain_rates)} |")
    print(f"| Ray Train, {args.compare_workers} workers x 1 thread | {ray_rate:.1f} | "
          f"{', '.join(f'{rate:.1f}' for rate in ray_rates[args.compare_workers])} |")
    print(f"\nray/plain: {ray_rate / plain:.3f} (goal >= 0.95)")


def print_scaling(args: argparse.Namespace, ray_rates: dict[int, list[float]]) -> None:
    if 1 not in ray_rates:
        print("\nscaling efficiency needs a 1-worker run; add 1 to --workers")
        return
    single = max(ray_rates[1])
    print("\n| Ray workers (1 thread each) | per-worker batch | images/s | speed-up | efficiency |")
    print("|---:|---:|---:|---:|---:|")
    for count in args.workers:
        rate = max(ray_rates[count])
        print(f"| {count} | {args.batch_size // count} | {rate:.1f} | {rate / single:.2f} "
              f"| {rate / (count * single):.2f} |")


def worker_counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=os.environ.get("DATA_ROOT"),
                        help="directory holding cifar-10-batches-py/ (default $DATA_ROOT)")
    parser.add_argument("--model", default="vit_tiny_patch4_32")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='JSON of extra timm.create_model keywords, e.g. \'{"depth": 4}\'')
    parser.add_argument("--batch-size", type=int, default=128, help="global batch; each Ray worker gets batch/N")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; only the last one is counted")
    parser.add_argument("--compare-workers", type=int, default=2,
                        help="Ray workers against a plain loop with as many threads")
    parser.add_argument("--workers", type=worker_counts, default=[1, 2, 4], help="Ray worker counts for scaling")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best of each counts")
    parser.add_argument("--out-dir", type=Path, default=None, help="parent of the temporary shard and run directory")
    parser.add_argument("--bf16", action="store_true", help="training.bf16: bf16 autocast in both candidates")
    args = parser.parse_args()
    if args.data_root is None:
        parser.error("--data-root or $DATA_ROOT is required")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is the warm-up")

    print(f"torch {torch.__version__}, ray {ray.__version__}, cpus {os.cpu_count()}, model {args.model} "
          f"{json.dumps(args.model_kwargs)}, global batch {args.batch_size}, epochs {args.epochs} (last counts), "
          f"loader_workers {LOADER_WORKERS}, bf16 {args.bf16}")
    with tempfile.TemporaryDirectory(prefix="train-overhead-", dir=args.out_dir) as work:
        shards = str(Path(work) / "shards")
        # One shard process: spawned ones would re-import this script (torch, ray) for an untimed step.
        options = ShardOptions(shard_size=SHARD_SIZE, val_size=VAL_SIZE, workers=1)
        shard_dataset("cifar10", args.data_root, shards, options, progress=False)
        plain_rates, ray_rates = measure(args, shards, Path(work))
    print(f"\nload average after the runs: {load_average()}")
    print_overhead(args, plain_rates, ray_rates)
    print_scaling(args, ray_rates)


if __name__ == "__main__":
    main()
