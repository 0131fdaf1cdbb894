"""The cluster's life around a flow run (tasks/operations/cluster.py): the launchers' commands, recorded
instead of run, and the teardown on every way out: success, failure, Ctrl-C, Prefect's cancellation and a
plain SIGTERM of the process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from prefect.exceptions import TerminationSignal

from tasks.config import ConfigError, build_config
from tasks.operations import cluster
from tasks.operations.cluster import ClusterError, KubeRayLauncher, RayUpLauncher, cluster_for_run, launcher_for
from tests.conftest import REPO_ROOT

CLUSTER_YAML = REPO_ROOT / "infra" / "ray" / "cluster-aws.yaml"
RAYCLUSTER = REPO_ROOT / "infra" / "kuberay" / "raycluster.yaml"


class _Forward:
    """A stand-in for the `ray dashboard` port forward."""

    def __init__(self, commands: list[str]) -> None:
        self.commands = commands

    def terminate(self) -> None:
        self.commands.append("stop the port forward")

    def wait(self) -> int:
        return 0


@pytest.fixture
def commands(monkeypatch) -> list[str]:
    """Every launcher command, in order, none of them run; this process on no Ray cluster."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    done: list[str] = []

    def run_command(argv, timeout):
        done.append(" ".join(argv))
        return ""

    def start_command(argv):
        done.append(" ".join(argv) + " &")
        return _Forward(done)

    monkeypatch.setattr(cluster, "run_command", run_command)
    monkeypatch.setattr(cluster, "start_command", start_command)
    monkeypatch.setattr(cluster, "wait_for_jobs_api", lambda address, timeout: done.append(f"wait for {address}"))
    return done


def _config(launcher: str = "ray", config_file=CLUSTER_YAML):
    return build_config({"tracking": {"mode": "disabled"},
                         "orchestration": {"cluster": {"launcher": launcher, "config_file": str(config_file)}}})


def test_ray_up_before_and_ray_down_after_with_the_jobs_api_forwarded_between(commands):
    config = _config()
    launcher = launcher_for(config.orchestration.cluster)
    assert isinstance(launcher, RayUpLauncher)
    port = launcher.local_port
    with cluster_for_run(config, launcher) as on_cluster:
        commands.append(f"train on {on_cluster.scaling.ray_address}")
    assert commands == [
        f"ray up -y --no-config-cache {CLUSTER_YAML}",
        f"ray dashboard --port {port} --remote-port 8265 {CLUSTER_YAML} &",
        f"wait for http://127.0.0.1:{port}",
        f"train on http://127.0.0.1:{port}",
        "stop the port forward",
        f"ray down -y {CLUSTER_YAML}",
    ]


def test_kuberay_applies_waits_for_the_head_and_deletes_only_the_raycluster(commands):
    config = build_config({"tracking": {"mode": "disabled"}, "orchestration": {"cluster": {
        "launcher": "kuberay", "config_file": str(RAYCLUSTER), "namespace": "ml", "up_timeout_minutes": 10}}})
    launcher = launcher_for(config.orchestration.cluster)
    assert isinstance(launcher, KubeRayLauncher)
    with cluster_for_run(config, launcher) as on_cluster:
        commands.append(f"train on {on_cluster.scaling.ray_address}")
    jobs_api = "http://vit-pipeline-head-svc.ml.svc.cluster.local:8265"  # the manifest's RayCluster is vit-pipeline
    assert commands == [
        f"kubectl apply -n ml -f {RAYCLUSTER}",
        "kubectl wait -n ml raycluster/vit-pipeline --for=condition=HeadPodReady --timeout=600s",
        f"wait for {jobs_api}",
        f"train on {jobs_api}",
        "kubectl delete -n ml raycluster/vit-pipeline --ignore-not-found --wait=true",
    ]


@pytest.mark.parametrize("leaving", [RuntimeError("a training failed"), KeyboardInterrupt(),
                                     TerminationSignal(signal.SIGTERM)],
                         ids=["failure", "ctrl-c", "prefect-cancellation"])
def test_the_cluster_goes_down_however_the_run_ends(commands, leaving):
    config = _config()
    with pytest.raises(type(leaving)), cluster_for_run(config, launcher_for(config.orchestration.cluster)):
        commands.append("train")
        raise leaving
    assert commands[-3:] == ["train", "stop the port forward", f"ray down -y {CLUSTER_YAML}"]


