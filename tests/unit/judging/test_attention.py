"""Attention maps: rollout on matrices with a known answer, Swin's window stitching, the grids."""

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.config import ModelSpec
from tasks.judging.attention import (
    ATTENTION_IMAGES,
    attention_maps,
    attention_rollout,
    grid_pixel_size,
    model_panels,
    select_images,
    stitch_windows,
    swin_received_attention,
)
from tasks.models import build_model
from tests.support.evaluation import NUM_CLASSES, SCRAMBLE_STD, TINY_TRANSFORMERS, save_random_weights, tiny_config
from vitmodels import SwinAttentionMap
from vitmodels.swin import window_partition

TOKENS = 5


def test_rollout_of_identity_attention_is_identity():
    identity = torch.eye(TOKENS).expand(2, 3, TOKENS, TOKENS)
    torch.testing.assert_close(attention_rollout([identity] * 4), torch.eye(TOKENS).expand(2, TOKENS, TOKENS))


def test_rollout_of_uniform_attention_has_the_closed_form():
    # (0.5 U + 0.5 I)^L = 0.5^L I + (1 - 0.5^L) U, as U U = U: every token keeps 0.5^L extra on itself
    uniform = torch.full((1, 2, TOKENS, TOKENS), 1 / TOKENS)
    layers = 3
    expected = 0.5**layers * torch.eye(TOKENS) + (1 - 0.5**layers) / TOKENS
    rollout = attention_rollout([uniform] * layers)[0]
    torch.testing.assert_close(rollout, expected)
    class_row = rollout[0, 1:]
    torch.testing.assert_close(class_row, torch.full_like(class_row, class_row[0].item()))


def test_rollout_averages_heads_and_multiplies_later_blocks_on_the_left():
    to_token_1 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    to_token_0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    first = torch.stack([torch.eye(2), to_token_1])[None]  # heads average to [[.5, .5], [0, 1]]
    second = to_token_0[None, None]
    # residual mix: first -> [[.75, .25], [0, 1]], second -> [[1, 0], [.5, .5]]; rollout = second @ first
    expected = torch.tensor([[0.75, 0.25], [0.375, 0.625]])
    torch.testing.assert_close(attention_rollout([first, second])[0], expected)


SHIFTED = {"resolution": (8, 8), "window_size": (4, 4), "shift_size": (2, 2)}


def test_stitching_undoes_window_partition_and_the_cyclic_shift():
    grid = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 8, 8)
    shifted = torch.roll(grid, shifts=(-2, -2), dims=(1, 2))  # what the Swin block partitions
    windows = window_partition(shifted[..., None], (4, 4))[..., 0]  # [2 * 4 windows, 16]
    torch.testing.assert_close(stitch_windows(windows, **SHIFTED), grid)


def test_received_attention_lands_on_the_attended_tokens_own_positions():
    # every query attends only to token 0 of its window; in the shifted map that token sits at
    # (r * 4 + 2) % 8, (c * 4 + 2) % 8 for window (r, c), i.e. rows and columns 2 and 6
    probs = torch.zeros(4, 3, 16, 16)
    probs[..., 0] = 1.0
    received = swin_received_attention(SwinAttentionMap(probs, **SHIFTED))[0]
    expected = torch.zeros(8, 8)
    expected[2::4, 2::4] = 1.0
    torch.testing.assert_close(received, expected)


def test_selected_images_are_one_per_class_and_seeded(subset_shards):
    images, labels, keys = select_images(subset_shards)
    assert images.shape == (ATTENTION_IMAGES, 3, 32, 32) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == list(range(NUM_CLASSES))
    assert select_images(subset_shards)[2] == keys
    assert select_images(subset_shards, seed=1)[2] != keys


@pytest.mark.parametrize("spec", TINY_TRANSFORMERS, ids=lambda spec: spec["name"])
def test_maps_depend_on_the_image(spec, subset_shards):
    torch.manual_seed(0)
    model = build_model(ModelSpec(**spec), NUM_CLASSES).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, SCRAMBLE_STD)
    images, _, _ = select_images(subset_shards, count=2)
    _, panels = model_panels(model, images.float() / 255)
    for panel in panels:
        first, second = panel.maps
        assert not torch.allclose(first, second, atol=1e-3), panel.title


def test_grids_for_every_transformer(tmp_path, subset_shards):
    config = tiny_config(tmp_path, subset_shards)
    save_random_weights(config, scramble=True)
    written = attention_maps(config)
    assert list(written) == [spec.name for spec in config.model.transformers]
    heads = 3
    # image + per prefix token (heads, mean, rollout); Swin: image + one map per stage
    columns = {"vit_tiny_patch4_32": 1 + heads + 2, "deit_tiny_distilled_patch4_32": 1 + 2 * (heads + 2),
               "swin_tiny_patch2_window4_32": 1 + 2}
    for name, path in written.items():
        assert path == config.run_dir / "attention" / f"{name}.png"
        with Image.open(path) as image:
            assert image.size == grid_pixel_size(ATTENTION_IMAGES, columns[name])
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 0  # drawn, not blank
