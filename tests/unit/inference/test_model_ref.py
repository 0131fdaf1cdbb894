"""Model references: training's config.json, every form of MODEL_REF, and a resolved model that gives evaluate's
logits."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tasks.config import build_config
from tasks.data.loader import ShardStream
from tasks.data.manifest import require_manifest
from tasks.digests import file_sha256
from tasks.inference.model_ref import (
    MODEL_CONFIG_FILE,
    ModelRefError,
    eval_transform,
    load_model,
    resolve_model_ref,
)
from tasks.judging.evaluate import load_trained_model, predict
from tasks.layout import LATEST_LINK, RunLayout
from tasks.models import build_model
from tasks.training.checkpoints import METADATA, WEIGHTS
from tasks.training.train import _export
from tests.support.inference import TINY_VIT, model_dir, png_test_images, trained_run

VIT = TINY_VIT["name"]


def _fake_result(checkpoint: Path, weights: dict[str, torch.Tensor]):
    """What Ray Train's fit() returns, as far as the export reads it: a last checkpoint with best weights."""
    from safetensors.torch import save_file

    checkpoint.mkdir(parents=True)
    for name in ("best.safetensors", WEIGHTS):
        save_file(weights, str(checkpoint / name))
    history = [{"epoch": 1, "val_acc": 0.5}]
    files = {WEIGHTS: {"bytes": (checkpoint / WEIGHTS).stat().st_size, "sha256": file_sha256(checkpoint / WEIGHTS)}}
    (checkpoint / METADATA).write_text(json.dumps({"files": files, "history": history, "best_epoch": 1}))

    @contextmanager
    def as_directory():
        yield str(checkpoint)

    return SimpleNamespace(checkpoint=SimpleNamespace(as_directory=as_directory, path=str(checkpoint)))


