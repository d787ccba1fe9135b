"""One rank of the 2-process DistillTask check (run by tests/test_task_distributed.py, gloo on CPU)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _gloo import exit_rank, gloo_group

from isa.build import build_student, build_task, build_teacher
from isa.config import load_config

OVERRIDES = [
    "teacher.name=isa-tiny-ViT",
    "teacher.pretrained=none",
    "student.backbone=mobilenetv3_large_100",
    "token_learner.dim=64",
    "token_learner.heads=4",
    "loss.lar_weight=0",
    "loss.rel_weight=0.5",
]


def losses_and_grads(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss and the gradient of its trainable parameters, on its slice of one global batch."""
    config = load_config(None, OVERRIDES)
    teacher = build_teacher(config.teacher)
    torch.manual_seed(0)
    task = build_task(config, teacher, build_student(config, teacher), rank, world)
    task.eval()  # no dropout; batch norm from running statistics, so the slices do not change the outputs
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 64, 64, generator=generator)
    with torch.no_grad():
        targets = teacher.encode_image(teacher.prepare(images))
    size = images.shape[0] // world
    local = slice(rank * size, (rank + 1) * size)
    loss = task(images[local], targets[local])["loss"]
    grads = torch.autograd.grad(loss, task.trainable_parameters())
    return loss.detach(), torch.cat([g.flatten() for g in grads])


def main(init_file: str, rank: int, out_file: str) -> None:
    with gloo_group(init_file, rank, 2):
        loss, grad = losses_and_grads(rank, 2)
        dist.all_reduce(grad)
        grad /= 2  # DDP's average
        losses = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(losses, loss)
        if rank == 0:
            torch.save({"loss": torch.stack(losses).mean(), "grad": grad}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    exit_rank()
