"""Trainings that only take time: flows/pipeline.py's scheduling tested without Ray or models."""

from __future__ import annotations

import time

import pytest
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

BASELINE, VIT, DEIT, SWIN = ("resnet18_cifar", "vit_tiny_patch4_32", "deit_tiny_distilled_patch4_32",
                             "swin_tiny_patch2_window4_32")
DURATIONS = {BASELINE: 2.0, VIT: 0.5, SWIN: 0.5, DEIT: 0.5}


@pytest.fixture(name="fake_trainings")
def fake_trainings_fixture(monkeypatch):
    """train_model replaced by one that takes DURATIONS[model] seconds, records when it ran, and writes weights."""
    import tasks.training.train
    from tasks.layout import RunLayout
    from tasks.training.train import TrainOutcome

    calls: list[dict] = []

    def train_model(config, model_name, *, teacher_weights=None, group=None):
        started = time.monotonic()
        time.sleep(DURATIONS[model_name])
        out = RunLayout.of(config).model_dir(model_name)
        out.mkdir(parents=True, exist_ok=True)
        for which in ("best", "last"):
            (out / f"{which}.safetensors").write_text(f"{model_name} of {config.tracking.flow_run}")
        calls.append({"model": model_name, "start": started, "end": time.monotonic(), "teacher": teacher_weights,
                      "group": group, "flow_run": config.tracking.flow_run})
        return TrainOutcome(model_name, out / "best.safetensors", out / "last.safetensors", [], best_epoch=1,
                            best_val_acc=0.5, checkpoint_dir="", train_seconds=0.0)

    monkeypatch.setattr(tasks.training.train, "train_model", train_model)  # the flow imports it in train_task
    return calls


@flow(task_runner=ThreadPoolTaskRunner(max_workers=8))
def trainings(config, slots: int, reuse: bool):
    """The flow's trainings alone, as the flow runs them."""
    from flows.pipeline import _train_models

    return _train_models(config, "f" * 64, config.tracking.flow_run, slots, reuse)


def intervals_overlap(calls: list[dict]) -> int:
    """The most trainings that ran at the same time."""
    events = sorted([(call["start"], 1) for call in calls] + [(call["end"], -1) for call in calls])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def flow_config(config, flow_run: str):
    """`config` as the flow gives it to one flow run."""
    claimed = config.model_copy(deep=True)
    claimed.tracking.flow_run = flow_run
    return claimed
