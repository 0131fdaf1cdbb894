"""Training checkpoints: weights as safetensors, the rest as a weights-only torch file, and a
metadata.json written last that lists every file's size and sha256.

A checkpoint is valid only if its metadata exists and every file matches it, so a checkpoint cut
short by a crash or damaged later is rejected by name rather than half-loaded. Nothing here
unpickles arbitrary objects: safetensors for tensors, `torch.load(weights_only=True)` for state.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tasks.digests import file_sha256
from tasks.errors import CheckpointError
from tasks.layout import BEST_WEIGHTS

log = logging.getLogger(__name__)

METADATA = "metadata.json"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
STATE = "state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def save_weights(module: nn.Module, path: Path) -> None:
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in module.state_dict().items()}
    save_file(tensors, str(path))


def save_checkpoint(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ema,
    epoch: int,
    global_step: int,
    history: list[dict],
    best_weights: dict[str, torch.Tensor] | None = None,
    extra: dict | None = None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / WEIGHTS)
    if ema is not None:
        save_weights(ema.module, directory / EMA_WEIGHTS)
    if best_weights is not None:
        save_file(best_weights, str(directory / BEST_WEIGHTS))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
        },
        directory / STATE,
    )
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(directory.iterdir())
        if path.name != METADATA
    }
    metadata = {"epoch": epoch, "global_step": global_step, "history": history, "files": files, **(extra or {})}
    temporary = directory / f".{METADATA}.tmp"
    temporary.write_text(json.dumps(metadata, indent=2))
    os.replace(temporary, directory / METADATA)


def read_checkpoint_metadata(directory: Path) -> dict:
    """The checkpoint's metadata after checking every listed file; CheckpointError names what is wrong."""
    path = directory / METADATA
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {METADATA} (the checkpoint was not finished)")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    for name, expected in metadata.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size != expected["bytes"] or file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: size or sha256 differs from {METADATA}")
    if WEIGHTS not in metadata.get("files", {}):
        raise CheckpointError(f"{directory}: {METADATA} lists no {WEIGHTS}")
    return metadata


def load_weights(path: Path, model: nn.Module) -> None:
    model.load_state_dict(load_file(str(path)))


def load_training_state(directory: Path, model: nn.Module, optimizer, scheduler, ema) -> dict:
    """Restore model, optimizer, scheduler and EMA in place; return epoch, step and history.

    A checkpoint without EMA weights was written with the EMA off (its files are all checked against its
    metadata, so none was lost): an EMA asked for now starts from the resumed weights, with a warning, rather
    than from the initial ones it was built from.
    RNG state is not stored: training reseeds every stream from (seed, epoch, rank) at each epoch.
    """
    metadata = read_checkpoint_metadata(directory)
    load_weights(directory / WEIGHTS, model)
    if ema is not None:
        if (directory / EMA_WEIGHTS).is_file():
            load_weights(directory / EMA_WEIGHTS, ema.module)
        else:
            log.warning("%s has no %s (it was written with the EMA off): the EMA starts again from the resumed "
                        "model's weights", directory, EMA_WEIGHTS)
            ema.set(model)
    try:
        state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError for refused content
        raise CheckpointError(f"{directory / STATE}: refused to load ({type(error).__name__}: {error})") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return {**state, "history": metadata["history"]}


def checkpoint_dirs(run_path: Path) -> list[Path]:
    """Ray Train's checkpoint directories of one run, newest first (their names sort by time)."""
    if not run_path.is_dir():
        return []
    return sorted((p for p in run_path.glob("checkpoint_*") if p.is_dir()), reverse=True)


def find_resume_checkpoint(preferred: Path | None, run_path: Path | None) -> Path | None:
    """The checkpoint to resume from: the valid one furthest into training; `preferred` (Ray's latest) on a
    tie, else the newest.

    A driver killed right after a checkpoint was written can leave it on disk, complete, but not yet in
    Ray's snapshot; Ray alone would resume from the one before and train that epoch again.
    None means there is nothing to resume. Checkpoints that exist but are all damaged raise, so a
    resume never silently starts over from epoch 1.
    """
    candidates = ([preferred] if preferred is not None else []) + (checkpoint_dirs(run_path) if run_path else [])
    problems, valid = [], []
    for candidate in dict.fromkeys(candidates):
        try:
            valid.append((read_checkpoint_metadata(candidate)["epoch"], candidate))
        except CheckpointError as error:
            problems.append(str(error))
    if valid:
        return max(valid, key=lambda pair: pair[0])[1]  # max keeps the first of equals: preferred, then newest
    if problems:
        raise CheckpointError("no valid checkpoint to resume from: " + "; ".join(problems))
    return None


def latest_valid_checkpoint(run_path: Path) -> Path | None:
    try:
        return find_resume_checkpoint(None, run_path)
    except CheckpointError:
        return None
