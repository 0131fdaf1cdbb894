"""Swin Transformer v1 (Liu et al., 2021), https://arxiv.org/abs/2103.14030.

Parameter names and numerics match timm.models.swin_transformer.SwinTransformer for inputs whose stage
resolutions divide into whole windows. relative_position_index and attn_mask are derived from the
hyper-parameters, so like timm they are non-persistent buffers and state_dicts load strictly both ways.
"""
from typing import NamedTuple

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from .factory import CIFAR10_CFG, IMAGENET_DEFAULT_CFG, make_default_cfgs
from .layers import (
    Attention,
    Mlp,
    PatchEmbed,
    drop_path_or_identity,
    drop_path_rates,
    init_transformer_weights,
    run_blocks,
    to_pair,
)


class SwinAttentionMap(NamedTuple):
    """Attention probabilities of one Swin block, per window.

    probs: [B * num_windows, num_heads, wh * ww, wh * ww]. Windows are ordered image by image, then row-major
    over the window grid of the *shifted* feature map (the map rolled by -shift_size); tokens row-major in a
    window. To place token (i, j) of window (r, c) on the grid of size `resolution`, take
    ((r * wh + i + shift_h) % H, (c * ww + j + shift_w) % W).
    """

    probs: torch.Tensor
    resolution: tuple[int, int]
    window_size: tuple[int, int]
    shift_size: tuple[int, int]


def window_partition(x: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, wh * ww, C)."""
    B, H, W, C = x.shape
    wh, ww = window_size
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_merge(windows: torch.Tensor, window_size: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of window_partition."""
    wh, ww = window_size
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """[N, N] row into the bias table for every (query, key) pair of a window, N = wh * ww."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    dy, dx = coords[:, :, None] - coords[:, None, :]
    return (dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)


def shifted_window_mask(resolution: tuple[int, int], window_size: tuple[int, int],
                        shift_size: tuple[int, int]) -> torch.Tensor:
    """Additive [num_windows, N, N] mask: -inf between tokens the cyclic shift brought from opposite sides.

    After rolling by -shift, the last `shift` rows (columns) are the image's first rows (columns) wrapped
    around; windows are aligned to the map, so only the last window row/column mixes them with their
    non-wrapped neighbours. Pairs that differ in wrapped-ness along either axis are masked. -inf (timm uses
    -100) makes their probabilities exactly 0.
    """
    (H, W), (sh, sw) = resolution, shift_size
    wrapped_rows = torch.arange(H) >= H - sh  # all False without a shift
    wrapped_cols = torch.arange(W) >= W - sw
    regions = wrapped_rows[:, None].long() * 2 + wrapped_cols[None, :].long()
    regions = window_partition(regions.view(1, H, W, 1), window_size).squeeze(-1)
    N = window_size[0] * window_size[1]
    mask = torch.zeros(regions.shape[0], N, N)
    return mask.masked_fill(regions[:, :, None] != regions[:, None, :], float("-inf"))


class WindowAttention(Attention):
    """Attention inside each window with a learned bias per relative offset and head."""

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int], qkv_bias: bool,
                 attn_drop: float, proj_drop: float):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False):
        N = x.shape[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            # x stacks all windows of every image, the per-window mask repeats once per image
            bias = (bias + mask.unsqueeze(1)).repeat(x.shape[0] // mask.shape[0], 1, 1, 1)
        return super().forward(x, bias, return_attention)


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int,
                 window_size: tuple[int, int], shift: bool, mlp_ratio: float, qkv_bias: bool,
                 proj_drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.input_resolution = input_resolution
        # as in timm: a window never exceeds the feature map, and shifting a single window along an axis
        # would only wrap the map onto itself
        self.window_size = tuple(min(r, w) for r, w in zip(input_resolution, window_size, strict=True))
        self.shift_size = tuple(
            w // 2 if shift and r > w else 0 for r, w in zip(input_resolution, self.window_size, strict=True))
        assert all(r % w == 0 for r, w in zip(input_resolution, self.window_size, strict=True)), (
            f"resolution {input_resolution} must split into whole {self.window_size} windows")

        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = drop_path_or_identity(drop_path)
        mask = shifted_window_mask(input_resolution, self.window_size, self.shift_size) if any(
            self.shift_size) else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, H, W, C = x.shape
        shifted = any(self.shift_size)
        y = self.norm1(x)
        if shifted:
            y = torch.roll(y, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        y = self.attn(window_partition(y, self.window_size), self.attn_mask, return_attention)
        if return_attention:
            y, probs = y
        y = window_merge(y, self.window_size, H, W)
        if shifted:
            y = torch.roll(y, shifts=self.shift_size, dims=(1, 2))
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        if return_attention:
            return x, SwinAttentionMap(probs, (H, W), self.window_size, self.shift_size)
        return x


class PatchMerging(nn.Module):
    """2x downsampling: concatenates each 2x2 neighbourhood (order (0,0), (1,0), (0,1), (1,1) as timm/the
    reference implementation) and projects 4C -> 2C."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, input_resolution: tuple[int, int], depth: int,
                 downsample: bool, num_heads: int, window_size: tuple[int, int], drop_path: list[float],
                 **block_args):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.output_resolution = tuple(r // 2 for r in input_resolution) if downsample else input_resolution
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, self.output_resolution, num_heads, window_size, shift=i % 2 == 1,
                                 drop_path=drop_path[i], **block_args)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        x = self.downsample(x)
        if not return_attention:
            return run_blocks(self.blocks, x, self.grad_checkpointing)
        maps = []
        for block in self.blocks:
            x, block_map = block(x, return_attention=True)
            maps.append(block_map)
        return x, maps


