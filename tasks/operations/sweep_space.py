"""The sweep's search space (the `sweep` section of the configuration) and its checks against the rest of
the configuration; tasks/operations/sweep.py runs it with Ray Tune.

Pydantic only: tasks.config imports this module, so it must not import Ray or torch.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.config_base import Section

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

# What every epoch reports about the validation split (tasks/train_loop.validate), and which way is better.
# Trials are chosen on these alone: an epoch's training metrics are not measured on held-out data.
VALIDATION_METRICS = {"val_acc": "max", "val_loss": "min"}
# Where swept parameters may live: the recipe, the augmentation and the swept model's own fields. The shards
# are made once for every trial, and scaling, tracking, orchestration and storage are not hyperparameters.
SWEEPABLE_SECTIONS = ("training.", "data.augment.")


class SearchDimension(Section):
    """The values one swept field takes: exactly one of `choice` (a list), `uniform` or `loguniform` ([low, high])."""

    choice: list[Any] | None = Field(None, min_length=1, description="The values to sample from, uniformly.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: any number between, uniformly.")
    loguniform: tuple[PositiveFloat, PositiveFloat] | None = Field(
        None, description="[low, high], both above 0: any number between, uniformly on a log scale (for learning "
                          "rates, weight decays).")

    @model_validator(mode="after")
    def _one_distribution(self) -> SearchDimension:
        given = [name for name in ("choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform (got {', '.join(given) or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"[low, high] needs low < high (got {list(bounds)})")
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        """[low, high] of a uniform or loguniform dimension."""
        bounds = self.uniform or self.loguniform
        if bounds is None:
            raise ValueError("a choice has no bounds")
        return bounds

    def candidates(self) -> list[Any]:
        """Values standing for everything the dimension samples, checked against the config before any trial:
        every choice, or both bounds and a fractional value between them (an integer field refuses that one)."""
        if self.choice is not None:
            return list(self.choice)
        low, high = self.bounds
        inside = low + 0.37 * (high - low) if self.uniform else low * (high / low) ** 0.37
        return [low, inside, high]


class SweepSchedulerConfig(Section):
    """How trials are stopped early: ASHA (asynchronous successive halving) on the sweep's metric, or never (fifo)."""

    name: Literal["asha", "fifo"] = Field(
        "asha", description="\"asha\" stops poor trials early; \"fifo\" trains every trial for training.epochs.")
    grace_period: PositiveInt = Field(
        1, description="Epochs every trial trains before ASHA may stop it; then at grace_period x "
                       "reduction_factor^k epochs a trial continues only if it is in the best 1/reduction_factor of "
                       "the trials that got that far.")
    reduction_factor: float = Field(
        3.0, gt=1.0, description="ASHA's halving rate: the share 1/reduction_factor of trials kept at each rung, and "
                                 "the growth of the epochs between rungs.")


