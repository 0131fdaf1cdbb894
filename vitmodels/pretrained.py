"""Loading checkpoints of another shape: fine-tuning a 224 px ImageNet model at 32 px on 10 classes.

load_pretrained(model, checkpoint) adapts a state dict (timm's or ours, .pth or .safetensors) to an already
built model and loads it strictly:

- position embeddings are resampled to the model's patch grid (bicubic), the class/distillation token rows
  kept apart from the patch rows;
- the patch embedding is resampled when the patch size differs (FlexiViT's pseudo-inverse resize,
  https://arxiv.org/abs/2212.08013: tokens of a resized patch match the original tokens in least squares);
- Swin's relative position bias tables are resampled to the model's windows; the derived index and mask
  buffers are the model's own (built for its windows), the checkpoint's copies are dropped;
- classifier heads of another class count keep the model's fresh initialisation;
- a DeiT's distillation token and head (and the token's position row) start as copies of the class
  token's when the checkpoint (a plain ViT) has none.

Everything else must match: a missing or unexpected key, or a shape no rule explains, is an error naming
the keys. The returned LoadReport says which keys were resampled, replaced, initialised, missing or dropped.
"""
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

# checkpoint wrappers, in the order timm's loader unwraps them (EMA weights first)
CHECKPOINT_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")
# prefixes of DistributedDataParallel and torch.compile wrappers
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# buffers that Swin derives from its window size; old timm checkpoints still carry them
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
RESAMPLE_MODE = "bicubic"


class CheckpointMismatchError(ValueError):
    """A checkpoint that no adaptation rule fits; the message names every offending key."""


@dataclass
class LoadReport:
    """What load_pretrained did besides copying tensors of equal shape.

    resampled: key -> (checkpoint shape, model shape). replaced: classifier keys of another class count, left
    at the model's initialisation. initialised: model key -> the checkpoint key it was copied from. missing:
    classifier keys the checkpoint lacks (a headless checkpoint), left at initialisation. dropped: checkpoint
    keys the model has no place for (a head the model lacks, derived buffers, a distillation token).
    """

    resampled: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    initialised: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"resampled {key} {tuple(old)} -> {tuple(new)}" for key, (old, new) in self.resampled.items()]
        if self.replaced:
            parts.append(f"replaced (another class count) {', '.join(self.replaced)}")
        parts += [f"initialised {key} from {source}" for key, source in self.initialised.items()]
        if self.missing:
            parts.append(f"missing, left at initialisation {', '.join(self.missing)}")
        if self.dropped:
            parts.append(f"dropped {', '.join(self.dropped)}")
        return "; ".join(parts) or "loaded as is"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (weights_only: no pickled code runs), unwrapped from
    {'state_dict': ...}-style wrappers and DDP / torch.compile prefixes."""
    path = Path(path)
    checkpoint: object  # a torch checkpoint can hold anything; the checks below find the state dict
    if path.suffix == ".safetensors":
        checkpoint = load_file(str(path))
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in CHECKPOINT_WRAPPERS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(f"{path}: not a state dict (a {type(checkpoint).__name__})")
    state: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        state[key] = value
    return state


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s): the pretrained cfg's, else found from get_classifier()."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if names:
        return (names,) if isinstance(names, str) else tuple(names)
    get_classifier = getattr(model, "get_classifier", None)
    heads = get_classifier() if get_classifier is not None else ()
    heads = heads if isinstance(heads, tuple) else (heads,)
    return tuple(name for name, module in model.named_modules() if any(module is head for head in heads))


def checkpoint_num_classes(state_dict: Mapping[str, torch.Tensor],
                           classifier: str | tuple[str, ...] | None) -> int | None:
    """Output size of the checkpoint's (first) classifier; None for a headless checkpoint."""
    if not classifier:
        return None
    name = classifier if isinstance(classifier, str) else classifier[0]
    weight = state_dict.get(f"{name}.weight")
    return None if weight is None else weight.shape[0]


# --- resampling ----------------------------------------------------------------------------------------------

