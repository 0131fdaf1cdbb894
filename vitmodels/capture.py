"""Collect attention probabilities from an unmodified training/eval call site."""
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list]:
    """Inside the block, model(x) keeps returning plain logits while `maps` receives the attention maps of
    that call (replaced on every call, so a loop over batches holds one batch's maps at a time).

    maps is what forward(x, return_attention=True) returns: one [B, heads, N, N] tensor per ViT/DeiT block,
    one SwinAttentionMap per Swin block. Outside the block the model is back on its fast path.

        with capture_attention(model) as maps:
            logits = model(images)
        last_block = maps[-1]
    """
    maps: list = []

    def ask_for_attention(module, args, kwargs):
        return args, {**kwargs, "return_attention": True}

    def keep_maps(module, args, kwargs, output):
        logits, maps[:] = output
        return logits

    handles = [
        model.register_forward_pre_hook(ask_for_attention, with_kwargs=True),
        model.register_forward_hook(keep_maps, with_kwargs=True),
    ]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
