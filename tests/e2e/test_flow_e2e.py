"""End to end with real components: `prefect server start`, the deployments served by
`python -m flows.deployments`, `prefect deployment run vit-pipeline/smoke` (trained, then reused on
request), a server restart mid-run, a cancelled flow run whose training runs as a job on a
`ray start --head`, and the sweep deployment `vit-pipeline/sweep`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.support.ports import unused_port
from tests.support.prefect_server import server_env, stop, wait_until
from tests.support.prefect_server import start as start_server
from tests.support.ray_head import ray_head
from tests.support.sweep_runs import SHRUNK as SWEEP_SHRUNK
from tests.support.sweep_runs import wandb_runs_by_job_type

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SERVER_STARTUP_SECONDS = 120
RUN_TIMEOUT_SECONDS = 900
MINI_VAL_IMAGES = 80  # of mini_cifar's 480 training images
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


@pytest.fixture(scope="module")
def cluster_head():
    with ray_head() as head:
        yield head


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_root, cluster_head):
    home = tmp_path_factory.mktemp("e2e")
    # The flow runs' credentials for the Ray head (trainings sent there as jobs); local Rays use it too.
    env = server_env(home, unused_port(), DATA_ROOT=str(data_root), WANDB_MODE="offline", **cluster_head.client_env)
    env.pop("WANDB_API_KEY", None)
    logs = home / "logs"
    logs.mkdir()
    servers = [start_server(env, logs / "server.log")]

    def restart_server() -> None:
        stop(servers[0])
        servers[0] = start_server(env, logs / "server-restarted.log")

    with open(logs / "serve.log", "w") as log:
        serve = subprocess.Popen([str(BIN / "python"), "-m", "flows.deployments"], env=env, cwd=home, stdout=log,
                                 stderr=subprocess.STDOUT)
    inspect = [str(BIN / "prefect"), "deployment", "inspect", "vit-pipeline/smoke"]
    wait_until(lambda: subprocess.run(inspect, env=env, capture_output=True).returncode == 0,
               SERVER_STARTUP_SECONDS, "deployment vit-pipeline/smoke")
    yield env, home, logs, restart_server
    # First, while the server is up. Its flow runs are over by now; `prefect serve` takes 30 s to answer Ctrl-C
    # when idle, which is CI time and tests nothing, so it is killed after 5.
    stop(serve, seconds=5)
    stop(servers[0])


def _smoke_params(output_dir: Path, *extra: str, reuse: bool = False) -> str:
    return json.dumps({
        "config_file": str(REPO_ROOT / "configs" / "smoke.yaml"),
        "overrides": [*TINY, f"tracking.output_dir={output_dir}", *extra],
        "reuse_trainings": reuse,
    })


def _run_smoke(env: dict, home: Path, *extra: str, reuse: bool = False) -> str:
    command = [str(BIN / "prefect"), "deployment", "run", "vit-pipeline/smoke", "--params",
               _smoke_params(home / "runs", *extra, reuse=reuse), "--watch"]
    result = subprocess.run(command, env=env, cwd=home, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr
    return _created_flow_run(result.stdout)


def _run_directory(run_root: Path, flow_run_name: str) -> Path:
    """The directory a flow run wrote: runs/<run>/<flow run name>-<id>/."""
    (found,) = [path.parent for path in run_root.glob("*/flow-run.json") if not path.parent.is_symlink()
                and json.loads(path.read_text())["flow_run_name"] == flow_run_name]
    return found


def _created_flow_run(output: str) -> str:
    return next(line.split("'")[1] for line in output.splitlines() if "Created flow run" in line)


def _created_flow_run_id(output: str) -> str:
    return next(line.split("UUID:")[1].strip() for line in output.splitlines() if "UUID:" in line)


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


def _assert_wandb_runs(wandb_dir: Path, group: str) -> None:
    from tests.support.wandb_records import read_records

    jobs = []
    for directory in wandb_dir.glob("offline-run-*"):
        records = read_records(next(directory.glob("*.wandb")))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        artifacts = {r.artifact.type for r in records if r.WhichOneof("record_type") == "artifact"}
        config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
        config_keys |= {item.key for item in run.config.update}
        assert run.run_group == group, (directory.name, run.run_group)
        kinds, inputs = EXPECTED_WANDB[run.job_type]
        assert kinds <= artifacts and inputs <= config_keys, (run.job_type, artifacts, config_keys)
        jobs.append(run.job_type)
    assert sorted(jobs) == sorted(["shard", "train", "train", "train", "train", "evaluate", "attention", "report"])


MODELS = {"resnet18_cifar", "vit_tiny_patch4_32", "deit_tiny_distilled_patch4_32", "swin_tiny_patch2_window4_32"}


def test_smoke_deployment_survives_a_server_restart_in_its_own_directory_and_a_rerun_reuses_only_when_asked(
        served, mini_cifar):
    """One real training flow run serves both checks (each costs minutes on two cores), on a few hundred images:
    the Prefect server is restarted while it trains, and it completes in a directory of its own; a second run
    reuses it on request."""
    env, home, logs, restart_server = served
    few_images = [f"data.data_root={mini_cifar}", f"data.val_size={MINI_VAL_IMAGES}"]
    started = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "vit-pipeline/smoke", "--params",
         _smoke_params(home / "runs", *few_images)],
        env=env, cwd=home, capture_output=True, text=True, check=True,
    )
    first = _created_flow_run(started.stdout)
    run_root = home / "runs" / "smoke"
    wait_until(lambda: any(run_root.glob("*/ray/resnet18_cifar/checkpoint_*")), RUN_TIMEOUT_SECONDS,
               "the baseline's first checkpoint")

    restart_server()  # mid-training: the flow's API calls fail until the new server answers

    terminal = {"Completed", "Failed", "Crashed", "Cancelled"}
    wait_until(lambda: _flow_run_state(env, first) in terminal, RUN_TIMEOUT_SECONDS, f"flow run {first} to finish")
    assert _flow_run_state(env, first) == "Completed"
    states = _task_states(env, first)
    assert list(_states_of(states, "shard").values()) == ["Completed"], states
    assert set(_states_of(states, "train-")) == {f"train-{name}" for name in MODELS}, states
    assert set(_states_of(states, "train-").values()) == {"Completed"}, states

    run_dir = _run_directory(run_root, first)
    assert run_dir.name.startswith(f"{first}-") and (run_root / "shards" / "manifest.json").is_file()
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert {record["model"] for record in evaluation["models"]} == MODELS
    assert (run_dir / "report" / "report.html").stat().st_size > 0
    assert (run_root / "latest").resolve() == run_dir
    _assert_wandb_runs(run_dir / "wandb", run_dir.name)  # the W&B group is the flow run's directory

    # (That a rerun trains again by default is tests/unit/flows/test_flow.py's, on the same cache; here: reuse on
    # request.)
    second = _run_smoke(env, home, *few_images, reuse=True)
    states = _task_states(env, second)
    assert list(_states_of(states, "shard").values()) == ["Cached"], states
    assert len(_states_of(states, "train-")) == 4, states
    assert set(_states_of(states, "train-").values()) == {"Cached"}, states
    second_dir = _run_directory(run_root, second)
    assert second_dir != run_dir and (run_root / "latest").resolve() == second_dir
    for name in MODELS:  # a whole run directory: the reused weights are copied in, unchanged
        assert (second_dir / "models" / name / "best.safetensors").read_bytes() == (
            run_dir / "models" / name / "best.safetensors").read_bytes()
    assert json.loads((second_dir / "evaluation.json").read_text())["models"]


def test_cancelling_a_flow_run_stops_its_ray_job(served, cluster_head, val_shards):
    """Trainings sent to a Ray head as jobs (as from KubeRay's head pod) stop when Prefect cancels the flow run:
    the runner's SIGTERM reaches the flow, which stops the jobs it submitted."""
    env, home, logs, _ = served
    output_dir = home / "runs-cancelled"
    params = _smoke_params(output_dir, "training.epochs=50", f"data.shard_dir={val_shards}",
                           f"scaling.ray_address={cluster_head.jobs_api}")
    started = subprocess.run([str(BIN / "prefect"), "deployment", "run", "vit-pipeline/smoke", "--params", params],
                             env=env, cwd=home, capture_output=True, text=True, check=True)
    name, flow_run_id = _created_flow_run(started.stdout), _created_flow_run_id(started.stdout)

    def flow_run_jobs() -> list[dict]:
        return [job for job in cluster_head.jobs()
                if (job.get("metadata") or {}).get("vit_pipeline_flow_run") == flow_run_id]

    wait_until(lambda: any((output_dir / "smoke").glob("*/ray/resnet18_cifar/checkpoint_*")), RUN_TIMEOUT_SECONDS,
                "the baseline job's first checkpoint")
    (job,) = flow_run_jobs()
    assert job["status"] == "RUNNING" and job["metadata"]["model"] == "resnet18_cifar"

    subprocess.run([str(BIN / "prefect"), "flow-run", "cancel", flow_run_id], env=env, cwd=home, check=True,
                   capture_output=True)
    wait_until(lambda: _flow_run_state(env, name) == "Cancelled", 120, f"flow run {name} to be cancelled")
    wait_until(lambda: [job["status"] for job in flow_run_jobs()] == ["STOPPED"], 60, "its job to stop")


def _markdown_artifact(env: dict, flow_run_name: str, key: str) -> str:
    script = (
        "import sys\n"
        "from prefect import get_client\n"
        "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, "
        "FlowRunFilterName\n"
        "with get_client(sync_client=True) as client:\n"
        "    (artifact,) = client.read_artifacts(\n"
        "        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[sys.argv[2]])),\n"
        "        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[sys.argv[1]])))\n"
        "    print(artifact.data)\n"
    )
    return subprocess.run([str(BIN / "python"), "-c", script, flow_run_name, key], env=env, capture_output=True,
                          text=True, check=True).stdout


def test_the_sweep_deployment_ranks_its_trials_and_returns_the_best_config(served, mini_cifar):
    """vit-pipeline/sweep, two trials of a one-block ViT at once on a few hundred images: shard, verify, Tune."""
    env, home, logs, _ = served
    output_dir = home / "runs-sweep"
    overrides = [*SWEEP_SHRUNK, "sweep.num_trials=2", "sweep.max_concurrent_trials=2",
                 f"data.data_root={mini_cifar}", f"tracking.output_dir={output_dir}"]
    params = json.dumps({"config_file": str(REPO_ROOT / "configs" / "sweep-smoke.yaml"), "overrides": overrides})
    command = [str(BIN / "prefect"), "deployment", "run", "vit-pipeline/sweep", "--params", params, "--watch"]
    result = subprocess.run(command, env=env, cwd=home, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr
    name = _created_flow_run(result.stdout)
    assert _flow_run_state(env, name) == "Completed"
    states = _task_states(env, name)
    for step in ("shard", "verify-shards", "sweep"):
        assert list(_states_of(states, step).values()) == ["Completed"], states

    run_dir = _run_directory(output_dir / "sweep-smoke", name)
    results = json.loads((run_dir / "sweep" / "results.json").read_text())
    assert [trial["rank"] for trial in results["trials"]] == [1, 2] and results["metric"] == "val_acc"
    best = results["trials"][0]
    from tasks.config import load_config

    best_config = load_config(run_dir / "sweep" / "best.yaml")
    assert best_config.sweep is None and best_config.training.lr == best["parameters"]["training.lr"]
    ranked = _markdown_artifact(env, name, "sweep-trials")
    assert f"| 1 | {best['trial']} |" in ranked and str(run_dir / "sweep" / "best.yaml") in ranked
    runs = wandb_runs_by_job_type(run_dir)
    assert {job: len(ids) for job, ids in runs.items()} == {"shard": 1, "sweep-trial": 2, "sweep": 1}
