"""What the benchmark scripts share: the training loss, device synchronisation around timers, and timm's
RandAugment on the Pillow installed."""
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import auto_augment


def classification_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(outputs, tuple):  # DeiT in training mode: both heads learn, as under DistillationLoss
        return sum(F.cross_entropy(logits, labels) for logits in outputs)
    return F.cross_entropy(outputs, labels)


def sync(device: torch.device) -> None:
    """Waits for queued GPU work, so a timer read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def _posterize_to_no_bits(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, 0 bits included: a black image, as tasks/data/auto_augment.py keeps. timm's
    PosterizeIncreasing asks for 0 bits at level 10 (rand-m9-mstd0.5-inc1 draws it); Pillow 13 refuses fewer
    than 1 bit with a ValueError where older Pillow gave that black image."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


def let_timm_posterize_to_no_bits() -> None:
    """Every timm posterize op built from now on goes through `_posterize_to_no_bits` (AugmentOp takes its
    function from NAME_TO_OP when it is built). Idempotent."""
    for name, op in auto_augment.NAME_TO_OP.items():
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_to_no_bits
