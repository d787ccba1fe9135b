"""Rows mixed across batches where the batches already are: a pool on their device (the GPU's, in training).

``isa train`` used Ray Data's local shuffle buffer for this. Ray does it on the host, in the training
process, by concatenating and taking rows of its Arrow blocks: 49 ms of CPU per batch of 256 views of
224 px (``benchmarks/train_ingest.py`` on the 2-core CPU machine, against 16.8 ms unshuffled), beside the
thread that queues the GPU's kernels. Here each batch is drawn from a pool on the batches' own device, with a
random permutation made there too: a gather and a scatter of one batch of rows per step. On a CPU that costs
more than Ray's buffer (``benchmarks/train_ingest.py``), so ``isa train`` uses the pool on a GPU only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

Batch = dict[str, torch.Tensor]  # column -> (B, ...) rows


def mixed_batches(
    batches: Iterable[Batch], pool_batches: int, generator: torch.Generator | None = None
) -> Iterator[Batch]:
    """Batches of the same size whose rows are drawn at random from a pool of the last ``pool_batches`` batches.

    Each incoming batch, once the pool is full, takes the places of the rows that the outgoing batch drew, so
    every row comes out exactly once; at the end the pool is emptied in a random order, in whole batches
    (the rows that do not fill a last batch are dropped, as ``drop_last`` does). ``pool_batches`` 1 keeps the
    rows in place.

    Args:
        batches: batches of one size with the same columns, all on one device.
        pool_batches: how many batches the rows are mixed across.
        generator: random source on the batches' device (None: torch's default one for that device).
    """
    if pool_batches <= 1:
        yield from batches
        return
    pool: Batch | None = None
    size = 0
    for batch in batches:
        if pool is None:
            pool = {name: rows.clone() for name, rows in batch.items()}  # ours to write into
            size, device = _rows(batch), next(iter(batch.values())).device
        elif _rows(pool) < pool_batches * size:  # filling
            pool = {name: torch.cat([pool[name], batch[name]]) for name in pool}
        else:
            drawn = torch.randperm(_rows(pool), device=device, generator=generator)[:size]  # (B,)
            yield {name: rows.index_select(0, drawn) for name, rows in pool.items()}
            for name, rows in pool.items():
                rows.index_copy_(0, drawn, batch[name])
    if pool is None:
        return
    order = torch.randperm(_rows(pool), device=device, generator=generator)
    for start in range(0, _rows(pool) - size + 1, size):
        yield {name: rows.index_select(0, order[start : start + size]) for name, rows in pool.items()}


def _rows(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]
