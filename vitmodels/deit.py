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
    average. Unlike timm, where `set_distilled_training(True)` must be called first, distilled training is on
    from construction; `set_distilled_training(False)` makes training-mode forward return the average too
    (plain fine-tuning). Attention maps (`capture_attention`) have N = 2 + patches: token 0 class, token 1
    distillation. TorchScript is not supported.

    Args:
        **kwargs: VisionTransformer's arguments; global_pool can only be 'token' (the heads read the class and
            distillation tokens), as in timm.
    """

    num_prefix_tokens = 2

    def __init__(self, **kwargs):
        if kwargs.get("global_pool", "token") != "token":
            raise ValueError(f"DeiT's heads read the class and distillation tokens: global_pool must be 'token', "
                             f"not {kwargs['global_pool']!r}")
        super().__init__(**kwargs)
        self.distilled_training = True
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.head_dist = self._classifier()
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        init_transformer_weights(self.head_dist)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"dist_token"}

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    # ignore[override] on get_classifier, forward_head and forward: they return two heads or two logits where a
    # ViT's return one, as timm's DeiT does; DistillationLoss, the train loop and classifier_names take both.
    def get_classifier(self) -> tuple[nn.Module, nn.Module]:  # type: ignore[override]
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Fresh class and distillation heads for num_classes (0: none); global_pool stays 'token' ('' and
        None accepted, as timm does when pruning the head)."""
        if global_pool not in (None, "", "token"):
            raise ValueError(f"DeiT's heads read the class and distillation tokens: global_pool {global_pool!r} "
                             "is not possible")
        self.num_classes = num_classes
        self.head = self._classifier()
        self.head_dist = self._classifier()
        self.head.train(self.training)
        self.head_dist.train(self.training)

    def prefix_tokens(self) -> torch.Tensor:
        return torch.cat([self.cls_token, self.dist_token], dim=1)

    def forward_head(self, x: torch.Tensor,  # type: ignore[override]
                     pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> (cls_logits, dist_logits) in distilled training, else their average; with pre_logits the
        average of the two dropped-out tokens, [B, embed_dim]."""
        cls_features, dist_features = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (cls_features + dist_features) / 2
        cls_logits, dist_logits = self.head(cls_features), self.head_dist(dist_features)
        if self.training and self.distilled_training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool, **kwargs) -> DistilledVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(DistilledVisionTransformer, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


default_cfgs = make_default_cfgs({
    "deit_tiny_distilled_patch4_32": CIFAR10_CFG,
    "deit_small_distilled_patch4_32": CIFAR10_CFG,
    "vp_deit_small_distilled_patch16_224": IMAGENET_DEFAULT_CFG,
}, classifier=("head", "head_dist"), pool_size=None, paper="deit")


@register_model
def deit_tiny_distilled_patch4_32(pretrained: bool = False, **kwargs) -> DistilledVisionTransformer:
    """DeiT-Ti/4 distilled for 32x32 inputs: 64 patch tokens + class + distillation token."""
    args = dict(patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create("deit_tiny_distilled_patch4_32", pretrained, **{**args, **kwargs})


@register_model
def deit_small_distilled_patch4_32(pretrained: bool = False, **kwargs) -> DistilledVisionTransformer:
    """DeiT-S/4 distilled for 32x32 inputs."""
    args = dict(patch_size=4, embed_dim=384, depth=12, num_heads=6)
    return _create("deit_small_distilled_patch4_32", pretrained, **{**args, **kwargs})


@register_model
def vp_deit_small_distilled_patch16_224(pretrained: bool = False, **kwargs) -> DistilledVisionTransformer:
    """DeiT-S/16 distilled at 224 (timm's deit_small_distilled_patch16_224 architecture)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("vp_deit_small_distilled_patch16_224", pretrained, **{**args, **kwargs})
