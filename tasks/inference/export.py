"""A trained model out of this package: an ONNX graph, or a folder that plain timm loads, each checked on real images.

`export_onnx` writes model.onnx (opset ONNX_OPSET, dynamic batch axis, input `images` [B, 3, H, W] normalised
as preprocessing.json says, output `logits` [B, num_classes]), preprocessing.json and labels.json, then runs
onnxruntime on real test images against the PyTorch model.

`export_timm` writes model.safetensors and config.json in the layout timm's hub loader reads, under timm's OWN
architecture for the model (`timm_architecture`: our ViT/DeiT/Swin are parameter for parameter timm's), so

    timm.create_model("local-dir:DIR", pretrained=True)

rebuilds it without this package; the export checks exactly that call against our model on real test images.
Our CIFAR ResNet has no timm twin (timm's ResNet stems downsample 4x; ours is one 3x3/1 conv): it is refused.

Both write parity.json (images, max |Δlogit|, top-1 agreement, tolerance) and raise ParityError beyond the
tolerance, leaving the files for inspection.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tasks.config import is_url
from tasks.inference.model_ref import (
    CROP_MODE,
    MODEL_CONFIG_FILE,
    ModelDescription,
    eval_transform,
    load_model,
    read_image,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitmodels import SwinTransformer, VisionTransformer

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "timm"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("onnx", "timm")
# 18: what torch's dynamo exporter emits natively, and what onnxruntime >= 1.14 and TensorRT >= 8.6 run.
ONNX_OPSET = 18
ONNX_FILE = "model.onnx"
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
TIMM_WEIGHTS = "model.safetensors"
PREPROCESSING_FILE = "preprocessing.json"
LABELS_FILE = "labels.json"
PARITY_FILE = "parity.json"
# Largest |Δlogit| accepted in fp32: ONNX kernels reorder sums (1e-3 abs); timm runs the same modules (1e-4 abs).
ONNX_TOLERANCE = 1e-3
TIMM_TOLERANCE = 1e-4
PARITY_IMAGES = 64
# Where a run keeps its shards, below the run name's directory (PipelineConfig.shard_location's default).
RUN_SHARDS = "shards"
# A protobuf message is at most 2 GiB: larger weights go to model.onnx.data beside the graph.
PROTOBUF_LIMIT = 2 ** 31 - 1

# The timm architecture our CIFAR presets are a smaller copy of; a vp_ preset's twin is the name without vp_.
# model_args set every structural hyper-parameter, so the name only chooses the family (and reads like the model).
TIMM_COUNTERPARTS = {
    "vit_tiny_patch4_32": "vit_tiny_patch16_224",
    "vit_small_patch4_32": "vit_small_patch16_224",
    "deit_tiny_distilled_patch4_32": "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch4_32": "deit_small_distilled_patch16_224",
    "swin_tiny_patch2_window4_32": "swin_tiny_patch4_window7_224",
}


class ExportError(ValueError):
    """A model that cannot be exported in the format asked for, or no images to check it on; says why."""


@dataclass(frozen=True)
class ParityReport:
    """The exported model against the PyTorch model on the same preprocessed images (fp32, CPU)."""

    runtime: str  # what ran the export: "onnxruntime 1.x" or "timm 1.x"
    images: int
    max_abs_diff: float  # largest |Δlogit| over every image and class
    top1_agreement: float  # fraction of images whose top class is the same
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (f"parity on {self.images} test images ({self.runtime}): max |Δlogit| {self.max_abs_diff:.2e}, "
                f"top-1 agreement {self.top1_agreement:.1%} (tolerance {self.tolerance:.0e} abs): {verdict}")


class ParityError(RuntimeError):
    """The exported model's logits differ from PyTorch's beyond the tolerance."""

    def __init__(self, report: ParityReport, out: Path):
        super().__init__(f"{out}: the export does not match the PyTorch model: max |Δlogit| "
                         f"{report.max_abs_diff:.2e} > tolerance {report.tolerance:.0e} on {report.images} test images "
                         f"(top-1 agreement {report.top1_agreement:.1%}); the files are left for inspection")
        self.report = report


@dataclass(frozen=True)
class ExportResult:
    format: ExportFormat
    out: Path
    files: tuple[str, ...]  # names written in `out`
    parity: ParityReport
    details: dict[str, Any] = field(default_factory=dict)  # opset (onnx); architecture, model_args (timm)


# -- the images the parity check runs on -----------------------------------------------------------------------------

def default_image_source(description: ModelDescription) -> str | None:
    """The shards of the run the model was trained in: runs/<run>/shards above runs/<run>[/<flow run>]/models/<name>/,
    or None when the model is not in such a run directory (a W&B download, a copied folder)."""
    from tasks.data.manifest import MANIFEST_NAME

    model_dir = description.weights.resolve().parent
    for run_root in list(model_dir.parents)[1:3]:  # runs/<run>/models/<name> or runs/<run>/<flow run>/models/<name>
        if (run_root / RUN_SHARDS / MANIFEST_NAME).is_file():
            return str(run_root / RUN_SHARDS)
    return None


def parity_images(description: ModelDescription, source: str | Path, count: int = PARITY_IMAGES) -> torch.Tensor:
    """Up to `count` real images as the model takes them ([N, C, H, W] float32, eval_transform'ed): the test split
    of a shard directory or URL, or image files (a file, or a folder searched recursively, in name order)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from tasks.data.manifest import MANIFEST_NAME, TEST_SPLIT, read_manifest

    transform = eval_transform(description)
    path = Path(source)
    if is_url(source) or (path / MANIFEST_NAME).is_file():
        if read_manifest(str(source)) is None:
            raise ExportError(f"--images {source}: no shards there (no manifest.json)")
        from tasks.data.loader import ShardStream

        pictures = []
        for images, _, _ in ShardStream(str(source), TEST_SPLIT, count, train=False):  # a batch ends with a shard
            pictures += [Image.fromarray(image) for image in images.permute(0, 2, 3, 1).numpy()]
            if len(pictures) >= count:
                break
        pictures = pictures[:count]
    else:
        from tasks.inference.predict import IMAGE_SUFFIXES, find_images

        files, _ = find_images([str(source)])
        if not files:
            raise ExportError(f"--images {source}: neither shards (a manifest.json) nor image files "
                              f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        pictures = []
        for file in files[:count]:
            try:
                pictures.append(read_image(file))
            except (OSError, UnidentifiedImageError) as error:
                raise ExportError(f"--images: {file} is not a readable image ({error})") from None
    return torch.stack([transform(picture) for picture in pictures])


def compare_logits(expected: torch.Tensor, actual: torch.Tensor, runtime: str, tolerance: float) -> ParityReport:
    return ParityReport(
        runtime=runtime, images=int(expected.shape[0]),
        max_abs_diff=float((expected - actual).abs().max()),
        top1_agreement=float((expected.argmax(dim=1) == actual.argmax(dim=1)).float().mean()),
        tolerance=tolerance)


def _finish(out: Path, report: ParityReport) -> None:
    (out / PARITY_FILE).write_text(json.dumps(asdict(report) | {"passed": report.passed}, indent=2) + "\n")
    log.info("%s: %s", out, report.summary())
    if not report.passed:
        raise ParityError(report, out)


def _reference_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return model(images).float()


# -- ONNX ------------------------------------------------------------------------------------------------------------

def preprocessing(description: ModelDescription) -> dict[str, Any]:
    """What an ONNX user must do to an image before `images`: RGB, resize and centre-crop, scale to [0, 1],
    normalise, NCHW float32."""
    return {
        "input": ONNX_INPUT, "output": ONNX_OUTPUT, "layout": "NCHW", "dtype": "float32",
        "input_size": list(description.input_size), "interpolation": description.interpolation,
        "crop_pct": description.crop_pct, "crop_mode": CROP_MODE, "scale": 1 / 255,
        "mean": list(description.mean), "std": list(description.std), "onnx_opset": ONNX_OPSET,
        "resize": "shorter side to input_size / crop_pct, then a centre crop of input_size (timm's eval transform)",
    }


def export_onnx(description: ModelDescription, out: Path, images: torch.Tensor,
                tolerance: float = ONNX_TOLERANCE) -> ExportResult:
    """model.onnx with a dynamic batch axis, preprocessing.json and labels.json in `out`, checked by onnxruntime
    on `images` (a batch of another size than the one traced, so the batch axis is proven dynamic).

    Raises:
        ParityError: beyond `tolerance`.
    """
    import onnxruntime
    import torch

    model = load_model(description)
    expected = _reference_logits(model, images)
    # The explicit softmax path: torch's exporter cannot decompose fused attention with an additive mask (Swin)
    # under a symbolic batch, and at this opset fused attention becomes the same MatMul/Softmax nodes anyway.
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = False  # type: ignore[assignment]
    out.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    # traced on two copies of one image: the parity run below feeds every image at once, another batch size
    trace = images[:1].repeat(2, 1, 1, 1)
    torch.onnx.export(
        model, (trace,), str(out / ONNX_FILE), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=ONNX_OPSET, dynamo=True,
        external_data=weight_bytes >= PROTOBUF_LIMIT, verbose=False)
    (out / PREPROCESSING_FILE).write_text(json.dumps(preprocessing(description), indent=2) + "\n")
    (out / LABELS_FILE).write_text(json.dumps(list(description.labels), indent=2) + "\n")

    session = onnxruntime.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    actual = torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: images.numpy()})[0])
    report = compare_logits(expected, actual, f"onnxruntime {onnxruntime.__version__}", tolerance)
    _finish(out, report)
    files = sorted(p.name for p in out.iterdir() if p.name.startswith(ONNX_FILE)) + [
        PREPROCESSING_FILE, LABELS_FILE, PARITY_FILE]
    return ExportResult("onnx", out, tuple(files), report, {"opset": ONNX_OPSET})


