"""The CPU operators of ``isa embed``: the ledger actor, decode tasks and shard writers.

None of them imports torch (the teacher actors live in ``pipelines/embed/tower.py``), so the processes
that run them stay small.

Exactly once: the :class:`Ledger` knows which URIs the cache already holds (cached, rejected or
recorded as duplicates) and which content ids are cached; decode tasks ask it which inputs are new and
which new images are the first of their bytes. Every file is named by a hash of the URIs it holds and
written whole, so a retried task rewrites the same file and a killed run leaves only complete files,
which the next run's ledger counts as done.
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import ray

from isa.cache import DUPLICATES_DIR, ERRORS_DIR, Manifest, shard_name, shard_table
from isa.images import ImageRejected, content_id, decode_image, encode_jpeg, resize_short_side, teacher_crop
from isa.storage import filesystem, write_table


@ray.remote(num_cpus=0)
class Ledger:
    """Which inputs are new, and which new images are the first with their bytes.

    Args:
        done_uris: URIs the cache already accounts for (cached, rejected, duplicates).
        cached_ids: content ids already cached.
    """

    def __init__(self, done_uris: list[str], cached_ids: list[str]):
        self.done = set(done_uris)
        self.owner: dict[str, str] = dict.fromkeys(cached_ids, "")  # id -> URI that caches it ("" = earlier run)
        self.admitted: dict[str, str] = {}  # URI -> key of the batch that took it this run
        self.skipped: set[str] = set()

    def admit(self, uris: list[str], batch_key: str) -> list[bool]:
        """True for inputs this batch should process; a retried batch gets the same answer again."""
        answer = []
        for uri in uris:
            if uri in self.done:
                self.skipped.add(uri)
                answer.append(False)
            else:
                first = self.admitted.setdefault(uri, batch_key)
                answer.append(first == batch_key)  # the same URI listed twice is processed once
        return answer

    def claim(self, ids: list[str], uris: list[str]) -> list[str | None]:
        """None where ``uri`` is the one that caches ``id``, else the URI (or "cache") it duplicates."""
        result = []
        for image_id, uri in zip(ids, uris):
            owner = self.owner.setdefault(image_id, uri)
            result.append(None if owner == uri else (owner or "cache"))
        return result

    def counts(self) -> dict[str, int]:
        return {"read": len(self.admitted) + len(self.skipped), "skipped": len(self.skipped)}


@functools.lru_cache(maxsize=4)
def _crop_fn(preprocess_json: str):
    return teacher_crop(json.loads(preprocess_json))


def decode_batch(batch: dict[str, np.ndarray], *, ledger, output: str, manifest: dict, settings: dict) -> dict:
    """CPU task: read, hash, validate and decode new inputs; record rejects and duplicates.

    Returns the new, first-of-their-bytes images: ``uri, id, width, height, crop`` (uint8 teacher input
    (S, S, 3)) and ``image`` (student JPEG, or empty bytes for gallery-only caches).
    """
    uris = [str(u) for u in batch["uri"]]
    key = hashlib.sha256("\n".join(uris).encode()).hexdigest()
    admitted = ray.get(ledger.admit.remote(uris, key))
    rows = [(u, d, e) for (u, d, e, ok) in zip(uris, batch["data"], batch["error"], admitted) if ok]
    decoded, errors = decode_rows(rows, manifest, settings)
    duplicate_of = ray.get(ledger.claim.remote([d.id for d in decoded], [d.uri for d in decoded]))
    _record(output, errors, [(d.uri, d.id, o) for d, o in zip(decoded, duplicate_of) if o is not None])
    first = [d for d, o in zip(decoded, duplicate_of) if o is None]
    return _decoded_columns(first, manifest)


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
    Pillow keeps 4 bytes a pixel)."""
    crop = _crop_fn(json.dumps(manifest["teacher"]["preprocess"], sort_keys=True))
    decoded: list[Decoded] = []
    errors: list[tuple[str, str]] = []
    for uri, data, listed_error in rows:
        try:
            if isinstance(listed_error, str) and listed_error:
                raise ImageRejected(listed_error)
            data = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else _read(uri)
            image = decode_image(data, settings["max_pixels"], settings["draft_short_side"])
        except ImageRejected as error:
            errors.append((uri, str(error)))
            continue
        student = b""
        if manifest["image_size"] is not None:
            student = encode_jpeg(resize_short_side(image, manifest["image_size"]), settings["jpeg_quality"])
        decoded.append(Decoded(uri, content_id(data), image.width, image.height, np.asarray(crop(image)), student))
    return decoded, errors


def _read(uri: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as handle:
            return handle.read()
    except (OSError, ValueError) as error:  # missing, permission, bad scheme ...
        raise ImageRejected(f"unreadable: {type(error).__name__}: {error}") from None


def _decoded_columns(rows: list[Decoded], manifest: dict) -> dict:
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


def _record(output: str, errors: list[tuple[str, str]], duplicates: list[tuple[str, str, str]]) -> None:
    """Write this batch's rejects and duplicates, each as one whole file named by its URIs."""
    fs, root = filesystem(output)
    if errors:
        table = pa.table({"uri": [e[0] for e in errors], "reason": [e[1] for e in errors]})
        write_table(fs, posixpath.join(root, ERRORS_DIR, shard_name(table["uri"].to_pylist())), table)
    if duplicates:
        columns = list(zip(*duplicates))
        table = pa.table({"uri": list(columns[0]), "id": list(columns[1]), "duplicate_of": list(columns[2])})
        write_table(fs, posixpath.join(root, DUPLICATES_DIR, shard_name(table["uri"].to_pylist())), table)


def write_shard(batch: dict[str, np.ndarray], *, output: str, manifest: dict) -> dict[str, np.ndarray]:
    """CPU task: one cache shard, written whole under a name derived from its URIs."""
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
    write_table(fs, posixpath.join(root, shard_name(table["uri"].to_pylist())), table)
    return {"rows": np.array([table.num_rows], dtype=np.int64)}
