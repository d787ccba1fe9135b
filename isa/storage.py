"""Reading and writing files on any fsspec filesystem (local paths, ``s3://``, ...), whole or not at all.

Every writer here is atomic: locally a hidden temporary (``.NAME.tmp-<uuid>``) renamed into place, on object
stores one object upload, so a reader never sees a partial file under its final name and a killed writer leaves
at most a temporary, which :func:`remove_staging` removes.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def filesystem(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URI and the path within it."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return fs, path.rstrip("/")


def absolute_uri(uri: str) -> str:
    """``uri`` as every process of a cluster reads it: a local path made absolute from the working folder of the
    process that was given it (Ray's workers run elsewhere), any other URI as it is."""
    return full_uri(*filesystem(uri)) if uri else uri


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path listed by ``fs`` as a URI other processes can open: ``s3://...`` kept, local paths as they are."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write a Parquet file whole: readers never see a partial file under its final name."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(fs, path, sink.getvalue().to_pybytes())


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Atomic write: a hidden temporary renamed into place locally; one object upload elsewhere."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        staging = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
        with fs.open(staging, "wb") as handle:
            handle.write(data)
        fs.mv(staging, path)
    else:
        fs.pipe_file(path, data)


def remove_staging(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Delete temporaries a killed run left behind; returns how many."""
    leftovers = [p for p in fs.find(root) if ".tmp-" in posixpath.basename(p)] if fs.exists(root) else []
    for path in leftovers:
        fs.rm(path)
    return len(leftovers)


def read_column_values(fs: fsspec.AbstractFileSystem, files: Sequence[str], columns: Sequence[str]) -> pa.Table:
    """Only the named columns of the given Parquet files (e.g. ids and URIs for resuming)."""
    tables = []
    for path in files:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, columns=list(columns)))
    if not tables:
        return pa.table({name: pa.array([], pa.string()) for name in columns})
    return pa.concat_tables(tables)


def count_rows(fs: fsspec.AbstractFileSystem, files: Sequence[str]) -> int:
    """Rows in Parquet files, from their footers."""
    total = 0
    for path in files:
        with fs.open(path, "rb") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total
