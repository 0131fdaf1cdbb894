"""What the benchmark scripts share: the training loss and device synchronisation around timers."""
import torch
import torch.nn.functional as F


def classification_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(outputs, tuple):  # DeiT in training mode: both heads learn, as under DistillationLoss
        return sum(F.cross_entropy(logits, labels) for logits in outputs)
    return F.cross_entropy(outputs, labels)


def sync(device: torch.device) -> None:
    """Waits for queued GPU work, so a timer read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
