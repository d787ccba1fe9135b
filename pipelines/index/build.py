"""Building a gallery index: FAISS indexes from the cache's ``teacher_emb`` vectors, one Ray task per shard.

Each shard is built by one task from whole cache part files, one part in memory at a time beside the index it
fills, so the driver never reads the gallery. IVF-PQ is trained once, in one task, on a uniform sample of the
whole gallery, and that trained (empty) index is shared by every shard: one coarse quantizer and one codebook
give every shard the same scale of scores and the same meaning of ``nprobe``, training is paid once, and a
shard can be rebuilt alone. HNSW needs no training: each shard builds its own graph.

Approximate kinds are measured at build time against exact search on *probe queries*: gallery vectors drawn
uniformly, plus isotropic Gaussian noise of norm ``recall_noise``, renormalized (queries near the gallery but
not in it, as composed queries are). Half of them tune the search parameter (``nprobe`` or ``efSearch``) when
it is not given: the smallest value whose recall@50 reaches ``recall_target``; the other half measure the
recall recorded in the manifest. Recall@50 is the fraction of the exact top 50 (over every shard) that the
index's top 50 holds, averaged over queries.
"""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from isa.storage import filesystem, write_bytes
from pipelines.artifact import record
from pipelines.index.store import apply_search_params, shard_files

RECALL_K = 50
NPROBE_SCAN = 8  # nprobe is tuned up to nlist / NPROBE_SCAN lists (an eighth of the gallery), or 64
EF_CANDIDATES = (64, 96, 128, 192, 256, 384, 512)  # efSearch below k would act as k
SATURATED = 0.999  # a shard stops trying larger search parameters once its own recall reaches this
SHARD_BITS = 40  # probe results name a vector as shard << SHARD_BITS | row


@dataclass
class ShardResult:
    """What one shard task wrote and measured."""

    shard: int
    count: int
    files: dict[str, dict[str, Any]]  # name -> {"bytes", "sha256"}, as pipelines.artifact records them
    exact: tuple[np.ndarray, np.ndarray] | None = None  # (P, k) scores, (P, k) global ids: the probe queries' truth
    approx: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # search value -> same


def read_part(uri: str, columns: Sequence[str]) -> pa.Table:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=list(columns))


def vectors(table: pa.Table, dim: int) -> np.ndarray:
    """The ``teacher_emb`` column as a (N, D) float32 C-contiguous array."""
    flat = table.column("teacher_emb").combine_chunks().flatten()
    return np.ascontiguousarray(np.asarray(flat.to_numpy(zero_copy_only=False)).reshape(-1, dim), dtype=np.float32)


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def empty_index(kind: str, dim: int, params: dict[str, Any]) -> faiss.Index:
    """An index of ``kind`` with nothing in it (IVF-PQ untrained)."""
    if kind == "exact":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    ivfpq = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT)
    ivfpq.own_fields = True
    quantizer.this.disown()  # the IVF index frees its quantizer
    if not params.get("refine"):
        return ivfpq
    refined = faiss.IndexRefineFlat(ivfpq)
    refined.own_fields = True
    ivfpq.this.disown()
    return refined


def train_ivfpq(sample: np.ndarray, params: dict[str, Any], seed: int) -> bytes:
    """An IVF-PQ index trained on ``sample`` (S, D) float32, empty, serialized."""
    index = empty_index("ivfpq", sample.shape[1], params)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    faiss.downcast_index(ivf).pq.cp.seed = seed
    index.train(sample)
    return serialize(index)


