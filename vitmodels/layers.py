"""Building blocks shared by the ViT, DeiT and Swin families.

Module and parameter names follow timm so that state_dicts move between the two without conversion.
"""
import torch
import torch.nn.functional as F
from torch import nn


def to_pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


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


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, rescaling survivors to keep the mean."""

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
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping patches through a strided conv; returns channels-last (B, H', W', C)."""

    def __init__(self, img_size, patch_size, in_chans: int, embed_dim: int, norm: bool = False):
        super().__init__()
        self.img_size = to_pair(img_size)
        self.patch_size = to_pair(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size, strict=True))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The softmax SDPA computes internally, materialised only when someone asks to look at it."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention on F.scaled_dot_product_attention.

    With return_attention=True the output still comes from SDPA, so logits do not move by a single ulp; the
    probabilities are computed on the side.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, return_attention: bool = False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        if return_attention:
            return out, attention_probs(q, k, bias)
        return out