# -- timm ------------------------------------------------------------------------------------------------------------

def _side(pair: tuple[int, int] | list[int]) -> int | list[int]:
    """An int for a square size (how timm's own configs write it), else [height, width]."""
    return int(pair[0]) if pair[0] == pair[1] else [int(pair[0]), int(pair[1])]


def _vit_args(model: VisionTransformer) -> dict[str, Any]:
    """timm VisionTransformer(Distilled) keywords that rebuild one of our ViTs/DeiTs."""
    from torch import nn

    block: Any = model.blocks[0]
    return {
        "img_size": _side(model.patch_embed.img_size), "patch_size": _side(model.patch_embed.patch_size),
        "in_chans": model.in_chans, "embed_dim": model.embed_dim, "depth": len(model.blocks),
        "num_heads": block.attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None, "global_pool": model.global_pool,
        "fc_norm": isinstance(model.fc_norm, nn.LayerNorm),
    }


def _swin_args(model: SwinTransformer) -> dict[str, Any]:
    """timm SwinTransformer keywords that rebuild our Swin. The first stage's window is the configured one clamped
    to the largest grid, which clamps every later (smaller) grid as the configured one does."""
    stages: list[Any] = list(model.layers)
    first = stages[0].blocks[0]
    return {
        "img_size": _side(model.patch_embed.img_size), "patch_size": _side(model.patch_embed.patch_size),
        "in_chans": model.in_chans, "embed_dim": model.embed_dim,
        "depths": [len(stage.blocks) for stage in stages],
        "num_heads": [stage.blocks[0].attn.num_heads for stage in stages],
        "window_size": _side(first.window_size), "mlp_ratio": first.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": first.attn.qkv.bias is not None, "global_pool": model.global_pool,
    }


