"""The benchmark scripts still run: each one's smallest configuration, on CPU. Timings are not checked here."""

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.blocked_imports import import_blocker

REPO_ROOT = Path(__file__).resolve().parents[2]
GPU_SCRIPT = REPO_ROOT / "benchmarks" / "gpu.py"
ACCEPTANCE_SCRIPT = REPO_ROOT / "benchmarks" / "gpu_acceptance.py"
# What a lent GPU machine lacks (it has torch, timm and the offline wheels): a sitecustomize on PYTHONPATH makes
# their imports fail there as they would on that machine, in the script and in the children it starts.
ABSENT_ON_GPU_MACHINE = ("ray", "prefect", "wandb", "matplotlib", "pyarrow")
IMPORT_BLOCKER = import_blocker(ABSENT_ON_GPU_MACHINE, "absent on the GPU machine")
TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def table_rows(output: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_step_variants_time_on_cpu():
    variants = ["fp32", "channels_last", "bf16+fused"]
    result = run_script(str(GPU_SCRIPT), "--device", "cpu", "--models", "resnet18_cifar", "--variants", *variants,
                        "--batch-size", "2", "--steps", "1", "--warmup", "1", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert [row[3] for row in rows] == variants
    for row in rows:
        assert float(row[4]) >= 0, row  # images/s: a number (printed to 0 decimals), not "failed: ..."
    assert rows[0][5] == "1.00"  # speed-up of the first variant against itself


def test_dry_run_counts_flops_and_steps_every_model_on_cpu():
    result = run_script(str(GPU_SCRIPT), "--dry-run", "--models", "vit_tiny_patch4_32", "resnet18_cifar")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert [row[0] for row in rows] == ["vit_tiny_patch4_32", "resnet18_cifar"]
    assert all(row[-1].startswith("ok") and float(row[3]) > 0 for row in rows)


def test_flash_without_bf16_is_refused_by_name():
    result = run_script(str(GPU_SCRIPT), "--dry-run", "--variants", "flash")
    assert result.returncode == 2
    assert "'flash'" in result.stderr and "bf16" in result.stderr


def test_augment_benchmark_compares_per_image_and_batched_on_an_odd_batch(data_root):
    result = run_script(str(REPO_ROOT / "benchmarks" / "augment.py"), "--data-root", str(data_root),
                        "--batch-size", "7", "--batches", "2", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert [row[1] for row in rows] == ["timm (PIL), per image", "tasks/data/augment.py",
                                        "tasks/data/augment.py (batched)", "BatchMixer"]  # timm's refuses odd batches
    assert all(float(row[2].replace(",", "")) > 0 and int(row[4]) >= 1 for row in rows)
    assert float(result.stdout.strip().splitlines()[-1].split("= ")[1]) > 0


@pytest.mark.slow  # a minute or more: `vit-pipeline train` starts a Ray
def test_peer_benchmark_compares_ours_with_a_timm_loop_on_the_same_images(data_root, tmp_path):
    """The cifar10 recipe (RandAugment, Mixup/CutMix, label smoothing, EMA, bf16) on a few hundred images, ours
    through `vit-pipeline train` on Ray; compilation off, which costs minutes on a CPU."""
    out = tmp_path / "peer.json"
    result = run_script(str(REPO_ROOT / "benchmarks" / "peer.py"), "--device", "cpu", "--data-root", str(data_root),
                        "--config", "configs/cifar10.yaml", "--set", "training.compile=false",
                        "--model", "vit_tiny_patch4_32", "--model-kwargs", json.dumps(TINY_VIT), "--epochs", "1",
                        "--batch-size", "32", "--max-train-images", "300", "--max-eval-images", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr[-5000:]
    rows = table_rows(result.stdout)
    assert [row[0] for row in rows] == ["peer: timm loop", "ours: vit-pipeline train (Ray)", "ours/peer"]
    for name, images_per_s, _, wall, *_ in rows:
        assert float(images_per_s) > 0 and float(wall) > 0, name
    for name, _, _, _, *top1 in rows[:2]:
        assert all(0 <= float(value) <= 1 for value in top1), name
    figures = json.loads(out.read_text())
    assert figures["splits"] == {"train": 236, "val": 64, "test": 64}
    assert figures["settings"]["timm_policy"].startswith("rand-") and figures["settings"]["ema_decay"]
    assert all(epoch["images"] == 224 for epoch in figures["peer"]["epochs"])  # 7 whole batches of 32
    assert all(epoch["images"] == 236 for epoch in figures["ours"]["epochs"])  # every image, the last batch short


@pytest.fixture
def gpu_script(monkeypatch):
    """benchmarks/gpu.py imported in this process (its folder on sys.path for `harness`)."""
    monkeypatch.syspath_prepend(str(GPU_SCRIPT.parent))
    return importlib.import_module("gpu")


def test_models_compile_as_if_alone_in_one_process(gpu_script, monkeypatch, capsys):
    """Five models in one process, input sizes changing from one to the next, as in a full gpu.py run. Without
    the reset between models, dynamo recompiles the second and later ones with symbolic sizes; with it each
    graph is static, as when the model runs alone. Dynamo's state is what the reset is about, so the graphs go
    to a backend that records them instead of through inductor's minutes of C++ compilation."""
    symbolic = []

    def recording_backend(graph_module: torch.fx.GraphModule, example_inputs):
        values = [node.meta.get("example_value") for node in graph_module.graph.find_nodes(op="placeholder")]
        symbolic.append(any(isinstance(value, torch.SymInt) or (
            isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape))
            for value in values))
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording_backend))
    cases = [gpu_script.ModelCase("test_vit", 64, 2, 10), gpu_script.ModelCase("test_vit", 32, 2, 10),
             gpu_script.ModelCase("test_vit2", 32, 2, 10),
             gpu_script.ModelCase("test_resnet", 64, 2, 10, sized_by_img_size=False),
             gpu_script.ModelCase("test_resnet", 96, 2, 10, sized_by_img_size=False)]
    args = argparse.Namespace(batch_size=None, steps=1, warmup=1, rounds=1, peak_tflops=None, variants=["compile"])
    try:
        for case in cases:
            gpu_script.benchmark(case, args, torch.device("cpu"))
    finally:
        torch.compiler.reset()
    assert symbolic == [False] * len(cases)
    rows = table_rows("| header |\n" + capsys.readouterr().out)
    # images/s is printed to 0 decimals: on a loaded 2-core machine a tiny step can read 0, but never "failed"
    assert [row[0] for row in rows] == [case.name for case in cases] and all(float(row[4]) >= 0 for row in rows)


def test_tf32_is_set_so_both_torch_interfaces_read_it(gpu_script):
    """Inductor reads the legacy getters; assigning the per-backend attributes directly makes those raise."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        gpu_script.set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        gpu_script.set_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


@pytest.mark.slow
def test_gpu_acceptance_runs_every_part_in_miniature_without_ray_prefect_wandb_or_matplotlib(tmp_path, mini_cifar):
    """The GPU acceptance run (benchmarks/gpu_acceptance.py) on CPU with --tiny: every part in miniature, on a
    machine where Ray, Prefect, W&B and matplotlib cannot be imported, as on a lent GPU machine."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(IMPORT_BLOCKER)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO_ROOT)])}
    for module in ABSENT_ON_GPU_MACHINE:  # the blocker itself works
        absent = subprocess.run([sys.executable, "-c", f"import {module}"], env=environment, capture_output=True,
                                text=True, timeout=60)
        assert absent.returncode != 0 and "blocked" in absent.stderr, module

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ACCEPTANCE_SCRIPT), "--device", "cpu", "--tiny", "--data-root",
                             str(mini_cifar), "--out", str(out)], cwd=REPO_ROOT, env=environment, capture_output=True,
                            text=True, timeout=1800)
    document = json.loads((out / "gpu_acceptance.json").read_text())
    parts = document["parts"]
    # peer (part 6) needs benchmarks/peer.py; every part runs to its end, whatever its goal says.
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(
        ["correctness", "compile", "loop", "mfu", "recipe", "peer"], "ok"), result.stdout[-4000:]
    assert result.returncode == 0, result.stderr[-4000:]
    correctness = parts["correctness"]
    assert correctness["goal_met"] and len(correctness["figures"]["checks"]) == 10
    assert "CPU self-check" in correctness["summary"]  # no second device: said so, not passed off as a GPU check
    assert parts["compile"]["figures"]["compiled"] == ["vit_tiny_patch4_32"]  # compiled and stepped on the CPU
    assert all(ratio > 0 for ratio in parts["loop"]["figures"]["loop_over_step"].values())
    assert len(parts["loop"]["figures"]["loop_over_step"]) == 2
    best = parts["mfu"]["figures"]["best"]
    assert set(best) == {"vp_vit_base_patch16_224", "vp_vit_small_patch16_224"}
    assert all(row["images_per_s"] > 0 and row["mfu"] == "n/a" for row in best.values())  # no MFU on a CPU
    models = parts["recipe"]["figures"]["models"]
    assert list(models) == ["resnet18_cifar", "vit_small_patch4_32", "deit_small_distilled_patch4_32",
                            "swin_tiny_patch2_window4_32"]
    assert all(0 <= model["test_top1"] <= 1 and model["epochs"] == 1 for model in models.values())
    assert parts["peer"]["figures"]["ratios"]["images_per_s"] > 0
    table = (out / "gpu_acceptance.md").read_text()
    assert [row[0] for row in table_rows(table)] == ["1", "2", "3", "4", "5", "6"]
