"""A real `ray start --head` for tests: ports of its own, a temporary directory, token authentication."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.support.ports import unused_ports

BIN = Path(sys.executable).parent
STARTUP_SECONDS = 120
# Ray's ports besides the GCS and dashboard ones, all set: defaults would collide with other Rays here.
OTHER_PORTS = ["node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-grpc-port",
               "dashboard-agent-listen-port", "runtime-env-agent-port", "ray-client-server-port"]


@dataclass(frozen=True)
class RayHead:
    jobs_api: str  # http://127.0.0.1:<dashboard port>
    token_file: Path

    @property
    def client_env(self) -> dict[str, str]:
        """What a process needs in its environment to talk to this head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def jobs(self) -> list[dict]:
        """The Jobs API's list of jobs, over plain HTTP with the token (no Ray client in this process)."""
        request = urllib.request.Request(f"{self.jobs_api}/api/jobs/",
                                         headers={"Authorization": f"Bearer {self.token_file.read_text()}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[RayHead]:
    """Yield a running head; TERM to `ray start --block` then stops exactly the processes it started."""
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = temp / "auth-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs, dashboard, *others = unused_ports(2 + len(OTHER_PORTS))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    # Job drivers and workers import this checkout and find `python` as the flow's.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONPATH=str(REPO_ROOT),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp}",
               f"--num-cpus={num_cpus}", "--disable-usage-stats",
               *(f"--{name}={port}" for name, port in zip(OTHER_PORTS, others, strict=True))]
    log_path = temp / "ray-start.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard}", token)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                head.jobs()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the Ray head did not come up: {log_path.read_text()[-3000:]}"
                time.sleep(1)
        yield head
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(temp, ignore_errors=True)
