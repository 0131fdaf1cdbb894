"""create_model(pretrained_file=...): local checkpoints with a new head."""
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.helpers_models import one_thread, scramble_  # noqa: F401  (one_thread: an autouse fixture)
from vitmodels import VisionTransformer, create_model

TINY_VIT = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def cifar100_vit():
    torch.manual_seed(0)
    return timm.create_model("vp_vit_tiny_patch4_32", num_classes=100, depth=2)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name,kwargs", [
    ("vp_vit_tiny_patch4_32", dict(depth=2)),
    # timm's own name and class, resized to our checkpoint's geometry
    ("vit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=4)),
])
def test_pretrained_file_loads_with_a_new_head(tmp_path, cifar100_vit, suffix, name, kwargs):
    state = cifar100_vit.state_dict()
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)

    model = create_model(name, num_classes=10, pretrained_file=path, **kwargs)
    assert model.head.weight.shape == (10, 192)
    new_state = model.state_dict()
    for key, value in state.items():
        if not key.startswith("head."):
            assert torch.equal(new_state[key], value), key

    # same class count as the file: the trained head is kept (timm's preset says 10 or 1000 classes)
    same_head = create_model(name, num_classes=100, pretrained_file=path, **kwargs)
    assert torch.equal(same_head.head.weight, state["head.weight"])


def test_pretrained_file_new_heads_for_deit(tmp_path):
    source = timm.create_model("vp_deit_tiny_distilled_patch4_32", num_classes=100, depth=1)
    path = tmp_path / "deit.safetensors"
    save_file(source.state_dict(), path)
    model = create_model("vp_deit_tiny_distilled_patch4_32", num_classes=10, pretrained_file=path, depth=1)
    assert model.head.weight.shape == model.head_dist.weight.shape == (10, 192)
    assert torch.equal(model.dist_token, source.dist_token)


def test_pretrained_file_never_unpickles_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": VisionTransformer(**TINY_VIT).state_dict(), "payload": ArbitraryObject()}, path)
    with pytest.raises(pickle.UnpicklingError):
        create_model("vp_vit_tiny_patch4_32", pretrained_file=path, **TINY_VIT)
    assert not ArbitraryObject.unpickled


class ArbitraryObject:
    unpickled = False

    def __setstate__(self, state):
        ArbitraryObject.unpickled = True


def test_pretrained_without_file_or_hub_weights_fails_clearly():
    with pytest.raises(RuntimeError, match="pretrained_file"):
        create_model("vp_vit_tiny_patch4_32", pretrained=True)
