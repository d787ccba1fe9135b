"""A free loopback port, for the servers the tests start (moto, MLflow, Ray heads, Serve)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
