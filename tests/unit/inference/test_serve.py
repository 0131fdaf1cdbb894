"""The serving functions a replica runs on each batch, its options, and `vit-pipeline serve`'s refusals (no Ray here:
tests/e2e/test_serve.py serves over HTTP)."""

from __future__ import annotations

import io
import socket

import pytest
import torch
from PIL import Image

from tasks.config import ConfigError, ServingConfig, load_config
from tasks.inference.model_ref import eval_transform, load_model, resolve_model_ref
from tasks.inference.serve import (
    HTTP_BAD_REQUEST,
    RejectedImage,
    classify_bodies,
    decode_image,
    deployment_options,
    model_to_serve,
    require_free_port,
    require_haproxy,
    require_reachable_replicas,
    start_serving,
    top_k_predictions,
)
from tests.support.inference import TINY_VIT, model_dir, png_test_images, trained_run
from tests.support.ports import unused_port, unused_ports


@pytest.fixture(scope="module")
def served(tmp_path_factory, mini_shards):
    """A tiny ViT exported as training exports it, and real CIFAR-10 test images as PNG files."""
    tmp = tmp_path_factory.mktemp("serve")
    config = trained_run(tmp, mini_shards)
    description = resolve_model_ref(str(model_dir(config, TINY_VIT["name"])))
    paths, _, _ = png_test_images(mini_shards, tmp / "images", 4)
    return description, [path.read_bytes() for path in paths]


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_body_that_is_not_an_image_is_rejected_with_a_message():
    for body, words in ((b"", "empty"), (b"GIF89a not really", "not an image"), (_png((8, 8))[:40], "not an image")):
        rejected = decode_image(body)
        assert isinstance(rejected, RejectedImage) and rejected.status == HTTP_BAD_REQUEST
        assert words in rejected.message
    assert decode_image(_png((50, 20), "L")).size == (50, 20)


def test_top_k_is_the_likeliest_labels_best_first():
    probabilities = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    predictions = top_k_predictions(probabilities, ["cat", "dog", "frog"], 2)
    assert [[p["label"] for p in row] for row in predictions] == [["dog", "frog"], ["cat", "frog"]]
    assert predictions[0][0]["probability"] == pytest.approx(0.6)
    assert len(top_k_predictions(probabilities, ["cat", "dog", "frog"], 10)[0]) == 3  # k past the classes: all


def test_one_bad_body_in_a_batch_leaves_the_others_classified_as_alone(served):
    description, images = served
    model, transform = load_model(description), eval_transform(description)
    labels, cpu = description.labels, torch.device("cpu")
    alone = [classify_bodies(model, transform, [image], labels, 3, cpu)[0] for image in images]
    mixed = classify_bodies(model, transform, [images[0], b"junk", images[1], _png((64, 48), "L"), images[2]],
                            labels, 3, cpu)
    assert isinstance(mixed[1], RejectedImage) and mixed[1].status == HTTP_BAD_REQUEST
    for got, expected in zip([mixed[0], mixed[2], mixed[4]], alone[:3], strict=True):
        assert not isinstance(got, RejectedImage) and not isinstance(expected, RejectedImage)
        assert [p["label"] for p in got] == [p["label"] for p in expected]
        assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in expected], abs=1e-5)
    assert len(mixed[3]) == 3  # a grey image of another size: resized like any other
    assert all(label in labels for label in (p["label"] for p in mixed[0]))


