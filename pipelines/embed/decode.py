"""The CPU operators of ``isa embed``: admission, decode tasks and shard writers.

None of them imports torch (the teacher actors live in ``pipelines/embed/tower.py``), so the processes
that run them stay small.

Exactly once: the ledger (``pipelines/embed/ledger.py``) knows which URIs the cache already accounts for
(cached, rejected or recorded as duplicates) and which content ids are cached; :func:`admit_batch` asks it
which listed inputs are new, decode tasks which new images are the first of their bytes. Every file is
named by a hash of the URIs it holds and written whole, so a retried task rewrites the same file and a
killed run leaves only complete files, which the next run's ledger counts as done.
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa

from isa.cache import DUPLICATES_DIR, ERRORS_DIR, Manifest, shard_name, shard_table
from isa.images import ImageRejected, content_id, decode_image, encode_jpeg, resize_short_side, teacher_crop
from isa.storage import filesystem, write_table
from pipelines.embed.guard import TIMEOUT_SETTING, InputWatch, decode_guarded
from pipelines.embed.ledger import Ledger


@functools.lru_cache(maxsize=4)
def _crop_fn(preprocess_json: str):
    return teacher_crop(json.loads(preprocess_json))


def admit_batch(batch: dict[str, np.ndarray], *, ledger: Ledger) -> dict[str, np.ndarray]:
    """CPU task (fused with the listing): keep the listed inputs the cache does not account for and no earlier
    batch of this run took. A retried batch (same URIs) keeps the same ones."""
    uris = [str(u) for u in batch["uri"]]
    keep = ledger.admit(uris, hashlib.sha256("\n".join(uris).encode()).hexdigest())
    return {name: np.asarray(values)[keep] for name, values in batch.items()}


def count_new(
    batch: dict[str, np.ndarray], *, ledger: Ledger, settings: dict | None = None, attempts: Any = None
) -> dict[str, np.ndarray]:
    """CPU task of a dry run: hash the bytes of admitted inputs; how many are new and how many duplicates (same
    bytes as an image cached, or as another new input). An input that cannot be read counts as new (a run
    records it in ``_errors/``), as does one whose read kills its process or outlasts ``settings``' input timeout
    (``attempts``: as in :func:`decode_batch`)."""
    hashed, _ = decode_guarded(hash_rows, _rows(batch), {}, settings or {}, attempts)
    duplicates = sum(owner is not None for owner in ledger.claim([i for _, i in hashed], [u for u, _ in hashed]))
    return {"new": np.array([len(batch["uri"]) - duplicates]), "duplicates": np.array([duplicates])}


def hash_rows(rows: list[tuple[str, Any, Any]], manifest: dict, settings: dict) -> tuple[list, list]:
    """``(uri, content id)`` of each row whose bytes can be read, ``(uri, reason)`` of the others (``manifest`` is
    not read); an input that takes longer than ``settings["input_timeout_s"]`` (if set) ends this process."""
    hashed: list[tuple[str, str]] = []
    errors: list[tuple[str, str]] = []
    with InputWatch(settings.get(TIMEOUT_SETTING)) as watch:
        for uri, data, listed_error in rows:
            watch.begin()
            try:
                hashed.append((uri, content_id(_row_bytes(uri, data, listed_error))))
            except ImageRejected as error:
                errors.append((uri, str(error)))
    return hashed, errors


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    ledger: Ledger,
    output: str,
    manifest: dict | None,
    settings: dict | None,
    attempts: Any = None,
    fence: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """CPU task: read, hash, validate and decode the new inputs :func:`admit_batch` let through; record rejects and
    duplicates.

    Returns the new, first-of-their-bytes images: ``uri, id, width, height, crop`` (uint8 teacher input
    (S, S, 3)) and ``image`` (student JPEG, or empty bytes for gallery-only caches).

    ``attempts``: the actor keeping the run's :class:`~pipelines.embed.guard.Attempts`; a batch whose decoding
    process died is decoded again one input at a time in a child process
    (:func:`~pipelines.embed.guard.decode_guarded`). ``fence``: checked before each file is published
    (:class:`pipelines.lease.Fence`). ``manifest`` and ``settings`` None: the driver publishes them through the
    ledger once its teacher is loaded and the cache's manifest written (:meth:`Ledger.publish`); the task waits
    for them, so it decodes and writes nothing before.
    """
    if manifest is None or settings is None:
        manifest, settings = ledger.decoding()
    decoded, errors = decode_guarded(decode_rows, _rows(batch), manifest, settings, attempts)
    duplicate_of = ledger.claim([d.id for d in decoded], [d.uri for d in decoded])
    record_rejects(output, errors, [(d.uri, d.id, o) for d, o in zip(decoded, duplicate_of) if o is not None], fence)
    first = [d for d, o in zip(decoded, duplicate_of) if o is None]
    return decoded_columns(first, manifest)


class Decoded(NamedTuple):
    """One decoded input, reduced to what the cache keeps."""

    uri: str
    id: str  # content id of the file's bytes
    width: int  # of the decoded image (EXIF orientation applied)
    height: int
    crop: np.ndarray  # (S, S, 3) uint8 teacher input
    image: bytes  # student JPEG, or b"" for gallery-only caches


def decode_rows(
    rows: list[tuple[str, Any, Any]], manifest: dict, settings: dict
) -> tuple[list[Decoded], list[tuple[str, str]]]:
    """Decode ``(uri, bytes or None, listed error or None)`` rows into :class:`Decoded` rows and
    ``(uri, reason)`` rejects. Each image is reduced to its crop and student JPEG as soon as it is decoded,
    so a task holds one full-size image at a time, not a batch of them (256 photos of 12 MP are 12 GB:
    Pillow keeps 4 bytes a pixel).

    An input that takes longer than ``settings["input_timeout_s"]`` (if set) ends this process
    (:class:`~pipelines.embed.guard.InputWatch`)."""
    crop = _crop_fn(json.dumps(manifest["teacher"]["preprocess"], sort_keys=True))
    decoded: list[Decoded] = []
    errors: list[tuple[str, str]] = []
    with InputWatch(settings.get(TIMEOUT_SETTING)) as watch:
        for uri, data, listed_error in rows:
            watch.begin()
            try:
                data = _row_bytes(uri, data, listed_error)
                image = decode_image(data, settings["max_pixels"], settings["draft_short_side"])
            except ImageRejected as error:
                errors.append((uri, str(error)))
                continue
            student = b""
            if manifest["image_size"] is not None:
                student = encode_jpeg(resize_short_side(image, manifest["image_size"]), settings["jpeg_quality"])
            decoded.append(Decoded(uri, content_id(data), image.width, image.height, np.asarray(crop(image)), student))
    return decoded, errors


def _rows(batch: dict[str, np.ndarray]) -> list[tuple[str, Any, Any]]:
    """A batch of admitted inputs as ``(uri, bytes or None, listed error or None)`` rows."""
    return [(str(u), d, e) for u, d, e in zip(batch["uri"], batch["data"], batch["error"])]


def _row_bytes(uri: str, data: Any, listed_error: Any) -> bytes:
    """A row's bytes: given in the row, else read from its URI.

    Raises:
        ImageRejected: the listing found the input unusable (its reason in the row), or it cannot be read.
    """
    if isinstance(listed_error, str) and listed_error:
        raise ImageRejected(listed_error)
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else _read(uri)


def _read(uri: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as handle:
            return handle.read()
    except (OSError, ValueError) as error:  # missing, permission, bad scheme ...
        raise ImageRejected(f"unreadable: {type(error).__name__}: {error}") from None


def decoded_columns(rows: list[Decoded], manifest: dict) -> dict:
    """Decoded rows as the columns the tower takes: ``uri, id, width, height, crop`` (B, S, S, 3) and ``image``."""
    width, height = manifest["teacher"]["preprocess"]["size"]
    crops = np.zeros((len(rows), height, width, 3), dtype=np.uint8)  # (B, S, S, 3)
    for index, row in enumerate(rows):
        crops[index] = row.crop
    return {
        "uri": np.array([r.uri for r in rows], dtype=object),
        "id": np.array([r.id for r in rows], dtype=object),
        "width": np.array([r.width for r in rows], dtype=np.int32),
        "height": np.array([r.height for r in rows], dtype=np.int32),
        "crop": crops,
        "image": np.array([r.image for r in rows], dtype=object),
    }


def rebatched(blocks: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Column blocks of any length regrouped into batches of ``size`` rows (the last one shorter)."""
    held: list[dict[str, np.ndarray]] = []
    count = 0
    for block in blocks:
        if not len(block["uri"]):
            continue
        held.append(block)
        count += len(block["uri"])
        while count >= size:
            rows = {key: np.concatenate([part[key] for part in held]) for key in held[0]}
            yield {key: column[:size] for key, column in rows.items()}
            held = [{key: column[size:] for key, column in rows.items()}]
            count -= size
    if count:
        yield {key: np.concatenate([part[key] for part in held]) for key in held[0]}


