"""Helpers shared by the vitmodels tests."""
import pytest
import torch
from torch import nn


def scramble_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random values in every parameter: at init, near-zero heads, identity LayerNorms and zero-initialised
    residual branches would hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine their spinning costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
