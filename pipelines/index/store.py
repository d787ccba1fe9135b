"""Searching a gallery index made by ``isa index`` (docs/index.md): one shard, or every shard in one process.

```
INDEX/
  _isa_index.json       the manifest (written last): kind, dim, count, shards, teacher, params, recall_at_50
  shard-00000.faiss     faiss.serialize_index bytes
  shard-00000.parquet   id, uri: row i is vector i of that shard
```

No Ray is needed to search. Scores are inner products of float32 vectors (the teacher's embeddings are
L2-normalized, so they are cosines). Results are ordered best first; equal scores go to the lower (shard, row).
Index files are read through :mod:`pipelines.artifact` (sizes and digests checked) and deserialized by FAISS,
never unpickled.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipelines.artifact import ArtifactError, read_artifact, read_file

MANIFEST = "_isa_index.json"
FORMAT = "isa-gallery-index"
FORMAT_VERSION = 1
KINDS = ("exact", "ivfpq", "hnsw")


@dataclass
class Hit:
    """One gallery image found for a query."""

    id: str  # the cache's content id (sha256 of the image file)
    uri: str  # where the image was read from
    score: float  # inner product with the query


def shard_files(shard: int) -> tuple[str, str]:
    """The names of shard ``shard``'s index and rows files."""
    return f"shard-{shard:05d}.faiss", f"shard-{shard:05d}.parquet"


def read_index_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a complete gallery index.

    Raises:
        ArtifactError: no manifest, a file missing or cut short, or a folder of another format or version.
    """
    manifest = read_artifact(uri, MANIFEST, "gallery index")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{uri} holds {manifest.get('format')!r} version {manifest.get('format_version')!r}, not a "
            f"{FORMAT} of version {FORMAT_VERSION}: rebuild it with this version's 'isa index'"
        )
    return manifest


def apply_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    """Set an approximate index's search-time parameters (nprobe, refine factor, efSearch) from its manifest."""
    if kind == "ivfpq":
        if params.get("refine"):
            refine = faiss.downcast_index(index)
            refine.k_factor = float(params["refine"])
            index = refine.base_index
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])


