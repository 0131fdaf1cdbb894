"""A real `prefect server start` for tests, on a port and a database of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.support.ports import unused_port

BIN = Path(sys.executable).parent
STARTUP_SECONDS = 120
SHUTDOWN_SECONDS = 30


def wait_until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001  (not up yet: any failure means "try again")
            pass
        time.sleep(1)
    raise AssertionError(f"{what} not ready after {seconds}s")


def server_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of the server and of every client of it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def start(env: dict[str, str], log: Path) -> subprocess.Popen:
    port = env["PREFECT_API_URL"].split(":")[-1].split("/")[0]
    with open(log, "a") as output:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                                  env=env, stdout=output, stderr=subprocess.STDOUT)
    wait_until(lambda: urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health").status == 200, STARTUP_SECONDS,
               "the Prefect server")
    return server


def stop(process: subprocess.Popen, seconds: float = SHUTDOWN_SECONDS) -> None:
    """Ctrl-C, as a person would; killed if it has not gone after `seconds`."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def prefect_server(home: Path, **extra: str) -> Iterator[dict[str, str]]:
    """Yield the environment that talks to a fresh server."""
    env = server_env(home, unused_port(), **extra)
    server = start(env, home / "prefect-server.log")
    try:
        yield env
    finally:
        stop(server)


def drain_this_process_clients() -> None:
    """Send what this process's Prefect clients still hold and forget them, before their server stops.

    Prefect keeps one events worker (and one log worker) per process, keyed by client type and not by API URL:
    left running after its server is gone, the next server in this process (prefect_test_harness in a later
    test) would get a worker still sending to the old one, and its events would never arrive. The test harness
    drains them on exit; a test that points this process at a server of its own must do the same."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all()
    APILogWorker.drain_all()

