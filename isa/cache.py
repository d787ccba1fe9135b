"""The teacher cache: schema, shard files and the ``_isa_cache.json`` manifest (docs/cache.md).

```
CACHE/
  _isa_cache.json             teacher fingerprint, D, G, dtype, image size, schema version, counts
  part-<20 hex>.parquet       id, uri, width, height, image?, teacher_emb, teacher_local?
  _errors/part-<20 hex>.parquet      uri, reason            (one row per rejected input)
  _duplicates/part-<20 hex>.parquet  uri, id, duplicate_of  (same bytes as an input already cached)
```

Shard names are a hash of the URIs they hold, so writing the same work twice writes the same file; every
file is written whole (a temporary name renamed into place on local disks, a single object upload on
object stores), so a killed run leaves only complete shards. Readers take the ``part-*.parquet`` files;
names starting with ``_`` or ``.`` are not data.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from isa.errors import IsaError
from isa.storage import write_bytes

SCHEMA_VERSION = 1
MANIFEST_FILE = "_isa_cache.json"
ERRORS_DIR = "_errors"
DUPLICATES_DIR = "_duplicates"
PART_PREFIX = "part-"
DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


class CacheError(IsaError):
    """A cache is missing, malformed, or was made by another teacher or with other settings."""


def fingerprint_mismatch(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """A message naming both teachers when two fingerprints differ, else None."""
    keys = ("model", "weights_sha256", "preprocess")
    if all(expected.get(k) == found.get(k) for k in keys):
        return None

    differing = [k for k in keys if expected.get(k) != found.get(k)]
    return f"teacher mismatch in {differing}: expected {describe_teacher(expected)}, found {describe_teacher(found)}"


def describe_teacher(fingerprint: dict[str, Any]) -> str:
    """``MODEL (PRETRAINED, weights sha256 0123456789ab…)``; without the digest where it is not known yet."""
    sha = fingerprint.get("weights_sha256")
    weights = f", weights sha256 {str(sha)[:12]}…" if sha else ""
    return f"{fingerprint.get('model')} ({fingerprint.get('pretrained')}{weights})"


@dataclass
class Manifest:
    """The contents of ``_isa_cache.json``."""

    teacher: dict[str, Any]  # the teacher fingerprint
    embed_dim: int  # D
    local_grid: int  # g (0 = no teacher_local)
    dtype: str  # float16 | float32
    image_size: int | None  # short side of the cached JPEG; None = gallery-only cache
    tower_dtype: str = "float32"  # the teacher image tower's weights when it embedded (cache.tower_dtype)
    schema_version: int = SCHEMA_VERSION
    counts: dict[str, int] = field(default_factory=dict)  # cached / rejected / duplicates after the last run

    @property
    def grid_cells(self) -> int:
        return self.local_grid * self.local_grid

    def settings(self) -> dict[str, Any]:
        """What must match for two runs to write into the same cache."""
        return {k: v for k, v in asdict(self).items() if k != "counts"}


def cache_schema(embed_dim: int, local_grid: int, dtype: str, with_images: bool) -> pa.Schema:
    """Arrow schema of a cache shard."""
    value = DTYPES[dtype]
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
    if with_images:
        fields.append(pa.field("image", pa.binary()))
    fields.append(pa.field("teacher_emb", pa.list_(value, embed_dim), nullable=False))
    if local_grid:
        fields.append(pa.field("teacher_local", pa.list_(value, local_grid * local_grid * embed_dim), nullable=False))
    return pa.schema(fields)


def _fixed_list(values: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values, dtype=np.dtype(dtype)).reshape(len(values), -1)  # (N, K)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=DTYPES[dtype]), flat.shape[1])


def shard_table(
    manifest: Manifest,
    ids: Sequence[str],
    uris: Sequence[str],
    sizes: np.ndarray,
    teacher_emb: np.ndarray,
    teacher_local: np.ndarray | None = None,
    images: Sequence[bytes] | None = None,
) -> pa.Table:
    """One shard's table.

    Args:
        sizes: (N, 2) original width, height.
        teacher_emb: (N, D) L2-normalized; teacher_local: (N, G, D) when the manifest has a grid.
        images: student-ready JPEG bytes when the manifest keeps images.
    """
    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.string()),
        "uri": pa.array(uris, pa.string()),
        "width": pa.array(sizes[:, 0], pa.int32()),
        "height": pa.array(sizes[:, 1], pa.int32()),
    }
    if manifest.image_size is not None:
        columns["image"] = pa.array(images, pa.binary())
    columns["teacher_emb"] = _fixed_list(teacher_emb, manifest.dtype)
    if manifest.local_grid:
        columns["teacher_local"] = _fixed_list(teacher_local, manifest.dtype)
    schema = cache_schema(manifest.embed_dim, manifest.local_grid, manifest.dtype, manifest.image_size is not None)
    return pa.Table.from_pydict(columns, schema=schema)


def shard_name(uris: Iterable[str]) -> str:
    """Deterministic shard file name from the URIs it holds."""
    digest = hashlib.sha256("\n".join(sorted(uris)).encode()).hexdigest()[:20]
    return f"{PART_PREFIX}{digest}.parquet"


def own_entry(name: str) -> bool:
    """Whether a name at the top of a cache folder is one a cache holds (its manifest, shards, error and duplicate
    folders, a killed writer's hidden temporary)."""
    return (
        name in (MANIFEST_FILE, ERRORS_DIR, DUPLICATES_DIR)
        or (name.startswith(PART_PREFIX) and name.endswith(".parquet"))
        or (name.startswith(".") and ".tmp-" in name)
    )


def list_parts(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The committed ``part-*.parquet`` files of a folder, sorted (never from a stale listing cache)."""
    fs.invalidate_cache(folder)
    if not fs.exists(folder):
        return []
    names = fs.ls(folder, detail=False)
    return sorted(p for p in names if posixpath.basename(p).startswith(PART_PREFIX) and p.endswith(".parquet"))


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> Manifest | None:
    """The manifest of a cache, or None when the folder holds none."""
    path = posixpath.join(root, MANIFEST_FILE)
    if not fs.exists(path):
        return None
    try:
        data = json.loads(fs.cat_file(path))
        return Manifest(**data)
    except (ValueError, TypeError) as error:
        raise CacheError(f"cache manifest {path} is malformed: {error}") from None


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    write_bytes(fs, posixpath.join(root, MANIFEST_FILE), json.dumps(asdict(manifest), indent=2).encode())


def check_same_settings(existing: Manifest, wanted: Manifest, root: str) -> None:
    """Refuse to mix two teachers or two sets of settings in one cache, naming both."""
    if existing.settings() == wanted.settings():
        return
    differing = sorted(k for k, v in existing.settings().items() if wanted.settings()[k] != v)
    raise CacheError(
        f"cache {root} was written with other settings ({', '.join(differing)}): it holds teacher "
        f"{describe_teacher(existing.teacher)}, dtype {existing.dtype}, grid {existing.local_grid}, image size "
        f"{existing.image_size}, tower {existing.tower_dtype}; this run uses {describe_teacher(wanted.teacher)}, "
        f"dtype {wanted.dtype}, grid {wanted.local_grid}, image size {wanted.image_size}, tower "
        f"{wanted.tower_dtype}. Use another output."
    )
