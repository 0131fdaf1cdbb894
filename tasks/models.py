"""A model as the configuration describes it, and the numeric format it runs in.

Shared by training, the judging steps (evaluate, attention), inference and the benchmarks, so that all of
them build and run exactly the same network; nothing here depends on how a model is trained.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from tasks.config import ModelSpec, PipelineConfig, TrainingConfig


def build_model(spec: ModelSpec, num_classes: int) -> nn.Module:
    import vitmodels

    # Only the regularisers the config sets are passed: None keeps the architecture's own default (and not
    # every timm family takes every keyword), while an explicit 0.0 must reach the model as 0.0.
    regularisers = {
        key: value for key in ("drop_rate", "drop_path_rate") if (value := getattr(spec, key)) is not None
    }
    return vitmodels.create_model(
        spec.name,
        num_classes=num_classes,
        pretrained=spec.pretrained,
        pretrained_file=spec.pretrained_file,
        **regularisers,
        **spec.build_kwargs,
    )


def autocast_context(config: PipelineConfig, device: torch.device) -> AbstractContextManager:
    """bf16 autocast on any device when training.bf16 is on. CPUs with native bf16 (AVX512-BF16, AMX) gain as
    GPUs do; on CPUs without it bf16 is emulated and slower, which is why the CPU configs leave it off."""
    if config.training.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def uses_channels_last(training: TrainingConfig, spec: ModelSpec) -> bool:
    return training.channels_last if spec.channels_last is None else spec.channels_last
