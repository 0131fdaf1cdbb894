"""Pretrained-cfg presets for our registrations and create_model, the one entry point for any timm name."""
import functools
import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
)
from timm.models import generate_default_cfgs

from tasks.data.sources import CIFAR10_MEAN, CIFAR10_STD

from .pretrained import checkpoint_num_classes, classifier_names, load_pretrained, read_state_dict

log = logging.getLogger(__name__)

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

    pretrained_file loads a local .safetensors / torch checkpoint (torch.load with weights_only=True, so no
    pickled code runs) of any shape that fits: vitmodels.load_pretrained resamples position embeddings, patch
    embeddings and Swin's relative position tables, replaces heads of another class count and fills a DeiT's
    distillation token and head from a plain ViT checkpoint, and logs what it did. num_classes=None takes the
    checkpoint's class count, so the trained head is kept. Without pretrained_file, pretrained=True downloads
    the hub's checkpoint (`hub_checkpoint`: a vp_ preset takes its timm twin's) and loads it the same way.
    """
    if pretrained_file is None and pretrained:
        try:
            pretrained_file = hub_checkpoint(name)
        except Exception as err:  # no hub weights for the name, no network, no such file on the hub
            raise RuntimeError(
                f"Could not get pretrained weights for {name!r} ({err}). The hub is unreachable or has none for "
                "this name; pass pretrained_file= with a local .safetensors/.pth checkpoint instead."
            ) from err
    if pretrained_file is None:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    state_dict = read_state_dict(pretrained_file)
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    file_classes = checkpoint_num_classes(state_dict, classifier_names(model))
    if num_classes is None and file_classes is not None and file_classes != model.num_classes:
        # timm types its models as plain nn.Modules, so not this method of its model API that every one has
        model.reset_classifier(file_classes)  # type: ignore[operator]
    report = load_pretrained(model, state_dict)
    log.info("%s from %s: %s", name, pretrained_file, report.summary())
    return model


def input_size_kwargs(name: str, image_size: int, model_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The create_model keywords that make `name` (built with `model_kwargs`) take square images of image_size px.

    A model of any input size (a ResNet: its pretrained cfg says fixed_input_size false) takes none, nor does one
    whose preset is that size already. Others (ViT, DeiT, Swin) take img_size; a Swin whose window does not tile
    every stage's token grid at that size takes the largest smaller window that does (a window model_kwargs sets
    is kept). load_pretrained resamples a checkpoint's position embeddings and Swin tables to what is built.
    The model is built and run on the meta device (no memory, no arithmetic) to prove it takes the images.

    Raises:
        ValueError: saying why no keywords fit (no whole number of patches, no window that tiles the grids, a
            stage that cannot halve its grid).
    """
    cfg = timm.models.get_pretrained_cfg(name)
    given = dict(model_kwargs or {})
    if cfg is not None and (not cfg.fixed_input_size or (cfg.input_size[-1] == image_size and not
                                                          {"img_size", "window_size"} & given.keys())):
        return {}
    return dict(_fitting_size_kwargs(name, image_size, json.dumps(given, sort_keys=True)))


@functools.lru_cache(maxsize=256)
def _fitting_size_kwargs(name: str, image_size: int, model_kwargs_json: str) -> tuple[tuple[str, Any], ...]:
    """input_size_kwargs's search, cached: configurations are validated many times over (sweeps, Ray workers)."""
    given = json.loads(model_kwargs_json)
    size = {"img_size": image_size}
    model = _built_on_meta(name, {**given, **size})
    if model is None and "window_size" in given:
        raise ValueError(f"window_size {given['window_size']} does not tile every stage's token grid at "
                         f"{image_size} px")
    if model is None:
        window = _preset_window(name, given)
        for candidate in range(window - 1, 1, -1):
            size = {"img_size": image_size, "window_size": candidate}
            if (model := _built_on_meta(name, {**given, **size})) is not None:
                break
        else:
            raise ValueError(f"no window size from its {window} down to 2 tiles every stage's token grid at "
                             f"{image_size} px")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and image_size % patch[0]:
        raise ValueError(f"{image_size} px is no whole number of its {patch[0]} px patches")
    try:
        with torch.device("meta"), torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size))
    except RuntimeError as error:
        raise ValueError(f"it cannot run on {image_size} px images ({str(error).splitlines()[0]})") from None
    return tuple(size.items())


def _built_on_meta(name: str, kwargs: Mapping[str, Any]) -> torch.nn.Module | None:
    """The model on the meta device, or None when its windows do not tile its token grids (vitmodels' Swin
    refuses them when built)."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, **kwargs)
    except ValueError as error:
        if "window" in str(error):
            return None
        raise


def _preset_window(name: str, model_kwargs: Mapping[str, Any]) -> int:
    """The window side of a windowed model (Swin) at its preset size."""
    with torch.device("meta"):
        model = timm.create_model(name, **model_kwargs)
    if "window_size" not in inspect.signature(type(model)).parameters:
        raise ValueError(f"{type(model).__name__} refused its windows but takes no window_size")
    window: tuple[int, int] = model.get_submodule("layers.0.blocks.0").window_size  # type: ignore[assignment]
    return window[0]


# the files timm's Hugging Face repositories hold weights in, preferred first
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_weights_id(name: str) -> str | None:
    """The Hugging Face repository of `name`'s default (or tagged) pretrained weights in timm's registry; for our
    vp_ presets, which timm has no weights for, the repository of the timm architecture of the same name."""
    architecture, _, tag = name.partition(".")
    twin = architecture.removeprefix("vp_")
    for candidate in dict.fromkeys([name, f"{twin}.{tag}" if tag else twin]):
        try:
            cfg = timm.models.get_pretrained_cfg(candidate, allow_unregistered=False)
        except RuntimeError:  # an architecture or tag timm does not know
            continue
        if cfg is not None and cfg.hf_hub_id:
            return cfg.hf_hub_id
    return None


def hub_checkpoint(name: str) -> Path:
    """The local path of `name`'s hub checkpoint (hub_weights_id), downloaded once into Hugging Face's cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repository = hub_weights_id(name)
    if repository is None:
        raise LookupError(f"timm knows no hub weights for {name!r}")
    for filename in HUB_WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repository, filename=filename))
        except EntryNotFoundError as err:
            if isinstance(err, LocalEntryNotFoundError):  # offline and not in the cache: no other file helps
                raise
            continue  # the repository has no such file: try the next
    raise LookupError(f"{repository} holds none of {', '.join(HUB_WEIGHT_FILES)}")
