"""Exactly once at any scale: which inputs of ``isa embed`` are new, and which new images are the first with
their bytes (docs/cache.md, "Resuming").

The ledger is split by key across :class:`LedgerShard` actors, each holding its part of the key space: the
16-byte keys of the URIs (blake2b) and content ids (the sha256's first 16 bytes) that the cache accounted for
when the run started, as two sorted arrays, and, as Python objects, only this run's new inputs. The keys are
read from the cache's Parquet files by parallel tasks, never by the driver; a shard holds at most
``cache.ledger_rows`` of them (the cache's rows decide how many shards a run starts), so no process grows
with the size of the cache.
A run without Ray (``cache.runner``) keeps one such book, :class:`LedgerBook`, in its own process
(:class:`LocalLedger`): it goes that way only for a cache of at most ``cache.ledger_rows`` rows.

The shards run on the driver's node (the head, under ``ray job submit``), needing no CPU: this run's record of
what it took lives as long as the run does, and a worker node lost mid-run takes none of it along.

Retries: :meth:`Ledger.admit` answers a retried batch (same URIs, same batch key) as it answered the first
attempt, and :meth:`Ledger.claim` gives the same URI the same answer, so a task that died and ran again
processes exactly what the first attempt would have.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from isa.cache import DUPLICATES_DIR, ERRORS_DIR, list_parts
from isa.storage import filesystem, full_uri
from pipelines.embed.guard import Attempts

if TYPE_CHECKING:
    import ray

KEY = np.dtype("S16")  # a URI's or content id's key
FILES_PER_TASK = 256  # cache files whose keys one loading task reads
PUBLISH_POLL_S = 0.05  # how often a decode task asks whether its run's manifest is published


def uri_keys(uris: Sequence[str]) -> np.ndarray:
    """The 16-byte keys of URIs (blake2b-128)."""
    return np.array([hashlib.blake2b(u.encode(), digest_size=16).digest() for u in uris], dtype=KEY).reshape(-1)


def id_keys(ids: Sequence[str]) -> np.ndarray:
    """The 16-byte keys of content ids (sha256 hex): their first 16 bytes."""
    return np.array([bytes.fromhex(i[:32]) for i in ids], dtype=KEY).reshape(-1)


def shard_of(keys: np.ndarray, shards: int) -> np.ndarray:
    """Which shard holds each key: its first 4 bytes modulo the number of shards."""
    heads = np.ascontiguousarray(keys).view(np.uint8).reshape(-1, 16)[:, :4].copy().view(">u4").reshape(-1)
    return (heads % shards).astype(np.int64)


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _split(keys: np.ndarray, shards: int) -> list[np.ndarray]:
    where = shard_of(keys, shards)
    return [keys[where == shard] for shard in range(shards)]


def cache_keys(files: list[str], with_ids: bool, shards: int) -> list[np.ndarray] | np.ndarray:
    """The keys of the URIs (and, ``with_ids``, of the content ids) of some cache files, split by shard: one array
    per shard, the URIs' first, then the ids' (a single array for one)."""
    columns = ["uri", "id"] if with_ids else ["uri"]
    parts: list[list[np.ndarray]] = [[] for _ in range(shards * len(columns))]
    for uri in files:
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
        for index, column in enumerate(columns):
            values = table.column(column).to_pylist()
            keys = id_keys(values) if column == "id" else uri_keys(values)
            for shard, part in enumerate(_split(keys, shards)):
                parts[index * shards + shard].append(part)
    merged = [np.concatenate(p) if p else np.zeros(0, dtype=KEY) for p in parts]
    return merged if len(merged) > 1 else merged[0]


class LedgerBook(Attempts):
    """One part of the key space: what the cache held (sorted keys) and this run's new inputs; it also counts the
    run's decode attempts (:class:`~pipelines.embed.guard.Attempts`, used on the first shard only).

    Args:
        done: the sorted keys of the URIs the cache accounts for (cached, rejected, duplicates).
        cached_ids: the sorted keys of the content ids cached.
    """

    def __init__(self, done: np.ndarray, cached_ids: np.ndarray):
        self.done = done
        self.cached_ids = cached_ids
        self.admitted: dict[bytes, str] = {}  # URI key -> key of the batch that took it this run
        self.owner: dict[bytes, str] = {}  # content id key -> URI that caches it this run
        Attempts.__init__(self)
        self.batches: dict[str, tuple[int, int]] = {}  # batch key -> (inputs read, inputs skipped)
        self.published: tuple[dict, dict] | None = None  # the run's manifest and decode settings

    def admit(self, keys: np.ndarray, batch_key: str) -> np.ndarray:
        """True for inputs this batch should process; a retried batch gets the same answer again."""
        done = _member(self.done, keys)
        answer = np.zeros(len(keys), dtype=bool)
        for index in np.flatnonzero(~done):
            # the same URI listed twice is processed once, by the first batch that listed it
            answer[index] = self.admitted.setdefault(keys[index], batch_key) == batch_key
        self.batches[batch_key] = (len(keys), int(done.sum()))
        return answer

    def claim(self, keys: np.ndarray, uris: list[str]) -> list[str | None]:
        """None where ``uri`` is the one that caches its id, else the URI (or "cache") it duplicates."""
        cached = _member(self.cached_ids, keys)
        result: list[str | None] = []
        for key, uri, earlier in zip(keys, uris, cached):
            if earlier:
                result.append("cache")
                continue
            owner = self.owner.setdefault(key, uri)
            result.append(None if owner == uri else owner)
        return result

    def publish(self, manifest: dict, settings: dict) -> None:
        """The run's cache manifest and decode settings, once the driver has them (its teacher loaded, the
        manifest written)."""
        self.published = (manifest, settings)

    def decoding(self) -> tuple[dict, dict] | None:
        return self.published

    def counts(self) -> dict[str, int]:
        return {
            "read": sum(read for read, _ in self.batches.values()),
            "skipped": sum(skipped for _, skipped in self.batches.values()),
        }


def merged_keys(parts: Sequence[np.ndarray]) -> np.ndarray:
    """One sorted array of the keys of ``parts``."""
    keys = np.concatenate([np.zeros(0, dtype=KEY), *parts])
    keys.sort()
    return keys


class LedgerShard(LedgerBook):
    """A :class:`LedgerBook` in an actor of its own (:func:`start_ledger`), its keys read by tasks (``done_parts``,
    ``id_parts``: references to them)."""

    def __init__(self, done_parts: list[ray.ObjectRef], id_parts: list[ray.ObjectRef]):
        import ray

        # the parts are read-only views of the object store; the shard's own memory holds one copy of its keys
        super().__init__(merged_keys(ray.get(done_parts)), merged_keys(ray.get(id_parts)))


class Ledger:
    """The ledger's shards, as tasks ask them (a small object: it travels with every task that uses it)."""

    def __init__(self, shards: list[ray.actor.ActorHandle]):
        self.shards = shards

    def admit(self, uris: Sequence[str], batch_key: str) -> np.ndarray:
        """A mask of the inputs this batch processes: not accounted for by the cache, listed first here."""
        import ray

        keys = uri_keys(uris)
        where = shard_of(keys, len(self.shards))
        refs = {s: self.shards[s].admit.remote(keys[where == s], batch_key) for s in np.unique(where).tolist()}
        answer = np.zeros(len(keys), dtype=bool)
        for shard, ref in refs.items():
            answer[where == shard] = ray.get(ref)
        return answer

    def claim(self, ids: Sequence[str], uris: Sequence[str]) -> list[str | None]:
        """For each new image: None where it is the first with its bytes, else the URI (or "cache") holding them."""
        import ray

        keys = id_keys(ids)
        where = shard_of(keys, len(self.shards))
        result: list[str | None] = [None] * len(keys)
        refs = {}
        for shard in np.unique(where).tolist():
            rows = np.flatnonzero(where == shard)
            refs[shard] = (rows, self.shards[shard].claim.remote(keys[rows], [uris[i] for i in rows]))
        for rows, ref in refs.values():
            for row, answer in zip(rows, ray.get(ref)):
                result[row] = answer
        return result

    def publish(self, manifest: dict, settings: dict) -> None:
        """Hand the decode tasks of a run started before its teacher was loaded what they decode with."""
        import ray

        ray.get(self.shards[0].publish.remote(manifest, settings))

    def decoding(self) -> tuple[dict, dict]:
        """The run's manifest and decode settings (:meth:`publish`), waiting until the driver has published them.
        A task of the run waits no longer than its driver lives: Ray ends a job's tasks with its driver."""
        import ray

        while (published := ray.get(self.shards[0].decoding.remote())) is None:
            time.sleep(PUBLISH_POLL_S)
        return published

    @property
    def attempts(self) -> ray.actor.ActorHandle:
        """The actor counting the run's decode attempts (:class:`~pipelines.embed.guard.Attempts`)."""
        return self.shards[0]

    def counts(self) -> dict[str, int]:
        """Inputs read and skipped so far, over every shard."""
        import ray

        totals = {"read": 0, "skipped": 0}
        for counts in ray.get([shard.counts.remote() for shard in self.shards]):
            for name, value in counts.items():
                totals[name] += value
        return totals

    def kill(self) -> None:
        """End the shards' processes (and the keys they hold) now."""
        import ray

        for shard in self.shards:
            ray.kill(shard)


