"""One rank of the 2-process check of ``isa train``'s production step (run by tests/pipelines/test_train_step.py).

Each rank builds its worker, wraps it and steps it with the stage's own functions
(:func:`pipelines.train.loop.build`, ``distribute``, ``step``, ``record``) on its half of every global batch;
nothing here synchronizes anything by hand. Gloo on the CPU; the process group is joined directly (under Ray
Train, ``join_process_group`` finds the address through Ray).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _gloo import exit_rank, gloo_group

from isa.config import load_config
from pipelines.train.loop import build, distribute, record, step

OVERRIDES = [
    "teacher.name=isa-tiny-ViT",
    "teacher.pretrained=none",
    "student.backbone=mobilenetv3_large_100",
    "student.image_size=64",
    "token_learner.dim=64",
    "token_learner.heads=4",
    "loss.lar_weight=0",  # LAR draws its words at random on each rank
    "loss.rel_weight=0.5",  # a second loss over the gathered batch
    "train.global_batch_size=8",
    "train.lr=1e-3",  # Adam moves the temperature by about this much a step
    "train.grad_clip=0.5",
    "train.warmup_fraction=0",
]
STEPS = 4


def batches(steps: int) -> list[dict[str, torch.Tensor]]:
    """The global batches: uint8 views as the data tasks make them, and L2-normalized teacher targets."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        views = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, generator=generator)  # (B, S, S, 3)
        targets = torch.nn.functional.normalize(torch.randn(8, 32, generator=generator), dim=-1)  # (B, D)
        out.append({"view": views, "teacher_emb": targets})
    return out


def run(rank: int, world: int) -> dict[str, object]:
    """This rank's per-step losses, final temperature and flattened student parameters."""
    config = load_config(None, OVERRIDES)
    worker = build(config, rank, world, torch.device("cpu"), total=STEPS)
    distribute(worker)
    worker.task.eval()  # no dropout; batch norm from running statistics: the halves then equal the whole
    size = config.train.global_batch_size // world
    losses = []
    for batch in batches(STEPS):
        step(worker, {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()})
        losses.append(record(worker)["loss"])
    params = torch.cat([p.detach().flatten() for p in worker.task.student_module.parameters()])
    return {"losses": losses, "temperature": float(worker.task.logit_scale.detach()), "params": params}


def main(init_file: str, rank: int, out_file: str) -> None:
    with gloo_group(init_file, rank, 2):
        found = [None, None]
        dist.all_gather_object(found, run(rank, 2))
        if rank == 0:
            torch.save(found, out_file)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    exit_rank()
