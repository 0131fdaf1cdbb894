"""A trained model behind HTTP on Ray Serve, asked over real HTTP on localhost: the flow's serve step in this process,
and `vit-pipeline serve` as a user starts and stops it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from tasks.config import ConfigError, ServingConfig
from tasks.inference.model_ref import eval_transform, load_model, resolve_model_ref
from tasks.inference.serve import require_free_port
from tests.conftest import REPO_ROOT
from tests.support import inference
from tests.support.inference import TINY_VIT, model_dir, png_test_images, trained_run
from tests.support.ports import unused_port

mini_shards = inference.mini_shards  # a fixture: small real CIFAR-10 shards
pytestmark = pytest.mark.slow  # Ray and Serve take 20-30 s to start here
TOP_K = 3
MAX_BODY_BYTES = 20_000  # a 32 px PNG is ~3 KB
CONCURRENT_REQUESTS = 24


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def local_top_k(model_path: Path, images: list[Path]) -> list[list[str]]:
    """The model's own top-k labels for the images, computed here without Serve."""
    description = resolve_model_ref(str(model_path))
    model, transform = load_model(description), eval_transform(description)
    from PIL import Image

    with torch.inference_mode():
        logits = model(torch.stack([transform(Image.open(path)) for path in images]))
    return [[description.labels[i] for i in row] for row in logits.topk(TOP_K, dim=1).indices.tolist()]


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, mini_shards):
    """A trained-looking run: a tiny ViT's weights and config.json in models/<name>/."""
    return trained_run(tmp_path_factory.mktemp("served"), mini_shards)


def serve_command(run_config, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "serve", "--model", str(model_dir(run_config, TINY_VIT["name"])),
            "--port", str(port), "--set", "scaling.ray_num_cpus=2", *extra]


