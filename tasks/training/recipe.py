"""What a training is made of, as the configuration decides it: the model, the teacher, the loss, the
optimiser's parameter groups (layer-wise LR decay, a slower backbone), which parameters are frozen, the
learning-rate schedule, the EMA, the precision and the memory format.

Plain functions of the configuration. The model itself, its precision and memory format live in
tasks/models.py, shared with the judging steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tasks.config import ModelSpec, PipelineConfig, TrainingConfig
from tasks.data.loader import batches_per_rank
from tasks.models import build_model

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

    from vitmodels import DistillationLoss

# With warm-up, the EMA decay at step t is min(ema_decay, 1 - (1 + t) ** -EMA_WARMUP_POWER) (timm's ModelEmaV3).
EMA_WARMUP_POWER = 2 / 3
# The most of the initial (random) weights an EMA may still hold at the end of a run.
EMA_MAX_INITIAL_SHARE = 0.01


def build_teacher(config: PipelineConfig, spec: ModelSpec, num_classes: int, teacher_weights: str | None) -> nn.Module:
    """The distillation teacher: the pipeline's trained baseline, or any timm name plus a weights file."""
    from safetensors.torch import load_file

    if spec.teacher is None:
        raise ValueError(f"{spec.name}: distillation {spec.distillation!r} has no teacher to build")
    if spec.teacher == "baseline":
        if teacher_weights is None:
            raise ValueError(f"{spec.name}: the baseline teacher needs its trained weights (teacher_weights)")
        # The trained weights replace whatever the baseline was fine-tuned from: do not fetch that again.
        teacher = build_model(config.model.baseline.model_copy(update={"pretrained": False, "pretrained_file": None}),
                              num_classes)
        teacher.load_state_dict(load_file(teacher_weights))
        return teacher
    teacher_spec = ModelSpec(name=spec.teacher, pretrained_file=spec.teacher_file, drop_path_rate=0.0,
                             model_kwargs=spec.teacher_build_kwargs)
    return build_model(teacher_spec, num_classes)


def parameter_groups(model: nn.Module, weight_decay: float, lr_scales: Mapping[str, float] | None = None
                     ) -> list[dict]:
    """No weight decay on norms, biases, tokens and position tables (1-d params and no_weight_decay()).

    One group per (LR multiplier, decay), each carrying its "lr_scale": the multiplier from `lr_scales`
    (parameter name -> multiplier, see `lr_scales`), 1 for all without it."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim <= 1 or name in skip)
        groups.setdefault((1.0 if lr_scales is None else lr_scales[name], decayed), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            for (scale, decayed), params in groups.items()]


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s), the part a fine-tuned model learns from scratch."""
    from vitmodels.pretrained import classifier_names

    return classifier_names(model)


def is_head_parameter(name: str, heads: tuple[str, ...]) -> bool:
    return any(name.startswith(f"{head}.") for head in heads)


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> its layer group for layer-wise LR decay, by the model's group_matcher (timm's
    grouping: the stem 0, then each block (the final norm joins the last), and last what no rule matches: the heads)."""
    from timm.models import group_parameters

    group_matcher = getattr(model, "group_matcher", None)
    if group_matcher is None:
        raise ValueError(f"{type(model).__name__} has no group_matcher, so its layers for layer_decay are unknown")
    return group_parameters(model, group_matcher(coarse=False), reverse=True)


def lr_scales(model: nn.Module, *, layer_decay: float | None, backbone_lr_scale: float) -> dict[str, float]:
    """Parameter name -> LR multiplier: layer_decay ** (last layer - its layer) (BEiT/MAE; timm's
    param_groups_layer_decay), times backbone_lr_scale outside the classifier head(s)."""
    heads = head_names(model)
    layers = layer_ids(model) if layer_decay is not None else {}
    last_layer = max(layers.values(), default=0)
    scales = {}
    for name, _ in model.named_parameters():
        scale = layer_decay ** (last_layer - layers[name]) if layer_decay is not None else 1.0
        scales[name] = scale if is_head_parameter(name, heads) else scale * backbone_lr_scale
    return scales


def steps_per_epoch(config: PipelineConfig, train_samples: int, world_size: int) -> int:
    """Optimizer steps per epoch: the batches each rank yields (repeated-augmentation copies included), in
    groups of training.grad_accum_steps; the epoch's last group may be shorter."""
    training = config.training
    batches = batches_per_rank(train_samples, world_size, training.batch_size,
                               config.data.augment.repeated_augmentation)
    return math.ceil(batches / training.grad_accum_steps)


def global_batch(training: TrainingConfig, world_size: int) -> int:
    """Samples per optimizer step across ranks: batch_size x ranks x grad_accum_steps."""
    return training.batch_size * world_size * training.grad_accum_steps


def effective_lr(training: TrainingConfig, world_size: int) -> float:
    """training.lr, times global batch / lr_reference_batch when DeiT's linear scaling is on."""
    if training.lr_reference_batch is None:
        return training.lr
    return training.lr * global_batch(training, world_size) / training.lr_reference_batch


