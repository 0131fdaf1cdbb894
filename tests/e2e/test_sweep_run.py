"""`vit-pipeline sweep --config configs/sweep-smoke.yaml`, shrunk to a few hundred images and a one-block ViT:
killed mid-sweep with SIGKILL, started again, it continues Tune's experiment without training a finished trial
again, ASHA stops the trials that fall behind, and it writes results.json, best.yaml and the W&B runs."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tasks.config import load_config
from tests.conftest import REPO_ROOT
from tests.support.processes import kill_leftovers
from tests.support.sweep_runs import BAD_LR, GOOD_LR, SHRUNK, wandb_runs_by_job_type

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SWEEP_TIMEOUT = 900
ORDER = [GOOD_LR, BAD_LR, BAD_LR, GOOD_LR]


@pytest.fixture
def sweep_env(tmp_path, mini_cifar):
    marker = f"VIT_SWEEP_TEST_{secrets.token_hex(8)}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "WANDB_", "RAY_"))}
    env.update({
        marker: "1",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "DATA_ROOT": str(mini_cifar),
        "WANDB_MODE": "offline",
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONUNBUFFERED": "1",
    })
    yield env
    kill_leftovers(marker)
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)


def _command(tmp_path: Path) -> list[str]:
    command = [str(BIN / "vit-pipeline"), "sweep", "--config", str(REPO_ROOT / "configs" / "sweep-smoke.yaml"),
               "--set", f"tracking.output_dir={json.dumps(str(tmp_path / 'runs'))}"]
    for override in SHRUNK:
        command += ["--set", override]
    return command


def _reports(result_file: Path) -> list[dict]:
    """What Tune received from a trial, in order (its result.json holds one line per report)."""
    if not result_file.is_file():
        return []
    return [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]


def _epochs(result_file: Path) -> list[int]:
    return [report["epoch"] for report in _reports(result_file)]


@pytest.mark.timeout(2 * SWEEP_TIMEOUT)
def test_a_killed_sweep_continues_where_it_stopped_and_asha_stops_the_bad_trials(tmp_path, sweep_env):
    # Tune snapshots its experiment at every step here, so that the kill finds the finished trials recorded.
    first_env = {**sweep_env, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(_command(tmp_path), env=first_env, cwd=tmp_path, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SWEEP_TIMEOUT
        while not (found := list((tmp_path / "runs" / "sweep-smoke").glob("*/ray/sweep/tune/*_00003/result.json"))) \
                or not _epochs(found[0]):
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "the fourth trial never finished an epoch"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    kill_leftovers(next(key for key in sweep_env if key.startswith("VIT_SWEEP_TEST_")))
    tune_dir = found[0].parents[1]
    run_dir = tune_dir.parents[2]
    killed = found[0].parent.name
    before = {trial.name: _epochs(trial / "result.json") for trial in sorted(tune_dir.glob("*_0000*"))}
    killed_reports = _reports(found[0])
    finished_files = {name: (tune_dir / name / "result.json").read_text() for name in before if name != killed}
    assert not (run_dir / "sweep" / "results.json").exists()  # it really died mid-sweep
    assert len(before) == 4 and before[killed][-1] < 3, before

    second = subprocess.run(_command(tmp_path), env=sweep_env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=SWEEP_TIMEOUT)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-8000:]
    assert f"continuing {run_dir}" in output and "continuing the sweep in" in output

    results = json.loads((run_dir / "sweep" / "results.json").read_text())
    trials = {trial["trial"]: trial for trial in results["trials"]}
    after = {name: _epochs(tune_dir / name / "result.json") for name in before}
    assert len(trials) == 4 and set(trials) == set(before)
    by_order = [trials[name] for name in sorted(trials)]
    assert [trial["parameters"]["training.lr"] for trial in by_order] == ORDER, "Ray samples other trials: new seed"
    for name, epochs in after.items():
        # Nothing trained twice: trials that had ended kept their results, the killed one went on from its
        # last checkpoint (its epochs continue, none repeats).
        assert epochs[:len(before[name])] == before[name] and epochs == sorted(set(epochs)), (name, before, after)
        assert trials[name]["epochs"] == epochs[-1]
    assert all((tune_dir / name / "result.json").read_text() == text for name, text in finished_files.items())
    # The killed trial's epochs before the kill come from its Train run's checkpoint, timings and all, not from
    # training them again; Tune got them again as the trial resumed.
    resumed = _reports(tune_dir / killed / "result.json")
    assert len(resumed) > len(killed_reports) and f"trial {killed} resumes after epoch" in output
    same = ("epoch", "epoch_seconds", "val_acc")
    assert [[r[key] for key in same] for r in resumed[:len(killed_reports)]] == [[r[key] for key in same]
                                                                               for r in killed_reports]

    good, bad = [trial for trial in by_order if trial["parameters"]["training.lr"] == GOOD_LR], \
        [trial for trial in by_order if trial["parameters"]["training.lr"] == BAD_LR]
    assert all(trial["stopped_early"] and trial["epochs"] == 1 and trial["status"] == "stopped early" for trial in bad)
    assert by_order[0]["status"] == "completed" and by_order[0]["epochs"] == 3
    assert {trial["rank"] for trial in good} == {1, 2} and min(t["best_val_acc"] for t in good) > max(
        t["best_val_acc"] for t in bad)
    for trial in by_order:
        assert Path(trial["checkpoint"]).is_dir() and trial["checkpoint"].startswith(str(run_dir / "ray" / "sweep"))
    assert all(key in json.loads((tune_dir / name / "result.json").read_text().splitlines()[0])
               for name in before for key in ("val_acc", "val_loss"))

    best = load_config(run_dir / "sweep" / "best.yaml")
    assert best.sweep is None and best.training.lr == GOOD_LR and best.tracking.flow_run is None
    assert best.model.transformers[0].model_kwargs["depth"] == 1 and best.training.epochs == 3
    assert f"best config {run_dir / 'sweep' / 'best.yaml'}" in output
    # A trial continued after the kill continues its W&B run (same id): one run per trial.
    runs = wandb_runs_by_job_type(run_dir)
    assert {job: len(ids) for job, ids in runs.items()} == {"shard": 1, "sweep-trial": 4, "sweep": 1}

