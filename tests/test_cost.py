"""Query-side cost: parameter count, FLOPs and latency."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from isa.cost import Cost, flops, latency_ms, measure, parameter_count


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


def test_latency_ms_positive_and_validated():
    layer = nn.Linear(64, 32)
    x = torch.randn(1, 64)
    assert latency_ms(lambda: layer(x), runs=5) > 0
    calls = []
    latency_ms(lambda: calls.append(torch.is_inference_mode_enabled()), runs=4, warmup=2)
    assert calls == [True] * 6
    with pytest.raises(ValueError):
        latency_ms(lambda: None, runs=0)


def test_measure_fills_every_field():
    module = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    example = torch.randn(1, 64)
    cost = measure("light path", module, example, runs=5)
    assert isinstance(cost, Cost)
    assert cost.name == "light path"
    assert cost.params == parameter_count(module)
    assert cost.gflops == pytest.approx(2 * (64 * 32 + 32 * 8) / 1e9)
    assert cost.latency_ms > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cost.params = 0  # type: ignore[misc]


def test_measure_custom_forward():
    module = nn.Linear(64, 32)
    cost = measure("first half", module, torch.randn(2, 64), runs=3, forward=lambda x: module(x[:1]))
    assert cost.gflops == pytest.approx(2 * 64 * 32 / 1e9)
