"""tasks/operations/retention.py and `vit-pipeline prune`: which flow runs of a run name stay (registered, the last
N, unfinished, `latest`) and that the others' run directories and checkpoints go, on local storage and on S3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest

from flows.cli import main
from tasks.config import EXIT_BAD_INPUT, ConfigError, build_config
from tasks.layout import RunLayout
from tasks.operations.retention import plan, prune

VIT = "wandb-registry-model/vit-pipeline-vit_tiny_patch4_32"
RESNET = "wandb-registry-model/vit-pipeline-resnet18_cifar"


def _config(output_dir: Path, checkpoints: str | None = None):
    return build_config({"tracking": {"output_dir": str(output_dir), "run_name": "weekly", "mode": "disabled"},
                         "storage": {"checkpoints": checkpoints}})


def _flow_run(config, name: str, age_days: int, *, finished: bool = True, links=()) -> Path:
    """A flow run's directory as the flow leaves it: flow-run.json written `age_days` ago, weights, Ray's
    checkpoints and, for each (collection, aliases, when), a link in registry.json."""
    layout = RunLayout(Path(config.run_root) / name)
    (layout.checkpoints / "vit" / "checkpoint_000001").mkdir(parents=True)
    (layout.checkpoints / "vit" / "checkpoint_000001" / "model.safetensors").write_bytes(b"w" * 64)
    layout.weights("vit").parent.mkdir(parents=True)
    layout.weights("vit").write_bytes(b"w" * 64)
    if links:
        models = [{"model": target.rsplit("-", 1)[-1], "target": target,
                   "linked": {"version": f"{target}:v{index}", "aliases": aliases, "at": at}}
                  for index, (target, aliases, at) in enumerate(links)]
        layout.registry.write_text(json.dumps({"version": 1, "models": models}))
    layout.run_owner.write_text(json.dumps({"flow_run_id": name, "finished": finished}))
    written = 1_800_000_000 - age_days * 86_400
    os.utime(layout.run_owner, (written, written))
    return layout.root


@pytest.fixture
def weekly_runs(tmp_path):
    """Eight weekly flow runs, oldest first: w1 and w3 linked the ViT as best (w3 later), w5 as latest only
    (it regressed), w4 linked the ResNet as latest and best; w2 never finished; w6-w8 ran offline."""
    config = _config(tmp_path / "runs")
    _flow_run(config, "w1", 8, links=[(VIT, ["latest", "best"], "2026-10-01T03:00:00Z")])
    _flow_run(config, "w2", 7, finished=False)
    _flow_run(config, "w3", 6, links=[(VIT, ["latest", "best"], "2026-10-15T03:00:00Z")])
    _flow_run(config, "w4", 5, links=[(RESNET, ["latest", "best"], "2026-10-22T03:00:00Z"),
                                      (VIT, ["latest"], "2026-10-22T03:00:01Z")])
    _flow_run(config, "w5", 4, links=[(VIT, ["latest"], "2026-10-29T03:00:00Z")])
    for name, age in (("w6", 3), ("w7", 2), ("w8", 1)):
        _flow_run(config, name, age)
    (Path(config.run_root) / "latest").symlink_to("w8", target_is_directory=True)
    (Path(config.run_root) / "shards").mkdir()
    (Path(config.run_root) / "shards" / "manifest.json").write_text("{}")
    return config


def test_the_registered_the_last_n_and_the_unfinished_stay(weekly_runs):
    retention = plan(weekly_runs, keep=2)
    assert retention.kept == {
        "w2": "unfinished: running, or to be continued by the next flow run",
        "w3": f"registered: 'best' {VIT}:v0",
        "w4": f"registered: 'best' {RESNET}:v0, 'latest' {RESNET}:v0",
        "w5": f"registered: 'latest' {VIT}:v0",
        "w7": "one of the last 2", "w8": "one of the last 2"}
    run_root = Path(weekly_runs.run_root)
    assert retention.deleted == {name: [str(run_root / name)] for name in ("w1", "w6")}


def test_prune_deletes_only_what_the_plan_says_and_a_dry_run_nothing(weekly_runs):
    run_root = Path(weekly_runs.run_root)
    before = sorted(path.name for path in run_root.iterdir())
    assert prune(weekly_runs, 2, dry_run=True).deleted.keys() == {"w1", "w6"}
    assert sorted(path.name for path in run_root.iterdir()) == before
    prune(weekly_runs, 2)
    assert sorted(path.name for path in run_root.iterdir()) == ["latest", "shards", "w2", "w3", "w4", "w5", "w7",
                                                                "w8"]
    for name in ("w3", "w4", "w5"):  # nothing registered loses its weights or checkpoints
        assert RunLayout(run_root / name).weights("vit").is_file()
        assert (RunLayout(run_root / name).checkpoints / "vit" / "checkpoint_000001" / "model.safetensors").is_file()
    assert (run_root / "shards" / "manifest.json").is_file() and (run_root / "latest").resolve().name == "w8"
    assert prune(weekly_runs, 2).deleted == {}  # again: nothing more to do


def test_the_default_keeps_storage_keep_runs(weekly_runs):
    assert weekly_runs.storage.keep_runs == 4
    assert set(plan(weekly_runs, weekly_runs.storage.keep_runs).deleted) == {"w1"}


def test_checkpoints_on_s3_go_with_their_run_directory(tmp_path, s3_bucket):
    bucket = s3_bucket.rsplit("/", 1)[0]  # s3://shards
    config = _config(tmp_path / "runs", checkpoints=f"{bucket}/checkpoints")
    s3 = fsspec.filesystem("s3")
    for name, age, links in (("old", 3, ()), ("registered", 2, [(VIT, ["latest", "best"], "2026-11-01T03:00:00Z")]),
                             ("older", 4, ()), ("newest", 1, ())):
        _flow_run(config, name, age, links=links)
        s3.pipe(f"{bucket}/checkpoints/weekly/{name}/vit/checkpoint_000001/model.safetensors", b"w" * 64)
    s3.pipe(f"{bucket}/checkpoints/other-run/x/model.safetensors", b"w")  # another run name: not ours
    retention = prune(config, 1)
    assert sorted(retention.deleted) == ["old", "older"]
    assert retention.deleted["old"] == [str(Path(config.run_root) / "old"), f"{bucket}/checkpoints/weekly/old"]
    s3.invalidate_cache()
    assert sorted(path.rsplit("/", 1)[-1] for path in s3.ls(f"{bucket}/checkpoints/weekly")) == ["newest",
                                                                                                "registered"]
    assert s3.exists(f"{bucket}/checkpoints/other-run/x/model.safetensors")
    assert sorted(path.name for path in Path(config.run_root).iterdir()) == ["newest", "registered"]


def test_keeping_none_is_refused(weekly_runs):
    with pytest.raises(ConfigError, match="keep at least 1"):
        plan(weekly_runs, 0)


def test_the_prune_command(weekly_runs, capsys):
    output_dir = f"tracking.output_dir={weekly_runs.tracking.output_dir}"
    assert main(["prune", "--run-name", "weekly", "--keep", "2", "--dry-run", "--set", output_dir]) == 0
    out = capsys.readouterr().out
    assert "keep w3: registered: 'best'" in out and f"would delete w1: {weekly_runs.run_root}/w1" in out
    assert out.rstrip().endswith("6 flow runs kept, 2 would delete")
    assert (Path(weekly_runs.run_root) / "w1").is_dir()
    assert main(["prune", "--run-name", "weekly", "--keep", "2", "--set", output_dir]) == 0
    assert not (Path(weekly_runs.run_root) / "w1").exists()
    for argv, named in ((["--run-name", "weekly", "--keep", "0"], "keep at least 1"),
                        (["--run-name", "../weekly", "--keep", "2"], "tracking.run_name"),
                        (["--run-name", "monthly"], "no runs of run name 'monthly'")):
        assert main(["prune", *argv, "--set", output_dir]) == EXIT_BAD_INPUT
        error = capsys.readouterr().err
        assert named in error and "Traceback" not in error, error
