"""vit-pipeline export: a folder plain timm loads (checked in a process that cannot import this package) and an
ONNX graph onnxruntime runs, both giving our model's logits on real CIFAR-10 test images, for every model family."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from flows.cli import EXIT_BAD_INPUT, EXIT_VERIFY_FAILED, main
from tasks.config import PipelineConfig, build_config
from tasks.inference import export
from tasks.inference.export import (
    ONNX_OPSET,
    ExportError,
    export_onnx,
    export_timm,
    parity_images,
)
from tasks.inference.model_ref import load_model, resolve_model_ref, write_model_config
from tasks.layout import RunLayout
from tests.support.blocked_imports import import_blocker
from tests.support.evaluation import save_random_weights
from tests.support.inference import png_test_images, trained_run

REPO_ROOT = Path(__file__).resolve().parents[3]
# Tiny widths of every registered family; the baseline is our CIFAR ResNet.
RESNET = {"name": "resnet18_cifar", "drop_path_rate": 0.0,
          "model_kwargs": {"channels": [8, 16, 16, 16], "layers": [1, 1, 1, 1]}}
TINY_VIT_KWARGS = {"depth": 1, "embed_dim": 32, "num_heads": 2}
TRANSFORMERS = [
    {"name": "vit_tiny_patch4_32", "drop_path_rate": 0.0, "model_kwargs": TINY_VIT_KWARGS},
    {"name": "deit_tiny_distilled_patch4_32", "drop_path_rate": 0.0, "model_kwargs": TINY_VIT_KWARGS},
    # two stages of two blocks: the second block of each has shifted windows and their mask
    {"name": "swin_tiny_patch2_window4_32", "drop_path_rate": 0.0,
     "model_kwargs": {"depths": [2, 2], "num_heads": [1, 2], "embed_dim": 16}},
]
TIMM_FAMILIES = {"vit_tiny_patch4_32": "VisionTransformer",
                 "deit_tiny_distilled_patch4_32": "VisionTransformerDistilled",
                 "swin_tiny_patch2_window4_32": "SwinTransformer"}
IMAGES = 32

# The exported folder is loaded where neither this package nor vitmodels can be imported.
BLOCKED_LOADER = import_blocker(("vitmodels", "tasks", "flows"), "this package is not installed") + textwrap.dedent("""
    import json
    from pathlib import Path

    import numpy as np, timm, torch
    from timm.data import resolve_data_config

    try:
        import vitmodels
        sys.exit("vitmodels could be imported")
    except ModuleNotFoundError:
        pass
    images = torch.from_numpy(np.load(sys.argv[1]))
    report = {}
    for folder in sys.argv[2:]:
        config = json.loads((Path(folder) / "config.json").read_text())
        by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        by_overlay = timm.create_model(
            config["architecture"], pretrained=True, **config["model_args"],
            pretrained_cfg_overlay=dict(config["pretrained_cfg"], file=str(Path(folder) / "model.safetensors"))).eval()
        with torch.inference_mode():
            logits = [model(images).tolist() for model in (by_folder, by_overlay)]
        data = resolve_data_config({}, model=by_folder)
        report[folder] = {"class": type(by_folder).__name__, "logits": logits,
                          "labels": list(by_folder.pretrained_cfg["label_names"]),
                          "data": {key: list(v) if isinstance(v, tuple) else v for key, v in data.items()}}
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def families_run(tmp_path_factory, mini_shards) -> PipelineConfig:
    """A run with every family trained as far as export can tell (scrambled random weights, config.json), its
    shards where a run keeps them (runs/<run>/shards)."""
    root = tmp_path_factory.mktemp("export")
    config = build_config({
        "data": {"shard_dir": mini_shards, "loader_workers": 0},
        "model": {"baseline": RESNET, "transformers": TRANSFORMERS},
        "tracking": {"run_name": "families", "output_dir": str(root / "runs"), "mode": "disabled"},
    })
    for name, weights in save_random_weights(config, scramble=True).items():
        write_model_config(weights.parent, config, name, mini_shards)
    (config.run_root / "shards").symlink_to(mini_shards, target_is_directory=True)
    return config


def _described(config: PipelineConfig, name: str):
    return resolve_model_ref(str(RunLayout.of(config).model_dir(name)))


