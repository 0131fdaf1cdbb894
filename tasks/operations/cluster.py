"""The Ray cluster's life around one flow run: up before the trainings, down after them, whatever happened.

The weekly run's Prefect worker lives off the cluster (a small always-on VM or pod, infra/README.md), so
the cluster costs nothing between runs: the flow brings it up, trains on it through its Jobs API and takes
it down again on success, failure and cancellation alike. Two launchers, chosen by
orchestration.cluster.launcher:

- "ray": Ray's cluster launcher. `ray up -y <cluster yaml>`, then `ray dashboard` forwards the head's Jobs
  API (on the head's loopback only) to this machine over SSH; `ray down -y` at the end.
- "kuberay": `kubectl apply` of the RayCluster manifest, a wait for its head pod, the Jobs API at the head's
  service, `kubectl delete raycluster` at the end. Not a RayJob with shutdownAfterJobFinishes: a RayJob owns
  one entrypoint, and the flow submits one job per training (and per evaluation on a GPU) and follows each,
  exactly as against an always-on cluster.

`up` is idempotent (both tools update a cluster that is already there), so a flow run started while a
cluster was left behind takes it over, and takes it down after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from tasks.config import ClusterLifecycleConfig, ConfigError, PipelineConfig

log = logging.getLogger(__name__)

JOBS_API_PORT = 8265
# Relative to the repository, the flow's working directory (prefect.yaml's pull step).
DEFAULT_CLUSTER_FILES = {"ray": Path("infra/ray/cluster-aws.yaml"), "kuberay": Path("infra/kuberay/raycluster.yaml")}
# How long `down` may take before the flow gives up on it (the error names the command to run by hand).
DOWN_TIMEOUT_SECONDS = 30 * 60


class ClusterError(RuntimeError):
    """A launcher command failed; the message names it and what it printed."""


class ClusterLauncher(Protocol):
    def up(self) -> None:
        """Create the cluster, or update the one there; returns when its head answers."""

    def address(self) -> str:
        """The head's Jobs API, http://host:port, as this machine reaches it."""

    def down(self) -> None:
        """Delete the cluster and everything it started; nothing if there is none."""


def run_command(argv: list[str], timeout: float) -> str:
    """Run a launcher command to its end; its output, or ClusterError naming it."""
    log.info("$ %s", " ".join(argv))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ClusterError(f"`{' '.join(argv)}` failed: {error}") from error
    if done.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def start_command(argv: list[str]) -> subprocess.Popen:
    """Start a command that runs until stopped (an SSH port forward)."""
    log.info("$ %s &", " ".join(argv))
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for_jobs_api(address: str, timeout: float) -> None:
    """Until the Jobs API answers (any HTTP status: with token authentication it answers 401 to no token)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=10).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise ClusterError(f"the Ray Jobs API at {address} did not answer within {timeout:.0f}s: "
                                   f"{error}") from error
            time.sleep(2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayUpLauncher:
    """Ray's cluster launcher on a cluster YAML (infra/ray/cluster-aws.yaml)."""

    cluster_file: Path
    timeout: float
    local_port: int = field(default_factory=_free_port)
    _forward: subprocess.Popen | None = None

    def up(self) -> None:
        run_command(["ray", "up", "-y", "--no-config-cache", str(self.cluster_file)], self.timeout)
        self._forward = start_command(["ray", "dashboard", "--port", str(self.local_port),
                                       "--remote-port", str(JOBS_API_PORT), str(self.cluster_file)])
        wait_for_jobs_api(self.address(), self.timeout)

    def address(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    def down(self) -> None:
        if self._forward is not None:
            self._forward.terminate()
            self._forward.wait()
            self._forward = None
        run_command(["ray", "down", "-y", str(self.cluster_file)], DOWN_TIMEOUT_SECONDS)


@dataclass
class KubeRayLauncher:
    """A KubeRay RayCluster manifest (infra/kuberay/raycluster.yaml), applied and deleted with kubectl."""

    manifest: Path
    namespace: str
    timeout: float

    @property
    def name(self) -> str:
        for document in yaml.safe_load_all(self.manifest.read_text()):
            if document and document.get("kind") == "RayCluster":
                return document["metadata"]["name"]
        raise ConfigError(f"orchestration.cluster.config_file: {self.manifest} has no RayCluster")

    def up(self) -> None:
        run_command(["kubectl", "apply", "-n", self.namespace, "-f", str(self.manifest)], self.timeout)
        # HeadPodReady: KubeRay's RayCluster condition (on by default since KubeRay 1.3).
        run_command(["kubectl", "wait", "-n", self.namespace, f"raycluster/{self.name}",
                     "--for=condition=HeadPodReady", f"--timeout={int(self.timeout)}s"], self.timeout + 60)
        wait_for_jobs_api(self.address(), self.timeout)

    def address(self) -> str:
        # The head's service, <cluster>-head-svc, as a pod of the same Kubernetes cluster reaches it.
        return f"http://{self.name}-head-svc.{self.namespace}.svc.cluster.local:{JOBS_API_PORT}"

    def down(self) -> None:
        # The RayCluster only: the shared volume's claim (and the runs on it) stays.
        run_command(["kubectl", "delete", "-n", self.namespace, f"raycluster/{self.name}", "--ignore-not-found",
                     "--wait=true"], DOWN_TIMEOUT_SECONDS)


def launcher_for(cluster: ClusterLifecycleConfig) -> ClusterLauncher | None:
    """The configured launcher; None when the cluster outlives the flow run (launcher "none")."""
    if cluster.launcher == "none":
        return None
    timeout = cluster.up_timeout_minutes * 60
    if cluster.launcher == "ray":
        return RayUpLauncher(cluster.config_file or DEFAULT_CLUSTER_FILES["ray"], timeout)
    return KubeRayLauncher(cluster.config_file or DEFAULT_CLUSTER_FILES["kuberay"], cluster.namespace, timeout)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM as an exception while the cluster is up, where nothing else (Prefect's engine) handles it:
    a plain SIGTERM would end the process without taking the cluster down."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def cluster_for_run(config: PipelineConfig, launcher: ClusterLauncher | None,
                    emit: Callable[[str], None] = log.info) -> Iterator[PipelineConfig]:
    """Bring the cluster up, yield `config` training on it (scaling.ray_address: its Jobs API), and take it
    down when the block is left, however: an exception, a Prefect cancellation (TerminationSignal), Ctrl-C,
    SIGTERM. Without a launcher, `config` as it is: the cluster is someone else's."""
    if launcher is None:
        yield config
        return
    if os.environ.get("RAY_ADDRESS"):
        # The head's worker (infra/ray) and KubeRay's sidecar set it: taking the cluster down from there would
        # end the flow run with it, and another flow run's cluster too.
        raise ConfigError(f"orchestration.cluster.launcher {type(launcher).__name__}: RAY_ADDRESS="
                          f"{os.environ['RAY_ADDRESS']} says this flow runs on a Ray cluster; a flow that brings its "
                          "cluster up and down runs on a Prefect worker off the cluster (infra/README.md)")
    with _sigterm_raises():
        try:
            emit(f"bringing the Ray cluster up ({type(launcher).__name__})")
            launcher.up()
            address = launcher.address()
            emit(f"the Ray cluster is up: Jobs API {address}")
            yield config.model_copy(update={"scaling": config.scaling.model_copy(update={"ray_address": address})})
        finally:
            emit("taking the Ray cluster down")
            launcher.down()
            emit("the Ray cluster is down")
