"""Training settings that decide how each step runs: bf16 autocast and the memory format per model."""

import pytest
import torch

from tasks.config import build_config
from tasks.models import autocast_context, uses_channels_last
from tasks.training.recipe import steps_per_epoch


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_bf16_setting_decides_matmul_precision_on_cpu(bf16, expected):
    config = build_config({"training": {"bf16": bf16}})
    weights, inputs = torch.randn(4, 4), torch.randn(2, 4)
    with autocast_context(config, torch.device("cpu")):
        assert (inputs @ weights).dtype == expected


def test_channels_last_per_model_overrides_the_training_default():
    config = build_config({
        "model": {"baseline": {"name": "resnet18_cifar", "channels_last": True},
                  "transformers": [{"name": "vit_tiny_patch4_32"},
                                   {"name": "swin_tiny_patch2_window4_32", "channels_last": False}]},
        "training": {"channels_last": False},
    })
    decided = {spec.name: uses_channels_last(config.training, spec) for spec in config.model.all_specs()}
    assert decided == {"resnet18_cifar": True, "vit_tiny_patch4_32": False, "swin_tiny_patch2_window4_32": False}
    everywhere = config.model_copy(update={"training": config.training.model_copy(update={"channels_last": True})})
    assert uses_channels_last(everywhere.training, everywhere.model.spec("vit_tiny_patch4_32"))
    assert not uses_channels_last(everywhere.training, everywhere.model.spec("swin_tiny_patch2_window4_32"))


@pytest.mark.parametrize(("accum", "repeats", "expected"), [(1, 1, 8), (3, 1, 3), (3, 2, 6)])
def test_steps_per_epoch_counts_each_ranks_batches_in_accumulation_groups(accum, repeats, expected):
    # 1,000 images on 2 ranks: 500 each, in batches of 64 (32 distinct images when each is repeated twice).
    config = build_config({"training": {"batch_size": 64, "grad_accum_steps": accum},
                           "data": {"augment": {"repeated_augmentation": repeats}}})
    assert steps_per_epoch(config, 1000, 2) == expected
