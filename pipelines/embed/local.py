"""``isa embed`` without Ray (``cache.runner``): a local folder or list file into a local cache, all in one process
and its decode helpers.

Ray's start and Ray Data's first execution (its coordinating actors, the worker processes and their imports) cost
seconds of CPU, which a run of a few hundred images on a laptop feels. This runs the same steps with the same
guarantees as the Ray pipeline of ``pipelines.embed``:

- the inputs are listed as they are read (``os.scandir``, a list file line by line): no list of them is held;
- the ledger's own bookkeeping tells new inputs and duplicates (:class:`~pipelines.embed.ledger.LocalLedger`);
- helper processes decode, a decode call's inputs at a time, while the tower runs (one helper per 8 cores, as
  beside a tower in the Ray driver); an input that kills its helper is found by decoding that call's inputs again
  one at a time, each in a child of its own (:func:`~pipelines.embed.guard.decode_isolated`), and rejected with how
  its process ended;
- decoding starts while the teacher loads, with the preprocessing it is expected to have (told without loading it,
  :func:`isa.teacher.expected_preprocess`); a call decoded otherwise than the loaded teacher needs is decoded again,
  and nothing is written before the cache's manifest;
- rejects and duplicates are recorded, and the tower and the shard writes run, as with a tower in the Ray driver.

It imports no Ray module: importing Ray and Ray Data alone takes a second or two.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import posixpath
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import fsspec
import numpy as np
from tqdm import tqdm

from isa.config import CacheConfig, Config
from isa.storage import filesystem, full_uri
from pipelines.embed.decode import decode_rows, decoded_columns, rebatched, record_rejects
from pipelines.embed.guard import Row, decode_isolated
from pipelines.embed.ledger import LocalLedger
from pipelines.embed.sources import guess_format, walk_files

PROGRESS_LINE_S = 30.0  # seconds between the plain progress lines of a run without Ray
LOCAL_KINDS = ("folder", "list")  # the input kinds a run without Ray lists itself
LIST_FILES = (".txt", ".lst")  # list files of one URI a line (.csv and .parquet lists go through Ray Data)
EARLY_CROP_BYTES = 256 * 2**20  # teacher crops decoded while the teacher loads, at most
Plan = tuple[dict, dict]  # what decoding reads: (the cache's manifest, the decode settings)


def local_input(uri: str, cache: CacheConfig) -> str | None:
    """Why an (existing, checked) input cannot be listed without Ray, or None: a folder or a ``.txt`` list file on
    this machine's disk can (the files a list names may be anywhere: the helpers read them)."""
    if not on_this_disk(uri):
        return "the input is not on this machine's disk"
    _, path = filesystem(uri)
    kind = guess_format(uri, cache)
    if kind == "list" and not path.endswith(LIST_FILES):
        return f"the input is a {posixpath.splitext(path)[1]} list file, which Ray Data reads"
    if kind not in LOCAL_KINDS:
        return f"the input is {kind} shards, which Ray Data reads"
    return None


def on_this_disk(uri: str) -> bool:
    """Whether ``uri`` names this machine's disk, told from its protocol alone (no storage is asked)."""
    return fsspec.utils.get_protocol(uri) in ("file", "local")


def listed(uri: str, cache: CacheConfig, exclude: str | None) -> Iterator[list[str]]:
    """The input's URIs, ``cache.decode_batch_size`` at a time, as they are listed (``exclude``: a folder whose files
    are not inputs, the cache's)."""
    fs, path = filesystem(uri)
    if guess_format(uri, cache) == "folder":
        uris: Iterable[str] = (full_uri(fs, p) for p in walk_files(fs, path, exclude))
    else:
        uris = _lines(path)
    call: list[str] = []
    for item in uris:
        call.append(item)
        if len(call) == cache.decode_batch_size:
            yield call
            call = []
    if call:
        yield call


def _lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield line.strip()


