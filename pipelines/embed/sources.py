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
import posixpath
import tarfile
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data

from isa.config import CacheConfig
from isa.errors import IsaError
from isa.storage import filesystem, full_uri, reader_options

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")


class InputError(IsaError):
    """The input URI cannot be read as the requested (or guessed) kind."""


def check_input(uri: str, cache: CacheConfig, exclude: str | None = None) -> tuple[str, list[str] | None]:
    """Refuse an input that cannot be read as its kind (reading only listings and Parquet footers, no Ray).

    Args:
        exclude: a folder under ``uri`` whose files are not inputs (the cache being written, when it lies there).

    Returns:
        The input's kind and, for a folder, its files (sorted, hidden ones and ``exclude`` left out).

    Raises:
        InputError: naming the URI: it does not exist, holds no files, is of a kind that cannot be told, or is a
            Parquet input without the image bytes column.
    """
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise InputError(f"input not found: {uri}")
    listing = _find(fs, path, exclude) if fs.isdir(path) else None
    kind = guess_format(uri, cache, listing)
    if listing is not None and not listing:
        raise InputError(f"no input files found under {uri}")
    if kind == "tar" and not [p for p in (listing or [path]) if p.endswith(".tar")]:
        raise InputError(f"no .tar shards found at {uri}")
    if kind == "list" and listing is not None:
        raise InputError(f"input {uri} is a folder, not a list file: set cache.input_format=folder (or auto)")
    if kind == "folder" and listing is None:
        raise InputError(f"input {uri} is a file, not a folder: set cache.input_format (or auto)")
    parquet = [p for p in (listing or [path]) if p.endswith(".parquet")]
    needed = {"parquet": cache.bytes_column, "list": cache.uri_column}.get(kind)
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
    return kind, listing


def guess_format(uri: str, cache: CacheConfig, listing: list[str] | None = None) -> str:
    """The input kind of an existing URI when ``cache.input_format`` is ``auto``.

    Args:
        listing: the files under ``uri`` when it is a folder and they were listed already.
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
    files = _find(fs, path) if listing is None else listing
    if files and all(p.endswith(".tar") for p in files):
        return "tar"
    if files and all(p.endswith(".parquet") for p in files):
        return "parquet"
    return "folder"


def _find(fs: fsspec.AbstractFileSystem, root: str, exclude: str | None = None) -> list[str]:
    """Every non-hidden file under ``root``, sorted, leaving out anything under ``exclude``."""
    paths = fs.find(root, withdirs=False)
    keep = [p for p in paths if not posixpath.basename(p).startswith(".")]
    if exclude:
        keep = [p for p in keep if not (p == exclude or p.startswith(exclude.rstrip("/") + "/"))]
    return sorted(keep)


def read_sources(uri: str, cache: CacheConfig, exclude: str | None = None) -> ray.data.Dataset:
    """The inputs as a dataset with columns ``uri`` (str), ``data`` (bytes or None: read ``uri``) and ``error``
    (None, or why the input could not even be listed, e.g. a corrupt tar shard)."""
    fs, root = filesystem(uri)
    kind, listing = check_input(uri, cache, exclude)  # listed once, also to guess the kind
    if kind == "folder":
        return _from_uris([full_uri(fs, p) for p in listing or []], cache.decode_batch_size)
    if kind == "list":
        return _read_list(uri, root, cache)
    if kind == "tar":
        shards = [full_uri(fs, p) for p in (listing if listing is not None else [root]) if p.endswith(".tar")]
        return _from_uris(shards, 1).map_batches(
            _expand_tars, batch_size=1, fn_kwargs={"rows": cache.decode_batch_size}
        )
    if kind == "parquet":
        return _read_parquet(uri, cache)
    raise InputError(f"unknown input format {kind!r}")


def _from_uris(uris: list[str], rows_per_block: int) -> ray.data.Dataset:
    blocks = max(1, min(len(uris), -(-len(uris) // rows_per_block)))
    return ray.data.from_items([{"uri": u, "data": None, "error": None} for u in uris], override_num_blocks=blocks)


def _read_list(uri: str, path: str, cache: CacheConfig) -> ray.data.Dataset:
    if path.endswith(".parquet"):
        ds = ray.data.read_parquet(uri, **reader_options(uri)).select_columns([cache.uri_column])
        column = cache.uri_column
    elif path.endswith(".csv"):
        ds = ray.data.read_csv(uri, **reader_options(uri))
        names = ds.columns()
        column = cache.uri_column if cache.uri_column in names else names[0]
    else:
        ds = ray.data.read_text(uri, **reader_options(uri))
        column = "text"
    return ds.map_batches(_as_sources, batch_format="numpy", fn_kwargs={"column": column})


def _as_sources(batch: dict[str, np.ndarray], column: str) -> dict[str, np.ndarray]:
    uris = [str(u).strip() for u in batch[column]]
    return _rows([u for u in uris if u])


def _expand_tars(batch: dict[str, np.ndarray], rows: int) -> Iterator[dict[str, np.ndarray]]:
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


def _rows(uris: list[str], datas: list[bytes | None] | None = None, errors: list[str | None] | None = None) -> dict:
    empty = [None] * len(uris)
    return {
        "uri": np.array(uris, dtype=object),
        "data": np.array(datas or empty, dtype=object),
        "error": np.array(errors or empty, dtype=object),
    }


def _read_parquet(uri: str, cache: CacheConfig) -> ray.data.Dataset:
    schema_names = ray.data.read_parquet(uri, **reader_options(uri)).schema().names
    if cache.bytes_column not in schema_names:
        raise InputError(f"parquet input {uri} has no column {cache.bytes_column!r} (columns: {schema_names})")
    has_uri = cache.uri_column in schema_names
    # without a URI column a row is named by its file (see _parquet_rows)
    columns = [cache.bytes_column, cache.uri_column if has_uri else "path"]
    ds = ray.data.read_parquet(uri, include_paths=not has_uri, **reader_options(uri)).select_columns(columns)
    return ds.map_batches(
        _parquet_rows,
        batch_format="numpy",
        fn_kwargs={"bytes_column": cache.bytes_column, "uri_column": cache.uri_column},
    )


def _parquet_rows(batch: dict[str, np.ndarray], bytes_column: str, uri_column: str) -> dict[str, np.ndarray]:
    datas = list(batch[bytes_column])
    if uri_column in batch:
        uris = [str(u) for u in batch[uri_column]]
    else:
        uris = [f"{path}#sha256={hashlib.sha256(d or b'').hexdigest()}" for path, d in zip(batch["path"], datas)]
    return _rows(uris, datas)