class SwinHead(nn.Module):
    """Average pool over the token grid, then the classifier (named head.fc like timm's ClassifierHead)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean(dim=(1, 2))))


class SwinTransformer(nn.Module):
    """Swin v1 classifier.

    forward(x, return_attention=True) returns (logits, maps) with one SwinAttentionMap per block.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 96,
            depths: tuple[int, ...] = (2, 2, 6, 2),
            num_heads: tuple[int, ...] = (3, 6, 12, 24),
            window_size: int | tuple[int, int] = 7,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm=True)

        rates = drop_path_rates(drop_path_rate, sum(depths))
        resolution = self.patch_embed.grid_size
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim, out_dim = embed_dim * 2 ** max(i - 1, 0), embed_dim * 2 ** i
            stages.append(SwinTransformerStage(
                dim, out_dim, resolution, depth, downsample=i > 0, num_heads=heads,
                window_size=to_pair(window_size), drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])],
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
            ))
            resolution = stages[-1].output_resolution
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = SwinHead(self.num_features, num_classes, drop_rate)
        init_transformer_weights(self)

    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if "relative_position_bias_table" in name}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        x = self.patch_embed(x)
        maps = []
        for stage in self.layers:
            if return_attention:
                x, stage_maps = stage(x, return_attention=True)
                maps += stage_maps
            else:
                x = stage(x)
        x = self.norm(x)
        return (x, maps) if return_attention else x

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            features, maps = self.forward_features(x, return_attention=True)
            return self.head(features), maps
        return self.head(self.forward_features(x))


def _create(variant: str, pretrained: bool, **kwargs) -> SwinTransformer:
    return build_model_with_cfg(SwinTransformer, variant, pretrained, **kwargs)


default_cfgs = make_default_cfgs({
    "swin_tiny_patch2_window4_32": CIFAR10_CFG,
    "vp_swin_tiny_patch4_window7_224": IMAGENET_DEFAULT_CFG,
    "vp_swin_base_patch4_window7_224": IMAGENET_DEFAULT_CFG,
}, classifier="head.fc")


@register_model
def swin_tiny_patch2_window4_32(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-T widths for 32x32 inputs. 2x2 patches give a 16x16 grid; three stages at 16x16, 8x8 and 4x4
    tokens hold 16, 4 and 1 windows of 4x4 (a fourth stage would be a 2x2 map, smaller than a window).
    12 blocks and 3/6/12 heads as Swin-T's first three stages; the last stage is one window, never shifted."""
    args = dict(patch_size=2, window_size=4, embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12))
    return _create("swin_tiny_patch2_window4_32", pretrained, **{**args, **kwargs})


@register_model
def vp_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create("vp_swin_tiny_patch4_window7_224", pretrained, **{**args, **kwargs})


@register_model
def vp_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTransformer:
    args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create("vp_swin_base_patch4_window7_224", pretrained, **{**args, **kwargs})
