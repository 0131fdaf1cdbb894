"""A trained model behind HTTP on Ray Serve, with dynamic request batching.

    POST /predict   body: one image file's bytes (PNG, JPEG, ... any size)
                    200 {"model": ..., "predictions": [{"label": ..., "probability": ...}, ...]}  (top-k, best first)
                    400 {"error": ...} for a body that is not an image, 413 for one over serving.max_body_bytes
    GET  /health    200 {"status": "ok", "model": ...} once a replica has loaded the model

Requests reaching a replica within serving.batch_wait_timeout_s of each other go through the model as one batch
(`@serve.batch`), up to serving.max_batch_size. Each body is decoded inside the batch on its own: one that is not
an image is answered 400 and the others of its batch are classified as usual. Replicas take a GPU each when the
Ray cluster has GPUs. Requests reach them through HAProxy, Serve's high-throughput ingress, which hands each one
straight to a replica's own HTTP server (serving.haproxy; false: Serve's Python proxy actor, which passes it on
through Ray and leaves a replica a fifth of the requests/s, benchmarks/serve.py). `vit-pipeline serve`
(flows/cli.py) and the flow's optional serve step start it.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from tasks.config import ConfigError
from tasks.inference.model_ref import ModelDescription, eval_transform, likeliest_labels, load_model, read_image

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from ray.serve import Application
    from torch import nn

    from tasks.config import PipelineConfig, ServingConfig

log = logging.getLogger(__name__)

APP_NAME = "vit-pipeline"
PREDICT_PATH, HEALTH_PATH = "/predict", "/health"
# How many of the last batches' sizes a replica keeps (`ImageClassifier.recorded_batch_sizes`).
BATCH_SIZES_KEPT = 10_000
# One request's answer: its top-k labels with probabilities, best first.
Prediction = list[dict[str, Any]]
# Serve reads its ingress from the environment of its controller (ray.serve._private.constants).
HAPROXY_SWITCH = "RAY_SERVE_ENABLE_HA_PROXY"
WITHOUT_HAPROXY = "set serving.haproxy=false for Serve's Python proxy"
HTTP_BAD_REQUEST, HTTP_NOT_FOUND, HTTP_METHOD_NOT_ALLOWED, HTTP_TOO_LARGE = 400, 404, 405, 413


@dataclass(frozen=True)
class RejectedImage:
    """A request body that is not an image the model can take: answered with `status` and `message`."""

    status: int
    message: str


# -- plain functions: what a replica does with a batch of bodies ----------------------------------------------------

def decode_image(body: bytes) -> Image.Image | RejectedImage:
    """The image a request body holds, fully decoded, or why it cannot be classified."""
    from PIL import Image, UnidentifiedImageError

    if not body:
        return RejectedImage(HTTP_BAD_REQUEST, "the body is empty: POST an image file's bytes")
    try:
        image = read_image(io.BytesIO(body))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        return RejectedImage(HTTP_BAD_REQUEST, f"the body is not an image this server can read "
                                               f"({type(error).__name__}: {error})")
    return image


def top_k_predictions(probabilities: torch.Tensor, labels: Sequence[str], k: int) -> list[Prediction]:
    """Per row of a batch's class probabilities, its k likeliest labels, best first."""
    return [[{"label": label, "probability": value} for label, value in row]
            for row in likeliest_labels(probabilities, labels, k)]


def classify_bodies(model: nn.Module, transform: Callable[[Image.Image], torch.Tensor], bodies: Sequence[bytes],
                    labels: Sequence[str], top_k: int, device: torch.device) -> list[Prediction | RejectedImage]:
    """One result per body, in order: its top-k predictions, or why it was rejected. The bodies that are images
    go through the model as one batch; the others do not stop them."""
    import torch

    decoded = [decode_image(body) for body in bodies]
    results: list[Prediction | RejectedImage] = [
        item if isinstance(item, RejectedImage) else [] for item in decoded]
    accepted = [index for index, item in enumerate(decoded) if not isinstance(item, RejectedImage)]
    inputs = []
    for index in list(accepted):
        image = decoded[index]
        assert not isinstance(image, RejectedImage)
        try:
            inputs.append(transform(image))
        except (OSError, ValueError) as error:  # e.g. a mode the conversion to RGB refuses
            results[index] = RejectedImage(HTTP_BAD_REQUEST, f"the image cannot be prepared for the model "
                                                             f"({type(error).__name__}: {error})")
            accepted.remove(index)
    if inputs:
        with torch.inference_mode():
            logits = model(torch.stack(inputs).to(device))
            probabilities = logits.float().softmax(dim=1).cpu()
        for index, predictions in zip(accepted, top_k_predictions(probabilities, labels, top_k), strict=True):
            results[index] = predictions
    return results


# -- the Serve deployment -------------------------------------------------------------------------------------------