def timm_architecture(model: nn.Module, description: ModelDescription) -> tuple[str, dict[str, Any]]:
    """timm's own architecture name and the create_model keywords that build `model`'s module tree with its
    parameter names. A timm model (not ours) is its own; ours map to timm's ViT, distilled DeiT (which averages
    its two heads in eval, as ours) and Swin (its input size and window fixed by model_args).

    Raises:
        ExportError: for a family timm has no twin of (our CIFAR ResNet).
    """
    import vitmodels

    if type(model).__module__.partition(".")[0] != vitmodels.__name__:
        return description.architecture, dict(description.model_args)
    name = description.architecture
    if isinstance(model, vitmodels.ResNet):
        raise ExportError(
            f"{name}: timm has no ResNet with this CIFAR stem (one 3x3 stride-1 conv and no max-pool; every stem of "
            "timm's ResNet downsamples 4x), so no timm architecture gives its logits; use --format onnx")
    if isinstance(model, vitmodels.DistilledVisionTransformer):
        family, args = "deit_tiny_distilled_patch16_224", _vit_args(model)
    elif isinstance(model, vitmodels.VisionTransformer):
        family, args = "vit_tiny_patch16_224", _vit_args(model)
    elif isinstance(model, vitmodels.SwinTransformer):
        family, args = "swin_tiny_patch4_window7_224", _swin_args(model)
    else:
        raise ExportError(f"{name}: a {type(model).__name__}, which has no timm architecture to export as")
    counterpart = name.removeprefix("vp_") if name.startswith("vp_") else TIMM_COUNTERPARTS.get(name, family)
    return counterpart, args


