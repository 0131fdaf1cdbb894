"""Report step: the comparison as runs/<run>/report/report.md and a self-contained report.html.

Plots: accuracy against GFLOPs and against inference images/s with the Pareto front marked, the
training curves of every model, the confusion matrices; the attention grids are linked (Markdown)
and embedded (HTML).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

import matplotlib

from tasks.config import PipelineConfig
from tasks.judging.evaluate import EVALUATION_ARTIFACT, EvaluationRecord, markdown, read_evaluation
from tasks.layout import RunLayout
from tasks.operations.tracking import files_artifact, record_input, start_wandb_run

matplotlib.use("Agg")  # files only: no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

PLOT_DPI = 110
PLOT_SIZE = (6.0, 4.0)
CONFUSION_INCHES = 3.6
PERCENT = 100
NOT_AVAILABLE = "n/a"
REPORT_COLUMNS = ["model", "val top-1", "test top-1", "params (M)", "GFLOPs", "images/s", "training time",
                  "distillation gain (pp)"]


def pareto_front(costs: list[float], accuracies: list[float], lower_cost_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both cost and accuracy, in increasing cost order."""
    sign = 1 if lower_cost_is_better else -1
    order = sorted(range(len(costs)), key=lambda i: (sign * costs[i], -accuracies[i]))
    front, best = [], -math.inf
    for index in order:
        if accuracies[index] > best:
            front.append(index)
            best = accuracies[index]
    return sorted(front, key=lambda i: costs[i])


def distillation_partner(name: str) -> str:
    """The teacher-less ViT a DeiT compares to: deit_tiny_distilled_patch4_32 -> vit_tiny_patch4_32."""
    return re.sub(r"(^|_)deit_", r"\1vit_", name, count=1).replace("_distilled", "")


def distillation_gains(records: list[EvaluationRecord]) -> dict[str, float | None]:
    """Top-1 of each DeiT minus that of its same-size ViT, in percentage points; None without a pair."""
    top1 = {record.model: record.top1 for record in records}
    gains = {}
    for name in top1:
        partner = distillation_partner(name)
        paired = "deit_" in name and partner != name and partner in top1
        gains[name] = (top1[name] - top1[partner]) * PERCENT if paired else None
    return gains


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return NOT_AVAILABLE
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def report_rows(records: list[EvaluationRecord]) -> list[list[str]]:
    gains = distillation_gains(records)
    rows = []
    for record in records:
        gain = gains[record.model]
        rows.append([
            record.model,
            NOT_AVAILABLE if record.val_top1 is None else f"{record.val_top1 * PERCENT:.2f}%",
            f"{record.top1 * PERCENT:.2f}%",
            f"{record.params / 1e6:.2f}",
            f"{record.gflops:.3f}",
            f"{record.images_per_s:.0f}",
            format_duration(record.train_seconds),
            NOT_AVAILABLE if gain is None else f"{gain:+.2f}",
        ])
    return rows


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)
    return path


def plot_tradeoff(records: list[EvaluationRecord], cost_key: str, cost_label: str, lower_cost_is_better: bool,
                  path: Path) -> Path:
    """Top-1 against one cost (a field of the records), every model labelled, the Pareto-optimal ones joined by
    a line."""
    costs = [getattr(record, cost_key) for record in records]
    accuracies = [record.top1 * PERCENT for record in records]
    front = pareto_front(costs, accuracies, lower_cost_is_better)
    figure, axis = plt.subplots(figsize=PLOT_SIZE)
    axis.scatter(costs, accuracies, color="tab:blue", label="model")
    axis.plot([costs[i] for i in front], [accuracies[i] for i in front], "o--", color="tab:red",
              label="Pareto front")
    for record, cost, accuracy in zip(records, costs, accuracies, strict=True):
        axis.annotate(record.model, (cost, accuracy), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel(cost_label)
    axis.set_ylabel("test top-1 accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)


def read_histories(config: PipelineConfig, names: list[str]) -> dict[str, list[dict]]:
    """Per-epoch histories from each model's metrics.json; models without one are left out."""
    histories = {}
    layout = RunLayout.of(config)
    for name in names:
        metrics_file = layout.metrics(name)
        if metrics_file.is_file():
            histories[name] = json.loads(metrics_file.read_text()).get("history") or []
    return {name: history for name, history in histories.items() if history}


def plot_training_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """Training loss and validation accuracy per epoch, one line per model."""
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(2 * PLOT_SIZE[0], PLOT_SIZE[1]))
    for name, history in histories.items():
        epochs = [epoch["epoch"] for epoch in history]
        loss_axis.plot(epochs, [epoch["train_loss"] for epoch in history], marker=".", label=name)
        accuracy_axis.plot(epochs, [epoch["val_acc"] * PERCENT for epoch in history], marker=".", label=name)
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="training loss")
    accuracy_axis.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _save(figure, path)


def plot_confusion_matrices(records: list[EvaluationRecord], classes: list[str], path: Path) -> Path:
    """Row-normalised confusion matrices (rows true class, columns predicted), one panel per model."""
    figure, axes = plt.subplots(1, len(records), figsize=(CONFUSION_INCHES * len(records), CONFUSION_INCHES),
                                squeeze=False)
    for axis, record in zip(axes[0], records, strict=True):
        matrix = [[count / max(1, sum(row)) for count in row] for row in record.confusion_matrix]
        axis.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        axis.set_title(record.model, fontsize=8)
        axis.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
        axis.set_yticks(range(len(classes)), classes, fontsize=6)
        axis.set_xlabel("predicted", fontsize=7)
        axis.set_ylabel("true", fontsize=7)
    return _save(figure, path)


