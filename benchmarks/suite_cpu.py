"""The CPU time and wall time of each test and of each test file: what the suite spends the machine's cores on.

On 2 cores the suite is CPU-bound (its two pytest-xdist workers keep both cores busy), so what a test costs the
suite's wall time is the CPU time of everything it starts (Ray's processes, MLflow's, subprocesses), not its own
wall time: a test that waits leaves its cores to the other worker. This runs pytest in one process (``-n 0``)
and, around each test (setup, call and teardown), takes the machine's busy CPU time from ``/proc/stat``: every
process counts, so run it with no other work on the machine.

    python benchmarks/suite_cpu.py                                # the whole suite: about 30 minutes on 2 cores
    python benchmarks/suite_cpu.py tests/pipelines/test_train.py --top 10 --out train.jsonl

``--processes`` also tells what kind of process the CPU time went to: every process started during the run is
sampled every 0.1 s and grouped by kind (a Ray worker by its title, ``ray::RayTrainWorker``; anything else by its
program and script or module), this process counted too. With ``--workers N`` the suite runs on N pytest-xdist
workers, as CI runs it; the tests then share the cores, so no figures per test are given: each worker's share of
the run instead (its tests, when its last one ended, the files it ran and when), the process table and the totals:

    python benchmarks/suite_cpu.py --workers 2 --processes        # where the CI suite's CPU time goes
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def busy_cpu_seconds() -> float:
    """The machine's CPU time spent outside idle and I/O wait since boot, in seconds (every core, every process)."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(eq=False)  # a pytest plugin: hashable, by identity
class Measured:
    """Per test id: wall seconds and the machine's busy CPU seconds, from its setup's start to its teardown's end;
    and where it ran: the pytest-xdist worker (``main`` without workers), when it started and ended (seconds on
    ``time.perf_counter``, as this process heard of them)."""

    tests: dict[str, tuple[float, float]] = field(default_factory=dict)
    spans: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    _started: dict[str, tuple[float, float]] = field(default_factory=dict)
    _workers: dict[str, str] = field(default_factory=dict)

    def pytest_runtest_logstart(self, nodeid: str, location: tuple) -> None:
        self._started[nodeid] = (time.perf_counter(), busy_cpu_seconds())

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        gateway = getattr(getattr(report, "node", None), "gateway", None)  # set by pytest-xdist on its workers' reports
        self._workers[report.nodeid] = gateway.id if gateway is not None else "main"

    def pytest_runtest_logfinish(self, nodeid: str, location: tuple) -> None:
        wall, cpu = self._started.pop(nodeid)
        now = time.perf_counter()
        self.tests[nodeid] = (now - wall, busy_cpu_seconds() - cpu)
        self.spans[nodeid] = (self._workers.pop(nodeid, "main"), wall, now)


def process_kind(cmdline: list[str]) -> str:
    """What a process is, from its command line: a Ray worker's title without its method and replica id
    (``ray::RayTrainWorker.get_metadata`` -> ``ray::RayTrainWorker``); a Python program's script or module with
    its first argument (``python -m pipelines.cli``, ``mlflow server``); else the program's name."""
    if not cmdline:
        return "?"
    first = cmdline[0]
    if first.startswith("ray::"):
        title = first.split(" ")[0]
        title = re.sub(r"#[0-9a-z]{8}:", ":", title)  # a Serve replica's id
        return re.sub(r"\.\w+$", "", title) if not title.endswith(")") else title
    program = os.path.basename(first.split(" ")[0])  # a title set in place of the arguments: its first word
    if " " in first or not program.startswith("python"):
        return program
    words = cmdline[1:]
    while words and words[0].startswith("-") and words[0] not in ("-m", "-c"):
        words = words[2:] if words[0] in ("-X", "-W") else words[1:]
    if not words:
        return program
    if words[0] == "-c":
        return f"{program} -c"
    if words[0] == "-m":
        return f"{program} -m {words[1]}" if len(words) > 1 else program
    script = os.path.basename(words[0])
    return f"{script} {words[1]}" if len(words) > 1 and not words[1].startswith("-") else script


