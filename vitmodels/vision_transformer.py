"""Vision Transformer (Dosovitskiy et al., 2020), https://arxiv.org/abs/2010.11929.

Parameter names and numerics match timm.models.vision_transformer.VisionTransformer with its defaults
(class token, learned position embedding that also covers the class token, pre-norm blocks, final norm,
token pooling) and with its other `global_pool` heads, so either state_dict loads into the other with
strict=True. The timm model API is here too: forward_features/forward_head, reset_classifier,
forward_intermediates, features_only, group_matcher (see README "Models").
"""
from collections.abc import Sequence

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from .factory import CIFAR10_CFG, IMAGENET_INCEPTION_CFG, make_default_cfgs
from .layers import (
    Attention,
    Mlp,
    PatchEmbed,
    TimmClassifier,
    drop_path_or_identity,
    drop_path_rates,
    init_transformer_weights,
    run_block,
    run_blocks,
    take_indices,
    to_pair,
)

VIT_POOL_TYPES = ("", "token", "avg", "max", "avgmax", "map", "prr")
# pools that reduce the patch tokens move the final norm after the pool (timm's fc_norm default)
FC_NORM_POOLS = ("avg", "max", "avgmax")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over dim.
        qkv_bias: bias on the query/key/value projection.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention probabilities.
        drop_path: stochastic depth rate of both residual branches.
    """

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class LatentAttentionPool(nn.Module):
    """timm's 'map' head (multihead attention pooling, as in SigLIP): one learned query attends over the patch
    tokens, then a residual MLP. Parameter names are timm's AttentionPoolLatent's.

    Args:
        dim: token width.
        num_heads: attention heads of the pooling query.
        mlp_ratio: hidden width of the MLP over dim.
    """

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))
        nn.init.trunc_normal_(self.latent, std=dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        head_dim = C // self.num_heads
        q = self.q(self.latent.expand(B, -1, -1)).view(B, 1, self.num_heads, head_dim).transpose(1, 2)  # [B,nh,1,hd]
        k, v = self.kv(x).view(B, N, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B,nh,N,hd]
        pooled = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, nh, 1, hd]
        pooled = self.proj(pooled.transpose(1, 2).reshape(B, 1, C))
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


class TokenRefinementPool(nn.Module):
    """timm's 'prr' head (patch representation refinement): parameter-free multi-head self-attention over all
    tokens, the queries, keys and values being the tokens themselves, then the class token (or the mean).

    Args:
        num_heads: heads the token width is split into.
        pool_type: 'token' (the class token) or 'avg' (mean over all tokens).
    """

    def __init__(self, *, num_heads: int, pool_type: str):
        super().__init__()
        self.num_heads = num_heads
        self.pool_type = pool_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        heads = x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, nh, N, hd]
        refined = torch.nn.functional.scaled_dot_product_attention(heads, heads, heads)
        refined = refined.transpose(1, 2).reshape(B, N, C)
        return refined[:, 0] if self.pool_type == "token" else refined.mean(dim=1)


class VisionTransformer(TimmClassifier):
    """ViT classifying from the class token (or a pooled token set, `global_pool`).

    forward(x) returns logits. Attention probabilities: `vitmodels.capture_attention(model)` (one
    [B, num_heads, N, N] tensor per block, N = num_prefix_tokens + patches, token 0 the class token, then the
    patches row-major), or timm's AttentionExtract after `timm.layers.set_fused_attn(False)`.
    TorchScript is not supported (deprecated in the torch this project pins); use torch.compile or torch.export.

    Args:
        img_size: input height and width; fixed, as in timm (the position embedding has one row per patch).
        patch_size: patch height and width.
        in_chans: input channels.
        num_classes: classifier outputs; 0 leaves forward returning pooled features.
        global_pool: timm's ViT pooling: 'token' (class token), 'avg', 'max', 'avgmax' over the patch tokens,
            'map' (attention-pool head), 'prr' (parameter-free refinement, then class token), '' (no pooling).
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width over embed_dim.
        qkv_bias: bias on the query/key/value projections.
        fc_norm: LayerNorm after pooling instead of before; None: on for 'avg', 'max' and 'avgmax' (timm).
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after adding the position embedding.
        proj_drop_rate: dropout after attention projections and in MLPs.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth of the last block (linear from 0 at the first).
    """

    num_prefix_tokens = 1

    def __init__(
            self,
            *,
            img_size: int | tuple[int, int] = 224,
            patch_size: int | tuple[int, int] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            fc_norm: bool | None = None,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        check_vit_pool(global_pool)
        use_fc_norm = global_pool in FC_NORM_POOLS if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=rate)
            for rate in drop_path_rates(drop_path_rate, depth)
        ])
        reduction = max(to_pair(patch_size))
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction)
                             for i in range(depth)]
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool = self._attention_pool(global_pool, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._classifier()
        self.init_weights()

    def _attention_pool(self, global_pool: str, *, num_heads: int, mlp_ratio: float) -> nn.Module | None:
        if global_pool == "map":
            return LatentAttentionPool(self.embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio)
        if global_pool == "prr":
            return TokenRefinementPool(num_heads=num_heads, pool_type="token")
        return None

    def _classifier(self) -> nn.Module:
        return nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        init_transformer_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # near-zero rather than zero so the class token is not identical to a zero patch from the start
        nn.init.normal_(self.cls_token, std=1e-6)

    # --- timm model API ------------------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay: the embedding, then one group per block."""
        return dict(stem=r"^cls_token|^dist_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for num_classes (0: none), optionally with another pooling. A 'map' head can be
        kept or dropped here but not added (its weights would be untrained), as in timm."""
        self.num_classes = num_classes
        if global_pool is not None:
            check_vit_pool(global_pool)
            if global_pool in ("map", "prr") and global_pool != self.global_pool:
                raise ValueError(f"reset_classifier cannot switch global_pool from {self.global_pool!r} to "
                                 f"{global_pool!r}; build the model with global_pool={global_pool!r}")
            if global_pool not in ("map", "prr"):
                self.attn_pool = None
            self.global_pool = global_pool
        self.head = self._classifier()
        self.head.train(self.training)

    def prefix_tokens(self) -> torch.Tensor:
        return self.cls_token

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(1, 2)  # [B, H', W', C] -> [B, patches, C]
        prefix = self.prefix_tokens().expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([prefix, x], dim=1) + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] images -> [B, N, embed_dim] normed tokens, prefix tokens first."""
        x = run_blocks(self.blocks, self._embed(x), self.grad_checkpointing)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] tokens -> [B, C] by global_pool ([B, N, C] unchanged for '')."""
        if self.attn_pool is not None:
            # 'map' attends over the patches only, 'prr' refines all tokens including the class token
            return self.attn_pool(x if self.global_pool == "prr" else x[:, self.num_prefix_tokens:])
        if self.global_pool == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens:]
        if self.global_pool == "avg":
            return patches.mean(dim=1)
        if self.global_pool == "max":
            return patches.amax(dim=1)
        if self.global_pool == "avgmax":
            return 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' tokens -> logits, or with pre_logits the pooled [B, head_hidden_size] features."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | Sequence[int] | None = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """Block outputs as timm returns them: `indices` None = all blocks, n = the last n, a list = those.

        Intermediates are the patch tokens ([B, C, H', W'] for 'NCHW', [B, H'*W', C] for 'NLC'), normed with the
        final norm if `norm`; with return_prefix_tokens each is a (patches, prefix tokens) pair. Returns the
        intermediates alone (intermediates_only) or (forward_features output, intermediates); stop_early skips
        the blocks after the last index, in which case the first element is the normed last index's output.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt {output_fmt!r} is not 'NCHW' or 'NLC'")
        taken, last = take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        grid = (height // self.patch_embed.patch_size[0], width // self.patch_embed.patch_size[1])
        x = self._embed(x)
        blocks = self.blocks[:last + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = run_block(block, x, self.grad_checkpointing)
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in intermediates]
        patches = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            patches = [y.reshape(B, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in patches]
        intermediates = list(zip(patches, prefix, strict=True)) if return_prefix_tokens else patches
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm / head on request); returns the
        absolute indices, which stay valid on the pruned model."""
        taken, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return taken


def check_vit_pool(global_pool: str) -> None:
    if global_pool not in VIT_POOL_TYPES:
        raise ValueError(f"global_pool {global_pool!r} is not one of ViT's {VIT_POOL_TYPES}")


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    # features_only goes through forward_intermediates (timm's 'getter'), the last 3 blocks by default as timm
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(VisionTransformer, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


default_cfgs = make_default_cfgs({
    "vit_tiny_patch4_32": CIFAR10_CFG,
    "vit_small_patch4_32": CIFAR10_CFG,
    "vp_vit_small_patch16_224": IMAGENET_INCEPTION_CFG,
    "vp_vit_base_patch16_224": IMAGENET_INCEPTION_CFG,
    "vp_vit_large_patch16_224": IMAGENET_INCEPTION_CFG,
}, classifier="head", pool_size=None, paper="vit")


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
    """ViT-S/16 at 224 (timm's vit_small_patch16_224 architecture)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("vp_vit_small_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def vp_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 at 224 (timm's vit_base_patch16_224 architecture)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create("vp_vit_base_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def vp_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-L/16 at 224 (timm's vit_large_patch16_224 architecture)."""
    args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create("vp_vit_large_patch16_224", pretrained, **{**args, **kwargs})

