"""The benchmark scripts still run: each one's smallest configuration, on CPU. Timings are not checked here."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_SCRIPT = REPO_ROOT / "benchmarks" / "gpu.py"


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
        assert float(row[4]) > 0, row  # images/s: a number, not "failed: ..."
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
    assert [row[1] for row in rows] == ["torchvision, per image", "tasks/augment.py", "tasks/augment.py (batched)",
                                        "BatchMixer"]  # timm's refuses odd batches
    assert all(float(row[2].replace(",", "")) > 0 and int(row[4]) >= 1 for row in rows)
    assert float(result.stdout.strip().splitlines()[-1].split("= ")[1]) > 0


def test_train_loop_benchmark_prints_loop_over_step(data_root):
    result = run_script(str(REPO_ROOT / "benchmarks" / "train_loop.py"), "--device", "cpu", "--data-root",
                        str(data_root), "--config", "configs/smoke.yaml", "--model", "vit_tiny_patch4_32",
                        "--model-kwargs", '{"depth": 1, "embed_dim": 32, "num_heads": 2}', "--batch-size", "256",
                        "--steps", "2")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert [row[0] for row in rows] == ["loop, epoch 1", "loop, epoch 2", "step alone, synthetic on-device data"]
    assert all(float(row[1]) > 0 for row in rows)
    assert float(result.stdout.strip().splitlines()[-1].removeprefix("loop/step = ")) > 0
