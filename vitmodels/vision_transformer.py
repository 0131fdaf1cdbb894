"""Vision Transformer (Dosovitskiy et al., 2020), https://arxiv.org/abs/2010.11929.

Parameter names and numerics match timm.models.vision_transformer.VisionTransformer with its defaults
(class token, learned position embedding that also covers the class token, pre-norm blocks, final norm,
token pooling), so either state_dict loads into the other with strict=True.
"""
import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from .factory import CIFAR10_CFG, IMAGENET_INCEPTION_CFG, make_default_cfgs
from .layers import (
    Attention,
    Mlp,
    PatchEmbed,
    drop_path_or_identity,
    drop_path_rates,
    init_transformer_weights,
    run_blocks,
)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_drop: float,
                 attn_drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            attn_out, probs = self.attn(self.norm1(x), return_attention=True)
        else:
            attn_out = self.attn(self.norm1(x))
        x = x + self.drop_path1(attn_out)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return (x, probs) if return_attention else x


class VisionTransformer(nn.Module):
    """ViT classifying from the class token.

    forward(x) returns logits; forward(x, return_attention=True) returns (logits, maps) where maps holds one
    [B, num_heads, N, N] tensor of attention probabilities per block, N = 1 + number of patches (token 0 is
    the class token, then patches row-major).
    """

    num_prefix_tokens = 1

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int | tuple[int, int] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, rate)
            for rate in drop_path_rates(drop_path_rate, depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._classifier()
        self.init_weights()

    def _classifier(self) -> nn.Module:
        return nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        init_transformer_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # near-zero rather than zero so the class token is not identical to a zero patch from the start
        nn.init.normal_(self.cls_token, std=1e-6)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def prefix_tokens(self) -> torch.Tensor:
        return self.cls_token

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        x = self.patch_embed(x).flatten(1, 2)
        prefix = self.prefix_tokens().expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([prefix, x], dim=1) + self.pos_embed)
        maps = []
        if return_attention:
            for block in self.blocks:
                x, probs = block(x, return_attention=True)
                maps.append(probs)
        else:
            x = run_blocks(self.blocks, x, self.grad_checkpointing)
        x = self.norm(x)
        return (x, maps) if return_attention else x

    def forward_head(self, x: torch.Tensor):
        return self.head(self.head_drop(x[:, 0]))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            features, maps = self.forward_features(x, return_attention=True)
            return self.forward_head(features), maps
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **kwargs)


default_cfgs = make_default_cfgs({
    "vit_tiny_patch4_32": CIFAR10_CFG,
    "vit_small_patch4_32": CIFAR10_CFG,
    "vp_vit_small_patch16_224": IMAGENET_INCEPTION_CFG,
    "vp_vit_base_patch16_224": IMAGENET_INCEPTION_CFG,
    "vp_vit_large_patch16_224": IMAGENET_INCEPTION_CFG,
}, classifier="head")


@register_model
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/4 for 32x32 inputs: 64 patch tokens + class token."""
    args = dict(patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create("vit_tiny_patch4_32", pretrained, **{**args, **kwargs})


@register_model
def vit_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/4 for 32x32 inputs."""
    args = dict(patch_size=4, embed_dim=384, depth=12, num_heads=6)
    return _create("vit_small_patch4_32", pretrained, **{**args, **kwargs})


@register_model
def vp_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("vp_vit_small_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def vp_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create("vp_vit_base_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def vp_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create("vp_vit_large_patch16_224", pretrained, **{**args, **kwargs})
