"""A trained model by reference: what it is (config.json), where its weights are, and how to load and feed it.

Training's export writes `models/<model>/config.json` beside the weights (`write_model_config`), in the layout
timm's hub loader reads:

    {"architecture": <timm name>, "num_classes": N, "model_args": {<create_model keywords: img_size, ...>},
     "pretrained_cfg": {"input_size": [3, H, W], "mean": [...], "std": [...], "interpolation": ...,
                        "crop_pct": ..., "crop_mode": "center", "num_classes": N, "label_names": [...]}}

with the preprocessing evaluate applies to test images, so a model found by `resolve_model_ref` is fed what it
was scored on. A reference (MODEL_REF) is one of:

    runs/r/<flow run>/models/vit_tiny_patch4_32          a model directory (config.json and its weights)
    runs/r/latest:vit_tiny_patch4_32                     <run directory>:<model>
    runs/r/latest/registry.json:vit_tiny_patch4_32       a model of the publish plan, by model or collection
    wandb-registry-model/vit-pipeline-vit_tiny_patch4_32:best     a W&B Registry version, downloaded (online)

Resolving needs no torch; `load_model` and `eval_transform` import it when called.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tasks.layout import BEST_WEIGHTS, LATEST_LINK, REGISTRY_FILE, RunLayout

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

    from tasks.config import PipelineConfig

MODEL_CONFIG_FILE = "config.json"
# The weights a model directory holds: a run's models/<model>/, or a folder in timm's hub layout.
WEIGHT_FILES = (BEST_WEIGHTS, "model.safetensors")
# W&B Registry paths start with it: wandb-registry-<registry>/<collection>[:<alias or version>].
REGISTRY_PREFIX = "wandb-registry-"
DEFAULT_ALIAS = "latest"
CROP_MODE = "center"


class ModelRefError(LookupError):
    """A model reference that names no usable model; the message names the reference and what was looked for."""


@dataclass(frozen=True)
class ModelDescription:
    """A trained model as its config.json describes it, and where its weights are."""

    architecture: str  # the timm name it is built with (vitmodels.create_model)
    model_args: Mapping[str, Any]  # further create_model keywords that rebuild it (img_size, window_size, depth...)
    num_classes: int
    labels: tuple[str, ...]  # class names, by class index
    input_size: tuple[int, int, int]  # C, H, W the model takes
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # "bilinear" or "bicubic"
    crop_pct: float
    weights: Path  # a .safetensors state dict
    source: str  # the reference it was resolved from

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's data config (timm.data.resolve_data_config's keys) for create_transform."""
        return {"input_size": self.input_size, "interpolation": self.interpolation, "mean": self.mean,
                "std": self.std, "crop_pct": self.crop_pct, "crop_mode": CROP_MODE}


# -- writing: training's export ------------------------------------------------------------------------------------

def model_config(config: PipelineConfig, model_name: str, location: str) -> dict[str, Any]:
    """config.json for `model_name` of `config` trained on the shards at `location` (class names, image size).

    The input size and resize are evaluate's (EvalResize): data.image_size with data.crop_pct, else the shards'
    own size (passed through as it is: crop_pct is 1.0 without data.image_size)."""
    from tasks.data.manifest import require_manifest

    spec = config.model.spec(model_name)
    labels = list(require_manifest(location).classes)
    data = config.data
    height, width = (data.image_size, data.image_size) if data.image_size else _shard_image_size(config, location)
    return {
        "architecture": spec.name,
        "num_classes": len(labels),
        "model_args": spec.build_kwargs,
        "pretrained_cfg": {
            "input_size": [3, height, width],
            "mean": list(data.mean),
            "std": list(data.std),
            "interpolation": data.interpolation,
            "crop_pct": data.crop_pct,
            "crop_mode": CROP_MODE,
            "num_classes": len(labels),
            "label_names": labels,
        },
    }


def write_model_config(directory: Path, config: PipelineConfig, model_name: str, location: str) -> Path:
    """Write `model_config` to directory/config.json; the same inputs give the same bytes (the training run's
    model artifact and the exported directory hold the same file)."""
    path = Path(directory) / MODEL_CONFIG_FILE
    path.write_text(json.dumps(model_config(config, model_name, location), indent=2, sort_keys=True) + "\n")
    return path


