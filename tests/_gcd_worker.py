"""One rank of the real 2-process GCD check (run by tests/test_losses.py, gloo on CPU)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from isa.losses import GCDLoss


def main(init_file: str, rank: int, world_size: int, inputs_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
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
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    # gloo's background threads sometimes abort during interpreter teardown (after the results are saved);
    # leave without running it so the exit status reports the check, not the teardown.
    sys.stdout.flush()
    os._exit(0)
