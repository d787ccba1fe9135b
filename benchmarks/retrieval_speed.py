"""Seconds to rank a large gallery with :func:`isa.retrieval.rank` against a plain matmul + topk, in one run.

Both take the top 50 of ``--gallery`` random L2-normalized 768-d rows for 1,000 random normalized queries.
The plain baseline is what a user would otherwise write: ``(queries @ gallery.T).topk(50)`` in chunks of
1,000 queries, in the input dtype, ties broken arbitrarily. ``rank`` scores in float32 and orders ties by
gallery index.

    python benchmarks/retrieval_speed.py                                   # 1,000,000 rows, float16
    python benchmarks/retrieval_speed.py --gallery 200000 --dtype float32 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from isa.retrieval import rank

DIM = 768
K = 50
BASELINE_CHUNK = 1000


def random_normalized(rows: int, dtype: torch.dtype, seed: int, block: int = 65536) -> torch.Tensor:
    """(rows, DIM) random unit rows in ``dtype``, drawn a block at a time so float32 temporaries stay small."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, DIM, dtype=dtype)
    for start in range(0, rows, block):
        part = torch.randn(min(block, rows - start), DIM, generator=generator)  # (B, DIM) float32
        out[start : start + part.shape[0]] = torch.nn.functional.normalize(part, dim=1)
    return out


def baseline(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> torch.Tensor:
    """The plain way: one matmul and topk per chunk of queries, in the input dtype."""
    parts = [
        (queries[i : i + BASELINE_CHUNK] @ gallery.T).topk(k, dim=1).indices
        for i in range(0, len(queries), BASELINE_CHUNK)
    ]
    return torch.cat(parts)


def timed(fn, *args) -> tuple[float, float, torch.Tensor]:
    """Wall seconds, process CPU seconds (all threads; steadier on a shared machine) and the result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=1_000_000, help="gallery rows")
    parser.add_argument("--queries", type=int, default=1000, help="query rows")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="embedding dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    queries = random_normalized(args.queries, dtype, seed=0)  # (Q, DIM)
    gallery = random_normalized(args.gallery, dtype, seed=1)  # (N, DIM)
    rank(queries[:8], gallery[:4096], K)  # warm up kernels and thread pools
    baseline(queries[:8], gallery[:4096], K)
    rank_s, rank_cpu, ranked = timed(rank, queries, gallery, K)
    base_s, base_cpu, plain = timed(baseline, queries, gallery, K)
    same = sum(set(a) == set(b) for a, b in zip(ranked.tolist(), plain.tolist())) / len(queries)
    print(
        f"{args.queries} queries x {args.gallery} gallery rows, {DIM}-d {args.dtype}, top-{K}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"rank (float32 scores, stable ties): {rank_s:8.2f} s wall {rank_cpu:8.2f} s CPU")
    print(f"plain matmul + topk ({args.dtype}):  {base_s:8.2f} s wall {base_cpu:8.2f} s CPU")
    print(f"ratio rank / plain: {rank_s / base_s:.2f} wall, {rank_cpu / base_cpu:.2f} CPU")
    print(f"queries with the same top-{K} set: {100 * same:.1f}%")


if __name__ == "__main__":
    main()