def _process_cpu(pid: str) -> tuple[str, float] | None:
    """(start time in clock ticks since boot, user + system CPU seconds) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[19], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return [w.decode(errors="replace") for w in cmdline.read().split(b"\0") if w]
    except OSError:
        return []


class Processes:
    """Samples every process started after it starts (and this one) every ``interval`` seconds: the CPU time
    each used, by kind (:func:`process_kind`; a Ray worker under the last title it had other than ``IDLE``).
    A process's CPU time is its last sample's, so a process that lives less than ``interval`` may be missed.

    The sampling itself (a few ms of CPU per sample for a hundred processes) is left out of this process's figure
    and kept in :attr:`sampler_cpu`; it still counts in the machine's busy time.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.seen: dict[tuple[str, str], list] = {}  # (pid, start) -> [CPU s, kind]
        self._before: set[tuple[str, str]] = set()
        self._own: tuple[tuple[str, str], float] | None = None
        self.sampler_cpu = 0.0  # CPU seconds of the sampling thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Processes:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            found = _process_cpu(pid)
            if found is not None:
                self._before.add((pid, found[0]))
                if int(pid) == os.getpid():
                    self._own = ((pid, found[0]), found[1])
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            found = _process_cpu(pid)
            if found is None:
                continue
            key = (pid, found[0])
            own = self._own is not None and key == self._own[0]
            if key in self._before and not own:
                continue
            cpu = found[1] - (self._own[1] + self.sampler_cpu if own else 0.0)
            entry = self.seen.setdefault(key, [0.0, "?"])
            if cpu == entry[0] and entry[1] != "?":
                continue  # it has not run since the last sample: its title is the same
            entry[0] = max(entry[0], cpu)
            kind = process_kind(_cmdline(pid))
            if kind != "?" and not (kind == "ray::IDLE" and entry[1].startswith("ray::")):
                entry[1] = kind

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampler_cpu = time.thread_time()  # this thread's CPU time so far
            self._sample()
        self.sampler_cpu = time.thread_time()

    def by_kind(self) -> dict[str, tuple[float, int]]:
        """Kind -> (CPU seconds, processes), kernel threads (no command line) left out."""
        kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
        for cpu, kind in self.seen.values():
            if kind != "?":
                kinds[kind][0] += cpu
                kinds[kind][1] += 1
        return {kind: (cpu, int(count)) for kind, (cpu, count) in kinds.items()}


def process_report(kinds: dict[str, tuple[float, int]], top: int) -> str:
    """The ``top`` kinds of process by CPU time and the total, as a Markdown table."""
    lines = ["| CPU s | processes | kind |", "|---:|---:|---|"]
    for kind, (cpu, count) in sorted(kinds.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"| {cpu:.1f} | {count} | {kind} |")
    total = sum(cpu for cpu, _ in kinds.values())
    count = sum(n for _, n in kinds.values())
    lines += ["", f"{count} processes: {total:.1f} CPU s"]
    return "\n".join(lines)


def per_file(tests: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float, int]]:
    """Test file -> (wall seconds, CPU seconds, tests)."""
    files: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for nodeid, (wall, cpu) in tests.items():
        totals = files[nodeid.split("::")[0]]
        totals[0], totals[1], totals[2] = totals[0] + wall, totals[1] + cpu, totals[2] + 1
    return {name: (wall, cpu, int(count)) for name, (wall, cpu, count) in files.items()}


