"""Reading and writing files on any fsspec filesystem (local paths, ``s3://``, ...), whole or not at all.

Every writer here is atomic: locally a hidden temporary (``.NAME.tmp-<uuid>``) renamed into place, on object
stores one object upload, so a reader never sees a partial file under its final name and a killed writer leaves
at most a temporary, which :func:`remove_staging` removes.

Object storage (``s3://``) is reached with the settings of :func:`s3_settings`, the one place they are made:
how many times a request is tried (botocore's ``standard`` retry mode, backing off, on 5xx answers, ``SlowDown``,
timeouts and reset connections) and the connect and read timeouts. They apply to every S3 client of a process,
one client stack for all: fsspec's s3fs (:func:`filesystem`, ``fsspec.open``), also behind pyarrow for Ray Data's
readers and Ray Train's storage (:func:`arrow_filesystem`). The first use of a bucket in a process checks its
credentials (:func:`check_access`), so wrong ones are one clear message at the start instead of a traceback mid-run.
URIs are shown, logged and saved through :func:`redact_uri`, which hides a password written into one.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from isa.errors import IsaError

S3_ATTEMPTS_ENV = "ISA_S3_ATTEMPTS"
S3_CONNECT_TIMEOUT_ENV = "ISA_S3_CONNECT_TIMEOUT"
S3_READ_TIMEOUT_ENV = "ISA_S3_READ_TIMEOUT"
CREDENTIAL_ENV = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN, AWS_PROFILE), and AWS_ENDPOINT_URL"
# error codes of object storage that mean "these credentials do not open this bucket"
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
    }
)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^/\s?#]+)@")


class StorageError(IsaError):
    """Object storage refused: credentials that do not open a bucket, or invalid client settings."""


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """How every S3 client of a process talks to object storage; from the environment (:func:`s3_settings`).

    Attributes:
        attempts: tries of one request, the first included (``ISA_S3_ATTEMPTS``, default 10): botocore's
            ``standard`` retry mode with exponential backoff and jitter; s3fs tries a whole call whose answer was
            cut short, or still ``SlowDown`` after botocore's tries, as many times.
        connect_timeout: seconds to open a connection (``ISA_S3_CONNECT_TIMEOUT``, default 10).
        read_timeout: seconds to wait on an open connection (``ISA_S3_READ_TIMEOUT``, default 60).
    """

    attempts: int = 10
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


def s3_settings() -> S3Settings:
    """:class:`S3Settings` from ``ISA_S3_ATTEMPTS``, ``ISA_S3_CONNECT_TIMEOUT``, ``ISA_S3_READ_TIMEOUT``.

    Raises:
        StorageError: a value that is not a positive number (attempts: a whole one).
    """
    defaults = S3Settings()
    values: dict[str, Any] = {}
    for field, env, kind in (
        ("attempts", S3_ATTEMPTS_ENV, int),
        ("connect_timeout", S3_CONNECT_TIMEOUT_ENV, float),
        ("read_timeout", S3_READ_TIMEOUT_ENV, float),
    ):
        raw = os.environ.get(env, "").strip()
        if not raw:
            values[field] = getattr(defaults, field)
            continue
        try:
            value = kind(raw)
        except ValueError:
            value = 0
        if value <= 0:
            kind_name = "whole number" if kind is int else "number"
            raise StorageError(f"{env}={raw!r} is not a positive {kind_name}: set it so, or unset it for the default")
        values[field] = value
    return S3Settings(**values)


def s3_options(settings: S3Settings) -> dict[str, Any]:
    """s3fs's constructor options for ``settings`` (botocore's client config)."""
    return {
        "config_kwargs": {
            "retries": {"mode": "standard", "total_max_attempts": settings.attempts},
            "connect_timeout": settings.connect_timeout,
            "read_timeout": settings.read_timeout,
        }
    }


def _configured(settings: S3Settings) -> S3Settings:
    """Make ``settings`` fsspec's options of every ``s3://`` filesystem it opens (``fsspec.open`` too)."""
    import s3fs

    for protocol in ("s3", "s3a"):
        fsspec.config.conf[protocol] = {**fsspec.config.conf.get(protocol, {}), **s3_options(settings)}
    # s3fs tries a call again when its answer is cut short while read, or still SlowDown after botocore's own
    # tries; its count is a class attribute
    s3fs.S3FileSystem.retries = settings.attempts
    return settings


def redact_uri(text: str) -> str:
    """``text`` with the secret of every URI in it hidden: ``https://user:secret@host`` gives
    ``https://user:***@host``, ``https://token@host`` gives ``https://***@host``. Anything that is shown, logged
    or saved and may hold a URI goes through it."""

    def hidden(match: re.Match[str]) -> str:
        user, colon, _ = match["info"].partition(":")
        return f"{match['scheme']}{user}:***@" if colon else f"{match['scheme']}***@"

    return _USERINFO.sub(hidden, text)


