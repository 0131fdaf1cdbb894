"""Collect attention probabilities from an unmodified training/eval call site."""
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .layers import Attention


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list]:
    """Inside the block, model(x) keeps returning plain logits while `maps` receives the attention maps of
    that call (replaced on every call, so a loop over batches holds one batch's maps at a time).

    maps holds, in block order, one [B, heads, N, N] tensor per ViT/DeiT block and one SwinAttentionMap per
    Swin block. The attention layers take their explicit path (`fused_attn` off) for the duration, and the maps
    are the outputs of their `attn_drop` modules: the very probabilities multiplied with the values (in
    training mode with attention dropout, after the dropout). On leaving, the layers are back on their fused
    path and the hooks are gone, so nothing of this reaches FX tracing or torch.compile.

        with capture_attention(model) as maps:
            logits = model(images)
        last_block = maps[-1]
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, Attention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no vitmodels attention layers to capture")
    maps: list = []

    def start_call(module, args):
        maps.clear()

    def keeper(describe):
        def keep(module, args, output):
            maps.append(describe(output))
        return keep

    fused = {name: layer.fused_attn for name, layer in layers}
    handles = [model.register_forward_pre_hook(start_call)]
    for name, layer in layers:
        owner = model.get_submodule(name.rpartition(".")[0])
        # a Swin block knows where its windows sit on the token grid; ViT maps are plain tensors
        describe = getattr(owner, "attention_map", lambda probs: probs)
        handles.append(layer.attn_drop.register_forward_hook(keeper(describe)))
        layer.fused_attn = False
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in layers:
            layer.fused_attn = fused[name]
