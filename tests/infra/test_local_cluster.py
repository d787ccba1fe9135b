"""``infra/local_cluster.sh`` run as a user would: its refusals, a failed start, and a start and stop next to
another Ray instance on the same machine (a real ``ray start`` head, a real ``mlflow server``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cluster import command_line, descendants, session_processes
from _mlflow_server import job_runner
from _ports import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "local_cluster.sh"
BIN = Path(sys.executable).parent


def _env(tmp_path: Path, **ports: int) -> dict[str, str]:
    """The script's environment: its own HOME (the auth token) and state folder, the project's bin on PATH."""
    home = tmp_path / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(HOME=str(home), ISA_LOCAL_DIR=str(tmp_path / "state"), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update({name: str(port) for name, port in ports.items()})
    return env


def _script(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names ``text`` (a temp dir, a state folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


@pytest.mark.parametrize(
    ("ports", "options", "message"),
    [
        ({"MLFLOW_PORT": 15000}, [], "MLFLOW_PORT=15000 is inside Ray's worker port range 10002-19999"),
        ({"RAY_PORT": 20050}, ["--min-worker-port", "20000", "--max-worker-port=20100"], "range 20000-20100"),
        ({"DASHBOARD_PORT": 30001}, ["--worker-port-list=30000,30001"], "one of Ray's worker ports (30000,30001)"),
    ],
)
def test_a_port_among_rays_worker_ports_is_refused_before_anything_starts(tmp_path, ports, options, message):
    env = _env(tmp_path, **{"RAY_PORT": free_port(), "DASHBOARD_PORT": free_port(), "MLFLOW_PORT": free_port()})
    env.update({name: str(port) for name, port in ports.items()})
    done = _script(env, "start", *options, timeout=30)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "choose" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists() and not (tmp_path / "home" / ".ray").exists()  # nothing started
    assert _pids_mentioning(str(tmp_path)) == []


def test_a_taken_port_is_refused_and_stop_with_nothing_started_says_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = _env(tmp_path, RAY_PORT=taken.getsockname()[1], DASHBOARD_PORT=free_port(), MLFLOW_PORT=free_port())
        done = _script(env, "start", timeout=30)
    assert done.returncode == 2 and f"RAY_PORT={env['RAY_PORT']} is taken on 127.0.0.1" in done.stderr
    assert not (tmp_path / "state").exists()
    stop = _script(env, "stop", timeout=30)
    assert stop.returncode == 0 and "nothing to stop" in stop.stdout


def test_a_failed_ray_start_stops_the_mlflow_server_it_started(tmp_path):
    env = _env(tmp_path, RAY_PORT=free_port(), DASHBOARD_PORT=free_port(), MLFLOW_PORT=free_port())
    done = _script(env, "start", "--no-such-option", timeout=120)  # `ray start` refuses it, after MLflow started
    assert done.returncode != 0
    assert "No such option" in done.stderr
    assert "the Ray head did not start (see above); stopped the MLflow server this script had started" in done.stderr
    state = tmp_path / "state"
    assert (state / "mlflow.log").is_file()  # it was started ...
    assert not {"mlflow.pid", "ray.sid", "ray.temp_dir"} & {p.name for p in state.iterdir()}
    assert _wait_until(lambda: not _pids_mentioning(str(state)), 30)  # ... and is stopped
    assert not _listening(int(env["MLFLOW_PORT"]))


@pytest.fixture
def other_ray(ray_session) -> tuple[int, list[int]]:
    """Another Ray instance on this machine (another user's, say): the tests' own local instance, its processes
    below this one (its GCS, raylet, monitors, dashboard). Its GCS port and those processes."""
    ray_processes = [p for p in descendants(os.getpid()) if "/ray/" in command_line(p)]
    assert any(command_line(p).split(" ")[0].endswith("/gcs_server") for p in ray_processes)
    return int(ray_session.rsplit(":", 1)[1]), ray_processes


@pytest.mark.slow
def test_stop_stops_the_head_it_started_and_leaves_another_ray_running(tmp_path, other_ray):
    other_port, other = other_ray
    ports = {"RAY_PORT": free_port(), "DASHBOARD_PORT": free_port(), "MLFLOW_PORT": free_port()}
    env = _env(tmp_path, **ports)
    options = [
        "--num-cpus=1", f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]  # fmt: skip
    state = tmp_path / "state"
    try:
        started = _script(env, "start", *options)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert f"MLflow UI      http://127.0.0.1:{ports['MLFLOW_PORT']}" in started.stdout
        assert "warning" not in started.stderr  # MLflow answers
        mlflow = session_processes(int((state / "mlflow.pid").read_text()))
        assert mlflow and not job_runner(mlflow)
        session = int((state / "ray.sid").read_text())
        temp_dir = (state / "ray.temp_dir").read_text().strip()
        assert session_processes(session) and _listening(ports["RAY_PORT"]) and _listening(ports["DASHBOARD_PORT"])
        assert f"Ray logs       {temp_dir}" in started.stdout and Path(temp_dir, "session_latest").exists()

        again = _script(env, "start", *options, timeout=30)  # one head per state folder
        assert again.returncode == 2 and "is still running" in again.stderr and "stop" in again.stderr

        stopped = _script(env, "stop", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert (
            f"stopped the Ray head (session {session}" in stopped.stdout
            and "stopped the MLflow server" in stopped.stdout
        )
        assert session_processes(session) == []
        assert _pids_mentioning(temp_dir) == [] and _pids_mentioning(str(state)) == []
        assert not any(_listening(port) for port in ports.values())
        left = {p.name for p in state.iterdir()}
        assert "mlflow.db" in left and not {"mlflow.pid", "ray.sid", "ray.temp_dir"} & left  # the runs stay
    finally:
        _script(env, "stop", timeout=120)
        for line in started.stdout.splitlines() if "started" in locals() else ():
            if line.startswith("Ray logs"):
                shutil.rmtree(line.split()[-1], ignore_errors=True)  # the head's temp dir, kept by stop for its logs
    # the other instance is untouched: every process of it alive, its GCS answering
    assert set(other) <= set(descendants(os.getpid())) and _listening(other_port)
