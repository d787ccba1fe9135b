"""One writer per output: a lease file in the output folder that names the run writing there.

A run takes the lease (``_isa_lease.json``) before it writes anything, renews its heartbeat every
:data:`HEARTBEAT_S` seconds while it runs, and removes the lease when it ends, also when it fails. Another run
meanwhile is refused with a message naming the holder (host, pid, user, run id, start), or, asked to wait, starts
once the lease is gone. A run that was killed leaves its lease behind: once its heartbeat is older than
:data:`STALE_AFTER_S` seconds the lease is stale and the next run takes it over (the clocks of the machines that
share an output must agree to well within that).

Atomic on a local disk and on S3: a lease is created only where none exists (a hard link of a whole temporary,
which fails where the file exists; S3's conditional ``If-None-Match: *`` upload), and renewed, taken over or
removed only in the version that was read (locally a whole temporary renamed over it under an exclusive ``flock``
of the version read; on S3 ``If-Match`` on the version's ETag). Other filesystems check and then write, which two
runs starting at the same moment can both pass.

Fencing: every lease has a token of its own. A run's tasks carry a :class:`Fence` (the output and the token) and
check it before each file they publish, so the late writes of a run whose lease was taken over (a killed run's
tasks still running, a run that stalled past the stale timeout) are refused rather than landing in the output.
The check also refuses once the lease's last renewal is older than :data:`PUBLISH_WITHIN_S`: a run that is paused
or cut off from the storage (its heartbeat stalls while its tasks go on) stops publishing before any other run may
take its lease over (:data:`STALE_AFTER_S`). A check and the write after it are two requests (object storage has no
write conditional on another object), so a publish is fenced as long as it ends within
``STALE_AFTER_S - PUBLISH_WITHIN_S`` seconds of its check, and the clocks of the machines agree to well within that.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from isa.errors import IsaError
from isa.storage import filesystem

LEASE_FILE = "_isa_lease.json"
HEARTBEAT_S = 15.0  # how often a holder renews its lease
STALE_AFTER_S = 120.0  # a lease whose heartbeat is older is a killed run's: the next run takes it over
PUBLISH_WITHIN_S = 90.0  # a run whose heartbeat is older publishes nothing more: 30 s before a takeover
WAIT_POLL_S = 2.0  # how often a run that waits looks at the lease again


class LeaseHeld(IsaError):
    """Another live run holds the output's lease."""


class LeaseLost(IsaError):
    """This run's lease was taken over (or removed): it must not write to the output any more."""


def holder_text(record: dict[str, Any], now: float | None = None) -> str:
    """A lease's holder as the messages name it."""
    holder = record.get("holder", {})
    age = (time.time() if now is None else now) - float(record.get("heartbeat", 0.0))
    return (
        f"{holder.get('command', 'a run')} of user {holder.get('user', '?')}, pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, run {holder.get('run_id', '?')}, started {holder.get('started', '?')}, "
        f"last heartbeat {max(age, 0.0):.0f} s ago"
    )