class Decoders:
    """Helper processes that decode the inputs of a run without Ray, a decode call at a time each.

    They are forked when made: make them before the run starts threads of its own or loads its teacher.
    """

    def __init__(self, count: int):
        self._context = multiprocessing.get_context("fork")
        self._helpers: list[tuple[BaseProcess, Connection]] = []
        for _ in range(count):
            self._helpers.append(self._start())

    def __len__(self) -> int:
        return len(self._helpers)

    def _start(self) -> tuple[BaseProcess, Connection]:
        ours, theirs = self._context.Pipe()
        # the child closes its copies of the parent's ends (its own and the other helpers'), so that each helper
        # sees its pipe end once this process closes it or dies
        parents = [ours, *(connection for _, connection in self._helpers)]
        helper = self._context.Process(target=_serve_calls, args=(theirs, parents), name="isa-decode", daemon=True)
        helper.start()
        theirs.close()
        return helper, ours

    def send(self, helper: int, rows: list[Row], manifest: dict, settings: dict) -> None:
        """Hand helper number ``helper`` a call to decode (:func:`~pipelines.embed.decode.decode_rows`)."""
        self._helpers[helper][1].send((rows, manifest, settings))

    def result(self, helper: int, rows: list[Row], manifest: dict, settings: dict) -> tuple[list, list]:
        """The decoded rows and rejects of the call :meth:`send` gave ``helper``. Where the helper died with it, a
        new one takes its place and the call's inputs are decoded again one at a time, each in a child of its own.

        Raises:
            RuntimeError: decoding raised an error that is no input's fault (its traceback in the message).
        """
        process, connection = self._helpers[helper]
        try:
            status, value = connection.recv()
        except EOFError:  # the helper died on one of these inputs
            connection.close()
            process.join()
            self._helpers[helper] = self._start()
            return decode_isolated(decode_rows, rows, manifest, settings)
        if status == "error":
            raise RuntimeError(f"decoding failed in a helper process:\n{value}")
        return value

    def close(self) -> None:
        """End the helpers (each exits once its pipe is closed)."""
        for _, connection in self._helpers:
            connection.close()
        for process, _ in self._helpers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def _serve_calls(connection: Connection, parents: list[Connection]) -> None:
    """A helper: decode each call it is sent, until its pipe closes (``parents``: the parent's pipe ends, closed
    here)."""
    for end in parents:
        end.close()
    while True:
        try:
            rows, manifest, settings = connection.recv()
        except EOFError:
            return
        try:
            reply: tuple[str, Any] = ("ok", decode_rows(rows, manifest, settings))
        except Exception:  # noqa: BLE001 - a bug, not an input's fault: the run ends with it
            reply = ("error", traceback.format_exc())
        connection.send(reply)