def test_replicas_take_a_gpu_only_where_the_cluster_has_gpus():
    serving = ServingConfig(max_batch_size=16, replicas=2, cpus_per_replica=2)
    on_cpus = deployment_options(serving, cluster_gpus=0)
    assert on_cpus["ray_actor_options"] == {"num_cpus": 2}
    assert on_cpus["num_replicas"] == 2 and on_cpus["max_ongoing_requests"] >= 16  # a whole batch can gather
    assert deployment_options(serving, cluster_gpus=4)["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}


def test_the_flow_serves_the_named_model_else_the_best_on_validation():
    accuracies = {"resnet18_cifar": 0.5, "vit_tiny_patch4_32": 0.7, "swin_tiny_patch2_window4_32": 0.6}
    assert model_to_serve(load_config(None, []), accuracies) == "vit_tiny_patch4_32"
    chosen = load_config(None, ["serving.model=resnet18_cifar"])
    assert model_to_serve(chosen, accuracies) == "resnet18_cifar"
    with pytest.raises(ConfigError, match="serving.model: 'vit_base' is not a configured model"):
        load_config(None, ["serving.model=vit_base"])


def test_a_taken_port_is_refused_by_number():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            require_free_port("127.0.0.1", port)


def test_without_haproxys_binary_or_ports_serving_haproxy_is_refused_by_name(tmp_path, monkeypatch):
    from ray.serve._private import constants, haproxy

    stats_port, metrics_port = unused_ports(2)  # not Ray's 8404 and 9101: this machine's may be taken
    monkeypatch.setattr(constants, "RAY_SERVE_HAPROXY_STATS_PORT", stats_port)
    monkeypatch.setattr(constants, "RAY_SERVE_HAPROXY_METRICS_PORT", metrics_port)
    require_haproxy(ServingConfig())  # ray[serve] brings HAProxy on Linux
    require_haproxy(ServingConfig(haproxy=False))
    missing = tmp_path / "haproxy"
    monkeypatch.setattr(haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", str(missing))
    with pytest.raises(ConfigError, match=f"serving.haproxy: .*{missing}.*serving.haproxy=false"):
        require_haproxy(ServingConfig())
    require_haproxy(ServingConfig(haproxy=False))  # Serve's Python proxy needs none of it
    monkeypatch.setattr(haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", "")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        monkeypatch.setattr(constants, "RAY_SERVE_HAPROXY_METRICS_PORT", taken)
        with pytest.raises(ConfigError, match=f"serving.haproxy: cannot serve on 0.0.0.0:{taken}.*its metrics"):
            require_haproxy(ServingConfig())


def test_on_a_cluster_behind_haproxy_a_loopback_host_is_refused():
    for host in ("127.0.0.1", "localhost", "::1"):
        with pytest.raises(ConfigError, match=f"serving.host: {host} on a Ray cluster.*0.0.0.0"):
            require_reachable_replicas(ServingConfig(host=host))
        require_reachable_replicas(ServingConfig(host=host, haproxy=False))  # the proxy reaches replicas over Ray
    for host in ("0.0.0.0", "10.0.3.7", "head.internal"):
        require_reachable_replicas(ServingConfig(host=host))


def test_haproxy_failing_to_start_is_a_config_error_naming_its_alert(served, monkeypatch):
    """What a Ray cluster's HAProxy says when it cannot start reaches the user as serving.haproxy's error, and the
    controller left without an ingress is shut down."""
    from ray import serve
    from ray.exceptions import RayTaskError

    alert = "[ALERT]    (7) : Binding [haproxy.cfg:45] for frontend prometheus: cannot bind socket for [0.0.0.0:9101]"
    failure = RayTaskError("HAProxyManager.ready", "(a traceback)", RuntimeError(f"[NOTICE] (7) : version\n{alert}"))
    shutdowns = []

    def failing_start(**options: object) -> None:
        assert options["controller_options"] == {"runtime_env": {"env_vars": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}}}
        raise failure.as_instanceof_cause()

    monkeypatch.setattr(serve, "start", failing_start)
    monkeypatch.setattr(serve, "shutdown", lambda: shutdowns.append(True))
    with pytest.raises(ConfigError, match=r"serving.haproxy: .*\(Binding \[haproxy.cfg:45\] .*0.0.0.0:9101]\)"):
        start_serving(served[0], ServingConfig(port=unused_port()))
    assert shutdowns == [True]


def test_serve_refuses_a_bad_model_or_port_with_exit_2(tmp_path, capsys, served):
    from flows.cli import EXIT_BAD_INPUT, main

    assert main(["serve", "--model", str(tmp_path / "nowhere"), "--port", "8123"]) == EXIT_BAD_INPUT
    assert "nowhere" in capsys.readouterr().err
    model = served[0].weights.parent
    assert main(["serve", "--model", str(model), "--port", "70000"]) == EXIT_BAD_INPUT
    assert "serving.port" in capsys.readouterr().err
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        assert main(["serve", "--model", str(model), "--port", str(taken)]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{taken}" in error and "Traceback" not in error
    # a cluster's Serve, before joining it (nothing listens at that address)
    assert main(["serve", "--model", str(model), "--port", str(unused_port()),
                 "--set", "scaling.ray_address=127.0.0.1:1"]) == EXIT_BAD_INPUT
    assert "serving.host: 127.0.0.1 on a Ray cluster" in capsys.readouterr().err