def _resize_2d(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, C, h, w] -> [N, C, *size], bicubic, anti-aliased when shrinking; computed in float32."""
    resized = F.interpolate(maps.float(), size=size, mode=RESAMPLE_MODE, align_corners=False, antialias=True)
    return resized.to(maps.dtype)


def square_side(count: int, what: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise CheckpointMismatchError(f"{what}: {count} positions are not a square grid; cannot resample")
    return side


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], *, num_prefix_tokens: int,
                       old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """[1, prefix + h*w, C] -> [1, prefix + H*W, C]: the patch rows resampled as a grid, prefix rows unchanged.
    old_grid defaults to a square one."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = old_grid or (square_side(patches.shape[1], "pos_embed"),) * 2
    grid = patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)  # [1, C, h, w]
    grid = _resize_2d(grid, new_grid).permute(0, 2, 3, 1).flatten(1, 2)  # [1, H*W, C]
    return torch.cat([prefix, grid], dim=1)


def resample_patch_embed(weight: torch.Tensor, new_size: tuple[int, int]) -> torch.Tensor:
    """Conv kernel [out, in, h, w] -> [out, in, *new_size] such that a patch resized to the new size gives (in
    least squares over random patches) the token the old kernel gave the original patch (FlexiViT)."""
    old_size = tuple(weight.shape[-2:])
    old_area, new_area = old_size[0] * old_size[1], new_size[0] * new_size[1]
    basis = torch.eye(old_area, dtype=torch.float64).view(old_area, 1, *old_size)
    resize = _resize_2d(basis, new_size).reshape(old_area, new_area)  # row j: resized one-hot patch j
    # resize(x) = resize^T x, so <x, w_old> = <resize(x), w_new> for every x needs resize @ w_new = w_old:
    # exact when enlarging, least squares when shrinking, both given by the pseudo-inverse
    solve = torch.linalg.pinv(resize)  # [new_area, old_area]
    flat = weight.double().reshape(-1, old_area)  # [out * in, h * w]
    return (flat @ solve.T).reshape(*weight.shape[:2], *new_size).to(weight.dtype)


def resample_relative_position_table(table: torch.Tensor, new_window: tuple[int, int],
                                     old_window: tuple[int, int] | None = None) -> torch.Tensor:
    """Swin bias table [(2h-1)(2w-1), heads] -> [(2H-1)(2W-1), heads], resampled over the offset grid.
    old_window defaults to a square one."""
    if old_window is None:
        side = square_side(table.shape[0], "relative_position_bias_table")
        old_offsets = (side, side)
    else:
        old_offsets = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    new_offsets = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    grid = table.T.reshape(1, -1, *old_offsets)  # [1, heads, 2h-1, 2w-1]
    return _resize_2d(grid, new_offsets).reshape(table.shape[1], -1).T.contiguous()


# --- adapting a state dict to a model ------------------------------------------------------------------------

