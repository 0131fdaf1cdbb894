"""Fault injection: more failures than allowed, a SIGKILLed driver, racing shard writers, W&B offline and
resumed after a restart, and an API-key canary that must not leak anywhere."""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks.config import build_config
from tasks.data.manifest import MANIFEST_NAME, read_manifest, verify_shards
from tasks.models import build_model
from tasks.operations.tracking import wandb_run_id
from tasks.training.checkpoints import checkpoint_dirs, read_checkpoint_metadata
from tasks.training.train import TrainingError, train_model
from tests.conftest import REPO_ROOT
from tests.support.ports import unused_port
from tests.support.processes import kill_leftovers, processes_with
from tests.support.wandb_records import history_rows, read_records

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MODEL = "vit_tiny_patch4_32"
TINY_VIT = {"name": MODEL, "drop_path_rate": 0.0, "model_kwargs": {"depth": 1}}
STEPS_PER_EPOCH = 18  # 4585 train samples (5085 less 500 for validation), batch 128, 2 ranks
FLOW_TIMEOUT = 420


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray
    import ray.cloudpickle
    import wandb

    # The driver has a W&B service before Ray starts, as the flow process has after its shard step;
    # Ray's workers inherit its address and must not share it (a killed worker's run would stay in use).
    wandb.init(mode="offline", dir=str(tmp_path_factory.mktemp("driver-wandb"))).finish()

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fault hooks below travel by value
    # Workers inherit this environment: no W&B key, and a W&B server that refuses connections.
    patch = pytest.MonkeyPatch()
    patch.delenv("WANDB_API_KEY", raising=False)
    patch.delenv("WANDB_MODE", raising=False)
    patch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{unused_port()}")
    ray.init(address="local", num_cpus=4)  # "local": never join a Ray cluster someone else runs here
    yield
    ray.shutdown()
    patch.undo()


def _config(tmp_path: Path, data_root: Path, shards: str, run_name: str, tracking: str = "offline", **training):
    return build_config({
        "data": {"data_root": str(data_root), "shard_dir": shards, "loader_workers": 0},
        "model": {"transformers": [TINY_VIT]},
        "training": {"epochs": 2, "batch_size": 128, "warmup_epochs": 0.3, "bf16": False, "log_every_steps": 5,
                     "max_failures": 1, **training},
        "scaling": {"num_workers": 2},
        "tracking": {"run_name": run_name, "output_dir": str(tmp_path / "runs"), "mode": tracking},
    })


def _kill_every_attempt(epoch: int, step: int, rank: int, *, kills: str, from_epoch: int) -> None:
    """Rank 1 dies at the first step of `from_epoch`, in every attempt; each death appends a line to `kills`."""
    if epoch >= from_epoch and rank == 1:
        with open(kills, "a") as handle:
            handle.write(f"{epoch} {step}\n")
        os._exit(1)


def _kill_once_at_step(epoch: int, step: int, rank: int, *, marker: str, at_step: int) -> None:
    if step == at_step and rank == 1 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


def test_more_failures_than_allowed_name_the_last_good_checkpoint(tmp_path, data_root, val_shards, ray_cluster):
    config = _config(tmp_path, data_root, val_shards, "exhausted", max_failures=1)
    kills = tmp_path / "kills"
    hook = functools.partial(_kill_every_attempt, kills=str(kills), from_epoch=1)
    with pytest.raises(TrainingError) as raised:
        train_model(config, MODEL, step_hook=hook)
    message = str(raised.value)
    # The first attempt and the one retry allowed both died, each at the first step after the checkpoint.
    assert kills.read_text().splitlines() == [f"1 {STEPS_PER_EPOCH + 1}"] * 2
    checkpoints = checkpoint_dirs(Path(config.run_dir) / "ray" / MODEL)
    assert checkpoints, "no checkpoint was written before the faults"
    last_good = checkpoints[0]
    assert f"the last good checkpoint is {last_good}" in message, message
    assert f"training {MODEL} failed" in message
    metadata = read_checkpoint_metadata(last_good)  # raises if damaged
    assert metadata["epoch"] == 0 and metadata["global_step"] == STEPS_PER_EPOCH
    model = build_model(config.model.spec(MODEL), 10)
    model.load_state_dict(load_file(last_good / "model.safetensors"))  # strict
    assert not (Path(config.run_dir) / "models" / MODEL / "best.safetensors").exists()