def order_results(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's results by descending score, equal scores by ascending row, empty slots (-1) last.

    Args:
        scores: (Q, K) float32; rows: (Q, K) int64, -1 where nothing was found.
    """
    empty = rows < 0
    keys_score = np.where(empty, np.inf, -scores)  # (Q, K) ascending = best first
    keys_row = np.where(empty, np.iinfo(np.int64).max, rows)
    order = np.lexsort((keys_row, keys_score), axis=-1)  # (Q, K)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


class IndexShard:
    """One shard of a gallery index: the FAISS index and its rows' ids and URIs."""

    def __init__(self, index: faiss.Index, ids: list[str], uris: list[str], shard: int, manifest: dict[str, Any]):
        self.index = index
        self.ids = ids
        self.uris = uris
        self.shard = shard
        self.manifest = manifest
        self._rows: dict[str, int] | None = None  # id -> row, made on first use

    @classmethod
    def load(cls, uri: str, shard: int, threads: int = 0, manifest: dict[str, Any] | None = None) -> IndexShard:
        """Read shard ``shard`` of the index at ``uri``.

        Args:
            threads: FAISS's OpenMP threads for this process (0 = leave as is).
            manifest: the index's manifest when already read by :func:`read_index_manifest`.

        Raises:
            ArtifactError: the index is missing, incomplete or altered, or has no such shard.
        """
        manifest = manifest or read_index_manifest(uri)
        shards = manifest["shards"]
        if not 0 <= shard < len(shards):
            raise ArtifactError(f"gallery index {uri} has {len(shards)} shards; there is no shard {shard}")
        entry = shards[shard]
        if threads > 0:
            faiss.omp_set_num_threads(threads)
        data = read_file(uri, entry["index"], manifest)
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as error:
            raise ArtifactError(f"gallery index {uri}: {entry['index']} is not a FAISS index ({error})") from None
        rows = pq.read_table(io.BytesIO(read_file(uri, entry["rows"], manifest)), columns=["id", "uri"])
        if index.ntotal != entry["count"] or rows.num_rows != entry["count"] or index.d != manifest["dim"]:
            raise ArtifactError(
                f"gallery index {uri}: shard {shard} holds {index.ntotal} vectors of width {index.d} and "
                f"{rows.num_rows} rows; its manifest says {entry['count']} of width {manifest['dim']}"
            )
        apply_search_params(index, manifest["kind"], manifest.get("params", {}))
        return cls(index, rows["id"].to_pylist(), rows["uri"].to_pylist(), shard, manifest)

    @property
    def count(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows per query.

        Args:
            queries: (Q, D) float, L2-normalized like the gallery.

        Returns:
            scores (Q, k') float32 and rows (Q, k') int64 with k' = min(k, count), best first, equal scores by
            lower row; an approximate index may find fewer than k' for a query: those slots hold row -1 and
            score -inf.

        Raises:
            ValueError: k < 1 or queries not (Q, D).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries must be (Q, {self.index.d}), got {queries.shape}")
        scores, rows = self.index.search(queries, min(k, self.count))  # (Q, k'), (Q, k')
        scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
        return order_results(scores, rows.astype(np.int64))

    def image_uri(self, image_id: str) -> str | None:
        """The URI of a gallery image of this shard by id, None when the shard does not hold it."""
        if self._rows is None:
            self._rows = {image_id: row for row, image_id in enumerate(self.ids)}
        row = self._rows.get(image_id)
        return None if row is None else self.uris[row]

    def hits(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """:meth:`search` as ids, URIs and scores: one list per query, best first."""
        scores, rows = self.search(queries, k)
        return [
            [Hit(self.ids[r], self.uris[r], float(s)) for s, r in zip(row_scores, row_rows) if r >= 0]
            for row_scores, row_rows in zip(scores.tolist(), rows.tolist())
        ]


def merge_hits(per_shard: Sequence[list[list[Hit]]], k: int) -> list[list[Hit]]:
    """The ``k`` best hits per query over every shard's best-first hits, equal scores by lower (shard, row).

    Args:
        per_shard: for each shard (in shard order), for each query, its hits best first with equal scores by
            lower row (as :meth:`IndexShard.hits` gives).
    """
    if not per_shard:
        return []
    merged = []
    for query in range(len(per_shard[0])):
        keyed = [
            (-hit.score, shard, position, hit)
            for shard, hits in enumerate(per_shard)
            for position, hit in enumerate(hits[query])
        ]
        keyed.sort(key=lambda item: item[:3])
        merged.append([item[3] for item in keyed[:k]])
    return merged


class GalleryIndex:
    """Every shard of a gallery index in one process."""

    def __init__(self, uri: str, manifest: dict[str, Any], shards: list[IndexShard]):
        self.uri = uri
        self.manifest = manifest
        self.shards = shards

    @classmethod
    def load(cls, uri: str, threads: int = 0) -> GalleryIndex:
        """Read every shard of the index at ``uri``.

        Raises:
            ArtifactError: the index is missing, incomplete or altered.
        """
        manifest = read_index_manifest(uri)
        shards = [IndexShard.load(uri, s, threads, manifest) for s in range(len(manifest["shards"]))]
        return cls(uri, manifest, shards)

    @property
    def count(self) -> int:
        return sum(shard.count for shard in self.shards)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The ``k`` best gallery images per query (Q, D), best first."""
        return merge_hits([shard.hits(queries, k) for shard in self.shards], k)

    def image_uri(self, image_id: str) -> str | None:
        """The URI of a gallery image by id, None when the index has no such image."""
        return next((uri for shard in self.shards if (uri := shard.image_uri(image_id)) is not None), None)
