"""One writer per output (pipelines.lease) on a local disk and on a real S3 endpoint (moto), without Ray: atomic
creation and takeover under races, the refusal naming the holder, waiting, stale takeover, fencing of late writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from isa.storage import filesystem, write_table
from pipelines import lease
from pipelines.lease import LEASE_FILE, Fence, Lease, LeaseHeld, LeaseLost

HOLDER = """
import sys, time
from pipelines.lease import Lease
print(Lease.acquire(sys.argv[1], "isa embed").record["token"], flush=True)
time.sleep(600)
"""
RENEWING_HOLDER = """
import sys, time
from pipelines import lease
lease.HEARTBEAT_S = 0.1
print(lease.Lease.acquire(sys.argv[1], "isa embed").record["token"], flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "cache")
    request.getfixturevalue("s3_endpoint")
    import s3fs

    fs = s3fs.S3FileSystem()
    if not fs.exists("isa-lease-bucket"):
        fs.mkdir("isa-lease-bucket")
    return f"s3://isa-lease-bucket/{tmp_path.name}/cache"


def _lease_record(output: str) -> dict | None:
    fs, root = filesystem(output)
    fs.invalidate_cache(root)
    path = f"{root}/{LEASE_FILE}"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _race(count: int, attempt) -> list:
    """``attempt()`` from ``count`` threads released at once; the results (or errors) of each."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def one(index: int) -> None:
        barrier.wait()
        try:
            results[index] = attempt()
        except Exception as error:  # noqa: BLE001 - the refusals are counted
            results[index] = error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_one_run_takes_a_free_or_stale_lease_the_others_are_refused_naming_it(output, monkeypatch):
    results = _race(6, lambda: Lease.acquire(output, "isa embed"))
    winners = [r for r in results if isinstance(r, Lease)]
    refusals = [r for r in results if isinstance(r, LeaseHeld)]
    assert len(winners) == 1 and len(refusals) == 5, results
    holder = winners[0].record["holder"]
    for refusal in refusals:
        text = str(refusal)
        assert f"OUT {output} is being written by another run" in text and "--wait" in text
        for part in (holder["user"], f"pid {holder['pid']}", holder["host"], holder["run_id"], holder["started"]):
            assert part in text, (part, text)
    winners[0].fence()  # still its own

    winners[0].release()
    assert _lease_record(output) is None

    # a holder killed: its lease stays, and is taken over once stale, by one run of several at once
    child = subprocess.Popen([sys.executable, "-c", HOLDER, output], stdout=subprocess.PIPE, text=True)
    token = child.stdout.readline().strip()
    child.kill()
    child.wait(timeout=30)
    assert _lease_record(output)["token"] == token
    assert isinstance(_race(2, lambda: Lease.acquire(output, "isa embed"))[0], LeaseHeld)  # live for 120 s
    monkeypatch.setattr(lease, "STALE_AFTER_S", 1.0)
    time.sleep(1.2)
    results = _race(4, lambda: Lease.acquire(output, "isa embed"))
    takers = [r for r in results if isinstance(r, Lease)]
    assert len(takers) == 1, results  # the others found the new holder's lease live
    monkeypatch.setattr(lease, "STALE_AFTER_S", 120.0)
    assert _lease_record(output)["token"] == takers[0].record["token"] != token

    # the killed run's late writes are refused: nothing lands, not even a temporary
    fs, root = filesystem(output)
    table = pa.table({"uri": ["a.jpg"], "reason": ["late"]})
    with pytest.raises(LeaseLost, match="taken over"):
        write_table(fs, f"{root}/_errors/part-late.parquet", table, Fence(output, token))
    fs.invalidate_cache(root)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(root)) == [LEASE_FILE]
    write_table(fs, f"{root}/_errors/part-new.parquet", table, takers[0].fence)  # the holder writes
    takers[0].release()
    assert _lease_record(output) is None


def test_a_holder_renews_its_lease_notices_a_takeover_and_a_waiting_run_goes_on_after_it(output, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(lease, "WAIT_POLL_S", 0.05)
    first = Lease.acquire(output, "isa embed")
    beat = first.record["heartbeat"]
    deadline = time.monotonic() + 20
    while _lease_record(output)["heartbeat"] == beat and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _lease_record(output)["heartbeat"] > beat  # renewed while it runs

    waited: list = []
    waiter = threading.Thread(target=lambda: waited.append(Lease.acquire(output, "isa embed", wait=True)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not waited  # waits while the holder lives
    first.release()
    waiter.join(timeout=30)
    second = waited[0]
    assert _lease_record(output)["token"] == second.record["token"]

    # a stalled holder taken over (as a killed one would be) finds out at its next heartbeat and stops writing
    monkeypatch.setattr(lease, "STALE_AFTER_S", -1.0)  # every lease counts as stale
    third = Lease.acquire(output, "isa embed")
    monkeypatch.setattr(lease, "STALE_AFTER_S", 120.0)
    deadline = time.monotonic() + 20
    while second._lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseLost, match="taken over"):
        second.check()
    second.release()
    third.check()
    third.release()
    assert _lease_record(output) is None


def test_a_holder_whose_heartbeat_stalls_stops_publishing_before_its_lease_can_be_taken_over(output, monkeypatch):
    """A holder paused (SIGSTOP: its heartbeat stops, as on a machine cut off from the storage) while its tasks go
    on: their next publish is refused once the lease's last renewal is older than PUBLISH_WITHIN_S, while the lease
    is not stale yet (no other run can have taken it over); once the holder goes on, its renewals let them publish
    again."""
    monkeypatch.setattr(lease, "STALE_AFTER_S", 12.0)
    monkeypatch.setattr(lease, "PUBLISH_WITHIN_S", 2.0)
    child = subprocess.Popen([sys.executable, "-c", RENEWING_HOLDER, output], stdout=subprocess.PIPE, text=True)
    try:
        token = child.stdout.readline().strip()
        fence = Fence(output, token)  # what the holder's tasks carry
        fs, root = filesystem(output)
        table = pa.table({"uri": ["a.jpg"], "reason": ["published"]})
        write_table(fs, f"{root}/_errors/part-0.parquet", table, fence)
        os.kill(child.pid, signal.SIGSTOP)
        refused, deadline = None, time.monotonic() + 60
        while refused is None and time.monotonic() < deadline:
            try:
                fence()  # the check each publish makes
            except LeaseLost as error:
                refused = error
            time.sleep(0.1)
        record = _lease_record(output)
        assert refused is not None, "the stalled holder's tasks were never refused"
        assert record["token"] == token and not lease.is_stale(record)  # still its lease, not stale yet
        with pytest.raises(LeaseHeld):  # no other run may take it over yet
            Lease.acquire(output, "isa embed")
        text = str(refused)
        assert text.startswith(f"OUT {output}: this run's lease was last renewed ") and "stopped without" in text
        assert "another run may take it over at 12 s" in text and "--wait" in text
        with pytest.raises(LeaseLost, match="last renewed"):
            write_table(fs, f"{root}/_errors/part-late.parquet", table, fence)
        fs.invalidate_cache(root)
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(root)) == [LEASE_FILE, "part-0.parquet"]

        os.kill(child.pid, signal.SIGCONT)  # the holder goes on: its lease was never taken, its tasks go on too
        deadline = time.monotonic() + 60
        while _lease_record(output)["heartbeat"] == record["heartbeat"] and time.monotonic() < deadline:
            time.sleep(0.1)
        write_table(fs, f"{root}/_errors/part-1.parquet", table, fence)
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait(timeout=30)


def test_embed_into_a_held_output_is_refused_before_ray_naming_the_holder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not read: refused before")
    out = tmp_path / "cache"
    held = Lease.acquire(str(out), "isa embed")
    try:
        env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # a Ray start would fail loudly
        done = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "embed", str(images), str(out), "teacher.pretrained=none"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        held.release()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"isa embed: error: OUT {out} is being written by another run (")
    assert f"pid {os.getpid()}" in lines[0] and held.record["holder"]["run_id"] in lines[0] and "--wait" in lines[0]
    assert not out.exists()  # nothing left: the holder's lease went with it, no manifest was written


def test_the_lease_on_flaky_s3_is_taken_renewed_and_released_once(s3_endpoint, flaky_s3, tmp_path, monkeypatch):
    """Through the proxy that resets a third of the connections after the request is done: a conditional upload that
    landed though its answer was lost is the run's own (its retry fails its condition), never a refusal of the run
    by itself. (Faults answered before the request is done are retried by the S3 client as any request.)"""
    kind = "reset_after"
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    output = f"s3://isa-lease-bucket/{tmp_path.name}-{kind}/cache"
    filesystem(output)[0].mkdirs("isa-lease-bucket", exist_ok=True)
    with flaky_s3.faults(0.35, seed=3, kinds=(kind,)) as proxy:
        for _ in range(2):
            held = Lease.acquire(output, "isa embed")
            time.sleep(0.3)  # a few heartbeats
            held.check()
            with pytest.raises(LeaseHeld):
                Lease.acquire(output, "isa embed")
            held.release()
            assert _lease_record(output) is None
        assert proxy.injected[kind] > 0
