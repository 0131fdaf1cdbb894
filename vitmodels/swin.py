"""Swin Transformer v1 (Liu et al., 2021), https://arxiv.org/abs/2103.14030.

Parameter names and numerics match timm.models.swin_transformer.SwinTransformer for inputs whose stage
resolutions divide into whole windows. relative_position_index and attn_mask are derived from the
hyper-parameters, so like timm they are non-persistent buffers and state_dicts load strictly both ways.
"""
from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from .factory import CIFAR10_CFG, IMAGENET_DEFAULT_CFG, make_default_cfgs
from .layers import (
    Attention,
    GlobalPool2d,
    Mlp,
    PatchEmbed,
    TimmClassifier,
    drop_path_or_identity,
    drop_path_rates,
    init_transformer_weights,
    run_blocks,
    take_indices,
    to_output_fmt,
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
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)  # [B, H/wh, W/ww, wh, ww, C]
    return x.reshape(-1, wh * ww, C)


def window_merge(windows: torch.Tensor, window_size: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of window_partition."""
    wh, ww = window_size
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)  # [B, H/wh, wh, W/ww, ww, C]
    return x.reshape(-1, H, W, C)


def relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """[N, N] row into the bias table for every (query, key) pair of a window, N = wh * ww."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # [2, N]
    dy, dx = coords[:, :, None] - coords[:, None, :]  # each [N, N], in -(w-1)..(w-1)
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
    regions = wrapped_rows[:, None].long() * 2 + wrapped_cols[None, :].long()  # [H, W] region id 0..3
    regions = window_partition(regions.view(1, H, W, 1), window_size).squeeze(-1)  # [num_windows, N]
    N = window_size[0] * window_size[1]
    mask = torch.zeros(regions.shape[0], N, N)
    return mask.masked_fill(regions[:, :, None] != regions[:, None, :], float("-inf"))


class WindowAttention(Attention):
    """Attention inside each window with a learned bias per relative offset and head.

    Args:
        dim: token width.
        num_heads: attention heads.
        window_size: window height and width; the bias table has (2 wh - 1)(2 ww - 1) rows.
        qkv_bias: bias on the query/key/value projection.
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout after the output projection.
    """

    relative_position_index: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, dim: int, *, num_heads: int, window_size: tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        wh, ww = self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B * num_windows, N, C] window tokens; shift_mask: [num_windows, N, N] or None."""
        N = x.shape[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # [N * N, nh]
        bias = bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)  # [1, nh, N, N]
        if shift_mask is not None:
            # x stacks all windows of every image, the per-window mask repeats once per image
            bias = (bias + shift_mask.unsqueeze(1)).repeat(x.shape[0] // shift_mask.shape[0], 1, 1, 1)
        return super().forward(x, attn_mask=bias)


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention block on a [B, H, W, C] token grid.

    Args:
        dim: token width.
        input_resolution: token grid (H, W); windows are clamped to it.
        num_heads: attention heads.
        window_size: window (height, width).
        shift: shift the windows by half a window (odd blocks of a stage).
        mlp_ratio: MLP hidden width over dim.
        qkv_bias: bias on the query/key/value projection.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention probabilities.
        drop_path: stochastic depth rate of both residual branches.
    """

    def __init__(self, dim: int, *, input_resolution: tuple[int, int], num_heads: int,
                 window_size: tuple[int, int], shift: bool, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.input_resolution = input_resolution
        # as in timm: a window never exceeds the feature map, and shifting a single window along an axis
        # would only wrap the map onto itself
        self.window_size = to_pair([min(r, w) for r, w in zip(input_resolution, window_size, strict=True)])
        self.shift_size = to_pair(
            [w // 2 if shift and r > w else 0 for r, w in zip(input_resolution, self.window_size, strict=True)])
        if any(r % w for r, w in zip(input_resolution, self.window_size, strict=True)):
            raise ValueError(f"resolution {input_resolution} must split into whole {self.window_size} windows")

        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=self.window_size, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = drop_path_or_identity(drop_path)
        mask = shifted_window_mask(input_resolution, self.window_size, self.shift_size) if any(
            self.shift_size) else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def attention_map(self, probs: torch.Tensor) -> SwinAttentionMap:
        """The attention probabilities of this block's windows with what is needed to place them on the grid."""
        return SwinAttentionMap(probs, self.input_resolution, self.window_size, self.shift_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        shifted = any(self.shift_size)
        y = self.norm1(x)
        if shifted:
            y = torch.roll(y, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        y = self.attn(window_partition(y, self.window_size), self.attn_mask)  # [B * windows, wh * ww, C]
        y = window_merge(y, self.window_size, H, W)
        if shifted:
            y = torch.roll(y, shifts=self.shift_size, dims=(1, 2))
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x downsampling: concatenates each 2x2 neighbourhood (order (0,0), (1,0), (0,1), (1,1) as timm/the
    reference implementation) and projects 4C -> out_dim.

    Args:
        dim: input token width.
        out_dim: output token width (2 dim in Swin).
    """

    def __init__(self, dim: int, *, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # [B, H/2, W/2, 4C]
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating plain and shifted windows.

    Args:
        dim: input token width.
        out_dim: token width of the blocks.
        input_resolution: token grid entering the stage.
        depth: number of blocks.
        downsample: merge 2x2 patches first (every stage but the first).
        num_heads: attention heads of each block.
        window_size: window (height, width).
        drop_path: stochastic depth rate of each block.
        **block_args: SwinTransformerBlock's remaining keywords.
    """

    def __init__(self, dim: int, *, out_dim: int, input_resolution: tuple[int, int], depth: int,
                 downsample: bool, num_heads: int, window_size: tuple[int, int], drop_path: Sequence[float],
                 **block_args):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim=out_dim) if downsample else nn.Identity()
        self.output_resolution = (
            (input_resolution[0] // 2, input_resolution[1] // 2) if downsample else input_resolution)
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, input_resolution=self.output_resolution, num_heads=num_heads,
                                 window_size=window_size, shift=i % 2 == 1, drop_path=drop_path[i], **block_args)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, self.downsample(x), self.grad_checkpointing)


class SwinHead(nn.Module):
    """Pool over the token grid, dropout, classifier (`head.fc`, as timm's ClassifierHead names it).

    Args:
        in_features: token width.
        num_classes: classifier outputs, 0 for none.
        pool_type: GlobalPool2d type over the [B, H, W, C] grid.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, in_features: int, *, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes, pool_type)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        if pool_type is not None:
            self.global_pool = GlobalPool2d(pool_type, input_fmt="NHWC")
        self.num_features = self.in_features * self.global_pool.feat_mult()
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)


class SwinTransformer(TimmClassifier):
    """Swin v1 classifier.

    Attention maps: `vitmodels.capture_attention(model)` gives one SwinAttentionMap per block; timm's
    AttentionExtract finds `*attn_drop` / `*attn.softmax` with fused attention off. TorchScript is not supported
    (deprecated in the torch this project pins).

    Args:
        img_size: input height and width; every stage's token grid must split into whole windows.
        patch_size: patch height and width of the embedding.
        in_chans: input channels.
        num_classes: classifier outputs; 0 leaves forward returning pooled features.
        global_pool: pooling of the last token grid: 'avg' (timm's default), 'max', 'avgmax', 'catavgmax', or
            '' (none: the classifier then runs on every token).
        embed_dim: token width of the first stage; it doubles at every later stage.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window height and width (clamped to a stage's grid when larger).
        mlp_ratio: MLP hidden width over the token width.
        qkv_bias: bias on the query/key/value projections.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention projections and in MLPs.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth of the last block (linear from 0 at the first).
    """

    output_fmt = "NHWC"  # of forward_features and of the stages; timm's features_only keeps it

    def __init__(
            self,
            *,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
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
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, norm=True)

        rates = drop_path_rates(drop_path_rate, sum(depths))
        resolution = self.patch_embed.grid_size
        stages, self.feature_info = [], []
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim, out_dim = embed_dim * 2 ** max(i - 1, 0), embed_dim * 2 ** i
            stages.append(SwinTransformerStage(
                dim, out_dim=out_dim, input_resolution=resolution, depth=depth, downsample=i > 0,
                num_heads=heads, window_size=to_pair(window_size),
                drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])],
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
            ))
            resolution = stages[-1].output_resolution
            self.feature_info.append(dict(num_chs=out_dim, reduction=max(to_pair(patch_size)) * 2 ** i,
                                          module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self.norm: nn.Module = nn.LayerNorm(self.num_features)  # pruning may replace it with nn.Identity
        self.head = SwinHead(self.num_features, num_classes=num_classes, pool_type=global_pool,
                             drop_rate=drop_rate)
        self.head_hidden_size = self.head.num_features
        init_transformer_weights(self)

    # --- timm model API ------------------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if "relative_position_bias_table" in name}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay: the embedding, then per stage (coarse) or per block."""
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+).downsample", (0,)),
            (r"^layers\.(\d+)\.\w+\.(\d+)", None),
            (r"^norm", (99999,)),
        ])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            # nn.Sequential is not generic: its items are typed as plain modules
            cast(SwinTransformerStage, stage).grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] images -> [B, H', W', num_features] normed tokens of the last stage."""
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' grid -> logits, or with pre_logits the pooled [B, head_hidden_size] features."""
        return self.head(x, pre_logits=pre_logits)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | Sequence[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs, [B, C, H, W] ('NCHW', timm's format here) or [B, H, W, C] ('NHWC'). `indices`: None =
        all stages, n = the last n, a list = those. `norm` applies the final norm to the last stage's output (the
        only one it is sized for). Returns the intermediates alone or (forward_features output, intermediates);
        with stop_early the first element is the last computed stage's output, normed if it is the last stage.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt {output_fmt!r} is not 'NCHW' or 'NHWC'")
        taken, last = take_indices(len(self.layers), indices)
        x = self.patch_embed(x)
        stages = self.layers[:last + 1] if stop_early else self.layers
        final_stage = len(self.layers) - 1
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in taken:
                feature = self.norm(x) if norm and i == final_stage else x
                intermediates.append(to_output_fmt(feature, "NHWC", output_fmt))
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(stages) - 1 == final_stage else x), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of `indices`; the final norm and head go with them (they are sized for
        the last stage) or on request. Returns the absolute indices."""
        taken, last = take_indices(len(self.layers), indices)
        prune_end = last < len(self.layers) - 1
        self.layers = self.layers[:last + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.feature_info[last]["num_chs"]
            self.head.in_features = self.num_features
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return taken


def _create(variant: str, pretrained: bool, **kwargs) -> SwinTransformer:
    # features_only hooks the stage outputs in place (timm's FeatureListNet over the flattened `layers`), in
    # the model's NHWC, every stage by default: what timm does for its Swin
    default_out_indices = tuple(range(len(kwargs.get("depths", (2, 2, 6, 2)))))
    out_indices = kwargs.pop("out_indices", default_out_indices)
    return build_model_with_cfg(SwinTransformer, variant, pretrained,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)


default_cfgs = make_default_cfgs({
    # pool_size: the last stage's token grid
    "swin_tiny_patch2_window4_32": dict(CIFAR10_CFG, pool_size=(4, 4)),
    "vp_swin_tiny_patch4_window7_224": dict(IMAGENET_DEFAULT_CFG, pool_size=(7, 7)),
    "vp_swin_base_patch4_window7_224": dict(IMAGENET_DEFAULT_CFG, pool_size=(7, 7)),
}, classifier="head.fc", paper="swin")


@register_model
def swin_tiny_patch2_window4_32(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-T widths for 32x32 inputs. 2x2 patches give a 16x16 grid; three stages at 16x16, 8x8 and 4x4
    tokens hold 16, 4 and 1 windows of 4x4 (a fourth stage would be a 2x2 map, smaller than a window).
    12 blocks and 3/6/12 heads as Swin-T's first three stages; the last stage is one window, never shifted."""
    args = dict(patch_size=2, window_size=4, embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12))
    return _create("swin_tiny_patch2_window4_32", pretrained, **{**args, **kwargs})


@register_model
def vp_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-T at 224 (timm's swin_tiny_patch4_window7_224 architecture)."""
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create("vp_swin_tiny_patch4_window7_224", pretrained, **{**args, **kwargs})


@register_model
def vp_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin-B at 224 (timm's swin_base_patch4_window7_224 architecture)."""
    args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create("vp_swin_base_patch4_window7_224", pretrained, **{**args, **kwargs})

