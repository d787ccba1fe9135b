"""Real multi-process torch.distributed checks: start one process per rank (gloo on the CPU) and, inside each,
join and leave the process group."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(worker: Path, argv_of_rank: Callable[[int], list[str]], world: int = 2, timeout: int = 300) -> None:
    """Run ``python WORKER ARGV`` once per rank, at the same time; every rank must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(worker), *argv_of_rank(rank)], env=env) for rank in range(world)]
    assert [p.wait(timeout=timeout) for p in procs] == [0] * world


@contextmanager
def gloo_group(init_file: str, rank: int, world: int) -> Iterator[None]:
    """A gloo process group for the block; no rank tears gloo down while another still talks to it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    yield
    dist.barrier()
    dist.destroy_process_group()


def exit_rank() -> None:
    """Leave without the interpreter's teardown: gloo's background threads sometimes abort during it (after the
    results are saved), and the exit status must report the check, not the teardown."""
    sys.stdout.flush()
    os._exit(0)