class ImageClassifier:
    """One replica: the model loaded on this replica's device, answering /predict in batches and /health."""

    def __init__(self, description: ModelDescription, serving: ServingConfig) -> None:
        import torch

        # Ray sets OMP_NUM_THREADS to the replica's CPUs; torch's intra-op pool follows it at import, but say it.
        torch.set_num_threads(max(1, int(serving.cpus_per_replica)))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(description, self.device)
        self.transform = eval_transform(description)
        self.description = description
        self.serving = serving
        self.batch_sizes: deque[int] = deque(maxlen=BATCH_SIZES_KEPT)
        self.predict_batch.set_max_batch_size(serving.max_batch_size)  # type: ignore[attr-defined]
        self.predict_batch.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)  # type: ignore[attr-defined]
        log.info("serving %s (%s) on %s", description.source, description.architecture, self.device)

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        if path == HEALTH_PATH:
            return JSONResponse({"status": "ok", "model": self.description.source, "device": str(self.device)})
        if path != PREDICT_PATH:
            return _error(HTTP_NOT_FOUND, f"no such endpoint {path}: POST {PREDICT_PATH} or GET {HEALTH_PATH}")
        if request.method != "POST":
            return _error(HTTP_METHOD_NOT_ALLOWED, f"{PREDICT_PATH} takes POST with an image file as the body")
        body = await _read_body(request, self.serving.max_body_bytes)
        result = body if isinstance(body, RejectedImage) else await self.predict_batch(body)
        if isinstance(result, RejectedImage):
            return _error(result.status, result.message)
        return JSONResponse({"model": self.description.source, "predictions": result})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # set from ServingConfig in __init__
    async def predict_batch(self, bodies: list[bytes]) -> list[Prediction | RejectedImage]:
        self.batch_sizes.append(len(bodies))
        # On the event loop, not in a thread: torch gives up the GIL at every operation, and a thread that must
        # win it back from the loop's request handling each time ran the model at a fraction of its speed, in
        # batches of ~3 at 32 concurrent requests (benchmarks/serve.py). Requests queue meanwhile, making the next
        # batch full.
        return classify_bodies(self.model, self.transform, bodies, self.description.labels, self.serving.top_k,
                               self.device)

    def recorded_batch_sizes(self) -> list[int]:
        """The sizes of the batches this replica classified (the last BATCH_SIZES_KEPT)."""
        return list(self.batch_sizes)


# Built with a call rather than as a class decorator, which type checkers do not apply.
classifier_deployment = serve.deployment()(ImageClassifier)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, max_body_bytes: int) -> bytes | RejectedImage:
    """The body, or a 413 without reading past max_body_bytes (a declared length is refused before reading)."""
    declared = request.headers.get("content-length")
    too_large = RejectedImage(HTTP_TOO_LARGE, f"the body is more than the {max_body_bytes} bytes this server takes "
                                              "(serving.max_body_bytes)")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        return too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            return too_large
        chunks.append(chunk)
    return b"".join(chunks)


# -- building and running the application --------------------------------------------------------------------------

def deployment_options(serving: ServingConfig, cluster_gpus: float) -> dict[str, Any]:
    """Serve's options for the deployment: replicas, the requests each may hold (a full batch and the next one
    queueing), and the resources of each: a GPU when the cluster has any."""
    actor_options: dict[str, Any] = {"num_cpus": serving.cpus_per_replica}
    if cluster_gpus > 0:
        actor_options["num_gpus"] = 1
    return {"num_replicas": serving.replicas, "max_ongoing_requests": 2 * serving.max_batch_size,
            "ray_actor_options": actor_options,
            # A log line per request costs the replica CPU that batching saves; errors are still logged.
            "logging_config": {"enable_access_log": False}}


def controller_options(serving: ServingConfig) -> dict[str, Any]:
    """Serve's controller options: the environment of the controller, which its actors (the ingress, the replicas)
    inherit and which says whether HAProxy or Serve's Python proxy takes the requests (serving.haproxy)."""
    return {"runtime_env": {"env_vars": {HAPROXY_SWITCH: "1" if serving.haproxy else "0"}}}


def _haproxy_failure(cause: BaseException) -> str:
    """HAProxy's own complaint (its first [ALERT] line, e.g. a port it cannot bind), else the error's text."""
    alerts = [line.split(":", 1)[-1].strip() for line in str(cause).splitlines() if line.startswith("[ALERT]")]
    return (alerts[0] if alerts else str(cause).strip()).rstrip(".")


def build_app(description: ModelDescription, serving: ServingConfig, cluster_gpus: float = 0.0) -> Application:
    """The Serve application that serves `description` as `serving` says."""
    return classifier_deployment.options(**deployment_options(serving, cluster_gpus)).bind(description, serving)


