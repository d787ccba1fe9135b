"""Inputs of ``isa embed`` as a Ray dataset of ``uri`` (+ ``data`` when the bytes come with the listing).

Kinds (``cache.input_format``, or guessed from the URI with ``auto``):
- ``folder``: every file under a local folder or an ``s3://`` (any fsspec) prefix, recursively;
- ``list``: a ``.txt`` (one URI a line), ``.csv`` (column ``cache.uri_column``, else the first) or
  ``.parquet`` list of URIs;
- ``tar``: webdataset shards (one ``.tar`` or a folder of them); each image member becomes
  ``SHARD#MEMBER``;
- ``parquet``: a Parquet dataset with the image bytes in ``cache.bytes_column`` (and names in
  ``cache.uri_column`` when present, else ``FILE#sha256=ID``).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tarfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from isa.config import CacheConfig
from isa.errors import IsaError
from isa.storage import filesystem, full_uri, reader_options

if TYPE_CHECKING:
    import ray.data

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")


class InputError(IsaError):
    """The input URI cannot be read as the requested (or guessed) kind."""


SAMPLE_FILES = 1000  # files of a folder input looked at before Ray starts (its kind, that it holds any)
LIST_ROWS = 8192  # URIs per block of a folder listing or a list file
LIST_RANGE_BYTES = 8 * 2**20  # bytes of a .txt list file per reading task
# Listing and reading the inputs is mostly waiting on storage. Its tasks reserve no CPU: a listing task that
# waited for a CPU the teacher actors and decode tasks hold would wait forever on a small machine (two cores:
# an actor of 1.5 CPUs and decode tasks of 0.5). At most SOURCE_TASKS run at once, each holding one block.
SOURCE_TASKS = 2


def source_options() -> dict:
    """Ray Data options of every stage that lists or reads the inputs (and of the admission fused with it)."""
    import ray.data

    return {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=SOURCE_TASKS)}


PARQUET_READ = {"num_cpus": 0, "concurrency": SOURCE_TASKS}  # ray.data.read_parquet's, for the same reason


def check_input(uri: str, cache: CacheConfig, exclude: str | None = None) -> str:
    """Refuse an input that cannot be read as its kind (reading the first files of a folder and Parquet footers,
    never listing a whole folder; no Ray).

    Args:
        exclude: a folder under ``uri`` whose files are not inputs (the cache being written, when it lies there).

    Returns:
        The input's kind.

    Raises:
        InputError: naming the URI: it does not exist, holds no files, is of a kind that cannot be told, or is a
            Parquet input without the image bytes column.
    """
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise InputError(f"input not found: {uri}")
    sample = list(itertools.islice(walk_files(fs, path, exclude), SAMPLE_FILES)) if fs.isdir(path) else None
    kind = guess_format(uri, cache, sample)
    if sample is not None and not sample:
        raise InputError(f"no input files found under {uri}")
    if kind == "tar" and not _shards(fs, path, sample, ".tar", exclude):
        raise InputError(f"no .tar shards found at {uri}")
    if kind == "list" and sample is not None:
        raise InputError(f"input {uri} is a folder, not a list file: set cache.input_format=folder (or auto)")
    if kind == "folder" and sample is None:
        raise InputError(f"input {uri} is a file, not a folder: set cache.input_format (or auto)")
    needed = {"parquet": cache.bytes_column, "list": cache.uri_column}.get(kind)
    parquet = _shards(fs, path, sample, ".parquet", exclude) if needed else []
    if needed and parquet:
        with fs.open(parquet[0], "rb") as handle:
            names = pq.read_schema(handle).names
        if needed not in names:
            what = "image bytes" if kind == "parquet" else "image URIs"
            raise InputError(
                f"parquet input {uri} has no column {needed!r} with the {what} (columns: {names}); set "
                f"cache.{'bytes_column' if kind == 'parquet' else 'uri_column'}"
            )
    elif kind == "parquet":
        raise InputError(f"no .parquet files found at {uri}")
    return kind


def _shards(
    fs: fsspec.AbstractFileSystem, path: str, sample: list[str] | None, suffix: str, exclude: str | None
) -> list[str]:
    """The ``suffix`` files of a shard input: the file itself, else the folder's (listed whole only when its first
    files are not all shards: a folder of shards holds few files)."""
    if sample is None:
        return [path] if path.endswith(suffix) else []
    return [p for p in (sample if len(sample) < SAMPLE_FILES else _find(fs, path, exclude)) if p.endswith(suffix)]


def guess_format(uri: str, cache: CacheConfig, sample: list[str] | None = None) -> str:
    """The input kind of an existing URI when ``cache.input_format`` is ``auto``.

    Args:
        sample: the first files under ``uri`` when it is a folder and they were looked at already; a folder whose
            first files are all ``.tar`` (or all ``.parquet``) is read as shards of that kind.
    """
    if cache.input_format != "auto":
        return cache.input_format
    fs, path = filesystem(uri)
    if fs.isfile(path):
        if path.endswith(".tar"):
            return "tar"
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as handle:
                if cache.bytes_column in pq.read_schema(handle).names:
                    return "parquet"
        if path.endswith(LIST_SUFFIXES):
            return "list"
        raise InputError(
            f"cannot tell what kind of input {uri} is (a folder, a .tar shard, a list file "
            f"{'/'.join(LIST_SUFFIXES)}, or parquet with image bytes); set cache.input_format"
        )
    files = list(itertools.islice(walk_files(fs, path), SAMPLE_FILES)) if sample is None else sample
    if files and all(p.endswith(".tar") for p in files):
        return "tar"
    if files and all(p.endswith(".parquet") for p in files):
        return "parquet"
    return "folder"


def walk_files(fs: fsspec.AbstractFileSystem, root: str, exclude: str | None = None) -> Iterator[str]:
    """Every non-hidden file under ``root``, one at a time, leaving out anything under ``exclude``: a local folder
    is read entry by entry (``os.scandir``), another filesystem one folder listing at a time."""
    skip = exclude.rstrip("/") if exclude else None
    if isinstance(fs, LocalFileSystem):
        folders = [root]
        while folders:
            folder = folders.pop()
            if folder == skip:
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir():
                        folders.append(entry.path)
                    elif not entry.name.startswith("."):
                        yield entry.path
        return
    for folder, _, names in fs.walk(root, detail=False):
        folder = folder.rstrip("/")
        if skip and (folder == skip or folder.startswith(skip + "/")):
            continue
        for name in sorted(names):
            if not name.startswith("."):
                yield f"{folder}/{name}"


def _find(fs: fsspec.AbstractFileSystem, root: str, exclude: str | None = None) -> list[str]:
    """Every non-hidden file under ``root``, sorted (for shard inputs: few files)."""
    return sorted(walk_files(fs, root, exclude))


def read_sources(uri: str, cache: CacheConfig, exclude: str | None = None) -> ray.data.Dataset:
    """The inputs as a dataset with columns ``uri`` (str), ``data`` (bytes or None: read ``uri``) and ``error``
    (None, or why the input could not even be listed, e.g. a corrupt tar shard). Folders and list files are
    listed by tasks, block by block: no process holds the whole listing."""
    import ray.data

    fs, root = filesystem(uri)
    kind = check_input(uri, cache, exclude)
    if kind == "folder":
        return ray.data.from_items([{"root": root}]).map_batches(
            _list_folder, batch_size=1, fn_kwargs={"uri": uri, "exclude": exclude}, **source_options()
        )
    if kind == "list":
        return _read_list(uri, root, cache)
    if kind == "tar":
        listing = [root] if fs.isfile(root) else _find(fs, root, exclude)
        shards = [full_uri(fs, p) for p in listing if p.endswith(".tar")]
        return _from_uris(shards, 1).map_batches(
            _expand_tars, batch_size=1, fn_kwargs={"rows": cache.decode_batch_size}, **source_options()
        )
    if kind == "parquet":
        return _read_parquet(uri, cache)
    raise InputError(f"unknown input format {kind!r}")


def _list_folder(batch: dict[str, np.ndarray], uri: str, exclude: str | None) -> Iterator[pa.Table]:
    fs, root = filesystem(uri)
    uris: list[str] = []
    for path in walk_files(fs, root, exclude):
        uris.append(full_uri(fs, path))
        if len(uris) >= LIST_ROWS:
            yield _rows(uris)
            uris = []
    if uris:
        yield _rows(uris)


def _from_uris(uris: list[str], rows_per_block: int) -> ray.data.Dataset:
    import ray.data

    blocks = max(1, min(len(uris), -(-len(uris) // rows_per_block)))
    return ray.data.from_items([{"uri": u, "data": None, "error": None} for u in uris], override_num_blocks=blocks)


def _read_list(uri: str, path: str, cache: CacheConfig) -> ray.data.Dataset:
    import ray.data

    if path.endswith(".parquet"):
        ds = ray.data.read_parquet(uri, **PARQUET_READ, **reader_options(uri)).select_columns([cache.uri_column])
        return ds.map_batches(
            _as_sources, batch_format="numpy", fn_kwargs={"column": cache.uri_column}, **source_options()
        )
    if path.endswith(".csv"):
        return ray.data.from_items([{"uri": uri}]).map_batches(
            _read_csv_list, batch_size=1, fn_kwargs={"column": cache.uri_column}, **source_options()
        )
    fs, _ = filesystem(uri)
    size = fs.size(path)
    starts = range(0, max(size, 1), LIST_RANGE_BYTES)
    ranges = [{"start": start, "end": min(start + LIST_RANGE_BYTES, size)} for start in starts]
    return ray.data.from_items(ranges, override_num_blocks=len(ranges)).map_batches(
        _read_lines, batch_size=1, fn_kwargs={"uri": uri}, **source_options()
    )


def _read_lines(batch: dict[str, np.ndarray], uri: str) -> Iterator[pa.Table]:
    """The URIs of one byte range of a ``.txt`` list file: the lines that start in it (a line crossing its end is
    read whole; one crossing its start belongs to the range before)."""
    start, end = int(batch["start"][0]), int(batch["end"][0])
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # the rest of the line holding byte start - 1
        begin = handle.tell()
        if begin >= end:
            return
        data = handle.read(end - begin)
        if not data.endswith(b"\n"):
            data += handle.readline()
    lines = data.decode().splitlines()
    for first in range(0, len(lines), LIST_ROWS):
        uris = [u.strip() for u in lines[first : first + LIST_ROWS]]
        yield _rows([u for u in uris if u])


def _read_csv_list(batch: dict[str, np.ndarray], column: str) -> Iterator[pa.Table]:
    """The URIs of a ``.csv`` list file, read batch by batch: column ``column``, else the first."""
    fs, path = filesystem(str(batch["uri"][0]))
    with fs.open(path, "rb") as handle:
        reader = pa_csv.open_csv(handle, read_options=pa_csv.ReadOptions(block_size=LIST_RANGE_BYTES))
        names = reader.schema.names
        index = names.index(column) if column in names else 0
        for record_batch in reader:
            uris = [str(u).strip() for u in record_batch.column(index).to_pylist() if u is not None]
            yield _rows([u for u in uris if u])


def _as_sources(batch: dict[str, np.ndarray], column: str) -> pa.Table:
    uris = [str(u).strip() for u in batch[column]]
    return _rows([u for u in uris if u])


def _expand_tars(batch: dict[str, np.ndarray], rows: int) -> Iterator[pa.Table]:
    """Image members of webdataset shards as ``SHARD#MEMBER`` rows; an unreadable shard is one bad row."""
    for shard in batch["uri"]:
        uris: list[str] = []
        datas: list[bytes | None] = []
        errors: list[str | None] = []
        try:
            with fsspec.open(shard, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                        continue
                    uris.append(f"{shard}#{member.name}")
                    datas.append(archive.extractfile(member).read())
                    errors.append(None)
                    if len(uris) >= rows:
                        yield _rows(uris, datas, errors)
                        uris, datas, errors = [], [], []
        except (OSError, tarfile.TarError, EOFError) as error:  # the shard, or its rest, is unreadable
            uris.append(str(shard))
            datas.append(None)
            errors.append(f"unreadable tar shard: {error}")
        if uris:
            yield _rows(uris, datas, errors)


SOURCE_SCHEMA = pa.schema([("uri", pa.string()), ("data", pa.binary()), ("error", pa.string())])


def _rows(uris: list[str], datas: list[bytes | None] | None = None, errors: list[str | None] | None = None) -> pa.Table:
    """One block of inputs, typed: a block whose inputs all have no bytes yet still merges with one that has some."""
    empty = [None] * len(uris)
    return pa.table([uris, datas or empty, errors or empty], schema=SOURCE_SCHEMA)


def _read_parquet(uri: str, cache: CacheConfig) -> ray.data.Dataset:
    import ray.data

    schema_names = ray.data.read_parquet(uri, **PARQUET_READ, **reader_options(uri)).schema().names
    if cache.bytes_column not in schema_names:
        raise InputError(f"parquet input {uri} has no column {cache.bytes_column!r} (columns: {schema_names})")
    has_uri = cache.uri_column in schema_names
    # without a URI column a row is named by its file (see _parquet_rows)
    columns = [cache.bytes_column, cache.uri_column if has_uri else "path"]
    ds = ray.data.read_parquet(uri, include_paths=not has_uri, **PARQUET_READ, **reader_options(uri))
    return ds.select_columns(columns).map_batches(
        _parquet_rows,
        batch_format="numpy",
        fn_kwargs={"bytes_column": cache.bytes_column, "uri_column": cache.uri_column},
        **source_options(),
    )


def _parquet_rows(batch: dict[str, np.ndarray], bytes_column: str, uri_column: str) -> pa.Table:
    datas = list(batch[bytes_column])
    if uri_column in batch:
        uris = [str(u) for u in batch[uri_column]]
    else:
        uris = [f"{path}#sha256={hashlib.sha256(d or b'').hexdigest()}" for path, d in zip(batch["path"], datas)]
    return _rows(uris, datas)
