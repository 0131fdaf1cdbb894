"""Processes a test started and must not leave behind, found by a marker in their environment."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def processes_with(marker: str) -> list[int]:
    """PIDs of processes whose environment holds `marker`: the driver's descendants, Ray's included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def kill_leftovers(marker: str) -> None:
    for pid in processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
