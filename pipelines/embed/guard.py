"""Inputs that kill their decoding process: rejected with their reason, never retried for ever.

A decode task runs in a Ray worker; an input that makes the decoder crash the process (a decoder bug, memory
exhausted by one image) ends the task, and Ray runs it again (up to ``DECODE_RETRIES`` times,
``pipelines.embed.decode_task_options``). So does an input whose reading and decoding take longer than
``cache.input_timeout_s`` (a read that never ends: a hung network mount, a FIFO nobody writes): the process's
:class:`InputWatch` ends it with exit status ``TIMED_OUT``. :class:`Attempts` (kept by the run's ledger
actor) counts the attempts of each batch (named by a hash of its URIs, the same in every attempt): the first
decodes in the task's own process as usual; a later one decodes its inputs one at a time in a child process, so an
input that kills the child is rejected (``_errors/``, with how its process ended) and the batch's other inputs are
decoded in a new child. The actor also knows which input a child was decoding: where the task's own process died
with it (an input whose decoding takes its parent down too), the next attempt rejects that input without decoding
it again, so each attempt after the second leaves out one more input, and ``DECODE_RETRIES`` bounds them all.
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
        self.in_child: dict[str, str] = {}  # batch -> the URI a child of its attempt is decoding
        self.blamed: dict[str, list[str]] = {}  # batch -> the URIs being decoded when an attempt's process died

    def begin(self, key: str) -> tuple[int, list[str]]:
        """Count an attempt of batch ``key``; returns its number (1 for the first) and the batch's inputs that
        were being decoded when an earlier attempt's process died."""
        self.started[key] = self.started.get(key, 0) + 1
        if key in self.in_child:  # the earlier attempt's process died while its child decoded this one
            self.blamed.setdefault(key, []).append(self.in_child.pop(key))
        return self.started[key], list(self.blamed.get(key, []))

    def child_begins(self, key: str, uri: str) -> None:
        """A child of batch ``key``'s attempt begins decoding ``uri``."""
        self.in_child[key] = uri

    def child_ends(self, key: str) -> None:
        """That child is done with it (decoded, or died on it while its parent lived on)."""
        self.in_child.pop(key, None)

    def given_up(self, attempts: int) -> list[tuple[list[str], str | None]]:
        """The batches that started ``attempts`` times and never ended: for each, the inputs left out after they
        took an attempt's process down, and the one a child was decoding when the last attempt's process died."""
        return [
            (list(self.blamed.get(key, [])), self.in_child.get(key))
            for key, started in self.started.items()
            if started >= attempts
        ]

    def end(self, key: str) -> None:
        """Forget a batch that was decoded (only batches that died stay counted)."""
        for kept in (self.started, self.in_child, self.blamed):
            kept.pop(key, None)


def decode_guarded(
    decode: Decode, rows: list[Row], manifest: dict, settings: dict, attempts: Any
) -> tuple[list[Any], list[tuple[str, str]]]:
    """``decode(rows, manifest, settings)``; in a child process, one row at a time, when an earlier attempt of this
    batch died (``attempts``: the actor holding the run's :class:`Attempts`, or None to decode in this process)."""
    if attempts is None or not rows:
        return decode(rows, manifest, settings)
    import ray  # a decode task of Ray Data's

    key = hashlib.sha256("\n".join(uri for uri, _, _ in rows).encode()).hexdigest()
    number, blamed = ray.get(attempts.begin.remote(key))
    if number == 1:
        result = decode(rows, manifest, settings)
    else:
        result = decode_isolated(decode, rows, manifest, settings, Watched(attempts, key, set(blamed)))
    attempts.end.remote(key)
    return result


class Watched:
    """The actor keeping a batch's :class:`Attempts`, told which input each child decodes, and the inputs to leave
    out: those being decoded when an earlier attempt's process died."""

    def __init__(self, attempts: Any, key: str, blamed: set[str]):
        self.attempts, self.key, self.blamed = attempts, key, blamed

    def child_begins(self, uri: str) -> None:
        import ray

        ray.get(self.attempts.child_begins.remote(self.key, uri))  # recorded before the child may take us down

    def child_ends(self) -> None:
        import ray

        ray.get(self.attempts.child_ends.remote(self.key))  # recorded before anything else may take us down


BLAMED = "the decode task's process died while it was being decoded"  # the reason of an input left out


def decode_isolated(
    decode: Decode, rows: list[Row], manifest: dict, settings: dict, watched: Watched | None = None
) -> tuple[list[Any], list[tuple[str, str]]]:
    """``decode`` one row at a time in a forked child; a row whose child dies is rejected with how it died. With
    ``watched``: its actor is told each row before the child decodes it, and its blamed rows are rejected as they
    are, undecoded."""
    context = multiprocessing.get_context("fork")
    decoded: list[Any] = []
    errors: list[tuple[str, str]] = []
    pending = list(rows)
    if watched is not None:
        errors = [(uri, BLAMED) for uri, _, _ in rows if uri in watched.blamed]
        pending = [row for row in rows if row[0] not in watched.blamed]
    while pending:
        ours, theirs = context.Pipe()
        child = context.Process(target=_serve, args=(theirs, decode, manifest, settings), daemon=True)
        child.start()
        theirs.close()
        try:
            while pending:
                if watched is not None:
                    watched.child_begins(pending[0][0])
                ours.send(pending[0])
                try:
                    done, failed = ours.recv()
                except EOFError:  # the child died on this row
                    child.join()
                    errors.append((pending.pop(0)[0], _died_on_it(child.exitcode, settings)))
                    break
                finally:  # this process lived on
                    if watched is not None:
                        watched.child_ends()
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


def given_up_message(given_up: list[tuple[list[str], str | None]], attempts: int, dry_run: bool) -> str:
    """What a user is told of the batches (:meth:`Attempts.given_up`) whose decode tasks died on every attempt."""
    named = []
    for blamed, in_child in given_up:
        named += [*blamed, *([in_child] if in_child is not None else [])]
    batches = "a batch" if len(given_up) == 1 else f"{len(given_up)} batches"
    inputs = f": the inputs being decoded when it died: {', '.join(named)}" if named else ""
    that = "that batch" if len(given_up) == 1 else "those batches"
    cached = "" if dry_run else f" Nothing of {that} is cached; the rows cached so far stay (a rerun goes on)."
    return (
        f"a decode task's process died on each of its {attempts} attempts at {batches} of inputs{inputs}.{cached} "
        "Leave those inputs out of the input and run again"
    )


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
