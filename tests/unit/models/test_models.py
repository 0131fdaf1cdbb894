"""vitmodels: parity with timm, attention maps, distillation loss, registration and names.

The timm model API over every registered model: test_models_api.py; checkpoint loading: test_models_pretrained.py.
"""
import inspect
import math

import pytest
import timm
import torch
from timm.models import model_entrypoint
from timm.models.deit import VisionTransformerDistilled as TimmDeiT
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from tasks.config import our_model_names
from tests.support.models import one_thread, scramble_  # noqa: F401  (one_thread: an autouse fixture)
from vitmodels import (
    DistillationLoss,
    DistilledVisionTransformer,
    SwinTransformer,
    VisionTransformer,
    capture_attention,
)
from vitmodels.layers import Attention, DropPath, Mlp, PatchEmbed
from vitmodels.resnet import BasicBlock, Bottleneck
from vitmodels.swin import PatchMerging, SwinHead, SwinTransformerBlock, SwinTransformerStage, WindowAttention
from vitmodels.vision_transformer import Block

TINY_VIT = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2)
TINY_SWIN = dict(img_size=16, patch_size=2, num_classes=10, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                 window_size=4)

CIFAR_PRESETS = [name for name in our_model_names() if not name.endswith("_224")]
# our 224 presets and the timm architecture each one mirrors
IMAGENET_PRESETS = {
    "vp_vit_small_patch16_224": "vit_small_patch16_224",
    "vp_vit_base_patch16_224": "vit_base_patch16_224",
    "vp_vit_large_patch16_224": "vit_large_patch16_224",
    "vp_deit_small_distilled_patch16_224": "deit_small_distilled_patch16_224",
    "vp_swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224",
    "vp_swin_base_patch4_window7_224": "swin_base_patch4_window7_224",
}


def image(*size: int) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(0))



# --- parity with timm ------------------------------------------------------------------------------------

PARITY_CASES = [
    (TimmViT, VisionTransformer, dict(TINY_VIT, patch_size=4), (2, 3, 32, 32)),
    (TimmViT, VisionTransformer,
     dict(img_size=224, patch_size=32, num_classes=7, embed_dim=64, depth=2, num_heads=4, qkv_bias=False),
     (2, 3, 224, 224)),
    (TimmViT, VisionTransformer, dict(TINY_VIT, img_size=(32, 48), mlp_ratio=2.0), (2, 3, 32, 48)),
    (TimmDeiT, DistilledVisionTransformer, dict(TINY_VIT, patch_size=4), (2, 3, 32, 32)),
    (TimmDeiT, DistilledVisionTransformer, dict(TINY_VIT, img_size=224, patch_size=32), (1, 3, 224, 224)),
    (TimmSwin, SwinTransformer, dict(TINY_SWIN, img_size=32, depths=(2, 2, 2), num_heads=(1, 2, 4)),
     (2, 3, 32, 32)),
    # 8x32 -> 4x16 -> 2x8 tokens: 2x8, 1x4 and 1x4 windows; the later stages are one window high, so only
    # their width shifts, and the last stage's window is clamped to 2x4
    (TimmSwin, SwinTransformer, dict(TINY_SWIN, img_size=(16, 64), depths=(2, 2, 2), num_heads=(1, 2, 4)),
     (2, 3, 16, 64)),
    (TimmSwin, SwinTransformer,
     dict(img_size=224, patch_size=4, num_classes=5, embed_dim=16, depths=(2, 2, 2, 2),
          num_heads=(1, 2, 2, 4), window_size=7), (1, 3, 224, 224)),
    (TimmSwin, SwinTransformer,
     dict(img_size=(112, 224), patch_size=4, num_classes=5, embed_dim=16, depths=(2, 2, 2),
          num_heads=(1, 2, 2), window_size=7), (1, 3, 112, 224)),
    # every other head timm's families offer: pooled tokens (the final norm moves after the pool), attention
    # pooling ('map', 'prr'), no pooling, an explicit norm placement; Swin's pooled grids
    *[(TimmViT, VisionTransformer, dict(TINY_VIT, global_pool=pool), (2, 3, 32, 32))
      for pool in ("avg", "max", "avgmax", "map", "prr", "")],
    (TimmViT, VisionTransformer, dict(TINY_VIT, global_pool="avg", fc_norm=False), (2, 3, 32, 32)),
    *[(TimmSwin, SwinTransformer, dict(TINY_SWIN, global_pool=pool), (2, 3, 16, 16))
      for pool in ("max", "avgmax", "catavgmax", "")],
]


