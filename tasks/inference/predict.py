"""Predict: classify image files with a trained model (`vit-pipeline predict`).

Images are found (`find_images`: files, folders searched recursively, globs), decoded and preprocessed as the
model's config.json says (`eval_transform`, in a few threads), and classified in batches on the device; each
image's top-k labels come back with their probabilities, and optionally its attention overlay (CLS attention per
head and rollout, drawn as the attention step draws them). A file that cannot be read as an image is skipped by
name; the others go on.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from tasks.inference.model_ref import ModelDescription, eval_transform, likeliest_labels, read_image
from tasks.judging.attention import model_panels, plot_attention_grid, supports_attention

log = logging.getLogger(__name__)

# What a folder is searched for (case-insensitive); a file named on the command line is tried whatever its name.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
OUTPUT_FORMATS = (".csv", ".jsonl")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 64
# Decoding threads: PIL decodes with the GIL released, so a few threads keep a GPU fed.
MAX_DECODE_THREADS = 8


class PredictInputError(ValueError):
    """Input predict cannot use at all (no images, a flag out of range); the CLI exits 2."""


@dataclass(frozen=True)
class Prediction:
    path: Path
    labels: tuple[str, ...]  # the top-k labels, most probable first
    probabilities: tuple[float, ...]
    attention: Path | None = None  # the overlay written for it, if any


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def find_images(inputs: Sequence[str]) -> tuple[list[Path], list[Skipped]]:
    """The image files `inputs` name, in order, each once: files as given, folders searched recursively for
    IMAGE_SUFFIXES, globs (`**` recursive) expanded the same way. Inputs that name nothing come back skipped."""
    found: dict[Path, None] = {}
    missing = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        paths = [Path(match) for match in matches if Path(match).exists()]
        if not paths:
            missing.append(Skipped(Path(item), "no such file" if matches else "the pattern matches no file"))
        for path in paths:
            if path.is_dir():
                found.update(dict.fromkeys(sorted(p for p in path.rglob("*")
                                                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)))
            else:
                found[path] = None
    return list(found), missing


def choose_device(name: str) -> torch.device:
    """auto: the GPU when there is one, else the CPU."""
    if name not in DEVICES:
        raise PredictInputError(f"--device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictInputError("--device cuda: no CUDA device is available here")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_output(path: Path | None) -> None:
    if path is not None and path.suffix.lower() not in OUTPUT_FORMATS:
        raise PredictInputError(f"--output {path}: the name must end in {' or '.join(OUTPUT_FORMATS)}")


def predict_images(model: nn.Module, description: ModelDescription, paths: Sequence[Path], *,
                   device: torch.device, top_k: int = DEFAULT_TOP_K, batch_size: int = DEFAULT_BATCH_SIZE,
                   attention_dir: Path | None = None, progress: bool = False) -> tuple[list[Prediction], list[Skipped]]:
    """Top-k predictions for every readable image of `paths` (in order) and the files skipped, with why.

    `model` is `load_model(description)` on `device`. attention_dir: write each image's attention overlay there
    (`<name>.png`), for ViT/DeiT/Swin models."""
    if top_k < 1 or batch_size < 1:
        raise PredictInputError(f"--top-k {top_k} and --batch-size {batch_size} must be at least 1")
    top_k = min(top_k, description.num_classes)
    # The model whose attention is drawn: --attention on a ViT, DeiT or Swin.
    attention_model = model if attention_dir is not None and supports_attention(model) else None
    if attention_dir is not None and attention_model is None:
        log.warning("%s (%s) has no attention maps to draw (ViT, DeiT and Swin have); --attention is ignored",
                    description.source, description.architecture)
    overlay_names = _overlay_names(paths) if attention_model is not None else {}
    predictions: list[Prediction] = []
    skipped: list[Skipped] = []
    batches = tqdm(_decoded_batches(paths, eval_transform(description), batch_size, skipped),
                   total=-(-len(paths) // batch_size), unit="batch", desc="predict",
                   disable=not progress or len(paths) <= batch_size)
    for batch_paths, images in batches:
        inputs = images.to(device, non_blocking=True)
        with torch.inference_mode():
            if attention_model is not None:
                logits, panels = model_panels(attention_model, inputs)
            else:
                logits, panels = model(inputs), []
            best = likeliest_labels(logits.float().softmax(1), description.labels, top_k)
        for row, path in enumerate(batch_paths):
            labels, chances = (tuple(column) for column in zip(*best[row], strict=True))
            overlay = None
            if attention_dir is not None and attention_model is not None:
                overlay = attention_dir / overlay_names[path]
                title = f"{labels[0]} {chances[0]:.2f}"
                plot_attention_grid(display_images(images[row : row + 1], description),
                                    [panel.of_image(row) for panel in panels], [title], overlay)
            predictions.append(Prediction(path, labels, chances, overlay))
    return predictions, skipped


def _decoded_batches(paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor], batch_size: int,
                     skipped: list[Skipped]) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """(paths, normalised images) per batch of readable images; unreadable ones are appended to `skipped`."""
    threads = min(MAX_DECODE_THREADS, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            loaded = list(pool.map(lambda path: _load(path, transform), chunk))
            good = [(path, image) for path, image in zip(chunk, loaded, strict=True) if isinstance(image, torch.Tensor)]
            for path, problem in zip(chunk, loaded, strict=True):
                if isinstance(problem, str):
                    log.warning("%s: skipped, %s", path, problem)
                    skipped.append(Skipped(path, problem))
            if good:
                yield [path for path, _ in good], torch.stack([image for _, image in good])


def _load(path: Path, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor | str:
    """The preprocessed image, or why it cannot be read."""
    try:
        with read_image(path) as image:
            return transform(image)
    except Exception as error:  # noqa: BLE001  (PIL's decoders raise many kinds: OSError, ValueError, SyntaxError...)
        return f"not a readable image ({type(error).__name__}: {error})"


def display_images(inputs: torch.Tensor, description: ModelDescription) -> torch.Tensor:
    """Normalised N x C x H x W model inputs -> the uint8 images they are (what the overlay is drawn on)."""
    mean = torch.tensor(description.mean).view(1, -1, 1, 1)
    std = torch.tensor(description.std).view(1, -1, 1, 1)
    return ((inputs.cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def _overlay_names(paths: Sequence[Path]) -> dict[Path, str]:
    """A distinct overlay file name per image: its stem, numbered when two images share one."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for path in paths:
        name, number = f"{path.stem}.png", 1
        while name in used:
            number += 1
            name = f"{path.stem}-{number}.png"
        used.add(name)
        names[path] = name
    return names


