"""Attention-map step: where each transformer looks, on a fixed set of test images.

The maps are the attention probabilities of the forward pass itself, collected by
vitmodels.capture_attention, so what is drawn is exactly what the model multiplied its values with.
ViT/DeiT: the prefix tokens' (class, and for DeiT distillation) attention over the patches in the
last block, per head and head-averaged, and the attention rollout through all blocks.
Swin: per stage, the attention each token receives inside its window, put back on the token grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.config import PipelineConfig
from tasks.data.crops import EvalResize
from tasks.data.loader import ShardStream, normalize
from tasks.data.manifest import require_manifest
from tasks.judging.evaluate import evaluation_device, load_trained_model
from tasks.layout import RunLayout
from tasks.operations.tracking import files_artifact, record_model_inputs, start_wandb_run
from vitmodels import SwinAttentionMap, SwinTransformer, VisionTransformer, capture_attention
from vitmodels.swin import window_merge

log = logging.getLogger(__name__)

ATTENTION_IMAGES = 10  # one per class on CIFAR-10
ATTENTION_SEED = 0
PREFIX_TOKEN_NAMES = ("cls", "dist")  # token 0 is the class token, token 1 DeiT's distillation token
ROLLOUT_RESIDUAL = 0.5  # Abnar & Zuidema: A' = 0.5 A + 0.5 I accounts for the residual connection
PANEL_INCHES = 1.6
GRID_DPI = 100
OVERLAY_ALPHA = 0.5
HEATMAP = "inferno"
TITLE_FONT_SIZE = 7
SELECTION_BATCH = 512


@dataclass
class Panel:
    """One column of the grid: a title and one [h, w] map per image."""

    title: str
    maps: torch.Tensor

    def of_image(self, index: int) -> Panel:
        """This panel for the batch's image `index` alone (a one-row grid)."""
        return Panel(self.title, self.maps[index : index + 1])


def select_images(location: str, count: int = ATTENTION_IMAGES,
                  seed: int = ATTENTION_SEED) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A seeded choice of test images, one per class first (in class order), then others up to `count`."""
    stream = ShardStream(location, "test", SELECTION_BATCH, train=False)
    batches = list(stream)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    keys = [key for b in batches for key in b[2]]
    order = np.random.default_rng(seed).permutation(len(labels))
    first_of_class: dict[int, int] = {}
    for index in order:
        first_of_class.setdefault(int(labels[index]), int(index))
    chosen = [first_of_class[c] for c in sorted(first_of_class)][:count]
    chosen += [int(i) for i in order if int(i) not in chosen][: count - len(chosen)]
    return images[chosen], labels[chosen], [keys[i] for i in chosen]


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, heads, N, N] per block, first block first -> [B, N, N] attention from output to input tokens.

    Heads are averaged, the residual is mixed in as identity, rows renormalised, and the blocks multiplied
    so that row i is how much each input token contributes to output token i.
    """
    rollout = None
    for probs in attentions:
        mean = probs.float().mean(1)
        identity = torch.eye(mean.shape[-1], device=mean.device).expand_as(mean)
        mixed = ROLLOUT_RESIDUAL * mean + (1 - ROLLOUT_RESIDUAL) * identity
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs the maps of at least one block")
    return rollout


