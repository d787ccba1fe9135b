"""The benchmarks' memory sampler: a child's memory counts, shared pages count once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peak_memory import PeakMemory, descendants, pss_bytes  # noqa: E402

HOLD = (
    "import sys, time\n"
    "block = bytearray(300 * 1024 * 1024)\n"  # zero pages are touched only when written
    "block[::4096] = b'x' * len(block[::4096])\n"
    "print('ready', flush=True)\n"
    "time.sleep(4)\n"
)


def test_a_child_holding_300_mb_raises_the_peak_by_that_much():
    with PeakMemory(interval=0.2) as memory:
        before = pss_bytes(memory.root)
        child = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        assert child.pid in descendants(memory.root)
        time.sleep(1)
        child.wait(timeout=30)
    assert memory.peak - before >= 300 * 2**20
    child_pss = {pid: pss for pss, pid, _ in memory.at_peak}[child.pid]
    assert child_pss >= 300 * 2**20
    assert memory.samples[-1][1] < memory.peak - 250 * 2**20  # the child's memory went with it
    assert f"{child_pss / 1e6:7.0f} MB" in memory.report()
