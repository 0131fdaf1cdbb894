import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from tasks.training.checkpoints import (
    EMA_WEIGHTS,
    METADATA,
    STATE,
    WEIGHTS,
    CheckpointError,
    find_resume_checkpoint,
    load_training_state,
    read_checkpoint_metadata,
    save_checkpoint,
)


def _parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _save(directory: Path, epoch: int) -> nn.Module:
    model, optimizer, scheduler = _parts()
    save_checkpoint(directory, model=model, optimizer=optimizer, scheduler=scheduler, ema=None, epoch=epoch,
                    global_step=10 * (epoch + 1), history=[{"epoch": e + 1} for e in range(epoch + 1)])
    return model


def test_round_trip_restores_everything(tmp_path):
    saved = _save(tmp_path / "checkpoint_1", epoch=1)
    model, optimizer, scheduler = _parts()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    state = load_training_state(tmp_path / "checkpoint_1", model, optimizer, scheduler, None)
    assert (state["epoch"], state["global_step"], len(state["history"])) == (1, 20, 2)
    for a, b in zip(saved.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert scheduler.last_epoch == 1 and optimizer.state_dict()["state"]


def test_a_resume_without_ema_weights_starts_the_ema_from_the_resumed_model(tmp_path, caplog):
    from timm.utils import ModelEmaV3

    directory = tmp_path / "checkpoint_1"
    saved = _save(directory, epoch=1)  # written with the EMA off
    model, optimizer, scheduler = _parts()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # the fresh run's initial weights, which the EMA is built from
    ema = ModelEmaV3(model, decay=0.99)
    with caplog.at_level(logging.WARNING, logger="tasks.training.checkpoints"):
        load_training_state(directory, model, optimizer, scheduler, ema)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(ema.module.state_dict()[name], tensor), name
    assert f"{directory} has no {EMA_WEIGHTS}" in caplog.text and "EMA starts again" in caplog.text


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _refresh_hashes(directory: Path) -> None:
    """What an attacker who can write the checkpoint would do: make the metadata match the payload."""
    from tasks.digests import file_sha256

    metadata = json.loads((directory / METADATA).read_text())
    for name in metadata["files"]:
        path = directory / name
        metadata["files"][name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    (directory / METADATA).write_text(json.dumps(metadata))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    directory = tmp_path / "checkpoint_1"
    _save(directory, epoch=0)
    marker = tmp_path / "pwned"
    with open(directory / STATE, "wb") as handle:
        pickle.dump({"optimizer": _Exploit(marker)}, handle)
    _refresh_hashes(directory)
    model, optimizer, scheduler = _parts()
    with pytest.raises(CheckpointError, match="refused to load"):
        load_training_state(directory, model, optimizer, scheduler, None)
    assert not marker.exists()


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path):
    older, newer = tmp_path / "checkpoint_2026-01-01_00-00-01", tmp_path / "checkpoint_2026-01-01_00-00-02"
    _save(older, epoch=0)
    _save(newer, epoch=1)
    assert find_resume_checkpoint(newer, tmp_path) == newer
    weights = newer / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: size or sha256"):
        read_checkpoint_metadata(newer)
    assert find_resume_checkpoint(newer, tmp_path) == older
    (older / STATE).unlink()
    with pytest.raises(CheckpointError, match="no valid checkpoint to resume from.*state.pt: missing"):
        find_resume_checkpoint(newer, tmp_path)


def test_unfinished_checkpoint_is_rejected(tmp_path):
    directory = tmp_path / "checkpoint_1"
    _save(directory, epoch=0)
    (directory / METADATA).unlink()
    with pytest.raises(CheckpointError, match="was not finished"):
        read_checkpoint_metadata(directory)
    assert find_resume_checkpoint(None, tmp_path / "empty") is None