class SweepConfig(Section):
    """A hyperparameter search over one configured model with Ray Tune (`vit-pipeline sweep`); the pipeline
    flow ignores this section.

    parameters are keyed by their dotted path in this configuration, list items by index:
    `training.lr`, `data.augment.mixup_alpha`, `model.transformers.0.drop_path_rate`,
    `model.transformers.0.model_kwargs.depth`.
    """

    model: str = Field(description="The configured model (model.baseline or one of model.transformers) every "
                                   "trial trains.")
    parameters: dict[str, SearchDimension] = Field(
        description="The search space: each swept field's dotted path and the values it takes.")
    metric: str = Field(
        "val_acc", description="The validation metric trials are compared and stopped on: val_acc or val_loss.")
    mode: Literal["max", "min"] | None = Field(
        None, description="Whether the metric is better higher or lower; None: the metric's own direction (max for "
                          "val_acc, min for val_loss).")
    num_trials: PositiveInt = Field(8, description="Parameter samples to train.")
    max_concurrent_trials: PositiveInt | None = Field(
        None, description="Trials run at once; None: as many as the Ray cluster holds trainings of this scaling "
                          "config at its largest (scaling.max_cluster_resources, else its autoscaler's maximum).")
    scheduler: SweepSchedulerConfig = Field(
        default_factory=SweepSchedulerConfig, description="How trials are stopped early.")
    seed: int = Field(0, description="Seeds the sampling of parameters: the same config samples the same trials.")

    @field_validator("parameters")
    @classmethod
    def _not_empty(cls, value: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        if not value:
            raise ValueError("the search space is empty: give at least one parameter, e.g. "
                             "training.lr: {loguniform: [1.0e-4, 3.0e-3]}")
        return value

    @field_validator("metric")
    @classmethod
    def _reported_by_every_epoch(cls, value: str) -> str:
        if value not in VALIDATION_METRICS:
            raise ValueError(f"no epoch reports {value!r} about the validation split; trials are chosen on one "
                             f"of: {', '.join(VALIDATION_METRICS)}")
        return value

    @field_validator("mode")
    @classmethod
    def _the_metrics_direction(cls, value: str | None, info: ValidationInfo) -> str | None:
        metric = info.data.get("metric")
        if value is not None and metric in VALIDATION_METRICS and value != VALIDATION_METRICS[metric]:
            raise ValueError(f"{metric} is better when {'higher' if VALIDATION_METRICS[metric] == 'max' else 'lower'}"
                             f": mode {VALIDATION_METRICS[metric]} (or leave mode out)")
        return value

    @property
    def direction(self) -> str:
        return self.mode or VALIDATION_METRICS[self.metric]


def sweep_problems(config: PipelineConfig, sweep: SweepConfig) -> list[str]:
    """What is wrong with `sweep` in `config` (PipelineConfig's validator reports them): every swept path must be
    a field of this configuration that a trial may change, and every value the search can sample one the
    configuration accepts, found now, not when a trial starts. A sweep.model that is not configured raises."""
    problems = []
    if (where := swept_model_path(config, sweep)) is None:
        known = ", ".join(spec.name for spec in config.model.all_specs())
        raise ValueError(f"sweep.model: {sweep.model!r} is not a configured model; configured: {known}")
    spec = config.model.spec(sweep.model)
    if spec.distillation != "none" and spec.teacher == "baseline":
        problems.append(f"sweep.model: {sweep.model} distils from the pipeline's trained baseline, which a "
                        "sweep does not train; sweep a model without teacher: baseline")
    if sweep.scheduler.name == "asha" and sweep.scheduler.grace_period > config.training.epochs:
        problems.append(f"sweep.scheduler.grace_period: {sweep.scheduler.grace_period} epochs is more than "
                        f"training.epochs ({config.training.epochs})")
    tree = config.model_dump(mode="json", exclude={"sweep"})
    for path, dimension in list(sweep.parameters.items()):
        problem = _sweep_path_problem(config, sweep, path, where)
        if problem is None:
            problem, values = _checked_values(config, tree, path, dimension)
            if problem is None and dimension.choice is not None:
                # As the field holds them (YAML reads 1e-4 as a string, pydantic makes it a float): trials,
                # results and W&B see typed values.
                sweep.parameters[path] = dimension.model_copy(update={"choice": values})
        if problem is not None:
            problems.append(f"sweep.parameters.{path}: {problem}")
    return problems


def swept_model_path(config: PipelineConfig, sweep: SweepConfig) -> str | None:
    """Where the sweep's model sits in the configuration: model.baseline or model.transformers.<index>."""
    if config.model.baseline.name == sweep.model:
        return "model.baseline"
    indices = [i for i, spec in enumerate(config.model.transformers) if spec.name == sweep.model]
    return f"model.transformers.{indices[0]}" if indices else None


def _sweep_path_problem(config: PipelineConfig, sweep: SweepConfig, path: str, model_path: str) -> str | None:
    """Why `path` cannot be swept: not a field of this configuration, or one a trial must not change."""
    parts, node = path.split("."), config
    for index, part in enumerate(parts):
        where = ".".join(parts[:index]) or "the configuration"
        if isinstance(node, BaseModel):
            fields = type(node).model_fields
            if part not in fields:
                return f"no field {part!r} in {where} (it has: {', '.join(fields)})"
            node = getattr(node, part)
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"{where} is a list of {len(node)}: address its items by index (0..{len(node) - 1})"
            node = node[int(part)]
        elif isinstance(node, dict) and index == len(parts) - 1:
            node = None  # a keyword of model_kwargs: any the model's constructor takes
        else:
            return f"{where} is a value, not a section"
    if isinstance(node, BaseModel | list):
        return "is a section: sweep its fields one by one"
    if path.startswith("model."):
        if not path.startswith(f"{model_path}."):
            return f"not a field of the swept model {sweep.model} ({model_path}.*)"
        if path == f"{model_path}.name":
            return "sweep.model names the model every trial trains"
    elif not path.startswith(SWEEPABLE_SECTIONS):
        return (f"only {', '.join(s + '*' for s in SWEEPABLE_SECTIONS)} and the swept model's fields ({model_path}.*) "
                "can be swept: the shards are made once for every trial, and the other sections are not "
                "hyperparameters")
    if path == "training.epochs" and sweep.scheduler.name == "asha":
        return "ASHA decides how many epochs each trial gets, up to training.epochs"
    return None


def _checked_values(config: PipelineConfig, tree: dict[str, Any], path: str,
                    dimension: SearchDimension) -> tuple[str | None, list[Any]]:
    """Why a value the dimension can sample is refused at `path` of `config` (None if none is), and the candidate
    values as the configuration holds them once validated."""
    # At call time: tasks.config imports this module for SweepConfig.
    from tasks.config import get_dotted, set_dotted

    values = []
    for value in dimension.candidates():
        candidate = copy.deepcopy(tree)
        set_dotted(candidate, path, value)
        try:
            values.append(get_dotted(type(config).model_validate(candidate).model_dump(mode="json"), path))
        except ValidationError as error:
            reasons = "; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())
            sampled = "" if dimension.choice is not None else " (uniform and loguniform sample any number between "\
                "their bounds; choice lists whole numbers)"
            return f"the value {value!r} is refused: {reasons}{sampled}", values
    return None, values