def make_plots(config: PipelineConfig, records: list[EvaluationRecord], classes: list[str]) -> dict[str, Path]:
    layout = RunLayout.of(config)
    plots = {
        "accuracy_vs_gflops": plot_tradeoff(records, "gflops", "GFLOPs per image", True,
                                            layout.report_figure("accuracy_vs_gflops")),
        "accuracy_vs_throughput": plot_tradeoff(records, "images_per_s", "inference images/s", False,
                                                layout.report_figure("accuracy_vs_throughput")),
        "confusion_matrices": plot_confusion_matrices(records, classes, layout.report_figure("confusion_matrices")),
    }
    histories = read_histories(config, [record.model for record in records])
    if histories:
        plots["training_curves"] = plot_training_curves(histories, layout.report_figure("training_curves"))
    return plots


def attention_grids(config: PipelineConfig, records: list[EvaluationRecord]) -> dict[str, Path]:
    layout = RunLayout.of(config)
    grids = {record.model: layout.attention_map(record.model) for record in records}
    return {name: path for name, path in grids.items() if path.is_file()}


PLOT_TITLES = {
    "accuracy_vs_gflops": "Accuracy vs compute",
    "accuracy_vs_throughput": "Accuracy vs inference throughput",
    "training_curves": "Training curves",
    "confusion_matrices": "Confusion matrices",
}


def render_markdown(config: PipelineConfig, rows: list[list[str]], plots: dict[str, Path],
                    grids: dict[str, Path], out: Path) -> str:
    parts = [f"# Vision Transformers vs {config.model.baseline.name}: run {config.tracking.run_name}\n",
             markdown(REPORT_COLUMNS, rows),
             "Checkpoints were chosen on the validation split; the test split was scored once, by the evaluate "
             "step, on those weights.\n",
             "Distillation gain: test top-1 of a DeiT minus that of the ViT of the same size trained without a "
             "teacher.\n"]
    for key, path in plots.items():
        parts.append(f"## {PLOT_TITLES[key]}\n\n![{PLOT_TITLES[key]}]({path.name})\n")
    if grids:
        parts.append("## Attention maps\n")
        for name, path in grids.items():
            parts.append(f"### {name}\n\n![{name} attention]({Path('..') / path.relative_to(out.parent)})\n")
    return "\n".join(parts)


def _embedded(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(config: PipelineConfig, rows: list[list[str]], plots: dict[str, Path],
                grids: dict[str, Path]) -> str:
    """One self-contained page: every image is embedded, so the file can be sent or published alone."""
    title = html.escape(f"Vision Transformers vs {config.model.baseline.name}: run {config.tracking.run_name}")
    header = "".join(f"<th>{html.escape(column)}</th>" for column in REPORT_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    sections = [f"<h2>{PLOT_TITLES[key]}</h2>{_embedded(path, PLOT_TITLES[key])}" for key, path in plots.items()]
    if grids:
        sections.append("<h2>Attention maps</h2>")
        sections += [f"<h3>{html.escape(name)}</h3>{_embedded(path, name)}" for name, path in grids.items()]
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style>"
        f"</head><body><h1>{title}</h1><table><tr>{header}</tr>{body}</table>"
        "<p>Checkpoints were chosen on the validation split; the test split was scored once, by the evaluate "
        "step, on those weights.</p>"
        "<p>Distillation gain: test top-1 of a DeiT minus that of the ViT of the same size trained without a teacher, "
        "in percentage points.</p>" + "".join(sections) + "</body></html>"
    )


def write_report(config: PipelineConfig, evaluation: list[EvaluationRecord] | None = None,
                 group: str | None = None) -> dict[str, Path]:
    """Write report.md, report.html and the plots under runs/<run>/report/; returns every file by name."""
    layout = RunLayout.of(config)
    stored = read_evaluation(config)
    records = evaluation if evaluation is not None else stored.models
    if not records:
        raise ValueError(f"{layout.evaluation}: no evaluated models to report on")
    out = layout.report_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = report_rows(records)
    plots = make_plots(config, records, stored.classes)
    grids = attention_grids(config, records)
    files = {"markdown": layout.report_markdown, "html": layout.report, **plots}
    files["markdown"].write_text(render_markdown(config, rows, plots, grids, out))
    files["html"].write_text(render_html(config, rows, plots, grids))
    _log_to_wandb(config, rows, plots, files, group)
    return files


def _log_to_wandb(config: PipelineConfig, rows: list[list[str]], plots: dict[str, Path], files: dict[str, Path],
                  group: str | None) -> None:
    run = start_wandb_run(config, "report", "comparison", group=group)
    if run is None:
        return
    import wandb

    record_input(run, EVALUATION_ARTIFACT, "evaluation", RunLayout.of(config).evaluation)
    run.log({
        # a copy: a Table keeps the list it is given and add_column extends it
        "report/table": wandb.Table(columns=list(REPORT_COLUMNS), data=rows),
        "report/page": wandb.Html(files["html"].read_text()),
        **{f"report/{key}": wandb.Image(str(path)) for key, path in plots.items()},
    })
    run.log_artifact(files_artifact("report", "report", list(files.values())))
    run.finish()
