"""A model served over HTTP by `vit-pipeline serve` (Ray Serve, @serve.batch) against the same model called in a
plain loop, the ceiling: requests/s and latency at several concurrencies.

The plain loop does per image what a replica does (decode a PNG, the evaluation transform, the model, top-k) on
batches of --max-batch-size, in this process with the replica's torch threads; the served model answers
--requests POSTs of the same PNGs from `concurrency` client threads, each on one kept-alive connection, so the
server never holds more than `concurrency` requests. Each concurrency runs --rounds rounds of the plain loop then
the served model, so that both see about the same load from the rest of the machine; medians are reported.
Last, the same architecture cut to next to nothing (--floor-model-kwargs, depth 0 for a ViT) is served at the
highest concurrency: what Serve's own request path can carry, and from it the most a replica that handles requests
and runs the model one after the other can reach. Random weights: speed does not depend on them.

    python benchmarks/serve.py                               # ViT-Tiny/4 at concurrency 1, 8 and 32
    python benchmarks/serve.py --python-proxy                # the same behind Serve's Python proxy
    python benchmarks/serve.py --requests 64 --concurrency 1 4 --model-kwargs '{"depth": 1}'   # a quick look
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import ray
import torch
from PIL import Image
from safetensors.torch import save_file

import vitmodels
from tasks.config import ServingConfig
from tasks.inference.model_ref import eval_transform, load_model, read_model_dir
from tasks.inference.serve import (
    PREDICT_PATH,
    RejectedImage,
    classify_bodies,
    recorded_batch_sizes,
    start_serving,
)
from vitmodels import CIFAR10_MEAN, CIFAR10_STD

NUM_CLASSES = 10
DISTINCT_IMAGES = 64


def write_model(directory: Path, architecture: str, model_kwargs: dict) -> Path:
    """A random-weight model directory as training exports one (weights and config.json)."""
    torch.manual_seed(0)
    model = vitmodels.create_model(architecture, num_classes=NUM_CLASSES, **model_kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              str(directory / "best.safetensors"))
    side = model_kwargs.get("img_size", 32)
    config = {"architecture": architecture, "num_classes": NUM_CLASSES, "model_args": model_kwargs,
              "pretrained_cfg": {"input_size": [3, side, side], "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD),
                                 "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                                 "num_classes": NUM_CLASSES, "label_names": [f"class{i}" for i in range(NUM_CLASSES)]}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def png_bodies(count: int, side: int) -> list[bytes]:
    """Random-noise PNGs: the request bodies (noise compresses least, so these are the larger bodies)."""
    generator = np.random.default_rng(0)
    bodies = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
        bodies.append(buffer.getvalue())
    return bodies


def plain_loop(directory: Path, bodies: list[bytes], images: int, batch_size: int, threads: int) -> float:
    """images/s of classify_bodies on batches, no HTTP and no Ray (the best the served model could do)."""
    torch.set_num_threads(threads)  # the replica's
    description = read_model_dir(directory, str(directory))
    model, transform, cpu = load_model(description), eval_transform(description), torch.device("cpu")
    batches = [[bodies[(start + i) % len(bodies)] for i in range(batch_size)] for start in range(0, images, batch_size)]
    classify_bodies(model, transform, batches[0], description.labels, 5, cpu)  # warm-up
    start = time.perf_counter()
    for batch in batches:
        results = classify_bodies(model, transform, batch, description.labels, 5, cpu)
        assert not any(isinstance(result, RejectedImage) for result in results)
    return len(batches) * batch_size / (time.perf_counter() - start)


def load(port: int, bodies: list[bytes], requests: int, concurrency: int) -> tuple[float, list[float]]:
    """POST `requests` bodies from `concurrency` threads; the wall time and each request's latency (s)."""
    latencies: list[float] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            sent = time.perf_counter()
            connection.request("POST", PREDICT_PATH, body=bodies[index % len(bodies)],
                               headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            answer = response.read()
            assert response.status == 200, answer
            with lock:
                latencies.append(time.perf_counter() - sent)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@contextlib.contextmanager
def served(directory: Path, serving: ServingConfig, cpus: int) -> Iterator[None]:
    """`directory`'s model served on a local Ray of its own, which ends with the block (and Serve at once with it,
    where deleting the application would wait out the replica's drain)."""
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        start_serving(read_model_dir(directory, str(directory)), serving)
        yield
    finally:
        ray.shutdown()


class Row(NamedTuple):
    concurrency: int
    requests: int
    served_rate: float
    plain_rate: float
    p50_ms: float
    p99_ms: float
    mean_batch: float


def measure(directory: Path, bodies: list[bytes], port: int, concurrency: int, args: argparse.Namespace) -> Row:
    """Rounds of the plain loop then the served model (already serving `directory` on `port`); medians."""
    load(port, bodies, 2 * concurrency, concurrency)  # warm-up: connections, the first batches
    plain, served, latencies, sizes = [], [], [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(directory, bodies, args.requests, args.max_batch_size, args.cpus))
        seen = len(recorded_batch_sizes())
        wall, round_latencies = load(port, bodies, args.requests, concurrency)
        served.append(len(round_latencies) / wall)
        latencies += round_latencies
        sizes += recorded_batch_sizes()[seen:]
    print(f"concurrency {concurrency}: served {served} requests/s, plain loop {plain} images/s", flush=True)
    return Row(concurrency, len(latencies), statistics.median(served), statistics.median(plain),
               1000 * statistics.median(latencies), 1000 * percentile(latencies, 0.99), statistics.mean(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="vit_tiny_patch4_32")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="create_model keywords, as JSON")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=320, help="requests (and plain-loop images) per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per concurrency, each the plain loop then the served model: the machine's "
                             "other load changes less between the two than over the whole run; medians reported")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--cpus", type=int, default=1,
                        help="torch threads of the plain loop and of the replica (its Ray CPUs)")
    parser.add_argument("--python-proxy", action="store_true",
                        help="Serve's Python proxy actor takes the requests instead of HAProxy "
                             "(serving.haproxy=false)")
    parser.add_argument("--floor-model-kwargs", type=json.loads, default={"depth": 0},
                        help="create_model keywords (JSON, over --model-kwargs) of a model that costs next to "
                             "nothing, served at the highest concurrency to measure Serve's own request path; "
                             "null skips it")
    args = parser.parse_args()

    rows, floor = [], None
    with tempfile.TemporaryDirectory() as work:
        directory = write_model(Path(work) / "model", args.architecture, args.model_kwargs)
        bodies = png_bodies(DISTINCT_IMAGES, args.model_kwargs.get("img_size", 32))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        serving = ServingConfig(port=port, max_batch_size=args.max_batch_size,
                                batch_wait_timeout_s=args.batch_wait_ms / 1000, cpus_per_replica=args.cpus,
                                haproxy=not args.python_proxy)
        with served(directory, serving, args.cpus):
            rows = [measure(directory, bodies, port, concurrency, args) for concurrency in args.concurrency]
        if args.floor_model_kwargs is not None:
            floor_directory = write_model(Path(work) / "floor", args.architecture,
                                          {**args.model_kwargs, **args.floor_model_kwargs})
            with served(floor_directory, serving, args.cpus):
                floor = measure(floor_directory, bodies, port, max(args.concurrency), args)

    ingress = "Serve's Python proxy" if args.python_proxy else "HAProxy"
    print(f"\n{args.architecture} {args.model_kwargs or ''} served by Ray Serve behind {ingress} (batches of up to "
          f"{args.max_batch_size}, {args.batch_wait_ms:g} ms wait) against a plain loop on batches of "
          f"{args.max_batch_size}; {args.cpus} torch thread(s) in each; medians of {args.rounds} rounds\n")
    print("| concurrency | requests | served requests/s | plain loop images/s | served / plain | p50 ms | p99 ms "
          "| mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.concurrency} | {row.requests} | {row.served_rate:.1f} | {row.plain_rate:.1f} "
              f"| {row.served_rate / row.plain_rate:.2f} | {row.p50_ms:.1f} | {row.p99_ms:.1f} "
              f"| {row.mean_batch:.1f} |")
    if floor is not None:
        # A replica that handles a request and then runs the model, one after the other, spends about 1/floor +
        # 1/plain seconds per request: floor / (floor + plain) of the plain loop. (Part of the floor's cost is the
        # proxy's, on another core, so this is an estimate rather than a bound.)
        top = max(rows, key=lambda row: row.concurrency)
        estimate = floor.served_rate / (floor.served_rate + top.plain_rate)
        print(f"\nServe's own request path ({args.floor_model_kwargs} over the model, concurrency "
              f"{floor.concurrency}): {floor.served_rate:.1f} requests/s, mean batch {floor.mean_batch:.1f}. "
              f"Request handling and the model one after the other would give ~{estimate:.2f} of the plain loop "
              f"({top.plain_rate:.1f} images/s) at concurrency {top.concurrency}; measured "
              f"{top.served_rate / top.plain_rate:.2f}.")
    print(f"\nload average (1, 5, 15 min) at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
