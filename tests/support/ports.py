"""Ports for the servers that tests start (Ray heads, Prefect servers, Ray Serve).

A port the kernel hands out for port 0 comes from its ephemeral range, the same range every outgoing connection
takes its local port from; a Ray head starts dozens of processes that open connections and bind port 0, so such a
port can be taken between the test choosing it and its server binding it (a lost-head test failed that way, its
second head's GCS finding its port in use). The ports here come from between Ray's worker ports and the ports
Serve's replicas listen on behind HAProxy (from 30000), below the ephemeral range: nothing takes them by itself.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 19_999  # Ray's default --max-worker-port
SERVE_REPLICA_PORTS_START = 30_000  # RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT's default
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _first_ephemeral_port() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def unused_ports(count: int) -> list[int]:
    """`count` distinct ports that nothing listens on now, and that no process takes without being told to."""
    candidates = range(RAY_WORKER_PORTS_END + 1, min(SERVE_REPLICA_PORTS_START, _first_ephemeral_port()))
    ports: list[int] = []
    for port in random.sample(candidates, len(candidates)):
        if _bindable(port):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"fewer than {count} ports free in {candidates.start}-{candidates.stop - 1}")


def unused_port() -> int:
    """One port nothing listens on (a server's, or one a test connects to in order to be refused)."""
    return unused_ports(1)[0]