def token_to_patches(rows: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """[..., N] attention from one token to all tokens -> [..., gh, gw] over the patches only."""
    return rows[..., num_prefix:].reshape(*rows.shape[:-1], *grid)


def vit_panels(maps: list[torch.Tensor], num_prefix: int, grid: tuple[int, int]) -> list[Panel]:
    """Per prefix token: last-block attention per head and head-averaged, then the rollout."""
    last = maps[-1].float()  # [B, heads, N, N]
    rollout = attention_rollout(maps)
    panels = []
    for token in range(num_prefix):
        name = PREFIX_TOKEN_NAMES[token]
        per_head = token_to_patches(last[:, :, token], num_prefix, grid)  # [B, heads, gh, gw]
        panels += [Panel(f"{name} head {h + 1}", per_head[:, h]) for h in range(per_head.shape[1])]
        panels.append(Panel(f"{name} mean", per_head.mean(1)))
        panels.append(Panel(f"{name} rollout", token_to_patches(rollout[:, token], num_prefix, grid)))
    return panels


def stitch_windows(values: torch.Tensor, resolution: tuple[int, int], window_size: tuple[int, int],
                   shift_size: tuple[int, int]) -> torch.Tensor:
    """[B * windows, wh * ww] per-token values in Swin's window order -> [B, H, W] at the tokens' own positions.

    Windows tile the map rolled by -shift, so merging them gives the shifted map and rolling by +shift
    undoes the cyclic shift.
    """
    H, W = resolution
    merged = window_merge(values.unsqueeze(-1), window_size, H, W).squeeze(-1)
    return torch.roll(merged, shifts=shift_size, dims=(1, 2))


def swin_received_attention(block_map: SwinAttentionMap) -> torch.Tensor:
    """[B, H, W]: the attention each token receives from the queries of its window, averaged over heads."""
    received = block_map.probs.float().mean(1).mean(1)  # mean over heads, then over queries -> [B*nw, N]
    return stitch_windows(received, block_map.resolution, block_map.window_size, block_map.shift_size)


def swin_panels(maps: list[SwinAttentionMap]) -> list[Panel]:
    """One panel per stage (consecutive blocks at one resolution): the mean over its blocks."""
    panels = []
    for stage, (resolution, blocks) in enumerate(groupby(maps, key=lambda m: m.resolution)):
        stage_maps = torch.stack([swin_received_attention(m) for m in blocks]).mean(0)
        panels.append(Panel(f"stage {stage + 1} ({resolution[0]}x{resolution[1]})", stage_maps))
    return panels


def model_panels(model: VisionTransformer | SwinTransformer, inputs: torch.Tensor) -> tuple[torch.Tensor, list[Panel]]:
    """Logits and attention panels of a vitmodels ViT/DeiT/Swin for a normalised batch."""
    with torch.inference_mode(), capture_attention(model) as maps:
        logits = model(inputs)
    if isinstance(model, SwinTransformer):
        return logits, swin_panels(maps)
    return logits, vit_panels(maps, model.num_prefix_tokens, model.patch_embed.grid_size)


def supports_attention(model: nn.Module) -> TypeGuard[VisionTransformer | SwinTransformer]:
    return isinstance(model, (VisionTransformer, SwinTransformer))


def to_unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each map to [0, 1] so the colour scale shows where a map looks, not its overall level."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(torch.finfo(flat.dtype).tiny)).view_as(maps)


def _pyplot():
    """matplotlib's pyplot on the file-only backend (no display on workers or CI). Imported when a grid is drawn,
    not with the module: the maps themselves (`model_panels`) need no matplotlib, which a bare GPU machine lacks."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def overlay(images: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """uint8 [B, C, H, W] images and [B, h, w] maps -> uint8 [B, H, W, 3] heat maps blended over the images."""
    import matplotlib

    size = images.shape[-2:]
    heat = F.interpolate(maps.float().cpu()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    colours = matplotlib.colormaps[HEATMAP](to_unit_range(heat).numpy())[..., :3] * 255
    pixels = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)
    return ((1 - OVERLAY_ALPHA) * pixels + OVERLAY_ALPHA * colours).round().astype(np.uint8)


def grid_pixel_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid PNG."""
    return round(columns * PANEL_INCHES * GRID_DPI), round(rows * PANEL_INCHES * GRID_DPI)


def plot_attention_grid(images: torch.Tensor, panels: list[Panel], row_titles: list[str], path: Path) -> Path:
    """Rows = images; columns = the image, then one heat-map overlay per panel."""
    plt = _pyplot()
    rows, columns = len(images), 1 + len(panels)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES),
                                dpi=GRID_DPI, squeeze=False)
    overlays = [overlay(images, panel.maps) for panel in panels]
    for row in range(rows):
        axes[row, 0].imshow(images[row].permute(1, 2, 0).cpu().numpy())
        axes[row, 0].set_title(row_titles[row], fontsize=TITLE_FONT_SIZE)
        for column, (panel, blended) in enumerate(zip(panels, overlays, strict=True), start=1):
            axes[row, column].imshow(blended[row])
            if row == 0:
                axes[row, column].set_title(panel.title, fontsize=TITLE_FONT_SIZE)
        for axis in axes[row]:
            axis.set_axis_off()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no bbox_inches="tight": the PNG keeps the figure's exact pixel size
    figure.savefig(path, dpi=GRID_DPI)
    plt.close(figure)
    return path


def attention_maps(config: PipelineConfig, models: dict[str, Path] | None = None,
                   shard_location: str | None = None, group: str | None = None) -> dict[str, Path]:
    """Attention grids of every transformer (or `models`: name -> weights) under runs/<run>/attention/."""
    layout = RunLayout.of(config)
    models = models if models is not None else {
        spec.name: layout.weights(spec.name) for spec in config.model.transformers
    }
    location = shard_location or config.shard_location
    images, labels, keys = select_images(location)
    images = EvalResize.from_config(config.data)(images)  # what the models were validated on
    classes = require_manifest(location).classes
    device = evaluation_device()
    inputs = normalize(images, config.data.mean, config.data.std, device)
    tracker = _start_tracking(config, group)
    written = {}
    for name, weights in models.items():
        model = load_trained_model(config, name, Path(weights), len(classes)).to(device)
        if not supports_attention(model):
            log.warning("%s: not a vitmodels ViT/DeiT/Swin, which alone return attention maps; skipped", name)
            continue
        logits, panels = model_panels(model, inputs)
        predicted = logits.argmax(1).cpu()
        titles = [f"true {classes[t]}\npred {classes[p]}"
                  for t, p in zip(labels.tolist(), predicted.tolist(), strict=True)]
        path = layout.attention_map(name)
        written[name] = plot_attention_grid(images, panels, titles, path)
        if tracker is not None:
            _log_table(tracker, name, images, labels, keys, logits, panels, classes)
    if tracker is not None:
        record_model_inputs(tracker, {name: Path(models[name]) for name in written})
        if written:
            tracker.log_artifact(files_artifact("attention-maps", "attention", list(written.values())))
        tracker.finish()
    return written


def _start_tracking(config: PipelineConfig, group: str | None):
    return start_wandb_run(config, "attention", "maps", group=group)


def _log_table(tracker, name: str, images: torch.Tensor, labels: torch.Tensor, keys: list[str],
               logits: torch.Tensor, panels: list[Panel], classes: list[str]) -> None:
    import wandb

    probabilities = logits.float().softmax(1).cpu()
    confidence, predicted = probabilities.max(1)
    overlays = [overlay(images, panel.maps) for panel in panels]
    table = wandb.Table(columns=["key", "true", "predicted", "confidence", "image", *(panel.title for panel in panels)])
    for i, key in enumerate(keys):
        table.add_data(key, classes[labels[i]], classes[predicted[i]], confidence[i].item(),
                       wandb.Image(images[i].permute(1, 2, 0).cpu().numpy()),
                       *(wandb.Image(blended[i]) for blended in overlays))
    tracker.log({f"attention/{name}": table})