def search_values(kind: str, params: dict[str, Any]) -> list[int]:
    """The search parameter's values to measure, ascending: the given one, or the candidates to tune over."""
    if kind == "ivfpq":
        if params.get("nprobe"):
            return [params["nprobe"]]
        top = max(params["nlist"] // NPROBE_SCAN, min(params["nlist"], 64))
        values = [2**i for i in range(int(math.log2(top)) + 1)]
        return values if values[-1] == top else [*values, top]
    if kind == "hnsw":
        return [params["ef_search"]] if params.get("ef_search") else list(EF_CANDIDATES)
    return []


def search_key(kind: str) -> str:
    return {"ivfpq": "nprobe", "hnsw": "ef_search"}[kind]


def top_k_merge(
    best: tuple[np.ndarray, np.ndarray] | None, scores: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of a running best (P, k) and new candidates (P, c), by score. Ties in any order."""
    if best is not None:
        scores, ids = np.concatenate([best[0], scores], axis=1), np.concatenate([best[1], ids], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def recall_at(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|; (P, k) ids, -1 = empty."""
    total = 0.0
    for found, truth in zip(approx_ids.tolist(), exact_ids.tolist()):
        truth_set = {i for i in truth if i >= 0}
        total += len(truth_set.intersection(found)) / max(1, len(truth_set))
    return total / max(1, len(exact_ids))


def probe_queries(sample: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Gallery vectors (P, D) plus isotropic Gaussian noise of norm ``noise`` (in expectation), renormalized."""
    rng = np.random.default_rng(seed)
    noisy = sample + rng.normal(size=sample.shape).astype(np.float32) * (noise / math.sqrt(sample.shape[1]))
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def read_rows(parts: Sequence[str], part_rows: Sequence[int], positions: np.ndarray, dim: int) -> np.ndarray:
    """The vectors at sorted global ``positions`` of the parts read in order: (len(positions), D) float32."""
    out, start = [], 0
    for uri, rows in zip(parts, part_rows):
        local = positions[(positions >= start) & (positions < start + rows)] - start
        if len(local):
            out.append(vectors(read_part(uri, ["teacher_emb"]), dim)[local])
        start += rows
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


@ray.remote(num_cpus=1)
def prepare(
    parts: list[str], part_rows: list[int], kind: str, dim: int, params: dict[str, Any], options: dict[str, Any]
) -> tuple[bytes | None, np.ndarray]:
    """The shared trained IVF-PQ index (None for other kinds) and the probe queries, from one uniform sample."""
    rng = np.random.default_rng(options["seed"])
    total = sum(part_rows)
    train = params.get("train_size", 0) if kind == "ivfpq" else 0
    probes = min(total, options["recall_queries"])
    wanted = np.sort(rng.choice(total, size=min(total, max(train, probes)), replace=False))
    sample = read_rows(parts, part_rows, wanted, dim)  # (S, D)
    trained = train_ivfpq(sample[rng.permutation(len(sample))[:train]], params, options["seed"]) if train else None
    queries = probe_queries(sample[rng.permutation(len(sample))[:probes]], options["recall_noise"], options["seed"])
    return trained, queries


@ray.remote(num_cpus=1)
def build_shard(
    shard: int,
    parts: list[str],
    out: str,
    kind: str,
    dim: int,
    params: dict[str, Any],
    trained: bytes | None,
    queries: np.ndarray | None,
    target: float,
) -> ShardResult:
    """Build shard ``shard`` from ``parts`` (read one at a time), write its files, measure the probe queries."""
    index = deserialize(trained) if trained is not None else empty_index(kind, dim, params)
    ids: list[str] = []
    uris: list[str] = []
    exact = None
    for uri in parts:
        table = read_part(uri, ["id", "uri", "teacher_emb"])
        block = vectors(table, dim)  # (n, D)
        if queries is not None:
            scores, rows = faiss.knn(queries, block, min(RECALL_K, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            exact = top_k_merge(exact, scores, np.where(rows < 0, -1, rows + len(ids)), RECALL_K)
        index.add(block)
        ids += table["id"].to_pylist()
        uris += table["uri"].to_pylist()
        del table, block
    index_name, rows_name = shard_files(shard)
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string())}), sink)
    files = {index_name: serialize(index), rows_name: sink.getvalue()}
    fs, root = filesystem(out)
    for name, data in files.items():
        write_bytes(fs, posixpath.join(root, name), data)
    result = ShardResult(shard, len(ids), {n: record(d) for n, d in files.items()})
    if queries is None:
        return result
    tag = np.int64(shard) << SHARD_BITS
    result.exact = (exact[0], np.where(exact[1] < 0, -1, exact[1] + tag))
    half = len(queries) // 2
    for value in search_values(kind, params):
        apply_search_params(index, kind, {**params, search_key(kind): value})
        scores, rows = index.search(queries, min(RECALL_K, len(ids)))
        result.approx[value] = (scores, np.where(rows < 0, -1, rows + tag))
        if recall_at(rows[:half], exact[1][:half]) >= max(target, SATURATED):
            break  # larger values cannot do better on this shard
    return result