def is_stale(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether a lease's heartbeat is older than :data:`STALE_AFTER_S`."""
    return (time.time() if now is None else now) - float(record.get("heartbeat", 0.0)) > STALE_AFTER_S


class _Store:
    """Create-if-absent, conditional replace and conditional delete of one small JSON file; ``version`` is what a
    conditional change compares (S3: the ETag; locally: the record read, compared under the file's lock)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        record = self.peek()
        return record, record

    def peek(self) -> dict[str, Any] | None:
        """The record alone (no version): one read."""
        try:
            return _parse(self.fs.cat_file(self.path), self.path)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> Any:
        self.fs.invalidate_cache(self.path)
        if self.fs.exists(self.path):
            return None
        self.fs.pipe_file(self.path, data)
        return json.loads(data)

    def replace(self, data: bytes, version: Any) -> Any:
        current, _ = self.read()
        if current != version:
            return None
        self.fs.pipe_file(self.path, data)
        return json.loads(data)

    def delete(self, version: Any) -> bool:
        current, _ = self.read()
        if current != version:
            return False
        self.fs.rm(self.path)
        return True


class _LocalStore(_Store):
    """A local (or mounted) disk: creation by a hard link (which fails where the file exists), changes by a rename
    under an exclusive ``flock`` of the version read, so a reader always finds a whole file."""

    def _staging(self, data: bytes) -> str:
        """A whole temporary beside the lease, holding ``data``."""
        folder = posixpath.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        staging = posixpath.join(folder, f".{LEASE_FILE}.tmp-{uuid.uuid4().hex}")
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return staging

    def create(self, data: bytes) -> Any:
        staging = self._staging(data)
        try:
            os.link(staging, self.path)  # fails where the lease exists: create-if-absent with the whole content
        except (FileExistsError, FileNotFoundError):  # not found: a starting run removed the temporary
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
        return json.loads(data)

    @contextlib.contextmanager
    def _locked(self, version: Any):
        """The open lease file under an exclusive lock when it is still the version read, else None."""
        try:
            handle = open(self.path, "r+b")
        except FileNotFoundError:
            yield None
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                linked = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                linked = False
            same = linked and _parse(handle.read(), self.path) == version
            yield handle if same else None

    def replace(self, data: bytes, version: Any) -> Any:
        with self._locked(version) as handle:
            if handle is None:
                return None
            staging = self._staging(data)
            os.replace(staging, self.path)  # a run waiting for the old file's lock then finds it unlinked
        return json.loads(data)

    def delete(self, version: Any) -> bool:
        with self._locked(version) as handle:
            if handle is None:
                return False
            os.unlink(self.path)
        return True


class _S3Store(_Store):
    """S3: conditional uploads and deletes (``If-None-Match: *``, ``If-Match: ETag``)."""

    def _key(self) -> dict[str, str]:
        bucket, key, _ = self.fs.split_path(self.path)
        return {"Bucket": bucket, "Key": key}

    def read(self) -> tuple[dict[str, Any] | None, Any]:
        """The record and its ETag, from one request (so they are of the same version)."""
        try:
            response = self.fs.call_s3("get_object", **self._key())
            data = fsspec.asyn.sync(self.fs.loop, response["Body"].read)
        except FileNotFoundError:
            return None, None
        return _parse(data, self.path), response["ETag"]

    def _put(self, data: bytes, condition: dict[str, str]) -> Any:
        try:
            return self.fs.call_s3("put_object", Body=data, **self._key(), **condition)["ETag"]
        except OSError as error:
            if _precondition_failed(error):
                return None
            raise

    def create(self, data: bytes) -> Any:
        return self._put(data, {"IfNoneMatch": "*"})

    def replace(self, data: bytes, version: Any) -> Any:
        return self._put(data, {"IfMatch": version})

    def delete(self, version: Any) -> bool:
        try:
            self.fs.call_s3("delete_object", **self._key(), IfMatch=version)
        except OSError as error:
            if _precondition_failed(error):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return True


def _precondition_failed(error: OSError) -> bool:
    """An S3 conditional request that did not hold (412), or lost to a concurrent one (409)."""
    text = str(error)
    return isinstance(error, FileExistsError) or "pre-condition" in text or "ConditionalRequestConflict" in text


def _parse(data: bytes, path: str) -> dict[str, Any]:
    try:
        record = json.loads(data)
        if isinstance(record, dict) and isinstance(record.get("token"), str):
            return record
    except ValueError:
        pass
    raise LeaseHeld(f"the lease file {path} cannot be read: remove it if no run is writing to this output")


def _store(output: str) -> _Store:
    fs, root = filesystem(output)
    path = posixpath.join(root, LEASE_FILE)
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(fs, path)
    if "s3" in fs.protocol or "s3a" in fs.protocol:
        return _S3Store(fs, path)
    return _Store(fs, path)


@dataclass(frozen=True)
class Fence:
    """What a run's tasks carry to check that the run still holds its output's lease, before each file they
    publish (:func:`isa.storage.write_bytes`'s ``before_publish``)."""

    output: str
    token: str

    def __call__(self) -> None:
        """Raises :class:`LeaseLost` when the output's lease is not this run's any more, or when its last renewal
        is so old that another run may take it over before a publish ends (:data:`PUBLISH_WITHIN_S`)."""
        record = _store(self.output).peek()
        if record is None or record["token"] != self.token:
            holder = "no run" if record is None else holder_text(record)
            raise LeaseLost(
                f"OUT {self.output}: this run's lease was taken over (it now names {holder}); "
                "this run stopped without writing more"
            )
        age = time.time() - float(record.get("heartbeat", 0.0))
        if age > PUBLISH_WITHIN_S:
            raise LeaseLost(
                f"OUT {self.output}: this run's lease was last renewed {age:.0f} s ago (the run was paused, or its "
                f"renewals did not reach the storage); another run may take it over at {STALE_AFTER_S:.0f} s, so "
                "this run stopped without writing more: run it again with --wait to go on where it stopped"
            )


class Lease:
    """The lease of one run on one output; use :meth:`acquire`, and :meth:`release` (or ``with``) at the end."""

    def __init__(self, output: str, store: _Store, record: dict[str, Any], version: Any, created_folder: bool):
        self.output, self._store, self.record, self._version = output, store, record, version
        self._created_folder = created_folder
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="isa-lease-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, output: str, command: str, wait: bool = False) -> Lease:
        """Take the lease of ``output``: create it, or take over a stale one; refuse (or wait for) a live one.

        Raises:
            LeaseHeld: another run holds a live lease (not raised with ``wait``: it waits until the lease is
                released or goes stale).
        """
        store = _store(output)
        local_folder = isinstance(store, _LocalStore) and not os.path.isdir(posixpath.dirname(store.path))
        announced = False
        while True:
            record = _new_record(command)
            data = json.dumps(record, indent=1).encode()
            version = store.create(data)
            if version is not None:
                return cls(output, store, record, version, local_folder)
            current, current_version = store.read()
            if current is None:
                continue  # released meanwhile
            if current["token"] == record["token"]:  # ours: an upload retried after its answer was lost
                return cls(output, store, record, current_version, local_folder)
            if is_stale(current):
                version = store.replace(data, current_version)
                if version is None:
                    version = _own_version(store, record)
                if version is not None:
                    print(f"{command}: took over the stale lease of {output} ({holder_text(current)})", file=sys.stderr)
                    return cls(output, store, record, version, False)
                continue
            if not wait:
                raise LeaseHeld(
                    f"OUT {output} is being written by another run ({holder_text(current)}): rerun with --wait to "
                    f"start once it ends; a killed run's lease is taken over once its heartbeat is {STALE_AFTER_S:.0f}"
                    " s old"
                )
            if not announced:
                print(f"{command}: waiting for {output}, written by {holder_text(current)}", file=sys.stderr)
                announced = True
            time.sleep(WAIT_POLL_S)

    @property
    def fence(self) -> Fence:
        return Fence(self.output, self.record["token"])

    def check(self) -> None:
        """Raises :class:`LeaseLost` when this run's lease was taken over."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        self.fence()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            record = {**self.record, "heartbeat": time.time(), "heartbeat_utc": _utc()}
            try:
                version = self._store.replace(json.dumps(record, indent=1).encode(), self._version)
            except Exception:  # noqa: BLE001 - a storage hiccup: the next beat tries again, well within the timeout
                continue
            if version is None:
                version = _own_version(self._store, record)
            if version is None:
                self._lost = f"OUT {self.output}: this run's lease was taken over by another run"
                return
            self.record, self._version = record, version

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, where it is still this run's (a lease that cannot be removed
        is left to go stale, with a line saying so)."""
        self._stop.set()
        self._thread.join()
        if self._lost is None:
            try:
                self._store.delete(self._version)
            except OSError as error:
                print(f"could not remove the lease of {self.output} ({error}): it goes stale", file=sys.stderr)
        if self._created_folder:
            with contextlib.suppress(OSError):  # the run left nothing: no empty folder either
                os.rmdir(posixpath.dirname(self._store.path))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _own_version(store: _Store, record: dict[str, Any]) -> Any:
    """The version of the lease where it holds ``record`` (a conditional upload that landed though its answer was
    lost, and whose retry then failed its condition), else None."""
    current, version = store.read()
    return version if current == record else None


def _utc(now: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_record(command: str) -> dict[str, Any]:
    now = time.time()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    holder = {
        "command": command,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": user,
        "run_id": uuid.uuid4().hex[:12],
        "started": _utc(now),
    }
    return {"holder": holder, "token": uuid.uuid4().hex, "heartbeat": now, "heartbeat_utc": _utc(now)}
