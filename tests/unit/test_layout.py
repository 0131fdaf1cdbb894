"""tasks/layout.py: the paths of a run directory, and that it is the only place that spells its file names."""

from __future__ import annotations

import ast
from pathlib import Path

from tasks import layout
from tasks.config import build_config
from tasks.layout import RunLayout
from tests.conftest import REPO_ROOT

FILE_NAMES = (layout.BEST_WEIGHTS, layout.LAST_WEIGHTS, layout.METRICS_FILE, layout.EVALUATION_FILE,
              layout.REGISTRY_FILE, layout.RUN_OWNER_FILE, layout.REPORT_FILE, layout.REPORT_MARKDOWN_FILE,
              layout.OFFLINE_RUN_GLOB)


def test_the_documented_paths():
    root = Path("runs/weekly/crimson-fox-0a1b2c3d")
    run = RunLayout(root)
    assert run.weights("m") == root / "models" / "m" / "best.safetensors"
    assert run.weights("m", "last") == root / "models" / "m" / "last.safetensors"
    assert run.metrics("m") == root / "models" / "m" / "metrics.json"
    assert run.checkpoints == root / "ray"
    assert run.evaluation == root / "evaluation.json"
    assert run.attention_map("m") == root / "attention" / "m.png"
    assert run.report == root / "report" / "report.html"
    assert run.report_markdown == root / "report" / "report.md"
    assert run.report_figure("confusion_matrices") == root / "report" / "confusion_matrices.png"
    assert run.offline_wandb_runs == root / "wandb" / "offline-run-*"
    assert run.registry == root / "registry.json"
    assert run.sweep_dir == root / "sweep"
    assert run.wandb_dir == root / "wandb"
    assert run.wandb_inputs == root / "wandb-inputs"
    assert run.run_owner == root / "flow-run.json"


def test_of_a_configuration_is_its_run_dir(tmp_path):
    config = build_config({"tracking": {"output_dir": str(tmp_path), "run_name": "r", "flow_run": "f"}})
    assert RunLayout.of(config).root == config.run_dir == tmp_path / "r" / "f"


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def run_file_literals(source_dirs: list[Path]) -> list[str]:
    """String literals (docstrings aside) that are a run directory's file name or a path ending in one."""
    found = []
    for directory in source_dirs:
        for path in sorted(directory.rglob("*.py")):
            if path.resolve() == Path(layout.__file__).resolve():
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            docstrings = _docstrings(tree)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                        and any(node.value == name or node.value.endswith(f"/{name}") for name in FILE_NAMES)):
                    found.append(f"{path.relative_to(directory.parent)}:{node.lineno}: {node.value!r}")
    return found


def test_only_the_layout_spells_the_run_directorys_files():
    assert run_file_literals([REPO_ROOT / "tasks", REPO_ROOT / "flows"]) == []


def test_offline_wandb_runs_by_wandbs_own_directory_names(tmp_path):
    layout = RunLayout(tmp_path)
    for name in ("offline-run-20260101_000000-weekly-2-train-vit-0123456789", "offline-run-20260101_000001-abc",
                 "run-20260101_000002-online", "offline-run-unfinished"):
        (layout.wandb_dir / name).mkdir(parents=True)
    assert layout.offline_wandb_run_ids() == ["abc", "weekly-2-train-vit-0123456789"]
    assert sorted(path.name for path in layout.wandb_dir.glob(layout.offline_wandb_runs.name)) == [
        "offline-run-20260101_000000-weekly-2-train-vit-0123456789", "offline-run-20260101_000001-abc",
        "offline-run-unfinished"]
