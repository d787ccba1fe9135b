"""The query-side cost table of ``isa eval``: each student's image path beside the teacher image tower.

Measured in the driver process on the CPU at batch 1 (docs/method.md §5: parameters, FLOPs, latency).
"""

from __future__ import annotations

import torch

from isa.cost import Cost, measure, parameter_count
from isa.query import QueryEncoder
from isa.teacher import Teacher


def query_costs(teacher: Teacher, checkpoints: list[str], runs: int) -> list[Cost]:
    """The teacher image tower first, then each checkpoint's student (symmetric: its teacher tower included)."""
    torch.manual_seed(0)
    size = teacher.image_size
    pixels = teacher.prepare(torch.rand(1, 3, size, size))  # (1, 3, S, S)
    costs = [measure(f"teacher image tower ({teacher.name})", teacher.model.visual, pixels, runs)]
    for path in checkpoints:
        encoder = QueryEncoder.from_checkpoint(path, teacher)
        side = encoder.config.student.image_size
        images = torch.rand(1, 3, side, side)  # (1, 3, s, s) in [0, 1]
        cost = measure(encoder.name, encoder.student, images, runs)
        if encoder.config.student.backbone == "symmetric":  # the frozen tower is part of its query path
            cost = Cost(cost.name, cost.params + parameter_count(teacher.model.visual), cost.gflops, cost.latency_ms)
        costs.append(cost)
    return costs
