"""DeiT's hard/soft distillation loss (Touvron et al., 2020), https://arxiv.org/abs/2012.12877."""
import torch
import torch.nn.functional as F
from torch import nn

DISTILLATION_TYPES = ("none", "soft", "hard")


class DistillationLoss(nn.Module):
    """loss = (1 - alpha) * base_criterion(cls_logits, labels) + alpha * distillation(dist_logits, teacher).

    forward(inputs, outputs, labels): `outputs` is the student's (cls_logits, dist_logits) tuple (a DeiT model
    in training mode) or a plain logits tensor, which then serves for both terms (classic KD). `labels` go to
    base_criterion untouched, so soft (mixup/cutmix) targets work whenever the base criterion accepts them.

    - 'soft': KL(softmax(teacher / tau) || softmax(dist_logits / tau)) summed over classes, times tau^2,
      averaged over the batch (the DeiT paper's scale: the tau^2 keeps the gradient's size independent of tau,
      so `alpha` weighs two per-sample terms of like size, the cross entropy and the KL).
    - 'hard': cross entropy of dist_logits against the teacher's argmax.
    - 'none': base criterion only; a (cls, dist) tuple is averaged first, which is what the model predicts
      in eval mode.

    The teacher runs in eval mode under no_grad. After each call `last_terms` holds the detached
    {'base', 'distillation'} values, for logging.
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: nn.Module | None,
                 distillation_type: str = "none", *, alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(
                f"distillation_type must be one of {DISTILLATION_TYPES}, got {distillation_type!r}")
        if distillation_type != "none" and teacher_model is None:
            raise ValueError(f"distillation_type={distillation_type!r} needs a teacher_model")
        self.base_criterion = base_criterion
        self.teacher = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, inputs: torch.Tensor, outputs, labels: torch.Tensor) -> torch.Tensor:
        two_heads = isinstance(outputs, (tuple, list))
        if self.distillation_type == "none":
            loss = self.base_criterion((outputs[0] + outputs[1]) / 2 if two_heads else outputs, labels)
            self.last_terms = {"base": loss.detach(), "distillation": torch.zeros_like(loss.detach())}
            return loss

        teacher = self.teacher
        if teacher is None:  # the constructor checked; this catches a teacher removed since
            raise ValueError(f"distillation_type={self.distillation_type!r} needs a teacher_model")
        cls_logits, dist_logits = outputs if two_heads else (outputs, outputs)
        base = self.base_criterion(cls_logits, labels)
        # eval on every call: a model.train() on a parent module must not switch on teacher dropout/BN
        teacher.eval()
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        if self.distillation_type == "soft":
            # kl_div(input=log q, target=log p) = sum p (log p - log q) = KL(teacher || student); batchmean
            # divides the sum by the batch size only (dividing by numel would also divide by the class count).
            distillation = F.kl_div(
                F.log_softmax(dist_logits / self.tau, dim=1),
                F.log_softmax(teacher_logits / self.tau, dim=1),
                reduction="batchmean",
                log_target=True,
            ) * (self.tau * self.tau)
        else:
            distillation = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        self.last_terms = {"base": base.detach(), "distillation": distillation.detach()}
        return base * (1 - self.alpha) + distillation * self.alpha
