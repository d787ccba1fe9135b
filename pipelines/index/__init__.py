"""``isa index CACHE OUT``: a FAISS index of an ``isa embed`` cache's teacher embeddings (docs/index.md).

plan (cache parts balanced over shards by their Parquet footers' row counts) -> for IVF-PQ: one task trains
the shared quantizer on a uniform sample; for approximate kinds it also draws the probe queries -> one Ray task
per shard builds, writes and measures it -> recall@50 and the tuned search parameter -> ``_isa_index.json``
written last (``pipelines.artifact``'s format: each file's size and digest).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import posixpath
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from isa.cache import MANIFEST_FILE, Manifest, list_parts, read_manifest
from isa.errors import IsaError
from isa.storage import absolute_uri, count_rows, filesystem, full_uri
from pipelines.artifact import check_output, write_manifest
from pipelines.index.store import FORMAT, FORMAT_VERSION, KINDS, MANIFEST, shard_files
from pipelines.stage import HelpFormatter

DEFAULTS = {"nbits": 8, "refine": 40.0, "hnsw_m": 32, "ef_construction": 80}
KIND_OPTIONS = {
    "ivfpq": ("nlist", "pq_m", "nbits", "nprobe", "refine", "train_size"),
    "hnsw": ("hnsw_m", "ef_search", "ef_construction"),
    "exact": (),
}
OWN_FILE = re.compile(r"^(shard-\d{5}\.(faiss|parquet)|\..*\.tmp-[0-9a-f]+)$")  # what an index folder may hold
POINTS_PER_LIST = 39  # FAISS's k-means wants at least this many training vectors per list


class IndexBuildError(IsaError):
    """The index cannot be built as asked; the message says why."""


@dataclass
class Options:
    """``isa index``'s settings (None: the kind's default, or tuned at build time for nprobe / ef_search)."""

    kind: str = "exact"
    shards: int = 1
    nlist: int | None = None
    pq_m: int | None = None
    nbits: int | None = None
    nprobe: int | None = None
    refine: float | None = None
    train_size: int | None = None
    hnsw_m: int | None = None
    ef_search: int | None = None
    ef_construction: int | None = None
    recall_queries: int = 1000
    recall_noise: float = 0.5
    recall_target: float = 0.95
    seed: int = 0
    overwrite: bool = False


@dataclass
class Plan:
    """What ``check`` found: the cache, its parts, the shards and the resolved parameters."""

    cache: str
    out: str
    options: Options
    manifest: Manifest
    parts: list[str]  # part URIs, sorted
    part_rows: list[int]
    shards: list[list[int]]  # part positions per shard, sorted
    params: dict[str, Any]
    replace: bool  # OUT holds an earlier index (or a killed build's files) to remove first

    @property
    def count(self) -> int:
        return sum(self.part_rows)


def parser() -> argparse.ArgumentParser:
    """``isa index``'s arguments."""
    parser = argparse.ArgumentParser(
        prog="isa index",
        description="Build a FAISS index (inner product) of an isa embed cache's teacher embeddings.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("cache", help="an isa embed cache (usually a gallery cache made with --no-images)")
    parser.add_argument("out", help="index folder to write (local path or fsspec URI)")
    parser.add_argument("--kind", choices=KINDS, default="exact", help="exact (flat), ivfpq or hnsw")
    parser.add_argument("--shards", type=int, default=1, help="shards, each built by a Ray task from whole part files")
    ivf = parser.add_argument_group("ivfpq")
    ivf.add_argument("--nlist", type=int, help="inverted lists (default: 4·sqrt(N), at most N/39)")
    ivf.add_argument("--pq-m", type=int, help="PQ sub-quantizers, must divide D (default: the largest divisor <= D/8)")
    ivf.add_argument("--nbits", type=int, help=f"bits per PQ code (default {DEFAULTS['nbits']})")
    ivf.add_argument("--nprobe", type=int, help="lists searched per query (default: tuned to --recall-target)")
    ivf.add_argument(
        "--refine",
        type=float,
        help=f"re-rank refine·k PQ candidates with exact float32 scores; 0 = PQ only (default {DEFAULTS['refine']})",
    )
    ivf.add_argument("--train-size", type=int, help="training sample (default: min(N, max(64·nlist, 39·2^nbits)))")
    hnsw = parser.add_argument_group("hnsw")
    hnsw.add_argument("--hnsw-m", type=int, help=f"graph neighbours per node (default {DEFAULTS['hnsw_m']})")
    hnsw.add_argument("--ef-search", type=int, help="search beam (default: tuned to --recall-target)")
    hnsw.add_argument("--ef-construction", type=int, help=f"build beam (default {DEFAULTS['ef_construction']})")
    measure = parser.add_argument_group("recall of approximate kinds")
    measure.add_argument("--recall-queries", type=int, default=1000, help="probe queries (half tune, half measure)")
    measure.add_argument("--recall-noise", type=float, default=0.5, help="norm of the noise added to gallery vectors")
    measure.add_argument("--recall-target", type=float, default=0.95, help="recall@50 the tuned parameter reaches")
    parser.add_argument("--seed", type=int, default=0, help="sampling and training seed")
    parser.add_argument("--overwrite", action="store_true", help="replace an index already in OUT")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[str, str, Options]:
    args = vars(parser().parse_args(argv))
    cache, out = absolute_uri(args.pop("cache")), absolute_uri(args.pop("out"))  # as the Ray tasks read them
    return cache, out, Options(**args)


def _divisor_at_most(dim: int, limit: int) -> int:
    return max(d for d in range(1, max(1, limit) + 1) if dim % d == 0)


def resolve_params(options: Options, dim: int, count: int) -> dict[str, Any]:
    """The kind's parameters with defaults filled in (nprobe / ef_search None: tuned at build time).

    Raises:
        IndexBuildError: an option of another kind, or a value FAISS cannot use.
    """
    given = {name for kind, names in KIND_OPTIONS.items() if kind != options.kind for name in names}
    stray = sorted(n for n in given if getattr(options, n) is not None and n not in KIND_OPTIONS[options.kind])
    if stray:
        flags = ", ".join("--" + n.replace("_", "-") for n in stray)
        raise IndexBuildError(f"--kind {options.kind} takes none of {flags} (options of the other kinds)")
    for name in ("nlist", "pq_m", "nbits", "nprobe", "train_size", "hnsw_m", "ef_search", "ef_construction"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise IndexBuildError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if options.kind == "exact":
        return {}
    if options.kind == "hnsw":
        hnsw_m = options.hnsw_m or DEFAULTS["hnsw_m"]
        if hnsw_m < 2:
            raise IndexBuildError(f"--hnsw-m must be at least 2, got {hnsw_m}")
        return {
            "hnsw_m": hnsw_m,
            "ef_construction": options.ef_construction or DEFAULTS["ef_construction"],
            "ef_search": options.ef_search,
        }
    nbits = options.nbits or DEFAULTS["nbits"]
    if nbits > 16:
        raise IndexBuildError(f"--nbits must lie in [1, 16], got {nbits}")
    m = options.pq_m or _divisor_at_most(dim, dim // 8)
    if dim % m:
        raise IndexBuildError(f"--pq-m {m} must divide the embedding width D = {dim}")
    nlist = options.nlist or max(1, min(round(4 * math.sqrt(count)), count // POINTS_PER_LIST))
    if options.nprobe is not None and options.nprobe > nlist:
        raise IndexBuildError(f"--nprobe {options.nprobe} exceeds --nlist {nlist}")
    refine = DEFAULTS["refine"] if options.refine is None else options.refine
    if refine and refine < 1:
        raise IndexBuildError(f"--refine must be 0 (none) or at least 1, got {refine}")
    minimum = max(nlist, 2**nbits)
    train = options.train_size or min(count, max(64 * nlist, POINTS_PER_LIST * 2**nbits))
    if min(train, count) < minimum:
        raise IndexBuildError(
            f"IVF-PQ with nlist {nlist} and {nbits}-bit codes trains on at least {minimum} vectors (one per list and "
            f"one per code), but {'the cache holds' if train >= count else '--train-size is'} {min(train, count)}: "
            "use fewer lists or bits, or --kind exact / hnsw"
        )
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": options.nprobe, "refine": refine, "train_size": train}


def balance(part_rows: Sequence[int], shards: int) -> list[list[int]]:
    """Whole parts per shard, largest first onto the lightest shard; each shard's parts in cache order."""
    loads = [0] * shards
    members: list[list[int]] = [[] for _ in range(shards)]
    for part in sorted(range(len(part_rows)), key=lambda p: (-part_rows[p], p)):
        lightest = min(range(shards), key=lambda s: (loads[s], s))
        loads[lightest] += part_rows[part]
        members[lightest].append(part)
    return [sorted(m) for m in members]


def _check_folders(cache: str, out: str, overwrite: bool) -> bool:
    """Refuse OUT equal to or inside CACHE (or the reverse), or a folder that is not an index; True: replace."""
    cache_fs, cache_path = filesystem(cache)
    out_fs, out_path = filesystem(out)
    if cache_fs.protocol == out_fs.protocol:
        if out_path == cache_path or out_path.startswith(cache_path + "/"):
            raise IndexBuildError(f"OUT {out} is the cache or lies inside it ({cache}): write the index elsewhere")
        if cache_path.startswith(out_path + "/"):
            raise IndexBuildError(f"the cache {cache} lies inside OUT {out}: write the index elsewhere")
    if out_fs.exists(posixpath.join(out_path, MANIFEST_FILE)):
        raise IndexBuildError(f"OUT {out} is an isa embed cache ({MANIFEST_FILE}), not an index folder")
    return check_output(out, MANIFEST, "gallery index", lambda name: bool(OWN_FILE.match(name)), overwrite)


def check(cache: str, out: str, options: Options) -> Plan:
    """Every refusal before Ray starts; returns the plan ``run`` follows.

    Raises:
        IndexBuildError: no cache, an empty cache, a CACHE/OUT mix-up, an OUT that is not an index (or is one,
            without --overwrite), a shard count outside [1, parts], parameters FAISS cannot use, or too few
            vectors to train IVF-PQ.
    """
    fs, root = filesystem(cache)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise IndexBuildError(
            f"{posixpath.join(cache.rstrip('/'), MANIFEST_FILE)} does not exist: CACHE must be an isa embed cache"
        )
    parts = list_parts(fs, root)
    rows = [count_rows(fs, [p]) for p in parts]
    kept = [(full_uri(fs, p), n) for p, n in zip(parts, rows) if n > 0]
    if not kept:
        raise IndexBuildError(f"the cache {cache} holds no embeddings (no rows in its part-*.parquet files)")
    if not 1 <= options.shards <= len(kept):
        raise IndexBuildError(
            f"--shards must lie in [1, {len(kept)}]: each shard is built from whole cache part files and {cache} "
            f"has {len(kept)} non-empty ones"
        )
    if options.kind not in KINDS:
        raise IndexBuildError(f"--kind must be one of {', '.join(KINDS)}, got {options.kind!r}")
    if not 0 < options.recall_target <= 1 or options.recall_queries < 2 or options.recall_noise < 0:
        raise IndexBuildError("--recall-target must lie in (0, 1], --recall-queries be at least 2, --recall-noise >= 0")
    count = sum(n for _, n in kept)
    params = resolve_params(options, manifest.embed_dim, count)
    replace = _check_folders(cache, out, options.overwrite)
    return Plan(
        cache=cache,
        out=out,
        options=options,
        manifest=manifest,
        parts=[u for u, _ in kept],
        part_rows=[n for _, n in kept],
        shards=balance([n for _, n in kept], options.shards),
        params=params,
        replace=replace,
    )


def _clear(out: str) -> None:
    """Remove an earlier index (manifest first, so the folder stops being an index at once)."""
    fs, root = filesystem(out)
    names = [p for p in fs.ls(root, detail=False)]
    for path in sorted(names, key=lambda p: posixpath.basename(p) != MANIFEST):
        fs.rm(path)


def _merged(results: Sequence[Any], pick) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's (P, k) probe results merged into the overall (P, 50) by score."""
    from pipelines.index.build import RECALL_K, top_k_merge

    best = None
    for result in results:
        scores, ids = pick(result)
        best = top_k_merge(best, scores, ids, RECALL_K)
    return best


def measure(kind: str, results: Sequence[Any], target: float) -> tuple[int, float, dict[int, float]]:
    """The search value chosen (smallest reaching ``target`` on the tuning half), its recall@50 on the other half.

    Returns:
        value, recall@50 on the measuring half, {value: recall@50 on the tuning half} for every value tried.
    """
    from pipelines.index.build import recall_at

    exact = _merged(results, lambda r: r.exact)[1]  # (P, 50)
    half = len(exact) // 2
    common = sorted(set.intersection(*(set(r.approx) for r in results)))  # values every shard searched with
    tuning: dict[int, float] = {}
    chosen = common[-1]
    for value in common:
        approx = _merged(results, lambda r, v=value: r.approx[v])[1]
        tuning[value] = recall_at(approx[:half], exact[:half])
        if tuning[value] >= target:
            chosen = value
            break
    approx = _merged(results, lambda r: r.approx[chosen])[1]
    return chosen, recall_at(approx[half:], exact[half:]), tuning


def run(cache: str, out: str, options: Options) -> dict[str, Any]:
    """Build the index; returns its manifest. Joins the running Ray instance, else starts or joins one."""
    import ray

    from pipelines.index.build import build_shard, prepare, search_key
    from pipelines.stage import init_ray

    plan = check(cache, out, options)
    init_ray()  # after every refusal
    started = time.perf_counter()
    if plan.replace:
        _clear(out)
    kind, dim, params = options.kind, plan.manifest.embed_dim, dict(plan.params)
    trained = queries = None
    if kind != "exact":
        trained, queries = ray.get(
            prepare.remote(plan.parts, plan.part_rows, kind, dim, params, dataclasses.asdict(options))
        )
    trained, queries_ref = ray.put(trained), ray.put(queries)  # stored once, read by every shard task
    tasks = [
        build_shard.remote(
            shard, [plan.parts[p] for p in members], out, kind, dim, params, trained, queries_ref, options.recall_target
        )
        for shard, members in enumerate(plan.shards)
    ]
    results = sorted(ray.get(tasks), key=lambda r: r.shard)
    recall = None
    probe = None
    if kind != "exact":
        value, recall, tuning = measure(kind, results, options.recall_target)
        key = search_key(kind)
        params[key] = value
        probe = {
            "queries": len(queries) - len(queries) // 2,
            "tuning_queries": len(queries) // 2,
            "noise": options.recall_noise,
            "seed": options.seed,
            "target": options.recall_target,
            "tuned": None if getattr(options, key) else {str(v): r for v, r in tuning.items()},
            "queries_are": "gallery vectors plus isotropic gaussian noise of this norm, renormalized",
        }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "metric": "inner_product",
        "dim": dim,
        "count": sum(r.count for r in results),
        "dtype": "float32",
        "shards": [
            {"index": shard_files(r.shard)[0], "rows": shard_files(r.shard)[1], "count": r.count} for r in results
        ],
        "teacher": plan.manifest.teacher,
        "cache": cache,
        "params": params,
        "recall_at_50": recall,
        "recall_probe": probe,
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    recorded = {name: entry for r in results for name, entry in r.files.items()}
    write_manifest(out, MANIFEST, recorded, manifest)  # last: the folder is now an index
    return manifest


def summary_line(manifest: dict[str, Any]) -> str:
    params = ", ".join(f"{k} {v}" for k, v in manifest["params"].items())
    recall = "" if manifest["recall_at_50"] is None else f" · recall@50 {manifest['recall_at_50']:.4f}"
    probe = manifest.get("recall_probe") or {}
    if probe.get("tuned") and max(probe["tuned"].values()) < probe["target"]:
        more = "--refine or --pq-m" if manifest["kind"] == "ivfpq" else "--hnsw-m or --ef-construction"
        recall += f" (no value tried reached the target {probe['target']}: raise {more})"
    return (
        f"{manifest['kind']} · {len(manifest['shards'])} shard(s) · {manifest['count']} vectors of "
        f"{manifest['dim']}{f' · {params}' if params else ''}{recall} · {manifest['build_seconds']:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    cache, out, options = parse_args(argv)
    manifest = run(cache, out, options)  # refusals first, then Ray
    print(f"isa index: {summary_line(manifest)}")
    print(f"index: {out}")
    return 0
