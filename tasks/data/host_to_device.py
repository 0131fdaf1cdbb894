"""How the batched transforms reach the device without making the host wait for it.

The batched transforms (`BatchAugmenter` and its parts in crops.py and auto_augment.py, `BatchEraser`,
`BatchMixer`) draw every random choice on the host (a CPU `torch.Generator`, a NumPy `Generator`) and send
the device only index and parameter tensors, copied with `non_blocking=True` from pinned memory (`pinned_to`).
How many images took which op is therefore known on the host, so none of them reads a device tensor back: no
`.item()`, `.tolist()` or `nonzero()` of device data and no boolean-mask indexing with a data-dependent
shape. On CUDA a batch is queued without waiting for the GPU. (tests/unit/data/test_augment.py runs them all
on the meta device, which has no values to read, and fails on blocking host-to-device copies.)
"""

from __future__ import annotations

import torch


def pinned_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without making the host wait: pinned memory, non-blocking copy."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def require_host_generator(generator: torch.Generator, user: str) -> None:
    if generator.device.type != "cpu":
        raise ValueError(f"{user} draws on the host: pass a CPU torch.Generator, not one on {generator.device}")