class LocalLedger:
    """The ledger of a run without Ray (``cache.runner``): one :class:`LedgerBook` in this process, with the keys of
    the whole cache (a run goes this way only for a cache of at most ``cache.ledger_rows`` rows, one shard's worth).
    It answers as :class:`Ledger` does; the run's decode helpers are watched by the run itself, so it counts no
    attempts."""

    attempts = None

    def __init__(self, output: str):
        fs, root = filesystem(output)

        def keys(folder: str, with_ids: bool) -> list[np.ndarray]:
            files = [full_uri(fs, p) for p in list_parts(fs, folder)] if fs.exists(folder) else []
            found = cache_keys(files, with_ids, 1)
            return found if isinstance(found, list) else [found]

        cached = keys(root, True)  # the URIs' keys, then the ids'
        done = [cached[0], *keys(posixpath.join(root, ERRORS_DIR), False)]
        done += keys(posixpath.join(root, DUPLICATES_DIR), False)
        self.book = LedgerBook(merged_keys(done), merged_keys(cached[1:]))
        self._published = threading.Event()

    def admit(self, uris: Sequence[str], batch_key: str) -> np.ndarray:
        """A mask of the inputs this batch processes: not accounted for by the cache, listed first here."""
        return self.book.admit(uri_keys(uris), batch_key)

    def claim(self, ids: Sequence[str], uris: Sequence[str]) -> list[str | None]:
        """For each new image: None where it is the first with its bytes, else the URI (or "cache") holding them."""
        return self.book.claim(id_keys(ids), list(uris))

    def publish(self, manifest: dict, settings: dict) -> None:
        """Hand the run's decoding what it decodes with, once the teacher is loaded and the manifest written."""
        self.book.publish(manifest, settings)
        self._published.set()

    @property
    def published(self) -> tuple[dict, dict] | None:
        """The run's manifest and decode settings once :meth:`publish` has them, else None (without waiting)."""
        return self.book.published

    def decoding(self) -> tuple[dict, dict]:
        """The run's manifest and decode settings, waiting until :meth:`publish`.

        Raises:
            RuntimeError: the run ended (:meth:`kill`) before publishing them.
        """
        self._published.wait()
        if self.book.published is None:
            raise RuntimeError("the run ended before its cache's manifest was written")
        return self.book.published

    def counts(self) -> dict[str, int]:
        """Inputs read and skipped so far."""
        return self.book.counts()

    def kill(self) -> None:
        """End the run's use of the ledger: a decoding still waiting for the manifest stops."""
        self._published.set()


