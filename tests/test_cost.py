"""Query-side cost: parameter count, FLOPs and latency."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from isa.cost import GPU_BATCH, Cost, Path, flops, interleaved_latency_ms, measure_paths, parameter_count


def test_parameter_count_matches_numel_sum():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.LayerNorm(11))
    module[3].weight.requires_grad_(False)  # frozen parameters count too
    assert parameter_count(module) == sum(p.numel() for p in module.parameters())
    assert parameter_count(module) == (7 * 5 + 5) + (3 * 4 * 9 + 4) + 2 * 11


def test_flops_of_a_linear_layer():
    layer = nn.Linear(64, 32)
    x = torch.randn(1, 64)
    assert flops(lambda: layer(x)) == 2 * 64 * 32
    assert flops(lambda: layer(torch.randn(3, 64))) == 3 * 2 * 64 * 32


def test_paths_are_timed_interleaved_in_a_rotating_order():
    calls: list[str] = []

    def path(name: str):
        return lambda: calls.append((name, torch.is_inference_mode_enabled()))

    timings = interleaved_latency_ms([path("A"), path("B"), path("C")], runs=3, warmup=2)
    assert all(inference for _, inference in calls)
    order = "".join(name for name, _ in calls)
    assert order == "AABBCC" + "ABC" + "BCA" + "CAB"  # warm-ups, then each round one later
    assert len(timings) == 3 and all(0 < fastest <= median for fastest, median in timings)
    with pytest.raises(ValueError):
        interleaved_latency_ms([lambda: None], runs=0)


def test_measure_paths_fills_every_field_and_restores_the_threads():
    torch.manual_seed(0)
    light = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    heavy = nn.Linear(64, 256)
    before = torch.get_num_threads()
    seen_threads = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen_threads.append(torch.get_num_threads())
        return heavy(x[:, :64])

    paths = [
        Path("heavy", heavy, lambda batch, device: torch.randn(batch, 128, device=device), forward=forward),
        Path("light", light, lambda batch, device: torch.randn(batch, 64, device=device), extra_params=10),
    ]
    teacher_cost, light_cost = measure_paths(paths, runs=5, threads=1)
    assert torch.get_num_threads() == before and set(seen_threads) == {1}
    assert teacher_cost.name == "heavy" and teacher_cost.params == parameter_count(heavy)
    assert teacher_cost.gflops == pytest.approx(2 * 64 * 256 / 1e9)  # one image, through the custom forward
    assert light_cost.params == parameter_count(light) + 10
    assert light_cost.gflops == pytest.approx(2 * (64 * 32 + 32 * 8) / 1e9)
    for cost in (teacher_cost, light_cost):
        assert isinstance(cost, Cost) and cost.threads == 1 and cost.gpu_batch_ms is None
        assert 0 < cost.latency_min_ms <= cost.latency_ms
    with pytest.raises(dataclasses.FrozenInstanceError):
        light_cost.params = 0  # type: ignore[misc]


def test_the_accelerator_row_times_a_batch_of_256_and_leaves_the_modules_on_the_cpu():
    # the CPU stands in for the GPU here (bf16 autocast exists on both): the same code path, no GPU needed
    seen = []
    module = nn.Linear(64, 8)

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[0], torch.is_autocast_enabled(x.device.type)))
        return module(x)

    path = Path("light", module, lambda batch, device: torch.randn(batch, 64, device=device), forward=forward)
    (cost,) = measure_paths([path], runs=2, threads=1, gpu=torch.device("cpu"))
    assert cost.gpu_batch_ms is not None and cost.gpu_batch_ms > 0
    assert (GPU_BATCH, True) in seen and (1, False) in seen
    assert next(module.parameters()).device.type == "cpu"