@pytest.mark.parametrize("timm_cls,our_cls,kwargs,shape", PARITY_CASES,
                         ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_timm_state_dict_loads_strictly_both_ways_and_logits_match(timm_cls, our_cls, kwargs, shape):
    reference = scramble_(timm_cls(**kwargs)).eval()
    ours = our_cls(**kwargs).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = image(*shape)
    with torch.no_grad():
        expected = reference(x)
        assert expected.abs().max() > 1.0  # a signal a bug would disturb by far more than the tolerance
        assert (ours(x) - expected).abs().max() <= 1e-5

    ours = scramble_(our_cls(**kwargs)).eval()
    back = timm_cls(**kwargs).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert (back(x) - ours(x)).abs().max() <= 1e-5


def test_deit_training_returns_both_heads_like_timm_distilled_training():
    reference = scramble_(TimmDeiT(**TINY_VIT))
    reference.set_distilled_training(True)
    ours = DistilledVisionTransformer(**TINY_VIT)
    ours.load_state_dict(reference.state_dict())
    x = image(2, 3, 32, 32)
    cls_logits, dist_logits = ours.train()(x)
    expected_cls, expected_dist = reference.train()(x)
    torch.testing.assert_close(cls_logits, expected_cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(dist_logits, expected_dist, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.eval()(x), (cls_logits + dist_logits) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("global_pool", ["avg", "max", "avgmax", "catavgmax"])
def test_resnet_cifar_matches_timm_resnet_with_the_same_stem(global_pool):
    reference = timm.create_model("resnet18", num_classes=10, global_pool=global_pool)
    reference.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    scramble_(reference).eval()
    ours = timm.create_model("resnet18_cifar", global_pool=global_pool).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = image(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-5)
        assert ours.forward_head(ours.forward_features(x), pre_logits=True).shape == (2, reference.head_hidden_size)


@pytest.mark.parametrize("ours_name,timm_name", IMAGENET_PRESETS.items())
def test_imagenet_presets_have_the_architecture_of_their_timm_counterpart(ours_name, timm_name):
    with torch.device("meta"):  # shapes only: no memory, no init cost for ViT-L
        ours = timm.create_model(ours_name)
        reference = timm.create_model(timm_name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    assert ours.pretrained_cfg["input_size"] == (3, 224, 224)
    assert ours.pretrained_cfg["num_classes"] == 1000


def test_smallest_imagenet_preset_forwards_an_image():
    model = timm.create_model("vp_vit_small_patch16_224").eval()
    with torch.no_grad():
        assert model(image(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name", CIFAR_PRESETS)
def test_cifar_presets_build_through_timm_and_forward(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    assert cfg["mean"] == (0.4914, 0.4822, 0.4465) and cfg["std"] == (0.2470, 0.2435, 0.2616)
    with torch.no_grad():
        assert model(image(2, 3, 32, 32)).shape == (2, 10)


def test_vp_marks_exactly_the_presets_whose_name_timm_also_registers_and_names_say_what_they_are():
    ours = our_model_names()
    timm_own = {name for name in timm.list_models() if not model_entrypoint(name).__module__.startswith("vitmodels")}
    assert ours
    for name in ours:
        # vp_vit_base_patch16_224 is our build of timm's vit_base_patch16_224; vit_tiny_patch4_32 has no twin
        assert name.startswith("vp_") == (name.removeprefix("vp_") in timm_own), name
        with torch.device("meta"):
            distilled = isinstance(timm.create_model(name), DistilledVisionTransformer)
        assert distilled == ("distilled" in name), name


@pytest.mark.parametrize("cls", [Attention, WindowAttention, Block, SwinTransformerBlock, SwinTransformerStage,
                                 Mlp, PatchEmbed, PatchMerging, SwinHead, BasicBlock, Bottleneck])
def test_building_blocks_take_their_hyper_parameters_by_name(cls):
    """Two ints (or rates) side by side would swap silently: only the leading width may be positional."""
    parameters = list(inspect.signature(cls).parameters.values())
    positional = [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY
                  and p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert len(positional) <= 1, positional
    assert cls.__doc__ and "Args:" in cls.__doc__


# --- attention maps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_cls,prefix_tokens", [(VisionTransformer, 1), (DistilledVisionTransformer, 2)])
def test_vit_attention_maps_are_captured_from_a_plain_call(model_cls, prefix_tokens):
    model = scramble_(model_cls(**TINY_VIT)).eval()
    x = image(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        with capture_attention(model) as maps:
            logits_in_context = model(x)
            model(x[:1])  # every call replaces the maps
            assert maps[0].shape[0] == 1
            model(x)
    torch.testing.assert_close(logits_in_context, logits)  # the explicit softmax path, same logits
    tokens = prefix_tokens + (32 // 8) ** 2
    assert len(maps) == 2
    for probs in maps:
        assert probs.shape == (3, 2, tokens, tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, tokens))
    assert all(block.attn.fused_attn for block in model.blocks)  # back on the fast path after the context
    assert torch.equal(model(x), logits)


def test_captured_probabilities_are_the_ones_the_block_multiplies_with():
    model = scramble_(VisionTransformer(**TINY_VIT)).eval()
    block = model.blocks[0]
    x = image(2, 17, 32)
    with torch.no_grad(), capture_attention(block) as maps:
        out = block.attn(block.norm1(x))
        (probs,) = maps
        q, k, v = block.attn.qkv(block.norm1(x)).view(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)  # [B, nh, N, hd]
        expected = ((q / 4.0) @ k.transpose(-2, -1)).softmax(-1)  # head_dim 16: scale 1/4
        manual = block.attn.proj((probs @ v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)


def test_swin_attention_maps_are_captured_per_window():
    model = scramble_(SwinTransformer(**TINY_SWIN)).eval()
    x = image(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
        with capture_attention(model) as maps:
            torch.testing.assert_close(model(x), logits)
    # 8x8 tokens in four 4x4 windows, then 4x4 tokens in one window (which therefore never shifts)
    expected = [((8, 8), (0, 0), 4, 1), ((8, 8), (2, 2), 4, 1),
                ((4, 4), (0, 0), 1, 2), ((4, 4), (0, 0), 1, 2)]
    assert [(m.resolution, m.shift_size, m.probs.shape[0] // 2, m.probs.shape[1]) for m in maps] == expected
    for block_map in maps:
        assert block_map.window_size == (4, 4) and block_map.probs.shape[-2:] == (16, 16)
        torch.testing.assert_close(block_map.probs.sum(-1), torch.ones(block_map.probs.shape[:-1]))


def original_coords(block_map) -> torch.Tensor:
    """[num_windows, tokens, 2] grid (row, col) of each token, by the recipe in SwinAttentionMap's doc."""
    (H, W), (wh, ww), (sh, sw) = block_map.resolution, block_map.window_size, block_map.shift_size
    rows, cols = [], []
    for r in range(H // wh):
        for c in range(W // ww):
            i, j = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
            rows.append(((r * wh + i + sh) % H).flatten())
            cols.append(((c * ww + j + sw) % W).flatten())
    return torch.stack([torch.stack(rows), torch.stack(cols)], dim=-1)


def test_shifted_windows_never_attend_across_the_wrapped_border():
    model = scramble_(SwinTransformer(**TINY_SWIN)).eval()
    with torch.no_grad(), capture_attention(model) as maps:
        model(image(2, 3, 16, 16))
    for block_map in maps[:2]:
        coords = original_coords(block_map)  # [windows, tokens, 2]
        distance = (coords[:, :, None, :] - coords[:, None, :, :]).abs()
        # tokens brought together by the cyclic roll come from opposite image edges: a window apart or more
        across_border = (distance >= torch.tensor(block_map.window_size)).any(-1)  # [windows, tokens, tokens]
        probs = block_map.probs.view(2, -1, *block_map.probs.shape[1:])  # [B, windows, heads, N, N]
        across_border = across_border[None, :, None].expand_as(probs)
        if block_map.shift_size == (0, 0):
            assert not across_border.any()
        else:
            assert across_border.sum() > 0
            assert torch.all(probs[across_border] == 0)
        assert torch.all(probs[~across_border] > 0)


# --- training features -----------------------------------------------------------------------------------

def test_init_follows_timm():
    model = VisionTransformer(**dict(TINY_VIT, embed_dim=192, num_heads=3))
    assert 0.015 < model.pos_embed.std() < 0.025
    assert model.cls_token.abs().max() < 1e-4
    assert 0.015 < model.blocks[0].mlp.fc1.weight.std() < 0.025
    assert model.blocks[0].attn.qkv.bias.abs().max() == 0
    swin = SwinTransformer(**TINY_SWIN)
    assert 0.01 < swin.layers[0].blocks[0].attn.relative_position_bias_table.std() < 0.03
    resnet = timm.create_model("resnet18_cifar")
    assert resnet.layer1[0].bn2.weight.abs().max() == 0  # residual branches start as identity


def test_no_weight_decay_names_are_parameters():
    for model, required in [
        (VisionTransformer(**TINY_VIT), {"pos_embed", "cls_token"}),
        (DistilledVisionTransformer(**TINY_VIT), {"pos_embed", "cls_token", "dist_token"}),
        (SwinTransformer(**TINY_SWIN), {"layers.0.blocks.1.attn.relative_position_bias_table"}),
    ]:
        names = model.no_weight_decay()
        assert required <= names <= set(dict(model.named_parameters()))
    assert len(SwinTransformer(**TINY_SWIN).no_weight_decay()) == 4


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    drop = DropPath(0.5)
    x = torch.ones(4000, 3, 2)
    torch.manual_seed(0)
    out = drop.train()(x).flatten(1)
    # a sample's branch is dropped or kept whole, survivors scaled by 1 / keep_prob
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(out.amin(1), out.amax(1))
    assert abs(out.mean().item() - 1.0) < 0.05
    assert drop.eval()(x) is x


def test_a_model_with_drop_path_is_random_in_training_and_exact_in_eval():
    model = scramble_(VisionTransformer(**dict(TINY_VIT, drop_path_rate=0.5)))
    assert [block.drop_path1.drop_prob for block in model.blocks[1:]] == [0.5]
    without = VisionTransformer(**dict(TINY_VIT, drop_path_rate=0.0))
    without.load_state_dict(model.state_dict())
    x = image(8, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(0)
        assert not torch.allclose(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), without.eval()(x))


@pytest.mark.parametrize("model_cls,kwargs", [
    (VisionTransformer, TINY_VIT), (DistilledVisionTransformer, TINY_VIT), (SwinTransformer, TINY_SWIN)])
def test_default_forward_compiles_without_graph_breaks(model_cls, kwargs):
    torch._dynamo.reset()
    model = model_cls(**kwargs)
    x = image(2, 3, kwargs["img_size"], kwargs["img_size"])
    # the eager backend runs dynamo's tracing (where graph breaks come from) without slow CPU codegen
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled.train()(x)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), model(x))


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    torch._dynamo.reset()
    model = VisionTransformer(**TINY_VIT).eval()
    x = image(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-5, rtol=1e-5)


# --- distillation loss -----------------------------------------------------------------------------------

class FixedTeacher(nn.Module):
    """Returns set logits and records how it was called."""

    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.logits


def log_softmax(row: list[float], tau: float = 1.0) -> list[float]:
    log_total = math.log(sum(math.exp(v / tau) for v in row))
    return [v / tau - log_total for v in row]


STUDENT_CLS = [[0.0, 0.0, 0.0], [1.0, 0.0, -1.0]]
STUDENT_DIST = [[1.0, 2.0, 0.0], [0.5, -0.5, 3.0]]
TEACHER = [[0.0, 0.0, 5.0], [4.0, 1.0, 0.0]]
LABELS = [1, 0]


def distillation_case(distillation_type: str, alpha: float = 0.25, tau: float = 2.0):
    teacher = FixedTeacher(TEACHER).train()
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, distillation_type, alpha=alpha, tau=tau)
    cls_logits = torch.tensor(STUDENT_CLS, requires_grad=True)
    dist_logits = torch.tensor(STUDENT_DIST, requires_grad=True)
    loss = loss_fn(torch.zeros(2, 3, 4, 4), (cls_logits, dist_logits), torch.tensor(LABELS))
    return loss, loss_fn, teacher, dist_logits


def hand_base() -> float:
    return -sum(log_softmax(row)[label] for row, label in zip(STUDENT_CLS, LABELS, strict=True)) / 2


def test_hard_distillation_by_hand():
    loss, loss_fn, teacher, _ = distillation_case("hard")
    teacher_argmax = [2, 0]
    hard = -sum(log_softmax(row)[t] for row, t in zip(STUDENT_DIST, teacher_argmax, strict=True)) / 2
    assert loss.item() == pytest.approx(0.75 * hand_base() + 0.25 * hard, rel=1e-6)
    assert loss_fn.last_terms["base"].item() == pytest.approx(hand_base(), rel=1e-6)
    assert loss_fn.last_terms["distillation"].item() == pytest.approx(hard, rel=1e-6)
    assert teacher.calls == [(False, False)]  # eval mode, no autograd graph


def test_soft_distillation_by_hand():
    tau = 2.0
    loss, loss_fn, _, dist_logits = distillation_case("soft", tau=tau)
    kl = 0.0
    for student_row, teacher_row in zip(STUDENT_DIST, TEACHER, strict=True):
        log_p_student, log_p_teacher = log_softmax(student_row, tau), log_softmax(teacher_row, tau)
        kl += sum(math.exp(t) * (t - s) for s, t in zip(log_p_student, log_p_teacher, strict=True))
    soft = kl * tau * tau / 2  # summed over classes, averaged over the batch of 2
    assert loss.item() == pytest.approx(0.75 * hand_base() + 0.25 * soft, rel=1e-6)
    assert loss_fn.last_terms["distillation"].item() == pytest.approx(soft, rel=1e-6)
    loss.backward()
    assert dist_logits.grad.abs().sum() > 0


def test_distillation_scale_by_hand():
    """Two classes, tau = 2, numbers worked on paper. Teacher logits (2 ln 3, 0) / tau -> p = (3/4, 1/4); student
    (0, 0) -> q = (1/2, 1/2); KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2) = 3/4 ln 3 - ln 2. The second sample's student
    equals its teacher (KL 0). Soft = tau^2 * (3/4 ln 3 - ln 2) / batch 2 = 1.5 ln 3 - 2 ln 2 = 0.261624, and its
    gradient on the first sample's logits is tau^2 / 2 * (q - p) / tau = (-1/4, 1/4). Hard: cross entropy against
    the teacher's argmax: ln 2 for sample one, ln(10/9) for sample two (softmax(0, 2 ln 3) = (1/10, 9/10)), mean
    ln(20/9) / 2 = 0.399254. Base: cls logits (0, 0) give ln 2 = 0.693147 for either label."""
    ln3 = math.log(3.0)
    teacher = FixedTeacher([[2 * ln3, 0.0], [0.0, 2 * ln3]])
    expected = {"soft": 0.2616240, "hard": 0.3992538}
    assert expected["soft"] == pytest.approx(1.5 * ln3 - 2 * math.log(2), abs=1e-7)
    assert expected["hard"] == pytest.approx(math.log(20 / 9) / 2, abs=1e-7)
    for distillation_type, alpha in (("soft", 0.25), ("hard", 0.25), ("soft", 1.0), ("hard", 0.0)):
        loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, distillation_type, alpha=alpha, tau=2.0)
        dist_logits = torch.tensor([[0.0, 0.0], [0.0, 2 * ln3]], requires_grad=True)
        loss = loss_fn(torch.zeros(2, 3, 4, 4), (torch.zeros(2, 2), dist_logits), torch.tensor([0, 1]))
        assert loss_fn.last_terms["base"].item() == pytest.approx(0.6931472, abs=1e-6)
        assert loss_fn.last_terms["distillation"].item() == pytest.approx(expected[distillation_type], abs=1e-6)
        assert loss.item() == pytest.approx((1 - alpha) * 0.6931472 + alpha * expected[distillation_type], abs=1e-6)
        if distillation_type == "soft":
            loss.backward()
            torch.testing.assert_close(dist_logits.grad, alpha * torch.tensor([[-0.25, 0.25], [0.0, 0.0]]))


def test_no_distillation_uses_the_averaged_heads_and_soft_targets():
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), None, "none")
    mixed = torch.tensor([[0.0, 0.7, 0.3], [1.0, 0.0, 0.0]])  # mixup-style probabilities
    loss = loss_fn(None, (torch.tensor(STUDENT_CLS), torch.tensor(STUDENT_DIST)), mixed)
    averaged = [[(a + b) / 2 for a, b in zip(c, d, strict=True)] for c, d in zip(STUDENT_CLS, STUDENT_DIST,
                                                                                 strict=True)]
    expected = -sum(sum(p * lp for p, lp in zip(target, log_softmax(row), strict=True))
                    for target, row in zip(mixed.tolist(), averaged, strict=True)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss_fn.last_terms["distillation"].item() == 0


def test_distillation_trains_a_real_deit_against_a_resnet_teacher():
    student = timm.create_model("deit_tiny_distilled_patch4_32", depth=1).train()
    teacher = timm.create_model("resnet18_cifar").train()
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=0.5, tau=1.0)
    x = image(2, 3, 32, 32)
    loss = loss_fn(x, student(x), torch.tensor([1, 2]))
    loss.backward()
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert student.head_dist.weight.grad.abs().sum() > 0 and student.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        DistillationLoss(nn.CrossEntropyLoss(), None, "soft")


def test_resnet_channels_and_drop_path_follow_timm_keywords():
    kwargs = dict(channels=(16, 32, 64, 128))
    narrow = scramble_(timm.create_model("resnet18_cifar", drop_path_rate=0.2, **kwargs))
    assert narrow.conv1.out_channels == 16 and narrow.fc.in_features == 128
    rates = [block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
             for stage in narrow.stages() for block in stage]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 8).tolist())  # linear in depth, 0 at the first block
    plain = timm.create_model("resnet18_cifar", drop_path_rate=0.0, **kwargs)
    plain.load_state_dict(narrow.state_dict())
    x = image(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(narrow.eval()(x), plain.eval()(x))  # eval: the same net as without drop path
        torch.manual_seed(0)
        assert not torch.allclose(narrow.train()(x), narrow(x))  # training: each call draws its own paths
    with pytest.raises(ValueError, match="one width per stage"):
        timm.create_model("resnet18_cifar", channels=(16, 32))
