"""Query-side cost (docs/method.md §5): parameters, FLOPs and latency of a forward pass, pure torch.

Paths that are compared are timed interleaved (:func:`measure_paths`): every round times each path once, so a
machine that slows down for a while (other work, frequency scaling) slows every path alike and their ratio
stays true; the minimum over rounds is the path's own speed, the median what a user meets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Cost:
    """What one query costs on one path."""

    name: str  # which path: e.g. the student's light path or the teacher image tower
    params: int  # parameters of the module
    gflops: float  # GFLOPs of one forward of one image (a multiply-add counts 2)
    latency_ms: float  # median wall time of one forward, milliseconds (CPU, batch 1)
    latency_min_ms: float | None = None  # the fastest of those forwards
    threads: int | None = None  # CPU threads while timed
    gpu_batch_ms: float | None = None  # median wall time of one forward of a batch of GPU_BATCH on a GPU, if any


GPU_BATCH = 256  # the GPU row's batch (docs/method.md §5)


@dataclass(frozen=True)
class Path:
    """A query path to measure: ``forward(example)``, with ``module``'s parameters (plus ``extra_params``)."""

    name: str
    module: nn.Module
    make_example: Callable[[int, torch.device], torch.Tensor]  # (batch, device) -> the input
    forward: Callable[[torch.Tensor], object] | None = None  # None: module(example)
    extra_params: int = 0  # parameters outside ``module`` that the path runs (the symmetric student's tower)


def parameter_count(module: nn.Module) -> int:
    """Number of parameters of ``module`` (trainable or not; shared tensors counted once)."""
    return sum(parameter.numel() for parameter in module.parameters())


def flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` under ``torch.inference_mode()``, as ``FlopCounterMode`` counts them."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return int(counter.get_total_flops())


def interleaved_latency_ms(
    calls: Sequence[Callable[[], object]], runs: int, warmup: int = 3
) -> list[tuple[float, float]]:
    """(minimum, median) wall time in milliseconds of each call, timed interleaved.

    Each of ``runs`` rounds times every call once, starting one call later each round (A B C, B C A, ...), so
    neither a slow spell of the machine nor the order favours a path. When CUDA is in use, each timed call
    waits for the device to finish.

    Raises:
        ValueError: on runs < 1 or warmup < 0.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be at least 1 and warmup at least 0, got runs={runs}, warmup={warmup}")
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for call in calls:
            for _ in range(warmup):
                call()
        _synchronize()
        for round_ in range(runs):
            for offset in range(len(calls)):
                index = (round_ + offset) % len(calls)
                start = time.perf_counter()
                calls[index]()
                _synchronize()
                times[index].append((time.perf_counter() - start) * 1000)
    return [(min(t), statistics.median(t)) for t in times]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """``torch.set_num_threads(count)`` for the block, then the count as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_paths(paths: Sequence[Path], runs: int, threads: int, gpu: torch.device | None = None) -> list[Cost]:
    """Parameters, GFLOPs and latency of each path: batch 1 on the CPU with ``threads`` threads, the paths timed
    interleaved; on ``gpu`` (when given) also a batch of :data:`GPU_BATCH` under bf16 autocast, interleaved too.

    The modules are left on the CPU, in the mode the caller set.
    """
    examples = [path.make_example(1, torch.device("cpu")) for path in paths]
    calls = [_call(path, example) for path, example in zip(paths, examples)]
    with torch_threads(threads):
        timings = interleaved_latency_ms(calls, runs)
        costs = [
            Cost(
                name=path.name,
                params=parameter_count(path.module) + path.extra_params,
                gflops=flops(call) / 1e9,
                latency_ms=median,
                latency_min_ms=fastest,
                threads=threads,
            )
            for path, call, (fastest, median) in zip(paths, calls, timings)
        ]
    if gpu is None:
        return costs
    try:
        for path in paths:
            path.module.to(gpu)
        batches = [_call(path, path.make_example(GPU_BATCH, gpu)) for path in paths]
        with torch.autocast(gpu.type, dtype=torch.bfloat16):
            gpu_timings = interleaved_latency_ms(batches, runs)
    finally:
        for path in paths:
            path.module.to("cpu")
    return [replace(cost, gpu_batch_ms=median) for cost, (_, median) in zip(costs, gpu_timings)]


def _call(path: Path, example: torch.Tensor) -> Callable[[], object]:
    forward = path.forward if path.forward is not None else path.module
    return lambda: forward(example)


def _synchronize() -> None:
    """Wait for queued CUDA work so wall time covers it (GPU kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
