"""Inputs that kill their decoding process: rejected with their reason, never retried for ever.

A decode task runs in a Ray worker; an input that makes the decoder crash the process (a decoder bug, memory
exhausted by one image) ends the task, and Ray runs it again (up to ``DECODE_RETRIES`` times,
``pipelines.embed.decode_task_options``). So does an input whose reading and decoding take longer than
``cache.input_timeout_s`` (a read that never ends: a hung network mount, a FIFO nobody writes): the process's
:class:`InputWatch` ends it with exit status ``TIMED_OUT``. :class:`Attempts` (kept by the run's ledger
actor) counts the attempts of each batch (named by a hash of its URIs, the same in every attempt): the first
decodes in the task's own process as usual; a later one decodes its inputs one at a time in a child process, so an
input that kills the child is rejected (``_errors/``, with how its process ended) and the batch's other inputs are
decoded in a new child.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

Row = tuple[str, Any, Any]  # (uri, bytes or None, listed error or None)
Decode = Callable[[list[Row], dict, dict], tuple[list[Any], list[tuple[str, str]]]]
TIMED_OUT = 124  # the exit status of a decoding process that an input held longer than cache.input_timeout_s
TIMEOUT_SETTING = "input_timeout_s"  # its key in the decode settings (pipelines.embed.decode_settings)


class InputWatch:
    """Ends this process (exit status ``TIMED_OUT``) when one input is read and decoded for longer than
    ``seconds``: a read that never returns cannot be interrupted from within, and the process decoding it would
    wait for good. Its decoder's caller sees the process die on that input (:func:`decode_isolated`).

    Use it as a context manager around the inputs' loop, calling :meth:`begin` before each input.

    Args:
        seconds: the longest one input may take; None: no limit (no watching thread).
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._since: float | None = None  # when the input being decoded began (time.monotonic)
        self._done = threading.Event()
        if seconds is not None:
            threading.Thread(target=self._watch, name="isa-input-watch", daemon=True).start()

    def __enter__(self) -> InputWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()  # the thread ends at once: no input is watched after the block, whatever ended it

    def begin(self) -> None:
        """The next input's reading and decoding begin (the one before is done)."""
        self._since = time.monotonic()

    def _watch(self) -> None:
        assert self.seconds is not None
        while not self._done.wait(min(1.0, self.seconds / 4)):
            since = self._since
            if since is not None and time.monotonic() - since > self.seconds:
                os._exit(TIMED_OUT)  # no cleanup: the main thread may be stuck in a read


class Attempts:
    """How many times each unfinished batch of a run started decoding: methods of an actor of the run (the
    first shard of its ledger, :class:`pipelines.embed.ledger.LedgerShard`, so that a run starts no process more
    for them)."""

    def __init__(self) -> None:
        self.started: dict[str, int] = {}

    def begin(self, key: str) -> int:
        """Count an attempt of batch ``key``; returns its number (1 for the first)."""
        self.started[key] = self.started.get(key, 0) + 1
        return self.started[key]

    def end(self, key: str) -> None:
        """Forget a batch that was decoded (only batches that died stay counted)."""
        self.started.pop(key, None)


def decode_guarded(
    decode: Decode, rows: list[Row], manifest: dict, settings: dict, attempts: Any
) -> tuple[list[Any], list[tuple[str, str]]]:
    """``decode(rows, manifest, settings)``; in a child process, one row at a time, when an earlier attempt of this
    batch died (``attempts``: the actor holding the run's :class:`Attempts`, or None to decode in this process)."""
    if attempts is None or not rows:
        return decode(rows, manifest, settings)
    import ray  # a decode task of Ray Data's

    key = hashlib.sha256("\n".join(uri for uri, _, _ in rows).encode()).hexdigest()
    first = ray.get(attempts.begin.remote(key)) == 1
    result = decode(rows, manifest, settings) if first else decode_isolated(decode, rows, manifest, settings)
    attempts.end.remote(key)
    return result


def decode_isolated(
    decode: Decode, rows: list[Row], manifest: dict, settings: dict
) -> tuple[list[Any], list[tuple[str, str]]]:
    """``decode`` one row at a time in a forked child; a row whose child dies is rejected with how it died."""
    context = multiprocessing.get_context("fork")
    decoded: list[Any] = []
    errors: list[tuple[str, str]] = []
    pending = list(rows)
    while pending:
        ours, theirs = context.Pipe()
        child = context.Process(target=_serve, args=(theirs, decode, manifest, settings), daemon=True)
        child.start()
        theirs.close()
        try:
            while pending:
                ours.send(pending[0])
                try:
                    done, failed = ours.recv()
                except EOFError:  # the child died on this row
                    child.join()
                    errors.append((pending.pop(0)[0], _died_on_it(child.exitcode, settings)))
                    break
                pending.pop(0)
                decoded += done
                errors += failed
        finally:
            ours.close()
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
                child.join()
    return decoded, errors


def _serve(connection: Connection, decode: Decode, manifest: dict, settings: dict) -> None:
    """The child: decode each row it is sent, until the parent closes the pipe."""
    while True:
        try:
            row = connection.recv()
        except EOFError:
            return
        connection.send(decode([row], manifest, settings))


def _died_on_it(exitcode: int | None, settings: dict) -> str:
    """The reason a row is rejected when the child decoding it alone ended with ``exitcode``."""
    if exitcode == TIMED_OUT and settings.get(TIMEOUT_SETTING) is not None:
        return f"reading and decoding it took longer than {settings[TIMEOUT_SETTING]:g} s (cache.input_timeout_s)"
    if exitcode is not None and exitcode < 0:
        try:
            return f"the decoding process died on it (killed by {signal.Signals(-exitcode).name})"
        except ValueError:
            return f"the decoding process died on it (killed by signal {-exitcode})"
    return f"the decoding process died on it (exit status {exitcode})"
