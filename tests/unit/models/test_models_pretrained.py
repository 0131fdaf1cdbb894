"""Checkpoints of another shape: create_model(pretrained_file=...) and load_pretrained on a built model.

The hub is unreachable here, so timm's checkpoints are state dicts of timm models with random weights, saved
by the test (what timm's hub files are: the state dict of the same class).
"""
import logging
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.support.models import one_thread, scramble_  # noqa: F401  (one_thread: an autouse fixture)
from vitmodels import CheckpointMismatchError, VisionTransformer, create_model, load_pretrained
from vitmodels.pretrained import resample_patch_embed, resample_pos_embed, resample_relative_position_table
from vitmodels.swin import relative_position_index

TINY_VIT = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def save(state: dict[str, torch.Tensor], path, wrap: bool = False):
    """.safetensors as is; .pth the way training scripts save them, wrapped and with DDP's prefix."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif wrap:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save(state, path)
    return path


# --- resampling ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_pos_embed_resampled_to_its_own_grid_is_the_original(prefix):
    pos_embed = torch.randn(1, prefix + 14 * 14, 8)
    torch.testing.assert_close(resample_pos_embed(pos_embed, (14, 14), num_prefix_tokens=prefix), pos_embed,
                               rtol=0, atol=1e-6)


def test_pos_embed_resampling_keeps_rows_and_columns_apart_and_the_prefix_untouched():
    # a position embedding linear in (row, col) with different slopes: bicubic keeps a linear function in the
    # interior, and a transposed or scrambled grid would not
    rows, cols = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    ramp = (rows + 10 * cols).reshape(1, -1, 1)
    prefix = torch.tensor([[[-7.0], [-9.0]]])
    resampled = resample_pos_embed(torch.cat([prefix, ramp], dim=1), (7, 7), num_prefix_tokens=2)
    assert resampled.shape == (1, 2 + 49, 1)
    assert torch.equal(resampled[:, :2], prefix)
    grid = resampled[0, 2:, 0].view(7, 7)
    # new cell (i, j) covers old cells 2i..2i+1: its centre is old coordinate 2i + 0.5
    centres = torch.arange(7.0) * 2 + 0.5
    expected = centres[:, None] + 10 * centres[None, :]
    torch.testing.assert_close(grid[2:-2, 2:-2], expected[2:-2, 2:-2], rtol=0, atol=1e-3)


def test_enlarged_patch_embedding_gives_the_same_tokens_for_the_enlarged_patch():
    kernel = torch.randn(6, 3, 4, 4)
    big = resample_patch_embed(kernel, (16, 16))
    patches = torch.randn(5, 3, 4, 4)
    enlarged = F.interpolate(patches, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(F.conv2d(enlarged, big, stride=16), F.conv2d(patches, kernel, stride=4),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(resample_patch_embed(kernel, (4, 4)), kernel, rtol=0, atol=1e-5)


def test_swin_table_resampled_to_its_own_window_is_the_original():
    table = torch.randn(13 * 13, 3)
    torch.testing.assert_close(resample_relative_position_table(table, (7, 7)), table, rtol=0, atol=1e-6)
    assert resample_relative_position_table(table, (4, 4)).shape == (7 * 7, 3)


# --- create_model(pretrained_file=...) -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_vit_small():
    """timm's vit_small_patch16_224 (ImageNet: 224 px, 16 px patches, 1000 classes), 2 blocks for speed."""
    torch.manual_seed(0)
    return scramble_(timm.create_model("vit_small_patch16_224", depth=2)).state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_vit_small_224_checkpoint_fine_tunes_our_32px_vit_small(tmp_path, timm_vit_small, suffix, caplog):
    path = save(timm_vit_small, tmp_path / f"vit_small{suffix}", wrap=True)
    with caplog.at_level(logging.INFO, logger="vitmodels"):
        model = create_model("vit_small_patch4_32", num_classes=10, pretrained_file=path, depth=2)
    resampled = {"pos_embed", "patch_embed.proj.weight"}
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 384) and model.patch_embed.proj.weight.shape == (384, 3, 4, 4)
    assert model.head.weight.shape == (10, 384)
    state = model.state_dict()
    for key, value in timm_vit_small.items():
        if key not in resampled and not key.startswith("head."):
            assert torch.equal(state[key], value), key
    assert torch.equal(model.pos_embed[:, 0], timm_vit_small["pos_embed"][:, 0])  # the class token's row
    assert "resampled pos_embed (1, 197, 384) -> (1, 65, 384)" in caplog.text
    assert "resampled patch_embed.proj.weight" in caplog.text and "replaced" in caplog.text
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_num_classes_none_keeps_the_checkpoints_head(tmp_path, timm_vit_small):
    path = save(timm_vit_small, tmp_path / "vit_small.safetensors")
    model = create_model("vit_small_patch4_32", pretrained_file=path, depth=2)
    assert model.num_classes == 1000 and torch.equal(model.head.weight, timm_vit_small["head.weight"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_our_checkpoint_into_timms_own_model(tmp_path, suffix):
    source = scramble_(timm.create_model("vit_tiny_patch4_32", num_classes=100, depth=2))
    path = save(source.state_dict(), tmp_path / f"ours{suffix}")
    model = create_model("vit_tiny_patch16_224", num_classes=100, pretrained_file=path, depth=2)
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 192) and model.patch_embed.proj.weight.shape[-1] == 16
    assert torch.equal(model.head.weight, source.head.weight)
    same_grid = create_model("vit_tiny_patch16_224", num_classes=10, pretrained_file=path, depth=2, img_size=32,
                             patch_size=4)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(same_grid.state_dict()[key], value), key


def test_plain_vit_checkpoint_starts_a_deits_distillation_token_and_head(tmp_path):
    source = scramble_(timm.create_model("vit_tiny_patch16_224", depth=1))
    path = save(source.state_dict(), tmp_path / "vit.safetensors")
    deit = timm.create_model("deit_tiny_distilled_patch4_32", num_classes=1000, depth=1)
    report = load_pretrained(deit, path)
    assert torch.equal(deit.dist_token, source.cls_token)
    assert torch.equal(deit.head_dist.weight, source.head.weight) and torch.equal(deit.head.weight,
                                                                                  source.head.weight)
    assert torch.equal(deit.pos_embed[:, 1], deit.pos_embed[:, 0])  # the distillation token's position row
    assert report.initialised == {"pos_embed[dist_token row]": "pos_embed[cls_token row]",
                                  "dist_token": "cls_token", "head_dist.weight": "head.weight",
                                  "head_dist.bias": "head.bias"}
    # another class count: both heads start from the same fresh classifier
    fresh = create_model("deit_tiny_distilled_patch4_32", num_classes=10, pretrained_file=path, depth=1)
    assert torch.equal(fresh.head_dist.weight, fresh.head.weight) and fresh.head.weight.shape == (10, 192)


def test_deit_checkpoint_into_a_plain_vit_drops_the_distillation_parts(tmp_path):
    source = scramble_(timm.create_model("deit_tiny_distilled_patch16_224", depth=1))
    vit = timm.create_model("vit_tiny_patch4_32", num_classes=1000, depth=1)
    report = load_pretrained(vit, source.state_dict())
    assert set(report.dropped) == {"dist_token", "head_dist.weight", "head_dist.bias"}
    assert torch.equal(vit.head.weight, source.head.weight)
    assert torch.equal(vit.pos_embed[:, 0], source.pos_embed[:, 0])


def test_deit_heads_replaced_for_another_class_count(tmp_path):
    source = timm.create_model("deit_tiny_distilled_patch4_32", num_classes=100, depth=1)
    path = save(source.state_dict(), tmp_path / "deit.safetensors")
    model = create_model("deit_tiny_distilled_patch4_32", num_classes=10, pretrained_file=path, depth=1)
    assert model.head.weight.shape == model.head_dist.weight.shape == (10, 192)
    assert torch.equal(model.dist_token, source.dist_token)


def test_swin_tables_resampled_to_smaller_windows(tmp_path):
    swin = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    source = scramble_(timm.create_model("swin_tiny_patch4_window7_224", **swin))
    path = save(source.state_dict(), tmp_path / "swin.pth")
    # 128 px, 4x4 windows: the 13x13 offset tables of 7x7 windows become 7x7
    model = create_model("vp_swin_tiny_patch4_window7_224", num_classes=10, pretrained_file=path,
                         img_size=128, window_size=4, **swin)
    tables = [key for key in source.state_dict() if key.endswith("relative_position_bias_table")]
    state = model.state_dict()
    for key in tables:
        assert state[key].shape == (7 * 7, source.state_dict()[key].shape[1])
        torch.testing.assert_close(state[key], resample_relative_position_table(source.state_dict()[key], (4, 4)))
    # the derived buffers are the model's own, for its windows
    block = model.layers[0].blocks[1]
    assert torch.equal(block.attn.relative_position_index, relative_position_index((4, 4)))
    assert block.attn_mask.shape == (32 // 4 * 32 // 4, 16, 16)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, 10)
    # old timm checkpoints carry the derived buffers: dropped and reported
    with_buffers = dict(source.state_dict(), **{"layers.0.blocks.0.attn.relative_position_index": torch.zeros(1)})
    assert "layers.0.blocks.0.attn.relative_position_index" in load_pretrained(model, with_buffers).dropped


@pytest.mark.parametrize("name", ["vit_tiny_patch4_32", "deit_tiny_distilled_patch4_32"])
def test_a_checkpoint_of_the_same_shape_loads_bit_for_bit(name):
    kwargs = dict(depth=1, img_size=(32, 48))  # a 8x12 grid: nothing may assume square grids
    source = scramble_(timm.create_model(name, **kwargs))
    model = timm.create_model(name, **kwargs)
    report = load_pretrained(model, source.state_dict())
    assert report.summary() == "loaded as is"
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_headless_checkpoint_leaves_the_head_at_init(tmp_path):
    source = timm.create_model("vit_tiny_patch4_32", num_classes=0, depth=1)
    model = timm.create_model("vit_tiny_patch4_32", depth=1)
    head = model.head.weight.clone()
    report = load_pretrained(model, source.state_dict())
    assert report.missing == ["head.weight", "head.bias"] and torch.equal(model.head.weight, head)


def test_a_checkpoint_that_does_not_fit_names_the_keys():
    model = VisionTransformer(**TINY_VIT)
    state = dict(model.state_dict(), extra_layer=torch.zeros(1))
    del state["blocks.0.norm1.weight"]
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(7, 32)
    with pytest.raises(CheckpointMismatchError) as error:
        load_pretrained(model, state)
    message = str(error.value)
    assert "missing from the checkpoint: blocks.0.norm1.weight" in message
    assert "unexpected in the checkpoint: extra_layer" in message
    assert "blocks.1.mlp.fc1.weight (checkpoint (7, 32), model (128, 32))" in message


def test_pretrained_file_never_unpickles_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": VisionTransformer(**TINY_VIT).state_dict(), "payload": ArbitraryObject()}, path)
    with pytest.raises(pickle.UnpicklingError):
        create_model("vit_tiny_patch4_32", pretrained_file=path, **TINY_VIT)
    assert not ArbitraryObject.unpickled


class ArbitraryObject:
    unpickled = False

    def __setstate__(self, state):
        ArbitraryObject.unpickled = True


def test_pretrained_without_file_or_hub_weights_fails_clearly():
    with pytest.raises(RuntimeError, match="pretrained_file"):
        create_model("vit_tiny_patch4_32", pretrained=True)
