"""One rank of the real 2-process GCD check (run by tests/test_losses.py, gloo on CPU)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _gloo import exit_rank, gloo_group

from isa.losses import GCDLoss


def main(init_file: str, rank: int, world_size: int, inputs_file: str, out_file: str) -> None:
    with gloo_group(init_file, rank, world_size):
        data = torch.load(inputs_file, weights_only=True)
        weight = data["weight"].clone().requires_grad_(True)
        x, g = data["x"].chunk(world_size)[rank], data["g"].chunk(world_size)[rank]
        query = F.normalize(x @ weight, dim=-1)
        loss = GCDLoss(rank, world_size)(query, g, data["scale"])
        loss.backward()
        grad = weight.grad.clone()
        dist.all_reduce(grad)
        grad /= world_size  # what DDP does to the gradients
        losses = [torch.zeros(()) for _ in range(world_size)]
        dist.all_gather(losses, loss.detach())
        torch.save({"loss": torch.stack(losses).mean(), "grad": grad}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    exit_rank()
