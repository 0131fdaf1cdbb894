"""The training loop in this process (LocalContext), and the recipe decisions it rests on."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from timm.utils import ModelEmaV3
from torch import nn

from tasks.config import build_config
from tasks.data.loader import ShardStream
from tasks.errors import is_deterministic
from tasks.layout import BEST_WEIGHTS
from tasks.models import build_model
from tasks.training.checkpoints import EMA_WEIGHTS, checkpoint_dirs, read_checkpoint_metadata
from tasks.training.recipe import check_ema_horizon, ema_initial_share
from tasks.training.train_loop import (
    NonFiniteLossError,
    TrainingJob,
    average_batchnorm_statistics,
    fit_to_cores,
    run_training,
    setup,
    train_one_epoch,
)
from tasks.training.worker_context import LocalContext
from tests.conftest import SUBSET_VAL

TINY_VIT = {"name": "vit_tiny_patch4_32", "drop_path_rate": 0.0,
            "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}


def _config(tmp_path: Path, **training):
    return build_config({
        "data": {"loader_workers": 0},
        "model": {"baseline": TINY_VIT, "transformers": []},
        "training": {"epochs": 1, "batch_size": 256, "warmup_epochs": 0.2, "bf16": False, "ema_decay": 0.99,
                     "log_every_steps": 4, **training},
        "tracking": {"mode": "disabled", "output_dir": str(tmp_path / "runs"), "run_name": "local"},
    })


def test_in_process_training_scores_exports_and_resumes_the_ema(tmp_path, val_shards, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    averaged_at: list[int] = []  # the global step of each BatchNorm averaging (a no-op on one rank)
    monkeypatch.setattr("tasks.training.train_loop.average_batchnorm_statistics",
                        lambda loop: averaged_at.append(loop.global_step))
    context = LocalContext("cpu", checkpoint_root=root)
    first = run_training(context, TrainingJob(_config(tmp_path), "vit_tiny_patch4_32", val_shards))
    [epoch] = first
    assert epoch["val_samples"] == SUBSET_VAL and 0 < epoch["val_acc"] <= 1
    assert epoch["global_step"] == 18  # ceil(4585 / 256) steps, one rank
    assert "train_acc" in epoch and "train_acc_dominant_label" not in epoch  # no mixing: plain top-1
    [checkpoint] = checkpoint_dirs(root)
    metadata = read_checkpoint_metadata(checkpoint)
    assert metadata["scored_weights"] == EMA_WEIGHTS and metadata["best_epoch"] == 1
    best, ema = load_file(checkpoint / BEST_WEIGHTS), load_file(checkpoint / EMA_WEIGHTS)
    raw = load_file(checkpoint / "model.safetensors")
    assert best.keys() == ema.keys() and all(torch.equal(best[k], ema[k]) for k in best)
    assert not all(torch.equal(best[k], raw[k]) for k in best)  # the EMA, not the raw weights

    # The same run with a longer budget resumes after epoch 1 instead of starting over.
    resumed = run_training(LocalContext("cpu", checkpoint_root=root),
                           TrainingJob(_config(tmp_path, epochs=2), "vit_tiny_patch4_32", val_shards))
    assert [e["epoch"] for e in resumed] == [1, 2] and resumed[0] == first[0]
    assert resumed[1]["global_step"] == 36
    assert averaged_at == [18, 36]  # after each epoch's training, before its validation


def test_the_real_recipes_augmentation_trains_on_odd_batches_with_accumulation(tmp_path, val_shards):
    config = _config(tmp_path, batch_size=255, grad_accum_steps=2).model_copy(deep=True)
    config.data.augment = config.data.augment.model_copy(update={
        "auto_augment": "rand-m9-mstd0.5-inc1", "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_prob": 1.0})
    stream_sizes = {len(labels) for _, labels, _ in ShardStream(val_shards, "train", 255, train=True)}
    assert any(size % 2 for size in stream_sizes)  # 4585 images in 18 batches of 254 and 255
    [epoch] = run_training(LocalContext("cpu"), TrainingJob(config, "vit_tiny_patch4_32", val_shards))
    assert epoch["global_step"] == 9  # 18 batches, 2 per optimizer step
    assert "train_acc_dominant_label" in epoch and "train_acc" not in epoch
    assert torch.isfinite(torch.tensor(epoch["train_loss"]))


def test_every_accumulation_group_steps_on_the_mean_loss_of_its_micro_batches_the_short_last_one_too(
        tmp_path, val_shards, monkeypatch):
    # 4585 images in 5 batches of 917, accumulated 3 at a time: a group of 3, then a short last group of 2.
    loop = setup(LocalContext("cpu"), TrainingJob(_config(tmp_path, batch_size=1024, grad_accum_steps=3),
                                                     "vit_tiny_patch4_32", val_shards))
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    criterion = loop.criterion
    loss_of = criterion.forward

    def recording_loss(inputs, outputs, labels):
        micro_batches.append((inputs.detach().clone(), labels.detach().clone()))
        return loss_of(inputs, outputs, labels)

    monkeypatch.setattr(criterion, "forward", recording_loss)
    gradients: list[dict[str, torch.Tensor]] = []

    def keep_gradients_without_stepping(loop):  # the weights stay as they are: every group is recomputable
        gradients.append({name: param.grad.clone() for name, param in loop.model.named_parameters()})
        loop.optimizer.zero_grad(set_to_none=True)
        loop.global_step += 1

    monkeypatch.setattr("tasks.training.train_loop.optimizer_step", keep_gradients_without_stepping)
    train_one_epoch(loop, 0)
    assert [len(labels) for _, labels in micro_batches] == [917] * 5 and len(gradients) == 2

    # The reference: one forward and backward of the group's micro-batches as one batch (a deterministic model:
    # no dropout or drop-path), whose mean loss is the mean of the equal-sized micro-batches' means.
    model = loop.model
    groups = (micro_batches[:3], micro_batches[3:])  # the full group, then the short last one
    for group, group_gradients in zip(groups, gradients, strict=True):
        images, labels = torch.cat([images for images, _ in group]), torch.cat([labels for _, labels in group])
        model.zero_grad(set_to_none=True)
        loss_of(images, model(images), labels).backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(group_gradients[name], param.grad, rtol=1e-4, atol=1e-7,
                                       msg=lambda text, name=name: f"{name}: {text}")


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, val_shards):
    root = tmp_path / "checkpoints"
    root.mkdir()
    config = _config(tmp_path, epochs=2, lr=1e30, grad_clip_norm=None, warmup_epochs=0)
    with pytest.raises(NonFiniteLossError, match="NaN or infinite.*last good checkpoint"):
        run_training(LocalContext("cpu", checkpoint_root=root), TrainingJob(config, "vit_tiny_patch4_32", val_shards))
    assert len(checkpoint_dirs(root)) <= 1  # no checkpoint of the epoch that went bad


def _batchnorm_trainer(rank: int, world_size: int) -> SimpleNamespace:
    """A model and its EMA whose BatchNorm buffers are rank's own: mean rank (EMA 10 + rank), variance 1 + 2 x rank
    (EMA 11 + 2 x rank), batches tracked 5 + rank."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ema = ModelEmaV3(model, decay=0.99)
    for batchnorm, offset in ((model[1], 0), (ema.module[1], 10)):
        batchnorm.running_mean.fill_(offset + rank)
        batchnorm.running_var.fill_(offset + 1 + 2 * rank)
        batchnorm.num_batches_tracked.fill_(5 + rank)
    return SimpleNamespace(model=model, ema=ema, context=SimpleNamespace(world_size=world_size))