def local_batches(
    input_uri: str,
    output: str,
    config: Config,
    ledger: LocalLedger,
    decoders: Decoders,
    fence: Callable[[], None] | None = None,
    expected: Plan | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The new inputs' crops for the tower, ``cache.batch_size`` rows at a time: listed, admitted, decoded by the
    helpers (every helper holding one call, the calls taken back in order), rejects and duplicates recorded.

    Nothing is recorded or handed on before the run publishes its manifest and decode settings
    (:meth:`LocalLedger.publish`), so nothing is written before the cache's manifest is. Decoding starts before,
    while the teacher loads, with ``expected`` (what the run's decoding is expected to read of its manifest and its
    settings, :func:`pipelines.embed.expected_decoding`), up to ``EARLY_CROP_BYTES`` of crops; a call decoded with
    other than what is published is decoded again. Without ``expected`` decoding waits for the publication.
    ``fence``: the run's lease, checked before each file is published (:class:`pipelines.lease.Fence`).
    """
    _, root = filesystem(output)
    free = collections.deque(range(len(decoders)))
    in_flight: collections.deque[tuple[int, list[Row], Plan]] = collections.deque()
    decoded_calls: collections.deque[tuple[list[Row], Plan, tuple[list, list]]] = collections.deque()
    again: collections.deque[list[Row]] = collections.deque()  # calls decoded with what the run did not publish
    early_calls = 0
    if expected is not None:
        width, height = expected[0]["teacher"]["preprocess"]["size"]
        early_calls = max(1, EARLY_CROP_BYTES // (config.cache.decode_batch_size * width * height * 3))

    def new_calls() -> Iterator[list[Row]]:
        for uris in listed(input_uri, config.cache, root):
            keep = ledger.admit(uris, hashlib.sha256("\n".join(uris).encode()).hexdigest())
            rows: list[Row] = [(uri, None, None) for uri, new in zip(uris, keep) if new]
            if rows:
                yield rows

    def take_back() -> None:  # the oldest call in flight
        helper, rows, plan = in_flight.popleft()
        free.append(helper)
        decoded_calls.append((rows, plan, decoders.result(helper, rows, *plan)))

    def recorded(final: bool) -> Iterator[dict[str, np.ndarray]]:
        # before the publication, only when as many crops wait as may (or none are in flight): then it waits
        while decoded_calls and (final or ledger.published is not None or len(decoded_calls) >= early_calls):
            rows, plan, (decoded, errors) = decoded_calls.popleft()
            manifest, settings = ledger.decoding()
            if not decodes_alike(plan, (manifest, settings)):
                again.append(rows)
                continue
            duplicate_of = ledger.claim([d.id for d in decoded], [d.uri for d in decoded])
            duplicates = [(d.uri, d.id, o) for d, o in zip(decoded, duplicate_of) if o is not None]
            record_rejects(output, errors, duplicates, fence)
            yield decoded_columns([d for d, o in zip(decoded, duplicate_of) if o is None], manifest)

    def calls() -> Iterator[dict[str, np.ndarray]]:
        listing = new_calls()
        while True:
            rows = again.popleft() if again else next(listing, None)
            if rows is None:  # all listed: the calls in flight and decoded are finished
                if not in_flight and not decoded_calls:
                    return
                if in_flight:
                    take_back()
                yield from recorded(final=not in_flight)
                continue
            plan = ledger.published or expected or ledger.decoding()
            if not free:
                take_back()
                yield from recorded(final=False)
            helper = free.popleft()
            decoders.send(helper, rows, *plan)
            in_flight.append((helper, rows, plan))

    yield from rebatched(calls(), config.cache.batch_size)


def decodes_alike(plan: Plan, other: Plan) -> bool:
    """Whether two (manifest, decode settings) pairs decode every input alike: the same teacher preprocessing,
    cached image size and settings (:func:`~pipelines.embed.decode.decode_rows` reads nothing else)."""
    (manifest, settings), (other_manifest, other_settings) = plan, other
    return (
        manifest["teacher"]["preprocess"] == other_manifest["teacher"]["preprocess"]
        and manifest["image_size"] == other_manifest["image_size"]
        and settings == other_settings
    )


class Progress:
    """What a run without Ray shows as it goes (Ray Data shows its own): a progress bar where progress bars are
    wanted (:func:`pipelines.console.progress_wanted`), else a plain line every ``PROGRESS_LINE_S`` seconds."""

    def __init__(self, bar: bool):
        self._bar = tqdm(desc="isa embed", unit=" images", file=sys.stderr, dynamic_ncols=True) if bar else None
        self._count = 0
        self._started = self._shown = time.monotonic()

    def __call__(self, rows: int) -> None:
        """Count ``rows`` more images embedded."""
        self._count += rows
        if self._bar is not None:
            self._bar.update(rows)
            return
        now = time.monotonic()
        if now - self._shown >= PROGRESS_LINE_S:
            self._shown = now
            rate = self._count / (now - self._started)
            print(f"isa embed: {self._count:,} images embedded so far · {rate:.1f} images/s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