def redact_strings(value: Any) -> Any:
    """``value`` (a JSON-like document: dicts, lists, strings) with :func:`redact_uri` applied to every string."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {key: redact_strings(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_strings(item) for item in value)
    return value


def filesystem(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URI and the path within it; object storage with :func:`s3_settings`, its
    bucket's credentials checked once per process (:func:`check_access`).

    Raises:
        StorageError: the credentials of the environment do not open the bucket; invalid S3 settings.
    """
    if _is_s3(uri):
        _configured(s3_settings())
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    path = path.rstrip("/")
    if _is_s3(uri) and not storage_options:
        check_access(fs, path)
    return fs, path


def _is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


_checked: set[str] = set()
_checked_lock = threading.Lock()


def check_access(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Refuse credentials that do not open the bucket of ``path``: one request (a listing of at most one key),
    once per bucket and process. A bucket that does not exist passes (what reads or writes it says so).

    Raises:
        StorageError: the storage refused the credentials of the environment, or there are none; the message
            names the bucket and the environment variables to check.
    """
    bucket = path.split("/", 1)[0]
    key = "\n".join([os.environ.get("AWS_ENDPOINT_URL", ""), os.environ.get("AWS_ACCESS_KEY_ID", ""), bucket])
    with _checked_lock:
        if key in _checked:
            return
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except Exception as error:
        code = _credential_problem(error)
        if code is not None:
            raise StorageError(
                f"s3://{bucket} refused the credentials of this environment ({code}): check {CREDENTIAL_ENV}"
            ) from None
    with _checked_lock:
        _checked.add(key)


def _credential_problem(error: BaseException) -> str | None:
    """The credential error behind ``error`` (botocore's code, or its missing-credentials error), else None."""
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            return None
        name = type(seen).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return f"{name}: {seen}"
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            found = response.get("Error", {})
            if found.get("Code") in CREDENTIAL_CODES:
                return f"{found['Code']}: {found.get('Message', '')}".rstrip(": ")
            return None
        seen = seen.__cause__ or seen.__context__
    return None


def arrow_filesystem(uri: str) -> tuple[Any, str] | None:
    """A pyarrow filesystem for an ``s3://`` URI and the path within it, for Ray Train's storage and Ray Data's
    readers; None for any other URI (their own filesystems).

    It is :func:`filesystem`'s s3fs behind pyarrow's ``FSSpecHandler``: the same client, endpoint
    (``AWS_ENDPOINT_URL``), retries and timeouts as every other read and write, where pyarrow's own S3 client reads
    no ``AWS_ENDPOINT_URL`` and gives up on a ``SlowDown`` answer to a read. Credentials are not put in it: each
    process it travels to, pickled, takes its own from its environment.
    """
    if not _is_s3(uri):
        return None
    import pyarrow.fs

    fs, path = filesystem(uri)
    return pyarrow.fs.PyFileSystem(S3Handler(fs)), path


def ray_storage(uri: str) -> tuple[str, Any | None]:
    """Ray Train's and Ray Tune's ``storage_path`` and ``storage_filesystem`` for a folder (a ``RunConfig``'s
    storage, ``Tuner.restore``'s experiment): the path within :func:`arrow_filesystem` for object storage; any other
    URI as it is, a local path made absolute, with None (Ray's own filesystem)."""
    remote = arrow_filesystem(uri)
    if remote is not None:
        return remote[1], remote[0]
    return (uri if "://" in uri else str(Path(uri or ".").resolve())), None


class S3Handler(pyarrow.fs.FSSpecHandler):
    """pyarrow's handler of an fsspec filesystem that applies :func:`s3_settings` in every process it is unpickled
    in (s3fs keeps part of them process-wide)."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        _configured(s3_settings())
        super().__init__(fs)

    def __reduce__(self) -> tuple[Any, ...]:
        return S3Handler, (self.fs,)


def reader_options(uri: str) -> dict[str, Any]:
    """Keyword arguments of Ray Data's readers (``read_parquet``, ``read_csv``, ...) for files under ``uri``: the
    :func:`arrow_filesystem` of object storage, none for other URIs."""
    found = arrow_filesystem(uri)
    return {"filesystem": found[0]} if found else {}


def absolute_uri(uri: str) -> str:
    """``uri`` as every process of a cluster reads it: a local path made absolute from the working folder of the
    process that was given it (Ray's workers run elsewhere), any other URI as it is."""
    return full_uri(*filesystem(uri)) if uri else uri


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path listed by ``fs`` as a URI other processes can open: ``s3://...`` kept, local paths as they are."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def write_table(
    fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, before_publish: Callable[[], None] | None = None
) -> None:
    """Write a Parquet file whole: readers never see a partial file under its final name (``before_publish``: as
    :func:`write_bytes`)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(fs, path, sink.getvalue().to_pybytes(), before_publish)


def write_bytes(
    fs: fsspec.AbstractFileSystem, path: str, data: bytes, before_publish: Callable[[], None] | None = None
) -> None:
    """Atomic write: a hidden temporary renamed into place locally; one object upload elsewhere.

    Args:
        before_publish: called last before the file appears under its name (after the temporary is written); an
            error it raises leaves no file (e.g. a fence: the writer's run no longer holds the output).
    """
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        staging = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
        with fs.open(staging, "wb") as handle:
            handle.write(data)
        try:
            if before_publish is not None:
                before_publish()
        except BaseException:
            fs.rm(staging)
            raise
        fs.mv(staging, path)
    else:
        if before_publish is not None:
            before_publish()
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