def _average_on_two_ranks(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loop = _batchnorm_trainer(rank, world_size=2)
        average_batchnorm_statistics(loop)
        for batchnorm, offset in ((loop.model[1], 0), (loop.ema.module[1], 10)):
            assert torch.equal(batchnorm.running_mean, torch.full((4,), offset + 0.5))  # (0 + 1) / 2
            assert torch.equal(batchnorm.running_var, torch.full((4,), offset + 2.0))  # (1 + 3) / 2
            assert batchnorm.num_batches_tracked.item() == 5 + rank
    finally:
        dist.destroy_process_group()


def test_two_ranks_validate_with_the_mean_of_their_batchnorm_statistics_in_model_and_ema(tmp_path, monkeypatch):
    # Forked: the ranks start in a blink instead of importing the training loop again (tens of seconds on a busy
    # machine); they run nothing but a few collectives on four-element tensors.
    torch.multiprocessing.start_processes(_average_on_two_ranks, args=(str(tmp_path / "rendezvous"),), nprocs=2,
                                          join=True, start_method="fork")
    # One rank: nothing to average, and torch.distributed (not initialised here) is not called.
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: pytest.fail("all_reduce on one rank"))
    alone = _batchnorm_trainer(rank=1, world_size=1)
    average_batchnorm_statistics(alone)
    assert torch.equal(alone.model[1].running_mean, torch.ones(4))
    assert torch.equal(alone.ema.module[1].running_var, torch.full((4,), 13.0))