@contextlib.contextmanager
def serving_command(command: list[str], url: str, env: dict[str, str], stop: signal.Signals) -> Iterator[list[str]]:
    """`vit-pipeline serve` running until it says it serves at `url`; then `stop` (SIGINT: Ctrl-C), and it must exit
    0 having said "stopping Serve". Yields its output lines so far."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RAY_ADDRESS": "", **env})
    lines: list[str] = []
    serving = threading.Event()

    def read_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if f"at {url}/predict" in line:
                serving.set()

    reader = threading.Thread(target=read_output)
    reader.start()
    try:
        assert serving.wait(timeout=180), "".join(lines)
        yield lines
    finally:
        process.send_signal(stop)
        process.wait(timeout=120)
        reader.join()
    output = "".join(lines)
    assert process.returncode == 0, output
    assert "stopping Serve" in output and "Traceback" not in output


def test_the_serve_command_serves_until_terminated_then_shuts_down(run_config):
    port = unused_port()
    url = f"http://127.0.0.1:{port}"
    with serving_command(serve_command(run_config, port), url, {}, signal.SIGTERM):
        assert get(url, "/health")[0] == 200
    # HAProxy is gone, so that serving again on the port would start: Ray's processes end a few seconds after the
    # command (more on a loaded machine). (A bind without SO_REUSEADDR would wait out the closed connections'
    # TIME_WAIT instead, a minute.)
    deadline = time.monotonic() + 60
    while True:
        try:
            require_free_port("127.0.0.1", port)
            break
        except ConfigError:
            assert time.monotonic() < deadline, f"port {port} still taken 60 s after the command ended"
        time.sleep(0.5)


def test_without_haproxy_serve_refuses_naming_serving_haproxy_and_serves_with_the_python_proxy(
        run_config, mini_shards, tmp_path):
    missing = tmp_path / "no-haproxy" / "haproxy"
    without_haproxy = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(missing)}  # as on a machine without it (macOS)
    port = unused_port()
    url = f"http://127.0.0.1:{port}"
    refused = subprocess.run(serve_command(run_config, port), cwd=REPO_ROOT, capture_output=True, text=True,
                             env={**os.environ, "RAY_ADDRESS": "", **without_haproxy}, timeout=180)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "serving.haproxy" in refused.stderr and str(missing) in refused.stderr
    assert "Traceback" not in refused.stderr
    images, _, _ = png_test_images(mini_shards, tmp_path / "images", 1)
    with serving_command(serve_command(run_config, port, "--set", "serving.haproxy=false"), url, without_haproxy,
                         signal.SIGINT):
        status, body = post(url, images[0].read_bytes())
        assert status == 200, body
    expected = local_top_k(model_dir(run_config, TINY_VIT["name"]), images)[0]
    assert [p["label"] for p in body["predictions"]][:TOP_K] == expected


@pytest.fixture(scope="module")
def server(tmp_path_factory, run_config, mini_shards):
    """The flow's serve step (serve_trained_model) on a local Ray, the run's tiny ViT; its URL and real CIFAR-10
    test images with the labels the model itself gives them."""
    from ray import serve

    from tasks.inference.serve import APP_NAME, serve_trained_model, stop_serving

    serving = ServingConfig(port=unused_port(), top_k=TOP_K, max_body_bytes=MAX_BODY_BYTES, batch_wait_timeout_s=0.05)
    config = run_config.model_copy(update={"serving": serving})
    images, _, _ = png_test_images(mini_shards, tmp_path_factory.mktemp("images"), 8)
    expected = local_top_k(model_dir(config, TINY_VIT["name"]), images)
    with pytest.MonkeyPatch.context() as environment:  # Ray's processes take the environment it starts with
        # Behind HAProxy a replica being taken down stays 30 s for load balancers to let it go; none here.
        environment.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
        ray.init(address="local", num_cpus=4)  # "local": never join a Ray cluster someone else runs here
    try:
        url = serve_trained_model(config, TINY_VIT["name"])
        yield url, images, expected
        stop_serving()  # as `vit-pipeline serve` on a cluster does
        assert APP_NAME not in serve.status().applications
    finally:
        ray.shutdown()


def test_health_answers_once_the_model_is_loaded(server):
    url, _, _ = server
    status, body = get(url, "/health")
    assert status == 200 and body["status"] == "ok" and body["model"].endswith(TINY_VIT["name"])


def test_predict_gives_the_models_own_top_k_labels_for_real_test_images(server):
    url, images, expected = server
    for path, labels in zip(images, expected, strict=True):
        status, body = post(url, path.read_bytes())
        assert status == 200, body
        assert [p["label"] for p in body["predictions"]] == labels
        probabilities = [p["probability"] for p in body["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def test_a_malformed_or_oversized_body_gets_a_4xx_and_the_server_keeps_serving(server):
    url, images, expected = server
    status, body = post(url, b"this is not an image")
    assert status == 400 and "not an image" in body["error"]
    assert post(url, images[0].read_bytes())[0] == 200
    status, body = post(url, os.urandom(MAX_BODY_BYTES + 1))
    assert status == 413 and str(MAX_BODY_BYTES) in body["error"]
    status, body = post(url, images[1].read_bytes())
    assert status == 200 and [p["label"] for p in body["predictions"]] == expected[1]
    assert get(url, "/nothing-here")[0] == 404
    assert get(url, "/predict")[0] == 405


def test_concurrent_requests_are_batched_and_a_bad_one_fails_alone(server):
    from tasks.inference.serve import recorded_batch_sizes

    url, images, expected = server
    before = len(recorded_batch_sizes())
    bodies = [b"junk" if index % 6 == 5 else images[index % len(images)].read_bytes()
              for index in range(CONCURRENT_REQUESTS)]
    answers: list[tuple[int, dict] | None] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def ask(index: int) -> None:
        start.wait()
        answers[index] = post(url, bodies[index])

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, answer in enumerate(answers):
        assert answer is not None
        if bodies[index] == b"junk":
            assert answer[0] == 400
        else:
            assert answer[0] == 200 and [p["label"] for p in answer[1]["predictions"]] == expected[index % len(images)]
    sizes = recorded_batch_sizes()[before:]
    assert sum(sizes) == len(bodies) and max(sizes) > 1, sizes
