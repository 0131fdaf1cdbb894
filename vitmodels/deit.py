"""DeiT with a distillation token (Touvron et al., 2020), https://arxiv.org/abs/2012.12877.

Matches timm.models.deit.VisionTransformerDistilled parameter for parameter.
"""
import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from .factory import CIFAR10_CFG, IMAGENET_DEFAULT_CFG, make_default_cfgs
from .layers import init_transformer_weights
from .vision_transformer import VisionTransformer


class DistilledVisionTransformer(VisionTransformer):
    """ViT with class and distillation tokens, each with its own head.

    In training mode forward returns (cls_logits, dist_logits) for DistillationLoss; in eval mode their
    average. Attention maps (return_attention=True) have N = 2 + patches: token 0 class, token 1 distillation.
    """

    num_prefix_tokens = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.head_dist = self._classifier()
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        init_transformer_weights(self.head_dist)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"dist_token"}

    def prefix_tokens(self) -> torch.Tensor:
        return torch.cat([self.cls_token, self.dist_token], dim=1)

    def forward_head(self, x: torch.Tensor):
        cls_logits = self.head(self.head_drop(x[:, 0]))
        dist_logits = self.head_dist(self.head_drop(x[:, 1]))
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2


def _create(variant: str, pretrained: bool, **kwargs) -> DistilledVisionTransformer:
    return build_model_with_cfg(DistilledVisionTransformer, variant, pretrained, **kwargs)


default_cfgs = make_default_cfgs({
    "deit_tiny_distilled_patch4_32": CIFAR10_CFG,
    "deit_small_distilled_patch4_32": CIFAR10_CFG,
    "vp_deit_small_patch16_224": IMAGENET_DEFAULT_CFG,
}, classifier=("head", "head_dist"))


@register_model
def deit_tiny_distilled_patch4_32(pretrained: bool = False, **kwargs) -> DistilledVisionTransformer:
    """DeiT-Ti/4 distilled for 32x32 inputs: 64 patch tokens + class + distillation token."""
    args = dict(patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create("deit_tiny_distilled_patch4_32", pretrained, **{**args, **kwargs})


@register_model
def deit_small_distilled_patch4_32(pretrained: bool = False, **kwargs) -> DistilledVisionTransformer:
    args = dict(patch_size=4, embed_dim=384, depth=12, num_heads=6)
    return _create("deit_small_distilled_patch4_32", pretrained, **{**args, **kwargs})


@register_model
def vp_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> DistilledVisionTransformer:
    """DeiT-S distilled at 224 (timm's deit_small_distilled_patch16_224 architecture)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("vp_deit_small_patch16_224", pretrained, **{**args, **kwargs})
