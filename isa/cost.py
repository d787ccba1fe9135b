"""Query-side cost (docs/method.md §5): parameters, FLOPs and latency of a forward pass, pure torch."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Cost:
    """What one query costs on one path."""

    name: str  # which path: e.g. the student's light path or the teacher image tower
    params: int  # parameters of the module
    gflops: float  # GFLOPs of one forward (a multiply-add counts 2)
    latency_ms: float  # median wall time of one forward, milliseconds


def parameter_count(module: nn.Module) -> int:
    """Number of parameters of ``module`` (trainable or not; shared tensors counted once)."""
    return sum(parameter.numel() for parameter in module.parameters())


def flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` under ``torch.inference_mode()``, as ``FlopCounterMode`` counts them."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return int(counter.get_total_flops())


def latency_ms(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds over ``runs`` calls after ``warmup`` untimed ones.

    When CUDA is in use, each timed call waits for the device to finish.

    Raises:
        ValueError: on runs < 1 or warmup < 0.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be at least 1 and warmup at least 0, got runs={runs}, warmup={warmup}")
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _synchronize()
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            _synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _synchronize() -> None:
    """Wait for queued CUDA work so wall time covers it (GPU kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(
    name: str,
    module: nn.Module,
    example: torch.Tensor,
    runs: int,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> Cost:
    """Parameters, GFLOPs and median latency of one forward of ``module`` on ``example``.

    Args:
        name: label of the path measured.
        module: whose parameters are counted; its mode is left as the caller set it.
        example: the input, already of the batch size and on the device to measure (batch 1 CPU, batch 256 GPU).
        runs: timed calls.
        forward: how to run the path on ``example``; defaults to ``module(example)``.
    """
    forward = forward if forward is not None else module

    def call() -> object:
        return forward(example)

    return Cost(name=name, params=parameter_count(module), gflops=flops(call) / 1e9, latency_ms=latency_ms(call, runs))
