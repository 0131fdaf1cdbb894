"""Building blocks shared by the ViT, DeiT, Swin and ResNet families.

Module and parameter names follow timm so that state_dicts move between the two without conversion.
"""
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import nn


def to_pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, Sequence):
        first, second = value
        return int(first), int(second)
    return int(value), int(value)


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Stochastic depth grows linearly with depth: early blocks carry features every later block needs."""
    return torch.linspace(0, drop_path_rate, num_blocks, device="cpu").tolist()


def init_transformer_weights(module: nn.Module) -> None:
    """timm's ViT/Swin init: truncated normal linears, zero biases, default init for convs and norms."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    if grad_checkpointing and torch.is_grad_enabled():
        for block in blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x
    return blocks(x)


def run_block(block: nn.Module, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    if grad_checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return block(x)


def take_indices(num_features: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's `indices` convention for forward_intermediates: None = every feature, an int n = the last n,
    a sequence = those positions (negative ones count from the end). Returns (absolute indices, the largest).
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices={indices} asks for the last {indices} of {num_features} features")
        taken = list(range(num_features - indices, num_features))
    else:
        taken = [num_features + i if i < 0 else i for i in indices]
        if not taken or any(not 0 <= i < num_features for i in taken):
            raise ValueError(f"indices {list(indices)} out of range for {num_features} features")
    return taken, max(taken)


class TimmClassifier(nn.Module, ABC):
    """What every vitmodels family shares with timm's models: forward is forward_head after forward_features.

    Each family implements timm's model API around it: forward_features, forward_head(x, pre_logits),
    get_classifier, reset_classifier(num_classes, global_pool), num_features, head_hidden_size, feature_info,
    forward_intermediates, prune_intermediate_layers, group_matcher, no_weight_decay, set_grad_checkpointing.
    """

    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the backbone's output tokens or feature map."""

    @abstractmethod
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' output -> logits, or with pre_logits the pooled features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, rescaling survivors to keep the mean.

    Args:
        drop_prob: probability that a sample's branch is dropped (training mode only).
    """

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_path_or_identity(drop_prob: float) -> nn.Module:
    return DropPath(drop_prob) if drop_prob > 0 else nn.Identity()


class Mlp(nn.Module):
    """The transformer's feed-forward: Linear -> GELU -> Linear, dropout after each.

    Args:
        in_features: token width, in and out.
        hidden_features: width of the hidden layer (mlp_ratio * in_features in the blocks).
        drop: dropout rate after the activation and after the output projection.
    """

    def __init__(self, in_features: int, *, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping patches through a strided conv; returns channels-last (B, H', W', C).

    Args:
        img_size: input height and width (an int for square images).
        patch_size: patch height and width; the image must split into whole patches.
        in_chans: input channels.
        embed_dim: channels of each patch token.
        norm: LayerNorm the tokens (Swin) or not (ViT).
    """

    def __init__(self, *, img_size: int | tuple[int, int], patch_size: int | tuple[int, int], in_chans: int,
                 embed_dim: int, norm: bool = False):
        super().__init__()
        self.img_size = to_pair(img_size)
        self.patch_size = to_pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # [B, C, H', W'] -> [B, H', W', C]


class Attention(nn.Module):
    """Multi-head self-attention.

    Two paths compute the same thing. The fused one (F.scaled_dot_product_attention, the default, following
    timm's `use_fused_attn()` at construction) never materialises the attention matrix. With
    `fused_attn = False` the probabilities come from an explicit `attn.softmax(dim=-1)` and pass through the
    `attn_drop` module before multiplying the values, as in timm: hooks on `*attn_drop` (timm's
    AttentionExtract with method="hook", and vitmodels.capture_attention) and FX nodes `*attn.softmax`
    (AttentionExtract with method="fx") see them. No forward argument switches paths, so FX tracing and
    torch.compile see one static graph.

    Args:
        dim: token width, in and out; a multiple of num_heads.
        num_heads: attention heads, each dim // num_heads wide.
        qkv_bias: bias on the query/key/value projection.
        attn_drop: dropout rate on the attention probabilities.
        proj_drop: dropout rate after the output projection.
    """

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, C] tokens; attn_mask: additive, broadcastable to [B, heads, N, N] (Swin's relative position
        bias plus its shifted-window mask), None for full attention."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, nh, N, hd]
        q, k, v = qkv.unbind(0)  # each [B, nh, N, hd]
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, nh, N, N] scaled dot products
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = attn.softmax(dim=-1)  # row i: how much query i takes from each key
            attn = self.attn_drop(attn)
            x = attn @ v  # [B, nh, N, hd]
        x = x.transpose(1, 2).reshape(B, N, C)  # heads side by side again: [B, N, nh * hd]
        return self.proj_drop(self.proj(x))


POOL_TYPES_2D = ("", "avg", "max", "avgmax", "catavgmax")


class GlobalPool2d(nn.Module):
    """timm's global pooling types over a feature map's two spatial dims; '' passes the map through.

    'avgmax' is the mean of average and max pooling, 'catavgmax' their concatenation (twice the channels).

    Args:
        pool_type: one of '', 'avg', 'max', 'avgmax', 'catavgmax'.
        input_fmt: 'NCHW' (CNNs) or 'NHWC' (Swin's token grid).
    """

    def __init__(self, pool_type: str = "avg", input_fmt: str = "NCHW"):
        super().__init__()
        if pool_type not in POOL_TYPES_2D:
            raise ValueError(f"global_pool {pool_type!r} is not one of {POOL_TYPES_2D}")
        if input_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"input_fmt {input_fmt!r} is not 'NCHW' or 'NHWC'")
        self.pool_type = pool_type
        self.input_fmt = input_fmt
        self.spatial_dims = (2, 3) if input_fmt == "NCHW" else (1, 2)

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pool_type:
            return x
        if self.pool_type == "avg":
            return x.mean(dim=self.spatial_dims)
        if self.pool_type == "max":
            return x.amax(dim=self.spatial_dims)
        avg, peak = x.mean(dim=self.spatial_dims), x.amax(dim=self.spatial_dims)
        if self.pool_type == "avgmax":
            return 0.5 * (avg + peak)
        return torch.cat([avg, peak], dim=1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}, input_fmt={self.input_fmt!r}"


def to_output_fmt(x: torch.Tensor, input_fmt: str, output_fmt: str) -> torch.Tensor:
    """Permute a [B, C, H, W] / [B, H, W, C] map between NCHW and NHWC (contiguous, as timm returns them)."""
    if input_fmt == output_fmt:
        return x
    if output_fmt == "NCHW":
        return x.permute(0, 3, 1, 2).contiguous()
    return x.permute(0, 2, 3, 1).contiguous()
