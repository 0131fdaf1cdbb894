"""A trained model behind HTTP on Ray Serve, with dynamic request batching.

    POST /predict   body: one image file's bytes (PNG, JPEG, ... any size)
                    200 {"model": ..., "predictions": [{"label": ..., "probability": ...}, ...]}  (top-k, best first)
                    400 {"error": ...} for a body that is not an image, 413 for one over serving.max_body_bytes
    GET  /health    200 {"status": "ok", "model": ...} once a replica has loaded the model

Requests reaching a replica within serving.batch_wait_timeout_s of each other go through the model as one batch
(`@serve.batch`), up to serving.max_batch_size. Each body is decoded inside the batch on its own: one that is not
an image is answered 400 and the others of its batch are classified as usual. Replicas take a GPU each when the
Ray cluster has GPUs. `vit-pipeline serve` (flows/cli.py) and the flow's optional serve step start it.
"""

from __future__ import annotations

import io
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


def build_app(description: ModelDescription, serving: ServingConfig, cluster_gpus: float = 0.0) -> Application:
    """The Serve application that serves `description` as `serving` says."""
    return classifier_deployment.options(**deployment_options(serving, cluster_gpus)).bind(description, serving)


def require_free_port(host: str, port: int) -> None:
    """Refuse a port something already listens on (ConfigError), before Ray starts a proxy that would fail to
    bind it."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(f"serving.port: cannot serve on {host}:{port}: {error.strerror or error}; "
                              "choose another --port") from None


def start_serving(description: ModelDescription, serving: ServingConfig) -> str:
    """Deploy the model on the Ray this process is connected to (ray.init first) and return its base URL once a
    replica has loaded it. The application runs until `stop_serving` or the end of the Ray cluster."""
    import ray

    require_free_port(serving.host, serving.port)
    serve.start(http_options={"host": serving.host, "port": serving.port})
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
    ensure_ray(config)
    return start_serving(description, config.serving)


def recorded_batch_sizes() -> list[int]:
    """The batch sizes one replica of the running application has classified."""
    return list(serve.get_app_handle(APP_NAME).recorded_batch_sizes.remote().result())


def stop_serving(shutdown_serve: bool = True) -> None:
    """Take the application down; with `shutdown_serve`, Serve itself too (its proxy and controller): only right
    on a Ray this process started, since on a shared cluster other applications may be served."""
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(APP_NAME)
    except RayServeException:  # Serve never started (start_serving failed early): nothing to take down
        return
    if shutdown_serve:
        serve.shutdown()
