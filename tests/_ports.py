"""A free loopback port, for the servers the tests start (moto, MLflow, Ray heads, Serve)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Every outgoing connection on this machine takes its local port from the ephemeral range (32768-60999 by default):
# a port found free there may be taken by another process's connection (the suite's processes open thousands)
# before the server binds it. The ports handed out here lie below that range and above Ray's worker ports
# (10002-19999 by default), where nothing takes a port unasked.
_CHOICE = random.SystemRandom()  # not the tests' seeded generator: each pytest-xdist worker draws its own ports


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORTS = range(20000, max(_ephemeral_start(), 20001))  # at least one port, should the ephemeral range start low


def free_port() -> int:
    """A loopback port no socket holds, outside the ranges the system and Ray hand out by themselves."""
    for _ in range(200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", _CHOICE.choice(PORTS)))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError(f"no free loopback port in {PORTS.start}-{PORTS.stop - 1} after 200 tries")