@pytest.mark.parametrize("image_size, crop_pct", [(None, 1.0), (48, 0.875)])
def test_export_writes_config_json_as_evaluate_preprocesses(tmp_path, mini_shards, image_size, crop_pct):
    config = build_config({
        "data": {"shard_dir": mini_shards, "image_size": image_size, "crop_pct": crop_pct,
                 "interpolation": "bilinear", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
        "model": {"baseline": TINY_VIT, "transformers": []},
        "tracking": {"run_name": "r", "output_dir": str(tmp_path / "runs"), "mode": "disabled"},
    })
    model = build_model(config.model.spec(VIT), 10)
    result = _fake_result(tmp_path / "checkpoint", model.state_dict())
    _export(config, VIT, result, 1.0, mini_shards)

    written = json.loads((RunLayout.of(config).model_dir(VIT) / MODEL_CONFIG_FILE).read_text())
    side = image_size or 32
    assert written == {
        "architecture": VIT,
        "num_classes": 10,
        "model_args": config.model.spec(VIT).build_kwargs,
        "pretrained_cfg": {
            "input_size": [3, side, side], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
            "interpolation": "bilinear",
            "crop_pct": crop_pct,
            "crop_mode": "center", "num_classes": 10, "label_names": require_manifest(mini_shards).classes,
        },
    }
    assert written["model_args"].get("img_size") == image_size  # 32 is the preset's own: nothing to pass
    described = resolve_model_ref(str(RunLayout.of(config).model_dir(VIT)))
    assert load_model(described).default_cfg is not None  # rebuilt from model_args, weights loaded strictly


@pytest.fixture
def run(tmp_path, mini_shards):
    return trained_run(tmp_path, mini_shards)


def test_every_reference_form_names_the_same_model(run, tmp_path, mini_shards):
    directory = model_dir(run, VIT)
    run_dir = Path(run.run_dir)
    (run_dir.parent / LATEST_LINK).symlink_to(run_dir.name, target_is_directory=True)
    plan = {"version": 1, "models": [{
        "model": VIT, "target": f"wandb-registry-model/vit-pipeline-{VIT}",
        "weights": f"models/{VIT}/best.safetensors", "linked": None,
        "metadata": {"weights_sha256": file_sha256(directory / "best.safetensors")}}]}
    RunLayout(run_dir).registry.write_text(json.dumps(plan))
    downloads = tmp_path / "downloads"

    class FakeApi:
        requested: list[str] = []

        def artifact(self, name):
            self.requested.append(name)

            def download(root=None):
                target = Path(root) / name.replace("/", "_")
                shutil.copytree(directory, target)
                return str(target)

            return SimpleNamespace(download=download)

    refs = [str(directory), f"{run_dir}:{VIT}", f"{run_dir.parent / LATEST_LINK}:{VIT}",
            f"{run_dir / 'registry.json'}:{VIT}", f"{run_dir / 'registry.json'}:vit-pipeline-{VIT}",
            f"{run_dir / 'registry.json'}:wandb-registry-model/vit-pipeline-{VIT}"]
    described = [resolve_model_ref(ref) for ref in refs]
    api = FakeApi()
    for ref in (f"wandb-registry-model/vit-pipeline-{VIT}", f"wandb-registry-model/vit-pipeline-{VIT}:best"):
        described.append(resolve_model_ref(ref, wandb_api=api, download_root=downloads))
    assert api.requested == [f"wandb-registry-model/vit-pipeline-{VIT}:latest",
                             f"wandb-registry-model/vit-pipeline-{VIT}:best"]
    assert [d.source for d in described] == [*refs, *(f"wandb-registry-model/vit-pipeline-{VIT}" + s
                                                       for s in ("", ":best"))]
    expected = load_file(directory / "best.safetensors")
    for description in described:
        assert (description.architecture, description.num_classes, description.input_size) == (VIT, 10, (3, 32, 32))
        assert description.labels == tuple(require_manifest(mini_shards).classes)
        weights = load_file(description.weights)
        assert all(torch.equal(weights[key], expected[key]) for key in expected)


def test_bad_references_are_refused_naming_what_was_looked_for(run, tmp_path):
    run_dir = Path(run.run_dir)
    RunLayout(run_dir).registry.write_text(json.dumps({"version": 1, "models": []}))
    cases = {
        str(tmp_path / "nowhere"): "not a reference of another form",
        f"{run_dir}:vit_small": "the models trained in .*resnet10t, vit_tiny_patch4_32",
        f"{tmp_path / 'runs' / 'x' / LATEST_LINK}:{VIT}": "does not exist .*none has finished",
        f"{run_dir / 'registry.json'}:{VIT}": "plans no model or collection",
        f"{tmp_path / 'registry.json'}:{VIT}": "registry.json does not exist",
        str(run_dir): "config.json does not exist",
    }
    for ref, message in cases.items():
        with pytest.raises(ModelRefError, match=message) as raised:
            resolve_model_ref(ref)
        assert repr(ref) in str(raised.value)

    class Offline:
        def artifact(self, name):
            raise ConnectionError("no network")

    with pytest.raises(ModelRefError, match="could not download .*:latest .*no network"):
        resolve_model_ref("wandb-registry-model/c", wandb_api=Offline())
    (model_dir(run, VIT) / MODEL_CONFIG_FILE).write_text("{}")
    with pytest.raises(ModelRefError, match="has no 'pretrained_cfg'"):
        resolve_model_ref(f"{run_dir}:{VIT}")


def test_a_resolved_model_gives_evaluates_logits_on_png_test_images(run, tmp_path, mini_shards):
    paths, labels, _ = png_test_images(mini_shards, tmp_path / "png", 16)
    description = resolve_model_ref(f"{run.run_dir}:{VIT}")
    transform = eval_transform(description)
    inputs = torch.stack([transform(Image.open(path)) for path in paths])
    with torch.inference_mode():
        logits = load_model(description)(inputs).numpy()

    device = torch.device("cpu")
    evaluated_model = load_trained_model(run, VIT, description.weights, 10)
    evaluated, evaluated_labels = predict(evaluated_model, ShardStream(mini_shards, "test", 16, train=False),
                                          run, device)
    np.testing.assert_array_equal(evaluated_labels[:16], labels)
    np.testing.assert_allclose(logits, evaluated[:16], atol=1e-4, rtol=0)
    # Any size and mode: a grey 100 x 60 image comes out as the model's 3 x 32 x 32 input.
    assert transform(Image.new("L", (100, 60))).shape == (3, 32, 32)


def test_the_logged_and_the_published_model_artifacts_carry_config_json(run, mini_shards, monkeypatch):
    """A W&B Registry version downloads as a usable model directory: the training run's artifact and the one
    publish links hold the same config.json as the export, beside the weights."""
    from tasks.operations.publish import WandbRegistry
    from tasks.training.train_loop import _log_best_weights_artifact

    directory = model_dir(run, VIT)
    logged = []
    loop = SimpleNamespace(best_weights=load_file(directory / "best.safetensors"), best_epoch=1, config=run,
                           job=SimpleNamespace(model_name=VIT, shard_location=mini_shards))
    _log_best_weights_artifact(SimpleNamespace(log_artifact=logged.append), loop)

    class Run:
        url = "https://wandb.example/e/p/runs/x"

        def log_artifact(self, artifact):
            logged.append(artifact)
            return SimpleNamespace(wait=lambda: SimpleNamespace(save=lambda: None))

        def link_artifact(self, artifact, target, aliases):
            return SimpleNamespace(version="v0")

    entry = {"target": "wandb-registry-model/c", "artifact": f"model-{VIT}",
             "metadata": {"model": VIT, "report": {"file": "r", "wandb_run": "w"}}}
    monkeypatch.setattr("tasks.operations.publish.describe", lambda card: "card")
    WandbRegistry(Run(), api=None).link(entry, directory / "best.safetensors", ["latest"])

    exported = (directory / MODEL_CONFIG_FILE).read_bytes()
    for artifact in logged:
        assert sorted(artifact.manifest.entries) == ["best.safetensors", MODEL_CONFIG_FILE]
        assert Path(artifact.manifest.entries[MODEL_CONFIG_FILE].local_path).read_bytes() == exported