def test_a_cluster_that_failed_to_come_up_is_taken_down_too(commands, monkeypatch):
    """`ray up` that fails half way leaves nodes that cost money: they go as well."""
    def run_command(argv, timeout):
        commands.append(" ".join(argv))
        if argv[1] == "up":
            raise ClusterError("`ray up` exited 1")
        return ""

    monkeypatch.setattr(cluster, "run_command", run_command)
    config = _config()
    with pytest.raises(ClusterError), cluster_for_run(config, launcher_for(config.orchestration.cluster)):
        commands.append("train")
    assert commands == [f"ray up -y --no-config-cache {CLUSTER_YAML}", f"ray down -y {CLUSTER_YAML}"]


def test_without_a_launcher_the_cluster_is_left_alone(commands):
    config = build_config({"tracking": {"mode": "disabled"}, "scaling": {"ray_address": "http://head:8265"}})
    assert launcher_for(config.orchestration.cluster) is None
    with cluster_for_run(config, None) as on_cluster:
        assert on_cluster is config
    assert commands == []


def test_each_launcher_has_its_clusters_file_by_default_and_a_wrong_one_fails_at_load_time():
    ray = launcher_for(build_config({"orchestration": {"cluster": {"launcher": "ray"}}}).orchestration.cluster)
    assert isinstance(ray, RayUpLauncher) and (REPO_ROOT / ray.cluster_file).samefile(CLUSTER_YAML)
    kuberay = launcher_for(build_config({"orchestration": {"cluster": {"launcher": "kuberay"}}}).orchestration.cluster)
    assert isinstance(kuberay, KubeRayLauncher) and (REPO_ROOT / kuberay.manifest).samefile(RAYCLUSTER)
    with pytest.raises(ConfigError, match="orchestration.cluster.launcher"):
        build_config({"orchestration": {"cluster": {"launcher": "terraform"}}})


def test_a_manifest_without_a_raycluster_is_named(tmp_path):
    manifest = tmp_path / "volume.yaml"
    manifest.write_text("kind: PersistentVolumeClaim\nmetadata: {name: runs}\n")
    with pytest.raises(ConfigError, match="volume.yaml has no RayCluster"):
        _ = KubeRayLauncher(manifest, "default", 60).name


def test_a_failing_command_is_named_with_what_it_printed():
    with pytest.raises(ClusterError, match=r"(?s)`.*python -c .*` exited 3:.*no credentials"):
        cluster.run_command([sys.executable, "-c", "import sys; print('no credentials'); sys.exit(3)"], 30)


SIGTERMED_FLOW = """
import sys, time
from tasks.config import build_config
from tasks.operations.cluster import cluster_for_run

record = open(sys.argv[1], "a", buffering=1)

class Launcher:
    def up(self): record.write("up\\n")
    def address(self): return "http://head:8265"
    def down(self): record.write("down\\n")

with cluster_for_run(build_config({"tracking": {"mode": "disabled"}}), Launcher()):
    record.write("training\\n")
    time.sleep(60)
"""


def test_a_sigterm_of_the_flow_process_takes_the_cluster_down(tmp_path):
    """A process worker stops a flow run with SIGTERM; where no Prefect handler turns it into an exception,
    the cluster must still go down rather than outlive the process."""
    record = tmp_path / "record"
    process = subprocess.Popen([sys.executable, "-c", SIGTERMED_FLOW, str(record)], cwd=REPO_ROOT,
                               env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})  # no RAY_ADDRESS
    deadline = time.monotonic() + 60
    while not (record.is_file() and "training" in record.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the script did not start training"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert record.read_text().split() == ["up", "training", "down"]


def test_a_flow_on_a_node_of_a_cluster_never_launches_one(commands, monkeypatch):
    """The head's worker and KubeRay's sidecar set RAY_ADDRESS: `ray down` from there would end the flow run."""
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    config = _config()
    with pytest.raises(ConfigError, match="RAY_ADDRESS=auto says this flow runs on a Ray cluster"), \
            cluster_for_run(config, launcher_for(config.orchestration.cluster)):
        pass
    assert commands == []