def require_free_port(host: str, port: int, *, setting: str = "serving.port",
                      remedy: str = "choose another --port") -> None:
    """Refuse a port something already listens on (ConfigError naming `setting`), before Ray starts a server that
    would fail to bind it."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(f"{setting}: cannot serve on {host}:{port}: {error.strerror or error}; "
                              f"{remedy}") from None


def require_haproxy(serving: ServingConfig) -> None:
    """For a Serve whose controller will run on this machine: refuse (ConfigError) what would stop its HAProxy
    (serving.haproxy), no HAProxy binary or its statistics or metrics port taken, before Ray takes its seconds to
    start and before the failure reaches the terminal as Ray's tracebacks."""
    if not serving.haproxy:
        return
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_METRICS_PORT, RAY_SERVE_HAPROXY_STATS_PORT
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        get_haproxy_binary()
    except FileNotFoundError as error:
        raise ConfigError(f"serving.haproxy: {str(error).rstrip('.')}; {WITHOUT_HAPROXY}") from None
    for port, use in ((RAY_SERVE_HAPROXY_STATS_PORT, "statistics"), (RAY_SERVE_HAPROXY_METRICS_PORT, "metrics")):
        require_free_port("0.0.0.0", port, setting="serving.haproxy",
                          remedy=f"HAProxy serves its {use} there: free it, or {WITHOUT_HAPROXY}")


def require_reachable_replicas(serving: ServingConfig) -> None:
    """For a Serve on a Ray cluster: refuse (ConfigError) serving.host on loopback behind HAProxy. Each replica
    listens on serving.host, and HAProxy on one node must reach the replicas on the others (a GPU node's)."""
    if not serving.haproxy:
        return
    try:
        loopback = ipaddress.ip_address(serving.host).is_loopback
    except ValueError:  # a name
        loopback = serving.host == "localhost"
    if loopback:
        raise ConfigError(f"serving.host: {serving.host} on a Ray cluster: behind HAProxy each replica listens on it, "
                          "and HAProxy on one node must reach the replicas on the others; set serving.host=0.0.0.0 "
                          "(--host), or serving.haproxy=false for Serve's Python proxy")


def require_ingress(config: PipelineConfig) -> None:
    """Before Ray is started or joined, refuse (ConfigError) what would stop Serve's ingress: on a Ray of this
    process's own, Serve's controller and so HAProxy run on this machine (require_haproxy); on a cluster, HAProxy
    must reach replicas on other nodes (require_reachable_replicas)."""
    from tasks.training.train import ray_address

    if ray_address(config) is None:
        require_haproxy(config.serving)
    else:
        require_reachable_replicas(config.serving)


def start_serving(description: ModelDescription, serving: ServingConfig) -> str:
    """Deploy the model on the Ray this process is connected to (ray.init first) and return its base URL once a
    replica has loaded it. The application runs until `stop_serving` or the end of the Ray cluster."""
    import ray
    from ray.exceptions import RayTaskError

    require_free_port(serving.host, serving.port)
    try:
        serve.start(http_options={"host": serving.host, "port": serving.port},
                    controller_options=controller_options(serving))
    except RayTaskError as error:
        if not serving.haproxy:
            raise
        serve.shutdown()  # the controller this call created, left without an ingress
        raise ConfigError(f"serving.haproxy: Ray Serve's HAProxy did not start ({_haproxy_failure(error.cause)}); "
                          f"install ray[serve] on Linux, which brings HAProxy, free the port it names, or "
                          f"{WITHOUT_HAPROXY}") from None
    app = build_app(description, serving, ray.cluster_resources().get("GPU", 0.0))
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{serving.host}:{serving.port}"
    log.info("serving %s at %s%s (health: %s%s)", description.source, url, PREDICT_PATH, url, HEALTH_PATH)
    return url


def model_to_serve(config: PipelineConfig, val_accuracies: dict[str, float]) -> str:
    """The model the flow deploys: serving.model, else the trained one with the best validation accuracy."""
    return config.serving.model or max(val_accuracies, key=lambda name: val_accuracies[name])


def serve_trained_model(config: PipelineConfig, model_name: str) -> str:
    """The flow's serve step: deploy `model_name` of this run (models/<name>/) on the run's Ray cluster, joined
    here as a driver when this process is not one yet; returns the base URL."""
    from tasks.inference.model_ref import read_model_dir
    from tasks.layout import RunLayout
    from tasks.training.train import ensure_ray

    description = read_model_dir(RunLayout.of(config).model_dir(model_name), f"{config.run_dir}:{model_name}")
    require_ingress(config)
    ensure_ray(config)
    return start_serving(description, config.serving)


def recorded_batch_sizes() -> list[int]:
    """The batch sizes one replica of the running application has classified."""
    return list(serve.get_app_handle(APP_NAME).recorded_batch_sizes.remote().result())


def stop_serving() -> None:
    """Take the application down the way Serve does, letting its replicas finish their requests (behind HAProxy
    each also waits 30 s, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, for load balancers to let it go); for a
    Ray cluster that goes on. On a Ray this process started, ray.shutdown() alone ends Serve with it at once."""
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(APP_NAME)
    except RayServeException:  # Serve never started (start_serving failed early): nothing to take down
        return
