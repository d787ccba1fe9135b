"""Search seconds of the gallery index kinds of ``isa index`` against exact ranking, in one run.

Top 50 of ``--gallery`` 768-d unit vectors for ``--queries`` queries, side by side: FAISS exact
(``IndexFlatIP``, what ``isa index --kind exact`` builds), :func:`isa.retrieval.rank` on the same vectors in
float32 and in float16, and the approximate kinds built by the index stage's own functions
(``pipelines.index.build``) with their recall@50 against FAISS exact.

Data: a two-level Gaussian mixture: ``--clusters`` random unit centres; ``--subclusters`` centres, each a
random top centre plus isotropic noise of norm ``--centre-spread``; each gallery vector a random subcluster
centre plus isotropic noise of norm ``--spread``; every level renormalized. Neighbourhoods blend subclusters
of one top cluster, as image embeddings of a catalogue blend related products (uniform random vectors have no
neighbourhoods for an inverted file to find; well separated clusters make any inverted file look perfect).
Queries are the index stage's probe queries: gallery vectors plus noise of norm ``--noise``, renormalized.
The search parameter (nprobe, efSearch) is tuned as ``isa index`` tunes it, on separate tuning queries: the
smallest value reaching ``--target``.

Memory: the vectors are held once, in the exact index; ``rank`` float32 and the IVF-PQ refinement read that
same storage (``faiss.IndexRefine`` over the flat index, which searches as ``IndexRefineFlat`` does); the
float16 copy for ``rank`` is freed before the approximate indexes are built.

    python benchmarks/index_speed.py                                    # 1,000,000 × 768, IVF-PQ
    python benchmarks/index_speed.py --gallery 100000 --kinds ivfpq,hnsw
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
import torch

from isa.retrieval import rank
from pipelines.index import DEFAULTS
from pipelines.index.build import (
    empty_index,
    probe_queries,
    recall_at,
    search_key,
    search_values,
    train_ivfpq,
)
from pipelines.index.store import apply_search_params

K = 50
BLOCK = 65536


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, *args):
    """Wall seconds, process CPU seconds (all threads) and the result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def mixture(args: argparse.Namespace, flat: faiss.IndexFlatIP, picks: np.ndarray) -> np.ndarray:
    """Fill ``flat`` with the gallery, a block at a time; return the rows at sorted positions ``picks``."""
    rng = np.random.default_rng(args.seed)
    tops = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    tops /= np.linalg.norm(tops, axis=1, keepdims=True)
    centres = tops[rng.integers(0, args.clusters, args.subclusters)]
    centres += rng.standard_normal(size=centres.shape, dtype=np.float32) * (args.centre_spread / np.sqrt(args.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    picked = []
    for start in range(0, args.gallery, BLOCK):
        rows = min(BLOCK, args.gallery - start)
        block = centres[rng.integers(0, args.subclusters, rows)]
        block += rng.standard_normal(size=block.shape, dtype=np.float32) * (args.spread / np.sqrt(args.dim))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        flat.add(block)
        local = picks[(picks >= start) & (picks < start + rows)] - start
        picked.append(block[local])
    return np.concatenate(picked)


def stored(flat: faiss.IndexFlatIP) -> np.ndarray:
    """The flat index's vectors (N, D) float32, without a copy."""
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def same_top(found: np.ndarray, exact: np.ndarray) -> float:
    return recall_at(np.asarray(found), exact)


def build(args, kind, flat, sample):
    """Build ``kind`` with the index stage's functions; returns the index, its params, build and training seconds.

    IVF-PQ comes back without refinement (``refine`` 0): :func:`variants` wraps it.
    """
    vectors = stored(flat)
    started = time.perf_counter()
    trained = 0.0
    if kind == "ivfpq":
        params = {"nlist": args.nlist, "m": args.pq_m, "nbits": args.nbits, "nprobe": None, "refine": 0}
        index = faiss.deserialize_index(np.frombuffer(train_ivfpq(sample, params, args.seed), dtype=np.uint8))
        trained = time.perf_counter() - started
    else:
        params = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": None}
        index = empty_index("hnsw", args.dim, params)
    for start in range(0, flat.ntotal, BLOCK):
        index.add(vectors[start : start + BLOCK])
    return index, params, time.perf_counter() - started, trained


def variants(args, kind, index, params, flat):
    """(index, params) per ``--refine`` value for IVF-PQ (one build), else the index itself."""
    if kind != "ivfpq":
        return [(index, dict(params))]
    out = []
    for refine in (float(r) for r in args.refine.split(",")):
        # IndexRefine over the flat index shares its storage: it searches as IndexRefineFlat does, without a copy
        out.append((faiss.IndexRefine(index, flat) if refine else index, {**params, "refine": refine}))
    return out


def tune(args, kind, index, params, tune_queries, tune_exact):
    """The smallest search value reaching ``--target`` on the tuning queries (as isa index tunes); applied."""
    tuning = {}
    for value in search_values(kind, params):
        apply_search_params(index, kind, {**params, search_key(kind): value})
        tuning[value] = recall_at(index.search(tune_queries, K)[1], tune_exact)
        params[search_key(kind)] = value
        if tuning[value] >= args.target:
            break
    apply_search_params(index, kind, params)
    return tuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--tune-queries", type=int, default=500)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, default=100, help="top-level mixture components")
    parser.add_argument("--subclusters", type=int, default=20000, help="second-level components")
    parser.add_argument("--centre-spread", type=float, default=1.0, help="noise norm of a subcluster around its top")
    parser.add_argument("--spread", type=float, default=2.0, help="noise norm of a vector around its subcluster")
    parser.add_argument("--noise", type=float, default=0.5, help="norm of the noise turning gallery rows into queries")
    parser.add_argument("--kinds", default="ivfpq", help="comma-separated: ivfpq, hnsw")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--pq-m", type=int, default=96)
    parser.add_argument("--nbits", type=int, default=8)
    parser.add_argument(
        "--refine", default=str(DEFAULTS["refine"]), help="comma-separated refine factors, one IVF-PQ build; 0: PQ only"
    )
    parser.add_argument("--train-size", type=int, default=0, help="0: 64·nlist")
    parser.add_argument("--hnsw-m", type=int, default=DEFAULTS["hnsw_m"])
    parser.add_argument("--ef-construction", type=int, default=DEFAULTS["ef_construction"])
    parser.add_argument("--target", type=float, default=0.95, help="recall@50 the tuned parameter reaches")
    parser.add_argument("--skip-rank", action="store_true", help="leave isa.retrieval.rank out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"load average before: {load()}")

    rng = np.random.default_rng(args.seed + 1)
    train = min(args.gallery, args.train_size or 64 * args.nlist)
    probes = args.queries + args.tune_queries
    picks = np.sort(rng.choice(args.gallery, size=train + probes, replace=False))
    flat = faiss.IndexFlatIP(args.dim)
    seconds, _, picked = timed(mixture, args, flat, picks)
    picked = picked[rng.permutation(len(picked))]
    sample, sources = picked[:train], picked[train:]
    queries = probe_queries(sources[: args.queries], args.noise, args.seed + 2)
    tune_queries = probe_queries(sources[args.queries :], args.noise, args.seed + 3)
    print(f"gallery {args.gallery} × {args.dim} ({args.clusters} × {args.subclusters} clusters) in {seconds:.1f} s")

    rows = []
    wall, cpu, (_, exact) = timed(flat.search, queries, K)
    rows.append(("faiss exact (IndexFlatIP)", wall, cpu, 1.0))
    if not args.skip_rank:
        gallery = torch.from_numpy(stored(flat))  # a view
        wall, cpu, ranked = timed(rank, torch.from_numpy(queries), gallery, K)
        rows.append(("isa.retrieval.rank float32", wall, cpu, same_top(ranked.numpy(), exact)))
        half = gallery.half()  # (N, D) float16: the one extra copy, freed below
        wall, cpu, ranked = timed(rank, torch.from_numpy(queries), half, K)
        rows.append(("isa.retrieval.rank float16", wall, cpu, same_top(ranked.numpy(), exact)))
        del half, gallery
    tune_exact = flat.search(tune_queries, K)[1]
    for kind in args.kinds.split(","):
        index, params, built, trained = build(args, kind, flat, sample)
        print(f"{kind}: built in {built:.1f} s (training {trained:.1f} s on {len(sample)})")
        for variant, settings in variants(args, kind, index, params, flat):
            tuning = tune(args, kind, variant, settings, tune_queries, tune_exact)
            print(f"  tuning recall@50 {', '.join(f'{v}: {r:.3f}' for v, r in tuning.items())}; params {settings}")
            wall, cpu, (_, found) = timed(variant.search, queries, K)
            extra = f", refine {settings['refine']:g}" if kind == "ivfpq" else ""
            name = f"{kind} ({search_key(kind)} {settings[search_key(kind)]}{extra})"
            rows.append((name, wall, cpu, same_top(found, exact)))
        del index

    exact_wall, exact_cpu = rows[0][1], rows[0][2]
    print(f"\n{args.queries} queries × {args.gallery} gallery, top {K}, {args.threads} threads")
    print("| method | wall s | CPU s | ms/query | vs faiss exact (wall, CPU) | recall@50 vs exact |")
    print("|---|---|---|---|---|---|")
    for name, wall, cpu, recall in rows:
        print(
            f"| {name} | {wall:.2f} | {cpu:.2f} | {1000 * wall / args.queries:.2f} | "
            f"{exact_wall / wall:.1f}×, {exact_cpu / cpu:.1f}× | {recall:.4f} |"
        )
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