def start_ledger(output: str, rows: int, rows_per_shard: int) -> Ledger:
    """A ledger of what the cache at ``output`` accounts for, with one shard per ``rows_per_shard`` of its ``rows``
    (cached, rejected and duplicate rows, from the files' footers)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fs, root = filesystem(output)
    shards = max(1, math.ceil(rows / rows_per_shard))
    loading = ray.remote(num_cpus=0.5)(cache_keys)  # one loading task
    actor = ray.remote(num_cpus=0)(LedgerShard)

    def keys(folder: str, with_ids: bool) -> list[list[ray.ObjectRef]]:
        files = [full_uri(fs, p) for p in list_parts(fs, folder)] if fs.exists(folder) else []
        groups = [files[i : i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]
        returns = shards * (2 if with_ids else 1)
        refs = [loading.options(num_returns=returns).remote(g, with_ids, shards) for g in groups]
        return [r if isinstance(r, list) else [r] for r in refs]

    cached = keys(root, True)  # each: the URIs' parts, then the ids'
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)  # the driver's node
    done = [
        *(r[:shards] for r in cached),
        *keys(posixpath.join(root, ERRORS_DIR), False),
        *keys(posixpath.join(root, DUPLICATES_DIR), False),
    ]
    ids = [r[shards:] for r in cached]
    return Ledger(
        [
            actor.options(scheduling_strategy=here).remote([g[s] for g in done], [g[s] for g in ids])
            for s in range(shards)
        ]
    )
