"""timm's model API on every model vitmodels registers (parametrised over the registry, as timm's own suite is).

Each preset is built at its own input size with tiny widths and depths, and with scrambled weights: at init,
near-zero heads, identity LayerNorms and zero-initialised residual branches would hide mistakes.
"""
import copy
import fnmatch

import pytest
import timm
import torch
from timm.layers import set_fused_attn
from timm.models import group_parameters
from timm.utils import AttentionExtract
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from tasks.config import our_model_names
from tests.support.models import one_thread, scramble_  # noqa: F401  (one_thread: an autouse fixture)
from vitmodels import (
    DistilledVisionTransformer,
    ResNet,
    SwinAttentionMap,
    SwinTransformer,
    VisionTransformer,
    capture_attention,
)
from vitmodels.layers import POOL_TYPES_2D
from vitmodels.vision_transformer import VIT_POOL_TYPES

MODELS = our_model_names()
BATCH = 2
# the timm architecture whose pretrained cfg each preset's is checked against
TIMM_COUNTERPARTS = {
    "vit_tiny_patch4_32": "vit_tiny_patch16_224",
    "vit_small_patch4_32": "vit_small_patch16_224",
    "vp_vit_small_patch16_224": "vit_small_patch16_224",
    "vp_vit_base_patch16_224": "vit_base_patch16_224",
    "vp_vit_large_patch16_224": "vit_large_patch16_224",
    "deit_tiny_distilled_patch4_32": "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch4_32": "deit_small_distilled_patch16_224",
    "vp_deit_small_distilled_patch16_224": "deit_small_distilled_patch16_224",
    "swin_tiny_patch2_window4_32": "swin_tiny_patch4_window7_224",
    "vp_swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224",
    "vp_swin_base_patch4_window7_224": "swin_base_patch4_window7_224",
    "resnet18_cifar": "resnet18",
    "resnet50_cifar": "resnet50",
}
# timm's global_pool values for each family (DeiT's heads read the tokens: 'token' only, as in timm)
POOLS = {VisionTransformer: VIT_POOL_TYPES, DistilledVisionTransformer: ("token",),
         SwinTransformer: POOL_TYPES_2D, ResNet: POOL_TYPES_2D}


def family(name: str) -> type[nn.Module]:
    with torch.device("meta"):
        return type(timm.create_model(name))


def tiny_kwargs(name: str) -> dict:
    """Widths and depths small enough for CPU tests; 3 blocks so timm's default out_indices=3 exists."""
    with torch.device("meta"):
        preset = timm.create_model(name)
    if isinstance(preset, VisionTransformer):
        kwargs = dict(embed_dim=32, depth=3, num_heads=2)
    elif isinstance(preset, SwinTransformer):
        stages = len(preset.layers)
        kwargs = dict(embed_dim=8, depths=(2,) * stages, num_heads=(1, 2, 2, 4)[:stages])
    else:
        kwargs = dict(channels=(8, 16, 16, 32))
    return dict(kwargs, drop_path_rate=0.0)



def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return scramble_(timm.create_model(name, **{**tiny_kwargs(name), **kwargs})).eval()


def images(model: nn.Module) -> torch.Tensor:
    return torch.randn(BATCH, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))


def as_nchw(model: nn.Module, hooked: torch.Tensor) -> torch.Tensor:
    """A feature_info module's output ([B, N, C] tokens, [B, H, W, C] Swin grid, [B, C, H, W] map) as NCHW."""
    if isinstance(model, VisionTransformer):
        patches = hooked[:, model.num_prefix_tokens:]
        return patches.reshape(hooked.shape[0], *model.patch_embed.grid_size, -1).permute(0, 3, 1, 2)
    if isinstance(model, SwinTransformer):
        return hooked.permute(0, 3, 1, 2)
    return hooked