def build_optimizer(model: nn.Module, training: TrainingConfig, spec: ModelSpec, world_size: int
                    ) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter, each group at effective_lr x its lr_scale. Parameters frozen
    later (freeze_backbone_epochs) stay in their groups: without gradients they are skipped, and their
    moments start at their first step."""
    layer_decay = spec.layer_decay if spec.layer_decay is not None else training.layer_decay
    scales = None
    if layer_decay is not None or training.backbone_lr_scale != 1.0:
        scales = lr_scales(model, layer_decay=layer_decay, backbone_lr_scale=training.backbone_lr_scale)
    lr = effective_lr(training, world_size)
    groups = parameter_groups(model, training.weight_decay, scales)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def backbone_frozen(training: TrainingConfig, epoch: int) -> bool:
    """Whether epoch `epoch` (from 0) trains the classifier head(s) alone."""
    return epoch < training.freeze_backbone_epochs


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """Stop (or restart) gradients for every parameter outside the classifier head(s)."""
    heads = head_names(model)
    for name, param in model.named_parameters():
        if not is_head_parameter(name, heads):
            param.requires_grad_(not frozen)


def backbone_to_eval(model: nn.Module) -> None:
    """A frozen backbone computes fixed features: its modules go to eval mode, so dropout, drop-path and
    BatchNorm's running statistics leave it as it is. Call after model.train().

    The head(s) and the modules holding them, the model itself first, stay in training mode: what a forward
    decides by the model's own mode is the training's (a DeiT returns its two heads apart, for the label and
    the teacher loss, where eval mode would return their average)."""
    _backbone_to_eval(model, "", head_names(model))


def _backbone_to_eval(module: nn.Module, prefix: str, heads: tuple[str, ...]) -> None:
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if path in heads:
            continue
        if any(head.startswith(f"{path}.") for head in heads):
            _backbone_to_eval(child, f"{path}.", heads)
        else:
            child.eval()


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0, then cosine decay to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def uses_mixing(config: PipelineConfig) -> bool:
    augment = config.data.augment
    return augment.mixup_prob > 0 and (augment.mixup_alpha > 0 or augment.cutmix_alpha > 0)


def build_criterion(config: PipelineConfig, spec: ModelSpec, teacher: nn.Module | None) -> DistillationLoss:
    from timm.loss import SoftTargetCrossEntropy

    import vitmodels

    augment = config.data.augment
    # Mixing turns labels into soft targets that already carry the label smoothing.
    base = (SoftTargetCrossEntropy() if uses_mixing(config)
            else nn.CrossEntropyLoss(label_smoothing=augment.label_smoothing))
    return vitmodels.DistillationLoss(
        base, teacher, distillation_type=spec.distillation, alpha=spec.distillation_alpha, tau=spec.distillation_tau
    )


def build_ema(model: nn.Module, training: TrainingConfig) -> ModelEmaV3 | None:
    """timm's ModelEmaV3 of `model` as training.ema_decay / ema_warmup ask, or None when EMA is off."""
    from timm.utils import ModelEmaV3

    if training.ema_decay is None:
        return None
    return ModelEmaV3(model, decay=training.ema_decay, use_warmup=training.ema_warmup,
                      warmup_power=EMA_WARMUP_POWER)


def ema_initial_share(training: TrainingConfig, total_steps: int) -> float:
    """How much the EMA still holds of the weights it started from after `total_steps` optimizer steps.

    timm's ModelEmaV3 copies the model on the first two updates (decay 0), so what survives is the product
    of the decays of the updates after them, the warm-up's 1 - (1 + t)^(-2/3) for t = 1, 2, ... when on.
    """
    if training.ema_decay is None or total_steps < 3:
        return 0.0
    steps = np.arange(1, total_steps - 1, dtype=np.float64)
    decays = np.full_like(steps, training.ema_decay)
    if training.ema_warmup:
        decays = np.minimum(decays, 1 - (1 + steps) ** -EMA_WARMUP_POWER)
    return float(np.exp(np.log(decays).sum()))


def check_ema_horizon(training: TrainingConfig, total_steps: int) -> str | None:
    """A message naming the fields when an EMA without warm-up would still hold more than EMA_MAX_INITIAL_SHARE
    of its early, near-random weights at the end of a run of `total_steps` optimizer steps; None when fine.

    With warm-up the decay follows the run's own length (the share falls as exp(-3 t^(1/3))), so only a
    fixed decay can be wrong for a run.
    """
    if training.ema_warmup:
        return None
    share = ema_initial_share(training, total_steps)
    if share <= EMA_MAX_INITIAL_SHARE:
        return None
    largest_decay = math.exp(math.log(EMA_MAX_INITIAL_SHARE) / max(1, total_steps - 2))
    return (
        f"training.ema_decay {training.ema_decay} without training.ema_warmup keeps {share:.0%} of the early, "
        f"near-random weights in the EMA after this run's {total_steps} optimizer steps; turn ema_warmup on or "
        f"use a decay of at most {largest_decay:.5f}"
    )
