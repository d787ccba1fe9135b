"""A Ray cluster of several nodes on this one machine, started as the shipped manifests start one: a head with no
CPUs (``ray start --head --num-cpus=0``) and worker nodes that join it (``ray start --address=...``) with CPUs of
their own; token authentication on, every port free and of its own, every node with its own temp dir.

Each node is started in a session of its own (its ``ray start`` run under ``setsid``), so its processes are told
from those of every other Ray instance on the machine (other tests', other users'): :meth:`LocalCluster.kill`
kills one node (its raylet first, as a lost machine would), :meth:`LocalCluster.stop` stops what it started, and
neither touches anything else.

The nodes share this machine's disk, as the nodes of a real cluster share network storage: a local folder given
to a stage counts as shared storage. :attr:`LocalCluster.head_only` is the one exception: a folder of the head's
own disk, which the worker nodes do not see (each runs in a mount namespace with an empty tmpfs over it), as the
head's local disk is not seen by the other machines of a real cluster.

The head declares a node dead after 5 failed health checks 1 s apart (Ray's defaults: 3 s apart, about 15 s per
lost node); a live node under load still answers within Ray's 10 s check timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _ports import free_port

BIN = Path(sys.executable).parent
# the GCS's health checks of the nodes (Ray system config, read at ``ray start --head``)
HEALTH_CHECKS = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 5}'


@dataclass
class Node:
    """One ``ray start`` of the cluster: its session (the pid of its ``setsid ray start``) and temp dir."""

    name: str
    session: int
    temp_dir: str
    num_cpus: int


def session_processes(sid: int) -> list[int]:
    """The live processes of session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
                    pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass
    return pids


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parent_of(pid: int) -> int:
    """The pid of a process's parent (from ``/proc/PID/stat``: after the name in parentheses, its state, then it)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> set[int]:
    """``root`` and every live process below it (a local Ray instance's processes are below the driver that
    started it: its raylet, and the raylet's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":  # state, ppid
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass
    tree, stack = set(), [root]
    while stack:
        pid = stack.pop()
        tree.add(pid)
        stack.extend(children.get(pid, []))
    return tree


def stop_ray_processes(processes: Callable[[], list[int]], grace: float = 10) -> None:
    """Stop the processes of one Ray node (``processes()``: those alive now) in ``ray stop``'s order: its raylet
    first, then every other process, its GCS (a head's) last, each SIGTERM waited for; SIGKILL for what is left
    after ``grace`` seconds (``grace=0``: SIGKILL at once, as a lost machine's). Out of that order a head lingers:
    its autoscaler monitor, stopped after the GCS, waits for the GCS to take its last report."""

    def group(pid: int) -> str:
        executable = command_line(pid).split(" ")[0].rsplit("/", 1)[-1]
        return executable if executable in ("raylet", "gcs_server") else "other"

    deadline = time.monotonic() + grace
    for name in ("raylet", "other", "gcs_server") if grace > 0 else ():
        pids = [pid for pid in processes() if group(pid) == name]
        _signal(pids, signal.SIGTERM)
        while set(pids) & set(processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
    _signal(processes(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes() and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def processes_titled(name: str, below: int | None = None) -> list[int]:
    """Ray worker processes whose process title (``ray::...``) names ``name``; with ``below``, only those below
    that process (:func:`descendants`: the Ray instance it started, not another one on this machine)."""
    allowed = descendants(below) if below is not None else None
    pids = []
    for entry in Path("/proc").iterdir():
        title = command_line(int(entry.name)) if entry.name.isdigit() else ""
        if title.startswith("ray::") and name in title.split(" ")[0]:
            if allowed is None or int(entry.name) in allowed:
                pids.append(int(entry.name))
    return pids


@dataclass
class LocalCluster:
    """A head with no CPUs and worker nodes, all on loopback; :meth:`env` is a driver's environment for it."""

    root: Path
    base_env: dict[str, str]
    head_only: Path = field(init=False)
    port: int = field(init=False, default=0)
    head: Node | None = field(init=False, default=None)
    workers: list[Node] = field(init=False, default_factory=list)
    started: int = field(init=False, default=0)  # worker nodes started so far (their names)

    def __post_init__(self) -> None:
        self.head_only = self.root / "head-only"
        self.head_only.mkdir(parents=True, exist_ok=True)
        home = self.root / "home"  # the cluster's token: ~/.ray/auth_token of this HOME
        home.mkdir(exist_ok=True)
        self.base_env = {k: v for k, v in self.base_env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.base_env.update(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{self.base_env['PATH']}")
        # a worker process slow to start on a busy machine (this one's cores are shared) is waited for, not
        # killed and started again after Ray's default 60 s
        self.base_env.setdefault("RAY_worker_register_timeout_seconds", "300")
        subprocess.run(
            [str(BIN / "ray"), "get-auth-token", "--generate"], env=self.base_env, check=True, capture_output=True
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """A driver's environment: the cluster's address and token, the S3 settings the nodes have."""
        return {**self.base_env, "RAY_ADDRESS": self.address, **extra}

    def _start(self, name: str, options: list[str], num_cpus: int, hide_head_only: bool) -> Node:
        """``ray start`` of one node in a session of its own; raises RuntimeError with its output if it fails."""
        temp_dir = tempfile.mkdtemp(prefix=f"isa-{name}-", dir="/tmp")  # short: Ray's socket paths have a limit
        command = [
            str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}", f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}", *options,
        ]  # fmt: skip
        if hide_head_only:  # another machine: the head's own folder is not there
            mount = 'mount -t tmpfs isa-other-machine "$0" && exec "$@"'
            command = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                mount,
                str(self.head_only),
                *command,
            ]
        # Ray waits 30 s (not configurable) for a new node's agents to register with the head; on a machine whose
        # cores are busy with other tests they take longer, so the nodes run at a higher priority (where allowed)
        starter = subprocess.Popen(
            ["nice", "-n", "-15", *command],
            env=self.base_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        node = Node(name, starter.pid, temp_dir, num_cpus)
        try:
            output = starter.communicate(timeout=180)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            starter.kill()
            output = starter.communicate()[0].decode(errors="replace") + "\n(ray start did not end in 180 s)"
        if starter.returncode:
            self._stop_node(node)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise RuntimeError(f"ray start of {name} failed:\n{output[-3000:]}")
        return node

    def _start_again(self, start: Callable[[], Node], attempts: int = 4) -> Node:
        """A node whose agents do not come up within Ray's start-up wait (30 s, not configurable: a machine whose
        cores are busy with other tests) is stopped and started again, up to ``attempts`` times."""
        for attempt in range(1, attempts + 1):
            try:
                return start()
            except RuntimeError:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def start_head(self) -> Node:
        def start() -> Node:
            self.port = free_port()
            options = [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
                f"--system-config={HEALTH_CHECKS}",
            ]
            return self._start("head", options, 0, hide_head_only=False)

        self.head = self._start_again(start)
        return self.head

    def add_worker(self, num_cpus: int) -> Node:
        """A worker node that joins the head, registered with it before this returns."""
        self.started += 1
        name = f"worker{self.started}"
        node = self._start_again(lambda: self._start(name, [f"--address={self.address}"], num_cpus, True))
        self.workers.append(node)
        return node

    def processes(self, node: Node) -> list[int]:
        """The node's processes: those of its session and any naming its temp dir."""
        pids = set(session_processes(node.session))
        pids.update(
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and node.temp_dir in command_line(int(p.name))
        )
        return sorted(pids)

    def node_of(self, pid: int) -> Node | None:
        """The worker node a process belongs to."""
        return next((node for node in self.workers if pid in self.processes(node)), None)

    def raylet(self, node: Node) -> int:
        (pid,) = [p for p in session_processes(node.session) if command_line(p).split(" ")[0].endswith("/raylet")]
        return pid

    def kill(self, node: Node) -> None:
        """The node is lost: its raylet is killed (SIGKILL), then whatever else of it is left."""
        os.kill(self.raylet(node), signal.SIGKILL)
        self._stop_node(node, grace=0)
        self.workers.remove(node)

    def _stop_node(self, node: Node, grace: float = 10) -> None:
        """:func:`stop_ray_processes` of the node's processes."""
        stop_ray_processes(lambda: self.processes(node), grace)

    def stop(self) -> None:
        for node in [*self.workers, *([self.head] if self.head else [])]:  # the head last, as ``ray stop`` does
            self._stop_node(node)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.workers, self.head = [], None


def local_cluster(root: Path, env: dict[str, str], workers: list[int]) -> Iterator[LocalCluster]:
    """A started cluster (a head with no CPUs, a worker node of each CPU count in ``workers``), stopped after."""
    cluster = LocalCluster(root, env)
    try:
        cluster.start_head()
        for num_cpus in workers:
            cluster.add_worker(num_cpus)
        yield cluster
    finally:
        cluster.stop()