def write_predictions(predictions: Sequence[Prediction], path: Path) -> Path:
    """predictions.csv (one row per image: path, then label_1, probability_1, ... label_k, probability_k, and
    the overlay) or predictions.jsonl (one object per image)."""
    check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        with open(path, "w") as out:
            for prediction in predictions:
                out.write(json.dumps({
                    "path": str(prediction.path),
                    "predictions": [{"label": label, "probability": probability} for label, probability
                                    in zip(prediction.labels, prediction.probabilities, strict=True)],
                    "attention": None if prediction.attention is None else str(prediction.attention),
                }) + "\n")
        return path
    top_k = max((len(p.labels) for p in predictions), default=0)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", *(f"{kind}_{rank}" for rank in range(1, top_k + 1)
                                   for kind in ("label", "probability")), "attention"])
        for prediction in predictions:
            pairs = [value for label, probability in zip(prediction.labels, prediction.probabilities, strict=True)
                     for value in (label, f"{probability:.6f}")]
            writer.writerow([str(prediction.path), *pairs, prediction.attention or ""])
    return path


def format_prediction(prediction: Prediction) -> str:
    """`path: label 0.9312, label 0.0411, ...` for the terminal."""
    ranked = ", ".join(f"{label} {probability:.4f}"
                       for label, probability in zip(prediction.labels, prediction.probabilities, strict=True))
    return f"{prediction.path}: {ranked}"
