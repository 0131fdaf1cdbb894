"""vitmodels: parity with timm, attention maps, distillation loss, registration and fine-tuning loads."""
import math
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled as TimmDeiT
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from vitmodels import (
    DistillationLoss,
    DistilledVisionTransformer,
    SwinTransformer,
    VisionTransformer,
    capture_attention,
    create_model,
)

TINY_VIT = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2)
TINY_SWIN = dict(img_size=16, patch_size=2, num_classes=10, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                 window_size=4)

CIFAR_PRESETS = [
    "vit_tiny_patch4_32", "vit_small_patch4_32", "deit_tiny_distilled_patch4_32",
    "deit_small_distilled_patch4_32", "swin_tiny_patch2_window4_32", "resnet18_cifar", "resnet50_cifar",
]
# our 224 presets and the timm architecture each one mirrors
IMAGENET_PRESETS = {
    "vp_vit_small_patch16_224": "vit_small_patch16_224",
    "vp_vit_base_patch16_224": "vit_base_patch16_224",
    "vp_vit_large_patch16_224": "vit_large_patch16_224",
    "vp_deit_small_patch16_224": "deit_small_distilled_patch16_224",
    "vp_swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224",
    "vp_swin_base_patch4_window7_224": "swin_base_patch4_window7_224",
}


def image(*size: int) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(0))


def scramble_(model: nn.Module) -> nn.Module:
    """Random values in every parameter: at init, near-zero heads and identity LayerNorms would hide bugs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


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


def test_resnet_cifar_matches_timm_resnet_with_the_same_stem():
    reference = timm.create_model("resnet18", num_classes=10)
    reference.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    scramble_(reference).eval()
    ours = timm.create_model("resnet18_cifar").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = image(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-5)


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
    assert not name.startswith("vp_")
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    assert cfg["mean"] == (0.4914, 0.4822, 0.4465) and cfg["std"] == (0.2470, 0.2435, 0.2616)
    with torch.no_grad():
        assert model(image(2, 3, 32, 32)).shape == (2, 10)


# --- attention maps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_cls,prefix_tokens", [(VisionTransformer, 1), (DistilledVisionTransformer, 2)])
def test_vit_attention_maps_on_request(model_cls, prefix_tokens):
    model = scramble_(model_cls(**TINY_VIT)).eval()
    x = image(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        logits_with_maps, maps = model(x, return_attention=True)
        with capture_attention(model) as captured:
            logits_in_context = model(x)
    assert torch.equal(logits, logits_with_maps) and torch.equal(logits, logits_in_context)
    tokens = prefix_tokens + (32 // 8) ** 2
    assert len(maps) == len(captured) == 2
    for probs, same in zip(maps, captured, strict=True):
        assert probs.shape == (3, 2, tokens, tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, tokens))
        assert torch.equal(probs, same)
    assert torch.equal(model(x), logits)  # hooks are gone after the context


def test_attention_probs_are_the_ones_the_block_uses():
    model = scramble_(VisionTransformer(**TINY_VIT)).eval()
    block = model.blocks[0]
    x = image(2, 17, 32)
    with torch.no_grad():
        out, probs = block.attn(block.norm1(x), return_attention=True)
        v = block.attn.qkv(block.norm1(x)).view(2, 17, 3, 2, 16)[:, :, 2].transpose(1, 2)
        manual = block.attn.proj((probs @ v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)


def test_swin_attention_maps_on_request():
    model = scramble_(SwinTransformer(**TINY_SWIN)).eval()
    x = image(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
        logits_with_maps, maps = model(x, return_attention=True)
        with capture_attention(model) as captured:
            assert torch.equal(model(x), logits)
    assert torch.equal(logits, logits_with_maps)
    # 8x8 tokens in four 4x4 windows, then 4x4 tokens in one window (which therefore never shifts)
    expected = [((8, 8), (0, 0), 4, 1), ((8, 8), (2, 2), 4, 1),
                ((4, 4), (0, 0), 1, 2), ((4, 4), (0, 0), 1, 2)]
    assert [(m.resolution, m.shift_size, m.probs.shape[0] // 2, m.probs.shape[1]) for m in maps] == expected
    for block_map, same in zip(maps, captured, strict=True):
        assert block_map.window_size == (4, 4) and block_map.probs.shape[-2:] == (16, 16)
        torch.testing.assert_close(block_map.probs.sum(-1), torch.ones(block_map.probs.shape[:-1]))
        assert torch.equal(block_map.probs, same.probs)


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
    with torch.no_grad():
        _, maps = model(image(2, 3, 16, 16), return_attention=True)
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


def test_drop_path_is_random_in_training_only():
    model = scramble_(VisionTransformer(**dict(TINY_VIT, drop_path_rate=0.5)))
    x = image(8, 3, 32, 32)
    torch.manual_seed(0)
    assert not torch.equal(model.train()(x), model(x))
    assert torch.equal(model.eval()(x), model(x))


@pytest.mark.parametrize("model_cls,kwargs", [(VisionTransformer, TINY_VIT), (SwinTransformer, TINY_SWIN)])
def test_grad_checkpointing_gives_the_same_gradients(model_cls, kwargs):
    model = scramble_(model_cls(**dict(kwargs, drop_path_rate=0.0)))
    x = image(2, 3, kwargs["img_size"], kwargs["img_size"])
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)


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


# --- create_model and fine-tuning loads ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar100_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch4_32", num_classes=100, depth=2)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny_patch4_32", dict(depth=2)),
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
    source = timm.create_model("deit_tiny_distilled_patch4_32", num_classes=100, depth=1)
    path = tmp_path / "deit.safetensors"
    save_file(source.state_dict(), path)
    model = create_model("deit_tiny_distilled_patch4_32", num_classes=10, pretrained_file=path, depth=1)
    assert model.head.weight.shape == model.head_dist.weight.shape == (10, 192)
    assert torch.equal(model.dist_token, source.dist_token)


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



def test_resnet_channels_and_drop_path_follow_timm_keywords():
    narrow = timm.create_model("resnet18_cifar", channels=(16, 32, 64, 128), drop_path_rate=0.2)
    assert narrow.conv1.out_channels == 16 and narrow.fc.in_features == 128
    drop_paths = [block.drop_path for stage in narrow.stages() for block in stage]
    assert isinstance(drop_paths[0], nn.Identity) and drop_paths[-1].drop_prob == pytest.approx(0.2)
    x = image(4, 3, 32, 32)
    narrow.eval()
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), narrow(x))
    with pytest.raises(ValueError, match="one width per stage"):
        timm.create_model("resnet18_cifar", channels=(16, 32))
