"""The query-side cost table of ``isa eval``: each student's image path beside the teacher image tower.

Measured in the driver process (docs/method.md §5: parameters, FLOPs, latency): batch 1 on the CPU with a fixed
thread count (``eval.latency_threads``), every path timed interleaved with the others; a batch of 256 on a GPU
too when the process has one.
"""

from __future__ import annotations

import torch

from isa.cost import Cost, Path, measure_paths, parameter_count
from isa.query import QueryEncoder
from isa.teacher import Teacher


def query_costs(teacher: Teacher, checkpoints: list[str], runs: int, threads: int) -> list[Cost]:
    """The teacher image tower first, then each checkpoint's student (symmetric: its teacher tower included)."""
    torch.manual_seed(0)
    size = teacher.image_size
    paths = [
        Path(
            f"teacher image tower ({teacher.name})",
            teacher.model.visual,
            lambda batch, device: teacher.prepare(torch.rand(batch, 3, size, size)).to(device),  # (b, 3, S, S)
        )
    ]
    for checkpoint in checkpoints:
        encoder = QueryEncoder.from_checkpoint(checkpoint, teacher)
        side = encoder.config.student.image_size
        symmetric = encoder.config.student.backbone == "symmetric"  # the frozen tower is part of its query path
        paths.append(
            Path(
                encoder.name,
                encoder.student,
                lambda batch, device, side=side: torch.rand(batch, 3, side, side, device=device),  # [0, 1] images
                extra_params=parameter_count(teacher.model.visual) if symmetric else 0,
            )
        )
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    return measure_paths(paths, runs, threads, gpu)