def timm_config(native: nn.Module, architecture: str, model_args: dict[str, Any],
                description: ModelDescription) -> dict[str, Any]:
    """config.json as timm's hub loader reads it (timm.models._hub: architecture, num_classes, model_args, and a
    pretrained_cfg of PretrainedCfg's fields), with our preprocessing and class names."""
    own_cfg: dict[str, Any] = getattr(native, "pretrained_cfg", None) or {}
    config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": description.num_classes,
        "num_features": int(native.num_features),  # type: ignore[arg-type]
    }
    if isinstance(pool := getattr(native, "global_pool", None), str) and pool:
        config["global_pool"] = pool
    config["model_args"] = model_args
    config["pretrained_cfg"] = {
        "custom_load": False,  # a plain state dict, whatever the architecture's registry weights are
        "input_size": list(description.input_size),
        "fixed_input_size": bool(own_cfg.get("fixed_input_size", False)),
        "interpolation": description.interpolation, "crop_pct": description.crop_pct, "crop_mode": CROP_MODE,
        "mean": list(description.mean), "std": list(description.std),
        "num_classes": description.num_classes, "label_names": list(description.labels),
        "first_conv": own_cfg.get("first_conv"), "classifier": own_cfg.get("classifier"),
    }
    return config


def export_timm(description: ModelDescription, out: Path, images: torch.Tensor,
                tolerance: float = TIMM_TOLERANCE) -> ExportResult:
    """model.safetensors and config.json in `out`, loaded back with `timm.create_model("local-dir:<out>",
    pretrained=True)` and checked against our model on `images`.

    Raises:
        ExportError: no timm architecture has this module tree (the weights do not load strictly into it).
        ParityError: beyond `tolerance`.
    """
    import timm
    from safetensors.torch import save_file

    model = load_model(description)
    architecture, model_args = timm_architecture(model, description)
    native = timm.create_model(architecture, num_classes=description.num_classes, **model_args)
    try:
        native.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as error:  # the first line only says that loading failed; the rest names the keys
        keys = "; ".join(line.strip() for line in str(error).splitlines()[1:])
        raise ExportError(
            f"{description.architecture}: its weights do not fit timm's {architecture} ({keys})") from None
    out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in native.state_dict().items()}, str(out / TIMM_WEIGHTS))
    config = timm_config(native, architecture, model_args, description)
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    loaded = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True).eval()
    report = compare_logits(_reference_logits(model, images), _reference_logits(loaded, images),
                            f"timm {timm.__version__}", tolerance)
    _finish(out, report)
    return ExportResult("timm", out, (TIMM_WEIGHTS, MODEL_CONFIG_FILE, PARITY_FILE), report,
                        {"architecture": architecture, "model_args": model_args})


def export_model(description: ModelDescription, fmt: ExportFormat, out: Path, images: torch.Tensor,
                 tolerance: float | None = None) -> ExportResult:
    """Export in `fmt` ('onnx' or 'timm') to `out`, checked on `images` within `tolerance` (the format's default
    when None)."""
    if fmt == "onnx":
        return export_onnx(description, out, images, ONNX_TOLERANCE if tolerance is None else tolerance)
    if fmt == "timm":
        return export_timm(description, out, images, TIMM_TOLERANCE if tolerance is None else tolerance)
    raise ExportError(f"format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