def record_rejects(
    output: str,
    errors: list[tuple[str, str]],
    duplicates: list[tuple[str, str, str]],
    fence: Callable[[], None] | None = None,
) -> None:
    """Write this batch's rejects and duplicates, each as one whole file named by its URIs."""
    fs, root = filesystem(output)
    if errors:
        table = pa.table({"uri": [e[0] for e in errors], "reason": [e[1] for e in errors]})
        write_table(fs, posixpath.join(root, ERRORS_DIR, shard_name(table["uri"].to_pylist())), table, fence)
    if duplicates:
        columns = list(zip(*duplicates))
        table = pa.table({"uri": list(columns[0]), "id": list(columns[1]), "duplicate_of": list(columns[2])})
        write_table(fs, posixpath.join(root, DUPLICATES_DIR, shard_name(table["uri"].to_pylist())), table, fence)


def write_shard(
    batch: dict[str, np.ndarray], *, output: str, manifest: dict, fence: Callable[[], None] | None = None
) -> dict[str, np.ndarray]:
    """CPU task: one cache shard, written whole under a name derived from its URIs (``fence``: checked before it
    is published)."""
    if len(batch["uri"]) == 0:
        return {"rows": np.zeros(0, dtype=np.int64)}
    meta = Manifest(**manifest)
    table = shard_table(
        meta,
        ids=list(batch["id"]),
        uris=list(batch["uri"]),
        sizes=np.stack([batch["width"], batch["height"]], axis=1),
        teacher_emb=batch["teacher_emb"],
        teacher_local=batch.get("teacher_local"),
        images=list(batch["image"]) if meta.image_size is not None else None,
    )
    fs, root = filesystem(output)
    write_table(fs, posixpath.join(root, shard_name(table["uri"].to_pylist())), table, fence)
    return {"rows": np.array([table.num_rows], dtype=np.int64)}
