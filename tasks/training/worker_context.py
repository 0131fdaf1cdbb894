"""Where a training worker runs: its rank, device, checkpoints and reports, behind one small interface.

The training loop (tasks/training/train_loop.py) talks only to a WorkerContext. The pipeline trains through Ray
Train (`RayTrainContext`, one per rank of a TorchTrainer); `LocalContext` runs the same loop in this process,
on one device and without Ray installed, for benchmarks, tests and single-GPU debugging.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from tasks.training.checkpoints import checkpoint_dirs

log = logging.getLogger(__name__)


class WorkerContext(Protocol):
    rank: int
    world_size: int
    # Workers on this machine: they share its cores.
    local_world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model wrapped for data-parallel training (DDP across ranks), already on `device`."""
        ...

    def latest_checkpoint(self) -> AbstractContextManager[Path | None]:
        """A context manager: the checkpoint directory this run last reported, to resume from, readable while
        the block runs; None on a fresh start."""
        ...

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        """Report one epoch's metrics (every rank: it is a barrier); rank 0 attaches the checkpoint."""
        ...


class RayTrainContext:
    """The context of one Ray Train worker; built inside the function a TorchTrainer runs."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_world_size = context.get_local_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import pyarrow.fs
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        # A local or shared file system: read in place. Object storage (s3://...): downloaded into a temporary
        # directory, shared by the ranks of this node and deleted after the last leaves, so that no copy of
        # the checkpoint is left on the node's disk.
        if self.rank == 0 and not isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            log.info("downloading checkpoint %s://%s to resume from it", checkpoint.filesystem.type_name,
                     checkpoint.path)
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalContext:
    """One process, one device, no Ray. Reported metrics are kept in `reports`; checkpoints, when a
    `checkpoint_root` is given, are copied there as checkpoint_<epoch> directories, so a second run with the
    same root resumes as a Ray Train run would."""

    rank = 0
    world_size = 1
    local_world_size = 1

    def __init__(self, device: torch.device | str = "cpu", checkpoint_root: Path | None = None) -> None:
        self.device = torch.device(device)
        self.checkpoint_root = checkpoint_root
        self.reports: list[dict] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = checkpoint_dirs(self.checkpoint_root) if self.checkpoint_root is not None else []
        yield found[0] if found else None

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None and self.checkpoint_root is not None:
            # Named by time, as Ray Train names them, so the newest sorts first.
            target = self.checkpoint_root / f"checkpoint_{time.time_ns():020d}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
