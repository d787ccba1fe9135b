"""Peak memory of a process tree (this process, the Ray processes it starts, their workers), sampled.

Memory is the sum of each process's PSS (proportional set size, from ``/proc/PID/smaps_rollup``): pages
shared between processes, such as torch's libraries or Ray's object store, count once in total, split
among the processes that map them. Linux only.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the parent pid is the 4th field, after the command in parentheses (which may hold spaces)
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[parent].append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def pss_bytes(pid: int) -> int:
    """PSS of one process (0 when it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def process_name(pid: int) -> str:
    """The command line's first words (Ray names its workers ``ray::WHAT``)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:60].strip()
    except OSError:
        return "?"


class PeakMemory:
    """Samples the tree's PSS in a background thread.

    Afterwards: ``peak`` (bytes), ``samples`` (seconds, bytes), ``snapshots`` (each sample's processes:
    bytes, pid, name, largest first) and ``at_peak`` (the peak sample's).

        with PeakMemory() as memory:
            work()
        print(memory.peak / 1e9)
    """

    def __init__(self, root: int | None = None, interval: float = 0.5) -> None:
        self.root = root or os.getpid()
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.snapshots: list[list[tuple[int, int, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def peak(self) -> int:
        return max((value for _, value in self.samples), default=0)

    @property
    def at_peak(self) -> list[tuple[int, int, str]]:
        return self.peak_between(0, float("inf"))[1]

    def _sample(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            processes = [(pss_bytes(pid), pid) for pid in descendants(self.root)]
            self.snapshots.append(sorted(((pss, pid, process_name(pid)) for pss, pid in processes), reverse=True))
            self.samples.append((time.monotonic() - started, sum(pss for pss, _ in processes)))
            self._stop.wait(self.interval)

    def peak_between(self, start: float, end: float) -> tuple[int, list[tuple[int, int, str]]]:
        """The largest sample taken in [start, end) seconds and its processes (0 and [] when none)."""
        window = [(total, i) for i, (at, total) in enumerate(self.samples) if start <= at < end]
        if not window:
            return 0, []
        total, i = max(window)
        return total, self.snapshots[i]

    def report(self, top: int = 12, start: float = 0, end: float = float("inf")) -> str:
        """The peak (between ``start`` and ``end`` seconds) and its largest processes, one per line."""
        total, processes = self.peak_between(start, end)
        lines = [f"peak {total / 1e9:.2f} GB over {len(processes)} processes; the largest:"]
        lines += [f"  {pss / 1e6:7.0f} MB  {name}" for pss, _, name in processes[:top]]
        return "\n".join(lines)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
