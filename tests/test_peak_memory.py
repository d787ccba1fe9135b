"""The benchmarks' memory sampler: a child's memory counts, shared pages count once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from peak_memory import PeakMemory, descendants

HOLD = (
    "import sys, time\n"
    "block = bytearray(300 * 1024 * 1024)\n"  # zero pages are touched only when written
    "block[::4096] = b'x' * len(block[::4096])\n"
    "print('ready', flush=True)\n"
    "time.sleep(4)\n"
)


def test_a_child_holding_300_mb_raises_the_peak_by_that_much():
    # a shell (the tree's root) runs a Python child that holds 300 MB; "; true" keeps the shell from exec'ing it
    env = {**os.environ, "HOLD": HOLD}
    shell = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" -c "$HOLD"; true'], env=env, stdout=subprocess.PIPE, text=True
    )
    with PeakMemory(root=shell.pid, interval=0.2) as memory:
        assert shell.stdout.readline().strip() == "ready"
        children = [pid for pid in descendants(shell.pid) if pid != shell.pid]
        assert len(children) == 1
        time.sleep(1)
        shell.wait(timeout=30)
        time.sleep(0.5)
    assert memory.peak >= 300 * 2**20
    child_pss = {pid: pss for pss, pid, _ in memory.at_peak}[children[0]]
    assert child_pss >= 300 * 2**20
    assert memory.samples[-1][1] < 50 * 2**20  # the child's memory went with it
    assert f"{child_pss / 1e6:7.0f} MB" in memory.report()