@pytest.mark.parametrize(("rate", "expected_max"), [(0.0, 0.0), (0.3, 0.3), (None, 0.1)])
def test_explicit_zero_regularisers_reach_the_model(rate, expected_max):
    # swin_tiny_patch2_window4_32's own default drop_path_rate is 0.1; 0.0 in the config must mean 0.0.
    spec = build_config({"model": {"transformers": [
        {"name": "swin_tiny_patch2_window4_32", "drop_path_rate": rate,
         "model_kwargs": {"depths": [2, 2], "num_heads": [3, 6]}}
    ]}}).model.spec("swin_tiny_patch2_window4_32")
    model = build_model(spec, 10)
    probabilities = [module.drop_prob for module in model.modules() if type(module).__name__ == "DropPath"]
    assert max(probabilities, default=0.0) == pytest.approx(expected_max)
    if rate == 0.0:
        assert probabilities == []


def test_an_ema_too_slow_for_the_run_is_refused_by_name():
    no_warmup = build_config({"training": {"ema_decay": 0.9999, "ema_warmup": False}}).training
    assert ema_initial_share(no_warmup, 9800) == pytest.approx(0.9999 ** 9798)  # ~38% of the random init
    message = check_ema_horizon(no_warmup, 9800)
    assert "training.ema_decay 0.9999" in message and "38%" in message and "ema_warmup" in message
    assert check_ema_horizon(no_warmup, 200_000) is None
    warmed = build_config({"training": {"ema_decay": 0.9999}}).training
    assert warmed.ema_warmup and check_ema_horizon(warmed, 9800) is None
    assert ema_initial_share(warmed, 9800) < 1e-20


class _Context:
    rank, world_size, device = 0, 4, torch.device("cpu")

    def __init__(self, local_world_size: int):
        self.local_world_size = local_world_size


def test_threads_and_loader_processes_fit_the_cores_the_worker_has(monkeypatch, caplog):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    config = build_config({"data": {"loader_workers": 6}, "scaling": {"cpus_per_worker": 8}})
    with caplog.at_level(logging.WARNING):
        assert fit_to_cores(_Context(local_world_size=4), config) == (1, 1)
    assert "scaling.cpus_per_worker" in caplog.text and "data.loader_workers" in caplog.text
    caplog.clear()
    small = build_config({"data": {"loader_workers": 1}, "scaling": {"cpus_per_worker": 2}})
    assert fit_to_cores(_Context(local_world_size=1), small) == (2, 1)
    assert caplog.text == ""


@pytest.mark.parametrize(("error", "deterministic"), [
    (AssertionError("Batch size should be even"), True),
    (ValueError("bad value"), True),
    (NonFiniteLossError("nan"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), True),
    (RuntimeError("Connection reset by peer"), False),
    (OSError("No route to host"), False),
    (torch.OutOfMemoryError("CUDA out of memory"), False),
])
def test_only_deterministic_errors_skip_retries(error, deterministic):
    assert is_deterministic(error) is deterministic