def report(tests: dict[str, tuple[float, float]], top: int) -> str:
    """The ``top`` tests by CPU time, every file by CPU time, and the totals, as Markdown tables."""
    lines = ["| CPU s | wall s | cores | test |", "|---:|---:|---:|---|"]
    for nodeid, (wall, cpu) in sorted(tests.items(), key=lambda item: -item[1][1])[:top]:
        lines.append(f"| {cpu:.1f} | {wall:.1f} | {cpu / max(wall, 1e-9):.2f} | {nodeid} |")
    lines += ["", "| CPU s | wall s | tests | file |", "|---:|---:|---:|---|"]
    for name, (wall, cpu, count) in sorted(per_file(tests).items(), key=lambda item: -item[1][1]):
        lines.append(f"| {cpu:.1f} | {wall:.1f} | {count} | {name} |")
    wall = sum(w for w, _ in tests.values())
    cpu = sum(c for _, c in tests.values())
    cores = os.cpu_count() or 1
    lines += [
        "",
        f"{len(tests)} tests: {cpu:.1f} CPU s in {wall:.1f} s one after another; at best {cpu / cores:.0f} s on "
        f"{cores} cores kept busy",
    ]
    return "\n".join(lines)


def timeline(spans: dict[str, tuple[str, float, float]], started: float, min_s: float = 10.0) -> str:
    """Each worker's share of the run, as Markdown tables: its tests and when its last one ended, then the files
    it ran, in order, with their start and end (seconds after ``started``; files shorter than ``min_s`` left out).
    Workers ending far apart leave cores idle at the end of the run; ending together, none waits for the others."""
    workers: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for nodeid, (worker, start, end) in spans.items():
        workers[worker].append((start - started, end - started, nodeid.split("::")[0]))
    lines = ["| worker | tests | in tests s | last end s |", "|---|---:|---:|---:|"]
    for worker, tests in sorted(workers.items()):
        busy = sum(end - start for start, end, _ in tests)
        lines.append(f"| {worker} | {len(tests)} | {busy:.1f} | {max(end for _, end, _ in tests):.1f} |")
    lines += ["", "| worker | start s | end s | file |", "|---|---:|---:|---|"]
    for worker, tests in sorted(workers.items()):
        files: dict[str, list[float]] = {}
        for start, end, name in sorted(tests):
            span = files.setdefault(name, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
        for name, (start, end) in files.items():
            if end - start >= min_s:
                lines.append(f"| {worker} | {start:.1f} | {end:.1f} | {name} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["tests"], help="test files or folders (default: tests)")
    parser.add_argument("--top", type=int, default=30, help="tests listed by CPU time (default: 30)")
    parser.add_argument("--out", type=Path, help="also write each test's figures as JSON lines here (one process)")
    parser.add_argument("--processes", action="store_true", help="also the CPU time by kind of process")
    parser.add_argument("--workers", type=int, default=0, help="pytest-xdist workers (default: 0, one process)")
    parser.add_argument(
        "--min-file-s", type=float, default=10.0, help="with --workers: files shorter than this left out (default: 10)"
    )
    args = parser.parse_args(argv)
    measured = Measured()
    processes = Processes().start() if args.processes else None
    started, busy = time.perf_counter(), busy_cpu_seconds()
    code = pytest.main([*args.paths, "-n", str(args.workers), "-q", "-p", "no:cacheprovider"], plugins=[measured])
    wall, busy = time.perf_counter() - started, busy_cpu_seconds() - busy
    if processes is not None:
        processes.stop()
    if args.out is not None and args.workers == 0:
        with args.out.open("w") as out:
            for nodeid, (test_wall, cpu) in measured.tests.items():
                out.write(json.dumps({"test": nodeid, "wall_s": test_wall, "cpu_s": cpu}) + "\n")
    if args.workers == 0:
        print(report(measured.tests, args.top), flush=True)
    else:
        print(timeline(measured.spans, started, args.min_file_s), flush=True)
    if processes is not None:
        print("\n" + process_report(processes.by_kind(), args.top), flush=True)
        print(f"the sampling of processes: {processes.sampler_cpu:.1f} CPU s (in no row above)", flush=True)
    print(f"\nthe run: {wall:.1f} s, the machine busy {busy:.1f} CPU s ({busy / wall:.2f} cores)", flush=True)
    return int(code)


if __name__ == "__main__":
    os.chdir(REPO)  # the suite's own settings (pyproject.toml) and paths
    sys.exit(main())
