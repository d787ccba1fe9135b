"""A real ``mlflow server`` (SQLite backend, served artifacts) that a test can stop and start again on the same
port, store and artifact root: the MLflow server going down and coming back in the middle of a stage."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _cluster import command_line
from _ports import free_port


def job_runner(pids: list[int]) -> list[int]:
    """The processes among ``pids`` that are MLflow's job runner or its huey consumers (``mlflow.server.jobs``)."""
    return [pid for pid in pids if "mlflow.server.jobs" in command_line(pid)]


class MlflowServer:
    """``mlflow server`` on a free loopback port, its store ``ROOT/mlflow.db`` and its artifacts ``ROOT/artifacts``.

    Args:
        root: the folder of the store and artifacts (kept across :meth:`stop` and :meth:`start`); the server's
            working folder.
        options: more ``mlflow server`` options (e.g. ``--app-name=basic-auth``).
        env: more environment variables of the server (over the default: no job runner).
        workers: its uvicorn worker processes; None: mlflow's default.
    """

    def __init__(
        self, root: Path, options: tuple[str, ...] = (), env: dict[str, str] | None = None, workers: int | None = 1
    ):
        self.root = root
        self.options = options
        self.env = env or {}
        self.workers = workers
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> MlflowServer:
        """Start the server and wait until it answers ``/health``."""
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            *(["--workers", str(self.workers)] if self.workers is not None else []),
            *self.options,
        ]
        # its own process group: stop() ends the server's uvicorn and job runner with it
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.root,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env},  # no job runner: quicker
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("mlflow server exited") from None
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        """Stop the server this object started (its process and the workers it made), if it runs."""
        if self.process is None:
            return
        group = self.process.pid  # the group start() made, led by the server: only its processes
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # a worker still closing its connections
        self.process.wait(timeout=30)
        self.process = None