def hooked_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of every feature_info module in one plain forward: the reference for intermediates."""
    outputs = {}
    handles = [model.get_submodule(info["module"]).register_forward_hook(
        lambda module, args, output, key=info["module"]: outputs.__setitem__(key, output.clone()))
        for info in model.feature_info]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [outputs[info["module"]] for info in model.feature_info]


def heads(model: nn.Module) -> tuple[nn.Module, ...]:
    classifier = model.get_classifier()
    return classifier if isinstance(classifier, tuple) else (classifier,)


def test_the_registry_is_what_these_tests_cover():
    assert set(MODELS) == set(TIMM_COUNTERPARTS)


# --- forward_features / forward_head / classifier ------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_forward_features_then_head_is_forward(name):
    model = build(name)
    x = images(model)
    for training in (False, True):  # DeiT returns (cls, dist) logits in training
        model.train(training)
        with torch.no_grad():
            expected = model(x)
            combined = model.forward_head(model.forward_features(x))
        assert type(combined) is type(expected)
        for got, want in zip(combined if isinstance(combined, tuple) else (combined,),
                             expected if isinstance(expected, tuple) else (expected,), strict=True):
            assert torch.equal(got, want)
    assert isinstance(expected, tuple) == isinstance(model, DistilledVisionTransformer)


@pytest.mark.parametrize("name", MODELS)
def test_pre_logits_are_what_the_classifier_reads(name):
    model = build(name)
    with torch.no_grad():
        features = model.forward_features(images(model))
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    assert pooled.shape == (BATCH, model.head_hidden_size)
    assert all(head.in_features == model.head_hidden_size for head in heads(model))
    channels = features.shape[1] if isinstance(model, ResNet) else features.shape[-1]
    assert channels == model.num_features
    if isinstance(model, DistilledVisionTransformer):
        torch.testing.assert_close(pooled, (features[:, 0] + features[:, 1]) / 2)
    else:
        torch.testing.assert_close(model.get_classifier()(pooled), logits)


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier(name):
    model = build(name)
    x = images(model)
    model.reset_classifier(5)
    assert model.num_classes == 5 and all(head.out_features == 5 for head in heads(model))
    assert model(x).shape == (BATCH, 5)
    model.reset_classifier(0)
    assert all(isinstance(head, nn.Identity) for head in heads(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
        assert model(x).shape == (BATCH, model.head_hidden_size)


@pytest.mark.parametrize("name", MODELS)
def test_every_global_pool_of_the_family(name):
    pools = POOLS[family(name)]
    for pool in pools:
        num_classes = 0 if pool == "" else 7
        model = build(name, global_pool=pool, num_classes=num_classes)
        with torch.no_grad():
            out = model(images(model))
        if pool == "":
            assert out.ndim > 2  # unpooled tokens or map
        else:
            assert out.shape == (BATCH, 7), pool
    with pytest.raises(ValueError, match="global_pool"):
        build(name, global_pool="mean")


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier_switches_parameter_free_pooling(name):
    model = build(name)
    current = getattr(model.global_pool, "pool_type", model.global_pool)
    # the norm stays where it was built (before or after the pool), as in timm
    keep_norm = {"fc_norm": False} if isinstance(model, VisionTransformer) else {}
    pools = [p for p in POOLS[family(name)] if p not in ("", "map", "prr", current)]
    if not pools:  # DeiT: the heads read the class and distillation tokens
        with pytest.raises(ValueError, match="global_pool"):
            model.reset_classifier(3, global_pool="avg")
    if "map" in POOLS[family(name)]:  # an attention-pool head would start untrained: built, not switched to
        with pytest.raises(ValueError, match="map"):
            model.reset_classifier(3, global_pool="map")
    for pool in pools:
        model.reset_classifier(3, global_pool=pool)
        reference = build(name, global_pool=pool, num_classes=3, **keep_norm)
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(images(model)), reference(images(model)), msg=pool)


# --- features_only, forward_intermediates, prune_intermediate_layers -----------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_features_only_matches_feature_info_and_intermediates(name):
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, **tiny_kwargs(name)).eval()
    torch.manual_seed(0)  # the same initial weights: features_only wraps the model it built
    model = timm.create_model(name, **tiny_kwargs(name)).eval()
    x = images(model)
    with torch.no_grad():
        maps = features(x)
        expected = model.forward_intermediates(x, indices=features.feature_info.out_indices, intermediates_only=True)
    nhwc = isinstance(model, SwinTransformer)  # timm's Swin features keep the model's NHWC
    assert len(maps) == len(features.feature_info.out_indices) > 0
    for feature, info, reference in zip(maps, features.feature_info.get_dicts(), expected, strict=True):
        height, width = (size // info["reduction"] for size in x.shape[-2:])
        shape = (BATCH, height, width, info["num_chs"]) if nhwc else (BATCH, info["num_chs"], height, width)
        assert feature.shape == shape
        torch.testing.assert_close(feature.permute(0, 3, 1, 2) if nhwc else feature, reference)


@pytest.mark.parametrize("name", MODELS)
def test_features_only_out_indices(name):
    features = timm.create_model(name, features_only=True, out_indices=(0, -1), **tiny_kwargs(name)).eval()
    model = build(name)
    assert features.feature_info.channels() == [model.feature_info[0]["num_chs"], model.feature_info[-1]["num_chs"]]
    with torch.no_grad():
        assert len(features(images(model))) == 2


@pytest.mark.parametrize("name", MODELS)
def test_intermediates_match_a_hooked_forward(name):
    model = build(name)
    x = images(model)
    reference = [as_nchw(model, y) for y in hooked_features(model, x)]
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(intermediates) == len(model.feature_info)
    for got, want in zip(intermediates, reference, strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want)
    for got, want in zip(last_two, reference[-2:], strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(first[0], reference[0])
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(x, indices=len(model.feature_info) + 1)


@pytest.mark.parametrize("name", MODELS)
def test_intermediates_with_norm_and_other_formats(name):
    model = build(name)
    x = images(model)
    with torch.no_grad():
        plain = model.forward_intermediates(x, intermediates_only=True)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
    if isinstance(model, VisionTransformer):  # every block's tokens through the final norm
        hooked = hooked_features(model, x)
        for got, tokens in zip(normed, hooked, strict=True):
            torch.testing.assert_close(got, as_nchw(model, model.norm(tokens).detach()))
        with torch.no_grad():
            tokens = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True,
                                                 intermediates_only=True)
        for (patches, prefix), block_tokens in zip(tokens, hooked, strict=True):
            torch.testing.assert_close(torch.cat([prefix, patches], dim=1), block_tokens)
    elif isinstance(model, SwinTransformer):  # the final norm is sized for the last stage only
        for got, want in zip(normed[:-1], plain[:-1], strict=True):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(normed[-1], model.norm(plain[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        with torch.no_grad():
            nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        for got, want in zip(nhwc, plain, strict=True):
            torch.testing.assert_close(got, want.permute(0, 2, 3, 1))
    else:  # no final norm in a ResNet
        for got, want in zip(normed, plain, strict=True):
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NCL")


@pytest.mark.parametrize("name", MODELS)
def test_pruned_model_gives_the_same_intermediates(name):
    model = build(name)
    x = images(model)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([0, 1]) == [0, 1]
    with torch.no_grad():
        got = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert pruned(x).shape[0] == BATCH  # still runs end to end, headless
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(isinstance(head, nn.Identity) for head in heads(pruned))


# --- optimiser hooks: group_matcher, no_weight_decay, gradient checkpointing ---------------------------------

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_orders_every_parameter_from_stem_to_head(name, coarse):
    model = build(name)
    groups = group_parameters(model, model.group_matcher(coarse=coarse))
    names = [param for group in groups.values() for param in group]
    assert sorted(names) == sorted(dict(model.named_parameters()))
    group_of = {param: i for i, group in enumerate(groups.values()) for param in group}
    assert all(group_of[param] == 0 for param in group_of if param.startswith(("patch_embed.", "conv1.")))
    # from the stem through the feature stages to the head, groups never go back
    stage_groups = [[group_of[f"{info['module']}.{param}"] for param, _ in
                     model.get_submodule(info["module"]).named_parameters()] for info in model.feature_info]
    stage_groups = [groups_ for groups_ in stage_groups if groups_]
    assert all(max(a) <= min(b) for a, b in zip(stage_groups, stage_groups[1:], strict=False))
    assert min(stage_groups[0]) > 0 and len(groups) > 2


@pytest.mark.parametrize("name", MODELS)
def test_no_weight_decay_names_are_parameters(name):
    model = build(name)
    assert model.no_weight_decay() <= set(dict(model.named_parameters()))


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_keeps_outputs_and_gradients(name):
    model = build(name).train()
    x = images(model)

    def loss_and_grads():
        model.zero_grad()
        output = model(x)
        loss = sum(o.square().sum() for o in (output if isinstance(output, tuple) else (output,)))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected = loss_and_grads()
    model.set_grad_checkpointing(True)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, expected_loss)
    assert grads.keys() == expected.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, expected[key], msg=key)


# --- pretrained cfg ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg_is_complete(name):
    with torch.device("meta"):  # the full preset, shapes only
        model = timm.create_model(name)
        counterpart = timm.create_model(TIMM_COUNTERPARTS[name])
        features = model.forward_features(torch.empty(1, *model.pretrained_cfg["input_size"]))
    ours, theirs = model.pretrained_cfg, counterpart.pretrained_cfg
    weight_locations = {"url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag"}
    assert {k for k, v in theirs.items() if v is not None} - weight_locations <= {
        k for k, v in ours.items() if v is not None} | {"pool_size"}
    assert "pool_size" in ours
    grid = {ResNet: features.shape[-2:], SwinTransformer: features.shape[1:3]}.get(type(model))
    assert ours["pool_size"] == (None if grid is None else tuple(grid))
    assert isinstance(model.get_submodule(ours["first_conv"]), nn.Conv2d)
    classifiers = (ours["classifier"],) if isinstance(ours["classifier"], str) else ours["classifier"]
    assert tuple(model.get_submodule(c) for c in classifiers) == heads(model)
    assert ours["num_classes"] == model.num_classes and ours["architecture"] == name
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == ours["input_size"]


# --- FX, attention, TorchScript ------------------------------------------------------------------------------

def last_node_inside(nodes: list[str], module: str) -> str:
    return [node for node in nodes if node == module or node.startswith(f"{module}.")][-1]


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing the model in train mode")
@pytest.mark.parametrize("name", MODELS)
def test_fx_feature_extractor_equals_eager(name):
    model = build(name)
    x = images(model)
    train_nodes, eval_nodes = get_graph_node_names(model)  # no concrete_args needed
    assert train_nodes and eval_nodes
    feature_nodes = {last_node_inside(eval_nodes, info["module"]): info["module"] for info in model.feature_info}
    extractor = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]],
        eval_return_nodes={**feature_nodes, eval_nodes[-1]: "output"}).eval()
    with torch.no_grad():
        traced = extractor(x)
        torch.testing.assert_close(traced.pop("output"), model(x), rtol=0, atol=0)
    for got, want in zip(traced.values(), hooked_features(model, x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert extractor.train()(x)  # the training graph runs too


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing the model in train mode")
@pytest.mark.parametrize("name", MODELS)
def test_capture_and_timm_attention_extract_agree(name):
    model = build(name)
    x = images(model)
    if isinstance(model, ResNet):
        with pytest.raises(ValueError, match="no vitmodels attention"):
            with capture_attention(model):
                pass
        return
    with torch.no_grad():
        logits = model(x)
        with capture_attention(model) as maps:
            captured_logits = model(x)
    torch.testing.assert_close(captured_logits, logits)  # explicit softmax path, same result
    blocks = [m for m in model.modules() if hasattr(m, "attn")]
    assert len(maps) == len(blocks)
    probs = [m.probs if isinstance(m, SwinAttentionMap) else m for m in maps]
    for p in probs:
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))

    set_fused_attn(False)  # timm's recipe for AttentionExtract: no fused attention in models built now
    try:
        torch.manual_seed(0)
        unfused = scramble_(timm.create_model(name, **tiny_kwargs(name)))
    finally:
        set_fused_attn(True)
    for method, pattern in (("hook", "*attn_drop"), ("fx", "*attn.softmax")):
        extracted = AttentionExtract(unfused, method=method)(x)
        assert all(fnmatch.fnmatch(key, pattern) for key in extracted), method
        assert len(extracted) == len(maps), method
        for got, want in zip(extracted.values(), probs, strict=True):
            torch.testing.assert_close(got, want, msg=method)
    # capture leaves the model as it was: fused attention, no hooks
    assert all(m.attn.fused_attn for m in blocks)
    assert not any(m._forward_hooks for m in model.modules())


FAMILY_REPRESENTATIVES = list({family(name): name for name in sorted(MODELS, reverse=True)}.values())


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_torch_export_matches_eager(name):
    """torch.export, the supported way to a standalone graph (TorchScript is deprecated in the pinned torch)."""
    model = build(name)
    x = images(model)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_is_documented_as_unsupported(name):
    assert "TorchScript is not supported" in family(name).__doc__