def _prefix_kinds(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Prefix tokens in position-embedding order: class, distillation, registers (timm's order)."""
    kinds = ["cls_token"] if "cls_token" in state else []
    kinds += ["dist_token"] if "dist_token" in state else []
    if "reg_token" in state:
        kinds += [f"reg_token.{i}" for i in range(state["reg_token"].shape[1])]
    return kinds


def _adapt_pos_embed(model: nn.Module, checkpoint: Mapping[str, torch.Tensor],
                     target_state: Mapping[str, torch.Tensor], report: LoadReport) -> torch.Tensor:
    source, target = checkpoint["pos_embed"], target_state["pos_embed"]
    kinds, model_kinds = _prefix_kinds(checkpoint), _prefix_kinds(target_state)
    if source.shape == target.shape and kinds == model_kinds:
        return source  # the same layout (whatever the grid's shape): nothing to resample
    grid_size = getattr(model.get_submodule("patch_embed"), "grid_size", None)
    if grid_size is None:
        raise CheckpointMismatchError(f"pos_embed: {type(model).__name__}.patch_embed has no grid_size to resample to")
    new_grid: tuple[int, int] = tuple(grid_size)
    model_kinds = model_kinds[:target.shape[1] - new_grid[0] * new_grid[1]]  # none with no_embed_class
    # a checkpoint's position embedding covers its prefix tokens or none of them (timm's no_embed_class)
    patches = source.shape[1] - len(kinds)
    covered = len(kinds) if math.isqrt(patches) ** 2 == patches else 0
    resampled = resample_pos_embed(source, new_grid, num_prefix_tokens=covered)
    rows = {kind: resampled[:, i:i + 1] for i, kind in enumerate(kinds[:covered])}
    prefix = []
    for i, kind in enumerate(model_kinds):
        if kind in rows:
            prefix.append(rows[kind])
        elif kind == "dist_token" and "cls_token" in rows:
            prefix.append(rows["cls_token"])
            report.initialised["pos_embed[dist_token row]"] = "pos_embed[cls_token row]"
        else:
            prefix.append(target[:, i:i + 1])
            report.missing.append(f"pos_embed[{kind} row]")
    adapted = torch.cat([*prefix, resampled[:, covered:]], dim=1)
    if adapted.shape != target.shape:
        raise CheckpointMismatchError(
            f"pos_embed: checkpoint {tuple(source.shape)} does not fit the model's {tuple(target.shape)}")
    report.resampled["pos_embed"] = (tuple(source.shape), tuple(target.shape))
    return adapted


def _adapt(model: nn.Module, key: str, checkpoint: Mapping[str, torch.Tensor],
           target_state: Mapping[str, torch.Tensor], report: LoadReport) -> torch.Tensor | None:
    """The checkpoint's value for `key` shaped for the model, or None when no rule explains the difference."""
    if key == "pos_embed":
        return _adapt_pos_embed(model, checkpoint, target_state, report)
    value, target = checkpoint[key], target_state[key]
    if value.shape == target.shape:
        return value
    if key.endswith("patch_embed.proj.weight") and value.shape[:2] == target.shape[:2]:
        adapted = resample_patch_embed(value, (target.shape[-2], target.shape[-1]))
    elif key.endswith("relative_position_bias_table") and value.shape[1] == target.shape[1]:
        window = getattr(model.get_submodule(key.rsplit(".", 1)[0]), "window_size", None)
        new_window = tuple(window) if window is not None else (
            (square_side(target.shape[0], key) + 1) // 2,) * 2
        adapted = resample_relative_position_table(value, new_window)
    else:
        return None
    report.resampled[key] = (tuple(value.shape), tuple(target.shape))
    return adapted


def adapt_state_dict(model: nn.Module, checkpoint: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A complete state dict for `model` from `checkpoint` by the rules in this module's docstring."""
    target = model.state_dict()
    heads = classifier_names(model)

    def is_head(key: str) -> bool:
        return any(key.startswith(f"{head}.") for head in heads)

    report = LoadReport()
    adapted: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in checkpoint.items():
        if key not in target:
            if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS or is_head(key) or key == "dist_token" or (
                    key.startswith("head_dist.")):
                report.dropped.append(key)
            else:
                unexpected.append(key)
        elif is_head(key) and value.shape != target[key].shape:
            report.replaced.append(key)
        elif (fitted := _adapt(model, key, checkpoint, target, report)) is not None:
            adapted[key] = fitted
        else:
            mismatched.append(f"{key} (checkpoint {tuple(value.shape)}, model {tuple(target[key].shape)})")

    missing = []
    for key, value in target.items():
        if key in adapted:
            continue
        source = _copy_source(key, checkpoint, adapted)
        if source is not None:
            adapted[key] = adapted[source] if source in adapted else checkpoint[source]
            report.initialised[key] = source
        elif key in report.replaced or (is_head(key) and key not in checkpoint):
            adapted[key] = value
            if key not in report.replaced:
                report.missing.append(key)
        else:
            missing.append(key)
    problems = [f"{label}: {', '.join(keys)}" for label, keys in [
        ("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
        ("shapes no rule adapts", mismatched)] if keys]
    if problems:
        raise CheckpointMismatchError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    return adapted, report


def _copy_source(key: str, checkpoint: Mapping[str, torch.Tensor], adapted: Mapping[str, torch.Tensor]) -> str | None:
    """A DeiT key a plain ViT checkpoint lacks and the class-token counterpart it starts from."""
    if key == "dist_token" and "cls_token" in checkpoint:
        return "cls_token"
    if key.startswith("head_dist.") and key not in checkpoint:
        counterpart = "head." + key.removeprefix("head_dist.")
        if counterpart in adapted or counterpart in checkpoint:
            return counterpart
    return None


def load_pretrained(model: nn.Module, checkpoint: str | Path | Mapping[str, torch.Tensor]) -> LoadReport:
    """Adapt a checkpoint (a path or a state dict) to an already built model, load it strictly and report."""
    state = read_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    adapted, report = adapt_state_dict(model, state)
    model.load_state_dict(adapted, strict=True)
    return report
