"""End to end with real components: `prefect server start`, the deployments served by
`python -m flows.deployments`, `prefect deployment run vit-pipeline/smoke` twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SERVER_STARTUP_SECONDS = 120
RUN_TIMEOUT_SECONDS = 900
SHUTDOWN_SECONDS = 30
# The smoke deployment with smaller models and one epoch; outputs under the test's directory.
TINY = [
    "training.epochs=1",
    "training.batch_size=128",
    "model.baseline={name: resnet18_cifar, drop_path_rate: 0.0, model_kwargs: {channels: [8, 16, 32, 64]}}",
    "model.transformers=[{name: vit_tiny_patch4_32, drop_path_rate: 0.0, model_kwargs: {depth: 1}},"
    " {name: deit_tiny_distilled_patch4_32, drop_path_rate: 0.0, model_kwargs: {depth: 1}, teacher: baseline,"
    " distillation: hard}, {name: swin_tiny_patch2_window4_32, drop_path_rate: 0.0,"
    " model_kwargs: {depths: [1, 1, 1]}}]",
    "orchestration.retries=0",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001  (not up yet: any failure means "try again")
            pass
        time.sleep(1)
    raise AssertionError(f"{what} not ready after {seconds}s")


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_root):
    home = tmp_path_factory.mktemp("e2e")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DATA_ROOT": str(data_root),
        "WANDB_MODE": "offline",
    }
    env.pop("WANDB_API_KEY", None)
    logs = home / "logs"
    logs.mkdir()

    def launch(name: str, *command: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        return subprocess.Popen(command, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)

    server_command = (str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port))

    def server_up() -> None:
        _wait_until(lambda: urllib.request.urlopen(f"{api}/health").status == 200, SERVER_STARTUP_SECONDS, "server")

    processes = [launch("server", *server_command)]  # the server stays first: it is stopped last
    server_up()

    def restart_server() -> None:
        processes[0].send_signal(signal.SIGINT)
        processes[0].wait(timeout=SHUTDOWN_SECONDS)
        processes[0] = launch("server-restarted", *server_command)
        server_up()

    processes.append(launch("serve", str(BIN / "python"), "-m", "flows.deployments"))
    inspect = [str(BIN / "prefect"), "deployment", "inspect", "vit-pipeline/smoke"]
    _wait_until(lambda: subprocess.run(inspect, env=env, capture_output=True).returncode == 0,
                SERVER_STARTUP_SECONDS, "deployment vit-pipeline/smoke")
    yield env, home, logs, restart_server
    # Newest first, each with Ctrl-C: serve shuts down cleanly only while the server is still up.
    for process in reversed(processes):
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _smoke_params(output_dir: Path) -> str:
    return json.dumps({
        "config_file": str(REPO_ROOT / "configs" / "smoke.yaml"),
        "overrides": [*TINY, f"tracking.output_dir={output_dir}"],
    })


def _run_smoke(env: dict, home: Path) -> str:
    command = [str(BIN / "prefect"), "deployment", "run", "vit-pipeline/smoke", "--params",
               _smoke_params(home / "runs"), "--watch"]
    result = subprocess.run(command, env=env, cwd=home, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr
    return _created_flow_run(result.stdout)


def _created_flow_run(output: str) -> str:
    return next(line.split("'")[1] for line in output.splitlines() if "Created flow run" in line)


def _flow_run_state(env: dict, flow_run_name: str) -> str:
    script = (
        "import sys\n"
        "from prefect import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName\n"
        "with get_client(sync_client=True) as client:\n"
        "    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[sys.argv[1]])))\n"
        "    print(runs[0].state.name)\n"
    )
    return subprocess.run([str(BIN / "python"), "-c", script, flow_run_name], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def _task_states(env: dict, flow_run_name: str) -> dict[str, str]:
    script = (
        "import json, sys\n"
        "from prefect import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName\n"
        "with get_client(sync_client=True) as client:\n"
        "    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[sys.argv[1]])))\n"
        "    print(json.dumps({run.name: run.state.name for run in runs}))\n"
    )
    output = subprocess.run([str(BIN / "python"), "-c", script, flow_run_name], env=env, capture_output=True,
                            text=True, check=True).stdout
    return json.loads(output)


def _states_of(states: dict[str, str], prefix: str) -> dict[str, str]:
    return {name: state for name, state in states.items() if name.startswith(prefix)}


# What each step's W&B run must hold: (its artifact types, the inputs its config records for lineage).
EXPECTED_WANDB = {
    "shard": ({"dataset"}, set()),
    "train": ({"model"}, {"input/shards-cifar10"}),
    "evaluate": ({"evaluation", "run_table"}, {"input/model-resnet18_cifar", "input/model-vit_tiny_patch4_32"}),
    "attention": ({"attention", "run_table"}, {"input/model-vit_tiny_patch4_32"}),
    "report": ({"report", "run_table"}, {"input/evaluation"}),
}


def _assert_wandb_runs(wandb_dir: Path, flow_run_name: str) -> None:
    from tests.wandb_records import read_records

    jobs = []
    for directory in wandb_dir.glob("offline-run-*"):
        records = read_records(next(directory.glob("*.wandb")))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        artifacts = {r.artifact.type for r in records if r.WhichOneof("record_type") == "artifact"}
        config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
        config_keys |= {item.key for item in run.config.update}
        assert run.run_group == flow_run_name, (directory.name, run.run_group)
        kinds, inputs = EXPECTED_WANDB[run.job_type]
        assert kinds <= artifacts and inputs <= config_keys, (run.job_type, artifacts, config_keys)
        jobs.append(run.job_type)
    assert sorted(jobs) == sorted(["shard", "train", "train", "train", "train", "evaluate", "attention", "report"])


def test_smoke_deployment_completes_and_a_rerun_is_cached(served):
    env, home, logs, _ = served
    first = _run_smoke(env, home)
    states = _task_states(env, first)
    assert list(_states_of(states, "shard").values()) == ["Completed"], states
    assert set(_states_of(states, "train-")) == {
        "train-resnet18_cifar", "train-vit_tiny_patch4_32", "train-deit_tiny_distilled_patch4_32",
        "train-swin_tiny_patch2_window4_32"}, states
    assert set(_states_of(states, "train-").values()) == {"Completed"}, states

    run_dir = home / "runs" / "smoke"
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert {record["model"] for record in evaluation["models"]} == {
        "resnet18_cifar", "vit_tiny_patch4_32", "deit_tiny_distilled_patch4_32", "swin_tiny_patch2_window4_32"}
    assert (run_dir / "report" / "report.html").stat().st_size > 0
    _assert_wandb_runs(run_dir / "wandb", first)

    second = _run_smoke(env, home)
    states = _task_states(env, second)
    assert list(_states_of(states, "shard").values()) == ["Cached"], states
    assert len(_states_of(states, "train-")) == 4, states
    assert set(_states_of(states, "train-").values()) == {"Cached"}, states


def test_a_flow_run_survives_a_prefect_server_restart(served):
    env, home, logs, restart_server = served
    output_dir = home / "runs-restart"  # not the cached run's: this one really trains
    started = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "vit-pipeline/smoke", "--params", _smoke_params(output_dir)],
        env=env, cwd=home, capture_output=True, text=True, check=True,
    )
    name = _created_flow_run(started.stdout)
    checkpoints = output_dir / "smoke" / "ray" / "resnet18_cifar"
    _wait_until(lambda: any(checkpoints.glob("checkpoint_*")), RUN_TIMEOUT_SECONDS, "the baseline's first checkpoint")

    restart_server()  # mid-training: the flow's API calls fail until the new server answers

    terminal = {"Completed", "Failed", "Crashed", "Cancelled"}
    _wait_until(lambda: _flow_run_state(env, name) in terminal, RUN_TIMEOUT_SECONDS, f"flow run {name} to finish")
    assert _flow_run_state(env, name) == "Completed"
    evaluation = json.loads((output_dir / "smoke" / "evaluation.json").read_text())
    assert len(evaluation["models"]) == 4
    assert (output_dir / "smoke" / "report" / "report.html").is_file()