def _shard_image_size(config: PipelineConfig, location: str) -> tuple[int, int]:
    """H, W of the shards' images: CIFAR-10's own, else the first test image's (ImageFolder shards without
    data.image_size hold images of one size, which the loader passes on as they are)."""
    import fsspec

    from tasks.data.manifest import TEST_SPLIT, join_location, require_manifest
    from tasks.data.samples import decode_image, iter_samples
    from tasks.data.sources import CIFAR10_SIDE

    if config.data.dataset == "cifar10":
        return CIFAR10_SIDE, CIFAR10_SIDE
    first = require_manifest(location).splits[TEST_SPLIT].shards[0].name
    with fsspec.open(join_location(location, first), "rb") as stream:
        height, width = decode_image(next(iter_samples(stream, first))).shape[:2]
    return int(height), int(width)


# -- reading: a reference to a model -------------------------------------------------------------------------------

def resolve_model_ref(ref: str, *, wandb_api: Any = None, download_root: Path | None = None) -> ModelDescription:
    """The model `ref` names (see the module docstring for the forms).

    Args:
        wandb_api: what W&B Registry references are downloaded through (an object with wandb.Api's
            `artifact(name)`); default a wandb.Api().
        download_root: where a W&B artifact is downloaded; default W&B's (./artifacts/<name>).

    Raises:
        ModelRefError: naming the reference and what was looked for.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return read_model_dir(path, ref)
    if _is_registry_path(ref):
        return _from_wandb(ref, wandb_api, download_root)
    head, registry, selector = ref.partition(f"{REGISTRY_FILE}:")
    if registry:
        return _from_registry_file(Path(head + REGISTRY_FILE).expanduser(), selector, ref)
    run_dir, colon, name = ref.rpartition(":")
    if colon and run_dir and name:
        return _from_run_dir(Path(run_dir).expanduser(), name, ref)
    raise ModelRefError(
        f"model {ref!r}: no such directory, and not a reference of another form: a models/<name> directory, "
        f"<run directory>:<name> (e.g. runs/<run>/{LATEST_LINK}:<name>), <run directory>/{REGISTRY_FILE}:<name>, "
        f"or {REGISTRY_PREFIX}<registry>/<collection>:<alias>")


def read_model_dir(directory: Path, source: str, weights: Path | None = None) -> ModelDescription:
    """The model of a directory holding config.json and its weights (`weights`: that file, if not the default)."""
    directory = Path(directory)
    config_file = directory / MODEL_CONFIG_FILE
    if not config_file.is_file():
        raise ModelRefError(f"model {source!r}: {config_file} does not exist (training writes it beside the "
                            f"weights; a model trained before it did must be trained again)")
    if weights is None:
        weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
        if weights is None:
            raise ModelRefError(f"model {source!r}: no weights in {directory} (looked for {', '.join(WEIGHT_FILES)})")
    elif not weights.is_file():
        raise ModelRefError(f"model {source!r}: its weights {weights} do not exist")
    try:
        config = json.loads(config_file.read_text())
        cfg = config["pretrained_cfg"]
        num_classes = int(config["num_classes"])
        labels = tuple(str(label) for label in cfg.get("label_names") or range(num_classes))
        input_size = tuple(int(side) for side in cfg["input_size"])
        description = ModelDescription(
            architecture=str(config["architecture"]), model_args=dict(config.get("model_args") or {}),
            num_classes=num_classes, labels=labels,
            input_size=(input_size[0], input_size[1], input_size[2]),
            mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
            interpolation=str(cfg["interpolation"]), crop_pct=float(cfg.get("crop_pct", 1.0)),
            weights=weights, source=source)
    except json.JSONDecodeError as error:
        raise ModelRefError(f"model {source!r}: {config_file} is not valid JSON ({error})") from None
    except KeyError as error:
        raise ModelRefError(f"model {source!r}: {config_file} has no {error.args[0]!r}") from None
    except (TypeError, ValueError, IndexError) as error:
        raise ModelRefError(f"model {source!r}: {config_file} is malformed ({error})") from None
    if len(description.labels) != num_classes:
        raise ModelRefError(f"model {source!r}: {config_file} names {len(description.labels)} labels for "
                            f"{num_classes} classes")
    if not 0 < description.crop_pct <= 1 or math.isnan(description.crop_pct):
        raise ModelRefError(f"model {source!r}: {config_file} has crop_pct {description.crop_pct}, not in (0, 1]")
    return description


def _from_run_dir(run_dir: Path, name: str, ref: str) -> ModelDescription:
    directory = RunLayout(run_dir).model_dir(name)
    if directory.is_dir():
        return read_model_dir(directory, ref)
    if not run_dir.is_dir():
        latest = (f" ({LATEST_LINK} points at the last flow run that finished: none has finished here yet)"
                  if run_dir.name == LATEST_LINK else "")
        raise ModelRefError(f"model {ref!r}: the run directory {run_dir} does not exist{latest}")
    trained = sorted(p.name for p in directory.parent.glob("*") if p.is_dir())
    raise ModelRefError(f"model {ref!r}: {directory} does not exist; the models trained in {run_dir}: "
                        f"{', '.join(trained) or 'none'}")


def _from_registry_file(plan_file: Path, selector: str, ref: str) -> ModelDescription:
    """A model of a publish plan (registry.json), by model name, collection name or full registry target."""
    from tasks.digests import file_sha256

    if not plan_file.is_file():
        raise ModelRefError(f"model {ref!r}: {plan_file} does not exist (the publish step writes it)")
    try:
        entries = json.loads(plan_file.read_text())["models"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ModelRefError(f"model {ref!r}: {plan_file} is not a publish plan ({error})") from None
    matches = [entry for entry in entries
               if selector in (entry["model"], entry["target"], entry["target"].rpartition("/")[2])]
    if not matches:
        known = ", ".join(f"{entry['model']} ({entry['target']})" for entry in entries)
        raise ModelRefError(f"model {ref!r}: {plan_file} plans no model or collection {selector!r}; it plans "
                            f"{known or 'none'}")
    entry = matches[0]
    weights = plan_file.parent / entry["weights"]
    if not weights.is_file():
        raise ModelRefError(f"model {ref!r}: its weights {weights} do not exist")
    if file_sha256(weights) != entry["metadata"]["weights_sha256"]:
        raise ModelRefError(f"model {ref!r}: {weights} is not the file {plan_file} was planned with (sha256 differs)")
    return read_model_dir(weights.parent, ref, weights)


def _is_registry_path(ref: str) -> bool:
    """wandb-registry-<registry>/<collection>[:alias], optionally behind <entity>/."""
    parts = ref.split("/")
    return len(parts) in (2, 3) and parts[-2].startswith(REGISTRY_PREFIX)


def _from_wandb(ref: str, api: Any, download_root: Path | None) -> ModelDescription:
    """A W&B Registry version, downloaded (config.json beside the weights, as training and publish log it)."""
    name = ref if ":" in ref.rpartition("/")[2] else f"{ref}:{DEFAULT_ALIAS}"
    try:
        if api is None:
            import wandb

            api = wandb.Api()
        artifact = api.artifact(name)
        directory = Path(artifact.download(root=None if download_root is None else str(download_root)))
    except Exception as error:  # noqa: BLE001  (no key, no network, no such version: all reported by the ref)
        raise ModelRefError(f"model {ref!r}: could not download {name} from the W&B Registry "
                            f"({type(error).__name__}: {error})") from None
    return read_model_dir(directory, ref)


# -- using it ------------------------------------------------------------------------------------------------------

def load_model(description: ModelDescription, device: torch.device | str = "cpu") -> nn.Module:
    """The described model with its trained weights (loaded strictly), in eval mode, on `device`."""
    import torch
    from safetensors.torch import load_file

    import vitmodels

    model = vitmodels.create_model(description.architecture, num_classes=description.num_classes,
                                   **description.model_args)
    try:
        model.load_state_dict(load_file(str(description.weights)))
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        raise ModelRefError(f"model {description.source!r}: {description.weights} does not fit "
                            f"{description.architecture} ({str(error).splitlines()[0]})") from None
    return model.eval().to(torch.device(device))


def eval_transform(description: ModelDescription) -> Callable[[Image.Image], torch.Tensor]:
    """A PIL image of any size and mode -> the normalised C x H x W float tensor the model takes: upright (as its
    EXIF orientation says), RGB, resized and centre-cropped as its pretrained_cfg says (timm's evaluation
    transform)."""
    from timm.data import create_transform
    from torchvision import transforms

    resize_and_normalize = create_transform(**description.data_config, is_training=False)
    return transforms.Compose([transforms.Lambda(_rgb), resize_and_normalize])


def read_image(file: str | Path | BinaryIO) -> Image.Image:
    """The image in `file` (a path or an open binary file), decoded now: a truncated file fails here rather than
    inside a batch's transform. PIL's errors (OSError, UnidentifiedImageError, ValueError...) pass through."""
    from PIL import Image

    image = Image.open(file)
    image.load()
    return image


def likeliest_labels(probabilities: torch.Tensor, labels: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row of a batch's class probabilities, its k likeliest (label, probability), best first; one copy
    from the device for the whole batch."""
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [[(labels[index], value) for value, index in zip(row_values, row_indices, strict=True)]
            for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True)]


def _rgb(image: Image.Image) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.exif_transpose(image).convert("RGB")