def _our_logits(description, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return load_model(description)(images).numpy()


def test_timm_folders_give_our_logits_in_a_process_without_this_package(families_run, mini_shards, tmp_path):
    folders, expected = [], {}
    for name in TIMM_FAMILIES:
        description = _described(families_run, name)
        images = parity_images(description, mini_shards, IMAGES)
        result = export_timm(description, tmp_path / name, images)
        assert result.parity.passed and result.parity.images == IMAGES
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["architecture"] == result.details["architecture"] != name  # timm's own name, not ours
        folders.append(str(tmp_path / name))
        expected[str(tmp_path / name)] = (name, description, _our_logits(description, images))
    np.save(tmp_path / "images.npy", images.numpy())  # the same 32 test images for every family (all 32 px)

    loaded = subprocess.run([sys.executable, "-c", BLOCKED_LOADER, str(tmp_path / "images.npy"), *folders],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    report = json.loads(loaded.stdout)
    for folder, (name, description, ours) in expected.items():
        assert np.abs(ours).max() > 1.0, "scrambled weights give logits large enough for the tolerance to mean much"
        assert report[folder]["class"] == TIMM_FAMILIES[name]
        for logits in report[folder]["logits"]:  # local-dir: and the pretrained_cfg_overlay call alike
            assert np.abs(np.array(logits) - ours).max() < 1e-4, name
        assert report[folder]["labels"] == list(description.labels)
        data = report[folder]["data"]
        assert (data["input_size"], data["mean"], data["std"], data["interpolation"], data["crop_pct"]) == (
            list(description.input_size), list(description.mean), list(description.std), description.interpolation,
            description.crop_pct)


def test_a_timm_model_exports_under_its_own_name(tmp_path, mini_shards):
    run = trained_run(tmp_path, mini_shards, transformers=[])  # timm's resnet10t as the baseline
    description = _described(run, "resnet10t")
    result = export_timm(description, tmp_path / "out", parity_images(description, mini_shards, 8))
    assert result.details == {"architecture": "resnet10t", "model_args": {}}
    assert result.parity.passed


def test_our_cifar_resnet_has_no_timm_twin_and_is_refused(families_run, tmp_path):
    description = _described(families_run, RESNET["name"])
    with pytest.raises(ExportError, match="no ResNet with this CIFAR stem.*use --format onnx"):
        export_timm(description, tmp_path / "out", torch.zeros(1, 3, 32, 32))
    assert not (tmp_path / "out").exists()


def test_a_module_tree_timm_does_not_share_is_refused_not_exported(families_run, tmp_path, monkeypatch):
    """The weights must load strictly into timm's model: a wrong model_args is an error, never a silent export."""
    vit_args = export._vit_args
    monkeypatch.setattr(export, "_vit_args", lambda model: {**vit_args(model), "depth": 2})
    with pytest.raises(ExportError, match="do not fit timm's vit_tiny_patch16_224 .*Missing key"):
        export_timm(_described(families_run, "vit_tiny_patch4_32"), tmp_path / "out", torch.zeros(1, 3, 32, 32))


ONNX_FAMILIES = [RESNET["name"], "vit_tiny_patch4_32", "deit_tiny_distilled_patch4_32",
                 pytest.param("swin_tiny_patch2_window4_32", marks=pytest.mark.slow)]  # its export takes > 10 s


@pytest.mark.parametrize("name", ONNX_FAMILIES)
def test_onnx_gives_our_logits_at_any_batch_size(families_run, mini_shards, tmp_path, name):
    description = _described(families_run, name)
    images = parity_images(description, mini_shards, IMAGES)
    result = export_onnx(description, tmp_path, images)
    assert result.parity.passed and result.parity.top1_agreement == 1.0
    assert result.files == ("model.onnx", "preprocessing.json", "labels.json", "parity.json")

    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert {entry.domain: entry.version for entry in graph.opset_import}[""] == ONNX_OPSET
    batch_axis = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value  # symbolic, not a traced size
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = _our_logits(description, images)
    for batch in (images[:1], images[:5]):
        logits = session.run(["logits"], {"images": batch.numpy()})[0]
        np.testing.assert_allclose(logits, ours[:len(batch)], atol=1e-3, rtol=0)
    preprocessing = json.loads((tmp_path / "preprocessing.json").read_text())
    assert (preprocessing["mean"], preprocessing["std"], preprocessing["input_size"], preprocessing["onnx_opset"]) == (
        list(description.mean), list(description.std), list(description.input_size), ONNX_OPSET)
    assert json.loads((tmp_path / "labels.json").read_text()) == list(description.labels)


def test_cli_exports_checks_on_the_runs_shards_and_states_how_to_load(families_run, tmp_path, capsys):
    out = tmp_path / "timm"
    assert main(["export", "--model", f"{families_run.run_dir}:vit_tiny_patch4_32", "--format", "timm",
                 "--out", str(out), "--parity-images", "16"]) == 0
    printed = capsys.readouterr().out
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in printed
    assert "parity on 16 test images (timm " in printed and ": OK" in printed
    assert json.loads((out / "parity.json").read_text())["passed"] is True


def test_cli_checks_on_image_files_and_refuses_without_images(families_run, mini_shards, tmp_path, capsys):
    paths, _, _ = png_test_images(mini_shards, tmp_path / "png", 4)
    elsewhere = tmp_path / "copied"
    elsewhere.mkdir()
    model_dir = RunLayout.of(families_run).model_dir("vit_tiny_patch4_32")
    for file in model_dir.iterdir():
        (elsewhere / file.name).write_bytes(file.read_bytes())
    common = ["export", "--model", str(elsewhere), "--format", "timm", "--out", str(tmp_path / "out")]

    assert main(common) == EXIT_BAD_INPUT  # no run directory above it, so no shards to check on
    assert "--images: " in capsys.readouterr().err
    assert main([*common, "--images", str(tmp_path / "png")]) == 0
    assert f"parity on {len(paths)} test images" in capsys.readouterr().out
    assert main(["export", "--model", f"{families_run.run_dir}:{RESNET['name']}", "--format", "timm",
                 "--out", str(tmp_path / "resnet")]) == EXIT_BAD_INPUT
    assert "CIFAR stem" in capsys.readouterr().err


def test_cli_fails_when_onnxruntime_disagrees(families_run, tmp_path, capsys, monkeypatch):
    """A runtime whose logits drift by 0.01 fails the check: exit 1, the numbers printed, the files kept."""

    class Drifting(onnxruntime.InferenceSession):
        def run(self, output_names, input_feed, run_options=None):
            return [outputs + 0.01 for outputs in super().run(output_names, input_feed, run_options)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Drifting)
    out = tmp_path / "onnx"
    assert main(["export", "--model", f"{families_run.run_dir}:{RESNET['name']}", "--format", "onnx",
                 "--out", str(out), "--parity-images", "8"]) == EXIT_VERIFY_FAILED
    err = capsys.readouterr().err
    assert "max |Δlogit| 1.00e-02" in err and "> tolerance 1e-03" in err and "FAILED" in err
    assert (out / "model.onnx").is_file() and json.loads((out / "parity.json").read_text())["passed"] is False
