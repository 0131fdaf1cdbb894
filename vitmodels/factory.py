"""Pretrained-cfg presets for our registrations and create_model, the one entry point for any timm name."""
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
)
from timm.models import generate_default_cfgs, get_pretrained_cfg

# per-channel statistics of the CIFAR-10 training images (the one home of these numbers)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_CFG = dict(
    input_size=(3, 32, 32), num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD,
    crop_pct=1.0, interpolation="bilinear",
)
IMAGENET_DEFAULT_CFG = dict(
    input_size=(3, 224, 224), num_classes=1000, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    crop_pct=0.9, interpolation="bicubic",
)
# timm's vit_*_patch16_224 weights (augreg) were trained with inception normalisation
IMAGENET_INCEPTION_CFG = dict(IMAGENET_DEFAULT_CFG, mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD)

PAPERS = {
    "vit": ("An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", "arXiv:2010.11929"),
    "deit": ("Training data-efficient image transformers & distillation through attention", "arXiv:2012.12877"),
    "swin": ("Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", "arXiv:2103.14030"),
    "resnet": ("Deep Residual Learning for Image Recognition", "arXiv:1512.03385"),
}


def make_default_cfgs(presets: dict[str, dict], *, classifier: str | tuple[str, ...], paper: str,
                      first_conv: str = "patch_embed.proj", fixed_input_size: bool = True,
                      pool_size: tuple[int, int] | None = None):
    """timm default_cfgs for a family, with every field timm's own cfgs of the family set.

    `classifier` names the head(s) timm drops when num_classes changes; `pool_size` is the final feature map
    pooled by the head (None for token models), a preset's own value winning.
    """
    paper_name, paper_id = PAPERS[paper]
    return generate_default_cfgs({
        name: dict(dict(pool_size=pool_size), **cfg, classifier=classifier, first_conv=first_conv,
                   fixed_input_size=fixed_input_size, license="apache-2.0", paper_name=paper_name,
                   paper_ids=paper_id, origin_url="https://github.com/vit-pipeline/vit-pipeline")
        for name, cfg in presets.items()
    })


def create_model(name: str, num_classes: int | None = None, pretrained_file: str | Path | None = None,
                 pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """timm.create_model for any registered name (ours after `import vitmodels`, or timm's own).

    pretrained_file loads a local .safetensors / torch checkpoint through timm's loader (torch.load with
    weights_only=True, so no pickled code runs). A num_classes different from the file's drops the file's
    head(s) and keeps the freshly initialised ones; the file's class count is read first so that a matching
    num_classes keeps the trained head even when the file's classes differ from the preset's.
    Without pretrained_file, pretrained=True asks the hub.
    """
    if pretrained_file is not None:
        pretrained = True
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=str(pretrained_file))
        cfg = get_pretrained_cfg(name)
        file_classes = checkpoint_num_classes(pretrained_file, cfg.classifier if cfg else None)
        if file_classes is not None:
            overlay["num_classes"] = file_classes
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained or pretrained_file is not None:
            raise
        raise RuntimeError(
            f"Could not get pretrained weights for {name!r} ({err}). The hub is unreachable or has none for "
            "this name; pass pretrained_file= with a local .safetensors/.pth checkpoint instead."
        ) from err


def checkpoint_num_classes(path: str | Path, classifier: str | tuple[str, ...] | None) -> int | None:
    """Output size of the checkpoint's classifier, read without loading the other tensors."""
    if classifier is None:
        return None
    weight_name = f"{classifier if isinstance(classifier, str) else classifier[0]}.weight"
    if str(path).endswith(".safetensors"):
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice(weight_name).get_shape()[0] if weight_name in f.keys() else None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # the same wrappers timm's load_state_dict unwraps
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    weight = checkpoint.get(weight_name, checkpoint.get(f"module.{weight_name}"))
    return None if weight is None else weight.shape[0]