def test_an_offline_wandb_run_is_resumed_exactly_by_a_restarted_worker(tmp_path, data_root, val_shards,
                                                                     ray_cluster):
    # Offline, with an unreachable WANDB_BASE_URL (ray_cluster fixture) that nothing may wait for. (Online without a
    # key no longer falls back to offline: it refuses to start, tests/unit/operations/test_tracking.py.)
    config = _config(tmp_path, data_root, val_shards, "wandb-resume", tracking="offline", epochs=3)
    marker = tmp_path / "killed"
    # Mid-epoch 2: steps 25 and 30 had been reached when the worker died, and are replayed after the restart.
    hook = functools.partial(_kill_once_at_step, marker=str(marker), at_step=STEPS_PER_EPOCH + 13)
    started = time.monotonic()
    outcome = train_model(config, MODEL, step_hook=hook)
    assert marker.exists()
    assert time.monotonic() - started < 600  # an unreachable W&B server must not stall the training
    assert [epoch["epoch"] for epoch in outcome.history] == [1, 2, 3]

    run_id = wandb_run_id(config.tracking.run_name, "train", MODEL)
    wandb_dir = Path(config.run_dir) / "wandb"
    assert not list(wandb_dir.glob("run-*")), "an online run directory was created"
    attempts = sorted(wandb_dir.glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2, attempts  # the first attempt and the restart, both offline, one W&B run id
    files, ids = [], []
    for attempt in attempts:
        (run_file,) = attempt.glob("*.wandb")
        ids.append({r.run.run_id for r in read_records(run_file) if r.WhichOneof("record_type") == "run"})
        files.append(history_rows(run_file))
    # W&B's service dies with the killed worker and may not have written even the run record.
    assert ids[0] <= {run_id} and ids[1] == {run_id}, ids
    killed, resumed = files
    # The resumed attempt's file is the whole history: every train step once, in order, no gap, every epoch once.
    train_steps = [row["_step"] for row in resumed if "train/loss" in row]
    assert train_steps == list(range(5, 3 * STEPS_PER_EPOCH + 1, 5)), train_steps
    epochs = [(row["epoch/epoch"], row["_step"]) for row in resumed if "epoch/epoch" in row]
    assert epochs == [(epoch, epoch * STEPS_PER_EPOCH) for epoch in (1, 2, 3)], epochs
    logged = {row["epoch/epoch"]: row["epoch/train_loss"] for row in resumed if "epoch/epoch" in row}
    assert logged == {epoch["epoch"]: pytest.approx(epoch["train_loss"]) for epoch in outcome.history}
    # What the killed attempt got into its file is a prefix of that, and nothing of the epoch it did not finish.
    def content(row: dict) -> dict:
        return {key: value for key, value in row.items() if key not in ("_timestamp", "_runtime")}

    assert [content(row) for row in killed] == [content(row) for row in resumed[:len(killed)]]
    assert all(row["_step"] <= STEPS_PER_EPOCH for row in killed), [row["_step"] for row in killed]


def _shard_command(out: Path, data_root: Path) -> list[str]:
    return [str(BIN / "vit-pipeline"), "-q", "shard", "--data-root", str(data_root), "--out", str(out),
            "--shard-size", "1000", "--workers", "1"]


def test_two_identical_shard_runs_at_once_write_the_shards_once(tmp_path, data_root):
    reference, racing = tmp_path / "reference", tmp_path / "racing"
    subprocess.run(_shard_command(reference, data_root), check=True, capture_output=True, timeout=300)
    both = [subprocess.Popen(_shard_command(racing, data_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in both]
    assert [process.returncode for process in both] == [0, 0], outputs
    states = sorted("nothing to do" in out for out, _ in outputs)
    assert states == [False, True], outputs  # one wrote, the other found them written

    def tars(root: Path) -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in sorted(root.glob("*.tar"))}

    assert tars(racing) == tars(reference) and len(tars(racing)) == 8
    assert read_manifest(str(racing)) == read_manifest(str(reference))
    assert verify_shards(str(racing)).ok
    leftovers = [p.name for p in racing.iterdir() if p.name not in {*tars(racing), MANIFEST_NAME, ".shard.lock"}]
    assert leftovers == []


# ---- the driver SIGKILLed mid-flow, then run again -------------------------------------------------------

FLOW_OVERRIDES = [
    "training.epochs=3",
    "training.batch_size=128",
    "training.log_every_steps=5",
    "data.loader_workers=0",
    "data.shard_workers=1",
    "model.baseline={name: resnet18_cifar, drop_path_rate: 0.0, model_kwargs: {channels: [8, 16, 32, 64]}}",
    "model.transformers=[{name: vit_tiny_patch4_32, drop_path_rate: 0.0, model_kwargs: {depth: 1}}]",
    "orchestration.retries=0",
]

PREFECT_STATES = """
import json
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort
with get_client(sync_client=True) as client:
    found = []
    for run in client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC):
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        found.append({"id": str(run.id), "state": run.state.name, "message": run.state.message or "",
                      "tasks": {task.name: task.state.name for task in tasks},
                      "logs": [log.message for log in logs]})
print(json.dumps(found))
"""


def _prefect_runs(env: dict, cwd: Path) -> list[dict]:
    result = subprocess.run([str(BIN / "python"), "-c", PREFECT_STATES], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _valid_checkpoints(run_path: Path) -> list[Path]:
    return [path for path in checkpoint_dirs(run_path) if (path / "metadata.json").is_file()]


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and not path.is_symlink()
            and needle in path.read_bytes()]


@pytest.fixture
def flow_env(tmp_path, data_root):
    marker = f"VIT_FAULT_TEST_{secrets.token_hex(8)}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))  # short: Ray's socket paths have a length limit
    canary = "canary-" + secrets.token_hex(20)[:33]  # 40 characters, looks like a W&B key
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PREFECT_", "WANDB_", "RAY_"))}
    env.update({
        marker: "1",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DATA_ROOT": str(data_root),
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": canary,
        "RAY_TMPDIR": str(ray_tmp),  # its own Ray: neither joins nor is joined by another cluster here
        "PYTHONUNBUFFERED": "1",
    })
    yield env, marker, canary, ray_tmp
    kill_leftovers(marker)
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)


def _pipeline(tmp_path: Path) -> list[str]:
    command = [str(BIN / "vit-pipeline"), "run", "--config", str(REPO_ROOT / "configs" / "smoke.yaml"),
               "--run-name", "killed", "--set", f"tracking.output_dir={json.dumps(str(tmp_path / 'runs'))}"]
    for override in FLOW_OVERRIDES:
        command += ["--set", override]
    return command


@pytest.mark.timeout(1500)
def test_sigkilled_driver_resumes_skips_shards_marks_the_dead_run_crashed_and_leaks_no_key(tmp_path, flow_env):
    env, marker, canary, ray_tmp = flow_env
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        driver = subprocess.Popen(_pipeline(tmp_path), env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + FLOW_TIMEOUT
        # The flow run's own directory, runs/killed/<flow run>/, which the next run of this config continues.
        while not (found := list((tmp_path / "runs" / "killed").glob("*/ray/resnet18_cifar"))) or len(
                _valid_checkpoints(found[0])) < 2:
            assert driver.poll() is None, first_log.read_text()[-5000:]
            assert time.monotonic() < deadline, "two checkpoints never appeared"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    (baseline_ray,) = found
    run_dir = baseline_ray.parents[1]
    kill_leftovers(marker)
    assert processes_with(marker) == [], "processes of the killed driver survived SIGKILL"
    killed_history = read_checkpoint_metadata(_valid_checkpoints(baseline_ray)[0])["history"]
    assert [epoch["epoch"] for epoch in killed_history] == [1, 2]
    assert not (run_dir / "models" / "resnet18_cifar" / "metrics.json").exists()  # it really died mid-training

    (dead,) = _prefect_runs(env, tmp_path)
    assert dead["state"] == "Running"  # what SIGKILL leaves behind, until the next run of this run name

    second = subprocess.run(_pipeline(tmp_path), env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=FLOW_TIMEOUT)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-5000:]
    assert "[resnet18_cifar] resuming after epoch 2" in output
    assert "[resnet18_cifar] epoch 3/3" in output and "[resnet18_cifar] epoch 1/3" not in output

    metrics = json.loads((run_dir / "models" / "resnet18_cifar" / "metrics.json").read_text())
    assert [epoch["epoch"] for epoch in metrics["history"]] == [1, 2, 3]
    # Epochs 1 and 2 come from the killed run's checkpoint (their timings too), not from training again.
    assert metrics["history"][:2] == killed_history
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert {record["model"] for record in evaluation["models"]} == {"resnet18_cifar", MODEL}

    first_run, second_run = _prefect_runs(env, tmp_path)
    assert first_run["id"] == dead["id"]
    assert first_run["state"] == "Crashed" and "exited without reporting" in first_run["message"], first_run
    assert second_run["state"] == "Completed"
    assert [state for name, state in second_run["tasks"].items() if name.startswith("shard")] == ["Cached"], (
        second_run["tasks"])
    assert any("marked Crashed" in message for message in second_run["logs"])
    assert any(f"continuing {run_dir}" in message for message in second_run["logs"])

    # The canary key never left the environment: not in output, run files, checkpoints, Prefect's DB and logs,
    # Ray's session logs. (The first run's output went to first.log.)
    assert canary not in output
    leaks = [*_files_containing(tmp_path, canary.encode()), *_files_containing(ray_tmp, canary.encode())]
    for link in run_dir.rglob("debug-core.log"):  # W&B's service logs live in ~/.cache/wandb/logs
        if link.resolve().is_file() and canary.encode() in link.resolve().read_bytes():
            leaks.append(str(link.resolve()))
    assert leaks == []
    assert list(run_dir.glob("wandb/offline-run-*")) and list((tmp_path / "prefect").rglob("*.db"))


@pytest.mark.timeout(300)
def test_only_a_flow_run_whose_process_is_gone_is_marked_crashed(tmp_path):
    from prefect import flow, get_client
    from prefect.states import Running
    from prefect.testing.utilities import prefect_test_harness

    from flows.run_owner import claim_run_directory, config_digest, process_start
    from tasks.layout import RUN_OWNER_FILE

    @flow(name="orphan-check")
    def noop() -> None:
        pass

    config = build_config({"tracking": {"output_dir": str(tmp_path), "run_name": "owner"}})
    owner_file = Path(config.run_root) / "earlier" / RUN_OWNER_FILE
    owner_file.parent.mkdir(parents=True)
    exited = subprocess.Popen(["true"])
    exited.wait()
    host, me = socket.gethostname(), os.getpid()
    with prefect_test_harness(server_startup_timeout=120), get_client(sync_client=True) as client:
        def owned_by(pid: int, start: str | None, host: str = host) -> str:
            run = client.create_flow_run(noop, state=Running())
            owner_file.write_text(json.dumps({"flow_run_id": str(run.id), "host": host, "pid": pid, "start": start,
                                              "config": config_digest(config), "finished": False}))
            return str(run.id)

        def state(run_id: str) -> str:
            return client.read_flow_run(run_id).state.name

        def claim(run_id: str):
            return claim_run_directory(config, run_id, "next")

        alive = owned_by(me, process_start(me))
        assert claim("00000001").crashed == [] and state(alive) == "Running"
        elsewhere = owned_by(exited.pid, None, host="another-host")
        assert claim("00000002").crashed == [] and state(elsewhere) == "Running"
        gone = owned_by(exited.pid, None)
        assert claim("00000003").crashed == [gone] and state(gone) == "Crashed"
        reused = owned_by(me, "0")  # the PID lives on in another process: a different start time
        assert claim("00000004").crashed == [reused] and state(reused) == "Crashed"
    assert json.loads(owner_file.read_text())["flow_run_id"] == "00000004"  # it continues that directory
