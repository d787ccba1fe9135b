"""The CPU time and wall time of each test and of each test file: what the suite spends the machine's cores on.

On 2 cores the suite is CPU-bound (its two pytest-xdist workers keep both cores busy), so what a test costs the
suite's wall time is the CPU time of everything it starts (Ray's processes, MLflow's, subprocesses), not its own
wall time: a test that waits leaves its cores to the other worker. This runs pytest in one process (``-n 0``)
and, around each test (setup, call and teardown), takes the machine's busy CPU time from ``/proc/stat``: every
process counts, so run it with no other work on the machine.

    python benchmarks/suite_cpu.py                                # the whole suite: about 30 minutes on 2 cores
    python benchmarks/suite_cpu.py tests/pipelines/test_train.py --top 10 --out train.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
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


@dataclass
class Measured:
    """Per test id: wall seconds and the machine's busy CPU seconds, from its setup's start to its teardown's end."""

    tests: dict[str, tuple[float, float]] = field(default_factory=dict)
    _started: dict[str, tuple[float, float]] = field(default_factory=dict)

    def pytest_runtest_logstart(self, nodeid: str, location: tuple) -> None:
        self._started[nodeid] = (time.perf_counter(), busy_cpu_seconds())

    def pytest_runtest_logfinish(self, nodeid: str, location: tuple) -> None:
        wall, cpu = self._started.pop(nodeid)
        self.tests[nodeid] = (time.perf_counter() - wall, busy_cpu_seconds() - cpu)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["tests"], help="test files or folders (default: tests)")
    parser.add_argument("--top", type=int, default=30, help="tests listed by CPU time (default: 30)")
    parser.add_argument("--out", type=Path, help="also write each test's figures as JSON lines here")
    args = parser.parse_args(argv)
    measured = Measured()
    code = pytest.main([*args.paths, "-n", "0", "-q", "-p", "no:cacheprovider"], plugins=[measured])
    if args.out is not None:
        with args.out.open("w") as out:
            for nodeid, (wall, cpu) in measured.tests.items():
                out.write(json.dumps({"test": nodeid, "wall_s": wall, "cpu_s": cpu}) + "\n")
    print(report(measured.tests, args.top), flush=True)
    return int(code)


if __name__ == "__main__":
    os.chdir(REPO)  # the suite's own settings (pyproject.toml) and paths
    sys.exit(main())
