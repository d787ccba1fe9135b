"""``isa embed`` without Ray (``cache.runner``): the same cache as the Ray pipeline writes, exactly once, decoder
crashes contained, and the rule that picks it."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_embed import TEACHER, _cache, _config, _deadly_server, _write_scenes, image_folder  # noqa: F401

from isa.cache import MANIFEST_FILE
from isa.config import ConfigError
from isa.images import content_id
from pipelines import lease
from pipelines.embed import local as local_runs
from pipelines.embed import run, runner
from pipelines.embed.decode import rebatched

LOCAL = "cache.runner=local"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_cache(ours: Path, theirs: Path) -> None:
    """The same rows (ids, sizes, JPEG bytes; embeddings within 1e-6), rejects and duplicate pair in both caches."""
    rows = [_cache(root).sort_by("id").to_pydict() for root in (ours, theirs)]
    assert rows[0]["id"] == rows[1]["id"] and len(set(rows[0]["id"])) == len(rows[0]["id"])
    for column in ("width", "height", "image"):
        assert rows[0][column] == rows[1][column], column
    for column in ("teacher_emb", "teacher_local"):
        assert np.abs(np.array(rows[0][column]) - np.array(rows[1][column])).max() <= 1e-6, column
    errors = [pq.read_table(root / "_errors").sort_by("uri").to_pylist() for root in (ours, theirs)]
    assert errors[0] == errors[1]
    # which of two copies is cached depends on the order of decoding; the pair and its bytes are the same
    pairs = []
    for root in (ours, theirs):
        found = pq.read_table(root / "_duplicates").to_pylist()
        cached_uris = set(_cache(root)["uri"].to_pylist())
        assert len(found) == 1 and found[0]["duplicate_of"] in cached_uris and found[0]["uri"] not in cached_uris
        pairs.append((found[0]["id"], {found[0]["uri"], found[0]["duplicate_of"]}))
    assert pairs[0] == pairs[1]


def test_without_ray_the_cache_is_the_one_ray_writes(ray_session, image_folder, tmp_path):  # noqa: F811
    """Every kind of bad input, a copy, unusual images: the rows, rejects and duplicates of a run without Ray are
    the Ray pipeline's (whose fidelity to open_clip tests/pipelines/test_embed.py checks). Decode calls of 5 and
    tower batches of 8 are regrouped on the way."""
    folder, _, _ = image_folder
    settings = ["cache.dtype=float32", "cache.max_image_pixels=100000", "cache.decode_batch_size=5"]
    on_ray = run(str(folder), str(tmp_path / "ray"), _config(*settings, "cache.runner=ray"))
    local = run(str(folder), str(tmp_path / "local"), _config(*settings, LOCAL))
    assert (local.read, local.cached, local.rejected, local.duplicates, local.skipped) == (
        on_ray.read,
        on_ray.cached,
        on_ray.rejected,
        on_ray.duplicates,
        0,
    )
    _assert_same_cache(tmp_path / "local", tmp_path / "ray")
    assert local.rejected == len(pq.read_table(tmp_path / "local" / "_errors"))
    assert multiprocessing.active_children() == []  # the decode helpers ended with the run


def test_without_ray_decoding_starts_while_the_teacher_loads(image_folder, tmp_path, monkeypatch):  # noqa: F811
    """The helper decodes call after call while the teacher loads, with what the teacher is expected to need, and
    nothing is written before the cache's manifest; the cache is the one a run that waits for the teacher writes.
    Where the expectation is wrong, every call decoded with it is decoded again, and the cache is the same. The crops
    decoded ahead are bounded (``EARLY_CROP_BYTES``)."""
    import isa.build
    import pipelines.embed

    folder, _, _ = image_folder
    settings = ["cache.dtype=float32", "cache.max_image_pixels=100000", "cache.decode_batch_size=5", LOCAL]
    calls = len(list(local_runs.listed(str(folder), _config(*settings).cache, None)))  # all new: a decode each
    sent: list[dict] = []  # the manifest each call was sent with
    real_send, real_build = local_runs.Decoders.send, isa.build.build_teacher

    def send(self, helper, rows, manifest, settings):
        sent.append(manifest)
        real_send(self, helper, rows, manifest, settings)

    seen_at_load: list[tuple[int, list[str]]] = []
    wait_for = {"calls": calls}

    def build_teacher(*args, **kwargs):  # once that many calls were sent, or 60 s: what was sent and written
        deadline = time.monotonic() + 60
        while len(sent) < wait_for["calls"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        written = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != lease.LEASE_FILE]
        seen_at_load.append((len(sent), written))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(local_runs.Decoders, "send", send)
    monkeypatch.setattr(isa.build, "build_teacher", build_teacher)
    out = tmp_path / "early"
    early = run(str(folder), str(out), _config(*settings))
    assert seen_at_load == [(calls, [])]  # all decoded with one helper: taken back before the manifest was written
    assert len(sent) == calls

    expected_decoding = pipelines.embed.expected_decoding
    monkeypatch.setattr(pipelines.embed, "expected_decoding", lambda config: None)
    sent.clear()
    wait_for["calls"] = 0
    out = tmp_path / "waited"
    run(str(folder), str(out), _config(*settings))
    assert seen_at_load[1] == (0, [])  # without an expectation, nothing is decoded before the manifest
    _assert_same_cache(tmp_path / "early", tmp_path / "waited")

    def wrongly_expected(config):  # student JPEGs of another quality than the run's
        manifest, decoding = expected_decoding(config)
        return manifest, {**decoding, "jpeg_quality": decoding["jpeg_quality"] - 20}

    monkeypatch.setattr(pipelines.embed, "expected_decoding", wrongly_expected)
    sent.clear()
    wait_for["calls"] = calls
    out = tmp_path / "wrong"
    wrong = run(str(folder), str(out), _config(*settings))
    assert seen_at_load[2] == (calls, [])
    assert len(sent) == 2 * calls  # each call decoded again with what the run published
    assert (wrong.cached, wrong.rejected, wrong.duplicates) == (early.cached, early.rejected, early.duplicates)
    _assert_same_cache(tmp_path / "wrong", tmp_path / "waited")

    # at most EARLY_CROP_BYTES of crops wait for the manifest: here two calls' worth, then decoding waits too
    monkeypatch.setattr(pipelines.embed, "expected_decoding", expected_decoding)
    crop_side = expected_decoding(_config(*settings))[0]["teacher"]["preprocess"]["size"][0]
    monkeypatch.setattr(local_runs, "EARLY_CROP_BYTES", 2 * 5 * crop_side**2 * 3)
    sent.clear()
    wait_for["calls"] = 2
    out = tmp_path / "bounded"
    run(str(folder), str(out), _config(*settings))
    assert seen_at_load[3] == (2, [])
    assert len(sent) == calls
    _assert_same_cache(tmp_path / "bounded", tmp_path / "waited")
    assert multiprocessing.active_children() == []


def test_without_ray_a_rerun_writes_nothing_and_new_inputs_are_cached_once(tmp_path):
    folder = tmp_path / "images"
    good = _write_scenes(folder, 12)
    out = tmp_path / "cache"
    first = run(str(folder), str(out), _config(LOCAL))
    assert (first.read, first.cached, first.skipped) == (12, 12, 0)
    before = _files(out)
    again = run(str(folder), str(out), _config(LOCAL))
    assert (again.read, again.cached, again.skipped, again.rejected, again.duplicates) == (12, 0, 12, 0, 0)
    assert _files(out) == before

    # a list file: some cached inputs, new ones, one listed twice, and a new name for cached bytes
    new = _write_scenes(tmp_path / "new", 5, seed=1)
    shutil.copy(good[2], tmp_path / "renamed.png")
    listing = tmp_path / "inputs.txt"
    names = [*good[:4], *new, new[0], tmp_path / "renamed.png"]
    listing.write_text("\n".join(map(str, names)) + "\n\n")
    more = run(str(listing), str(out), _config(LOCAL, "cache.decode_batch_size=3"))
    assert (more.read, more.skipped, more.cached, more.duplicates) == (len(names), 4, 5, 1)
    ids = _cache(out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 17
    assert set(ids) == {content_id(p.read_bytes()) for p in [*good, *new]}
    duplicate = pq.read_table(out / "_duplicates").to_pylist()
    assert [(d["uri"], d["duplicate_of"]) for d in duplicate] == [(str(tmp_path / "renamed.png"), "cache")]


def test_without_ray_an_input_that_kills_its_decoder_or_never_ends_is_rejected_with_how(tmp_path):
    """The helper dies with the call; decoded again one input at a time, each in a child of its own, the input that
    kills its process is rejected and the others are cached. So is an input whose read never ends (a FIFO nobody
    writes, as on a hung network mount): its process ends once it has waited ``cache.input_timeout_s``."""
    good = _write_scenes(tmp_path / "images", 6)
    listing = tmp_path / "inputs.txt"
    stuck = tmp_path / "stuck.png"
    os.mkfifo(stuck)
    with _deadly_server() as (url, killed):
        inputs = [*map(str, good), str(tmp_path / "missing.jpg"), f"{url}/deadly.jpg", str(stuck)]
        listing.write_text("\n".join(inputs) + "\n")
        one_call = ["cache.decode_batch_size=16", "cache.input_timeout_s=1.5"]
        summary = run(str(listing), str(tmp_path / "cache"), _config(LOCAL, *one_call))
    reasons = {Path(r["uri"]).name: r["reason"] for r in pq.read_table(tmp_path / "cache" / "_errors").to_pylist()}
    assert reasons["deadly.jpg"] == "the decoding process died on it (killed by SIGKILL)"
    assert reasons["stuck.png"] == "reading and decoding it took longer than 1.5 s (cache.input_timeout_s)"
    assert reasons["missing.jpg"].startswith("unreadable: FileNotFoundError")
    assert len(killed) == 2, killed  # the helper, then the child that decoded the input alone: not retried again
    assert (summary.cached, summary.rejected) == (len(good), 3)
    assert multiprocessing.active_children() == []


def test_a_killed_run_without_ray_resumes_exactly_once(tmp_path, monkeypatch):
    good = _write_scenes(tmp_path / "images", 120)
    # The kill lands midway by construction. Two inputs are FIFOs (reads that wait, as on a hung network mount);
    # decode calls are taken back in order, so the run stops at each. The first is answered once the teacher is
    # loaded (a reject); the second never: the 39 images of the ten calls before its call are decoded, 36 of
    # them cached (nine parts, the three left wait for a fourth row), nothing after it.
    stuck = [tmp_path / "stuck-1.png", tmp_path / "stuck-2.png"]
    for fifo in stuck:
        os.mkfifo(fifo)
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(map(str, [*good[:12], stuck[0], *good[12:39], stuck[1], *good[39:]])) + "\n")
    out = tmp_path / "cache"
    args = [sys.executable, "-m", "pipelines.cli", "embed", str(listing), str(out), *TEACHER]
    args += ["cache.decode_batch_size=4", "cache.batch_size=4", "cache.rows_per_shard=4", "cache.local_grid=0"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 240
        while not ready():
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)

    wait_for(lambda: (out / MANIFEST_FILE).exists())
    time.sleep(1)  # the run hands its decoding the manifest right after writing it
    # open the FIFO's writing end and close it, writing nothing: the waiting read is answered (a reject either way,
    # the empty read or the seek that fsspec tries on a FIFO); a write could meet a reader already gone (EPIPE)
    os.close(os.open(stuck[0], os.O_WRONLY))
    wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 9)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    log.close()
    assert "without Ray" in (tmp_path / "first.log").read_text()
    partial = pq.read_table(sorted(out.glob("part-*.parquet"))).num_rows
    assert partial == 36, "the run cached inputs listed after the one it waited for"
    assert pq.read_table(out / "_errors").column("uri").to_pylist() == [str(stuck[0])]

    inputs = [*good[:39], stuck[1], *good[39:]]  # the unreadable input left out, the other one a file now
    stuck[1].unlink()
    shutil.copyfile(_write_scenes(tmp_path / "more", 1, seed=1)[0], stuck[1])
    listing.write_text("\n".join(map(str, inputs)) + "\n")
    monkeypatch.setattr(lease, "STALE_AFTER_S", 0.5)
    time.sleep(1)
    summary = run(str(listing), str(out), _config(LOCAL, "cache.local_grid=0"))
    ids = _cache(out)["id"].to_pylist()
    expected = {content_id(p.read_bytes()) for p in inputs}
    assert len(ids) == len(set(ids)) == len(inputs) == len(expected) and set(ids) == expected
    assert summary.read == len(inputs) and summary.skipped >= partial
    assert summary.skipped + summary.cached == summary.read
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_isa_embed_runs_without_ray_where_nothing_calls_for_it(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    _write_scenes(folder, 4)
    out = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the command as `isa embed` runs it, then what it imported: no Ray module (importing Ray costs seconds)
    command = (
        "import sys; from pipelines.cli import main; code = main(sys.argv[1:]); "
        "print('ray modules:', sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", command, "embed", str(folder), str(out), *TEACHER, "cache.local_grid=0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("isa embed: in this process, without Ray"), done.stdout
    assert lines[1].startswith("isa embed: read 4 · cached 4 · skipped 0"), done.stdout
    assert lines[-1] == "ray modules: []", done.stdout

    config = _config()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runner(str(folder), str(out), config, ray_started=False) == ("ray" if torch.cuda.is_available() else "local")
    assert runner(str(folder), str(out), _config("cache.device=cpu"), ray_started=False) == "local"
    local_cpu = _config("cache.device=cpu")
    assert runner(str(folder), str(out), local_cpu, ray_started=True) == "ray"  # a Ray instance joined already
    for overrides in (["cache.tower_in=actors"], ["cache.ledger_rows=3"], ["cache.runner=ray"]):
        assert runner(str(folder), str(out), _config("cache.device=cpu", *overrides), False) == "ray", overrides
    assert runner(str(folder), "s3://bucket/cache", local_cpu, False) == "ray"
    (tmp_path / "list.csv").write_text(f"uri\n{folder}\n")
    assert runner(str(tmp_path / "list.csv"), str(out), local_cpu, False) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert runner(str(folder), str(out), local_cpu, False) == "ray"
    assert runner(str(folder), str(out), _config(LOCAL), True) == "local"  # asked for
    with pytest.raises(ConfigError, match="the cache is not on this machine's disk"):
        runner(str(folder), "s3://bucket/cache", _config(LOCAL), False)
    with pytest.raises(ConfigError, match=r"cache.tower_in=actors"):
        runner(str(folder), str(out), _config(LOCAL, "cache.tower_in=actors"), False)


def test_decoded_calls_are_regrouped_into_tower_batches():
    calls = [
        {"uri": np.arange(start, stop), "crop": np.arange(start, stop) * 10}
        for start, stop in ((0, 5), (5, 5), (5, 12), (12, 13))
    ]
    batches = list(rebatched(calls, 4))
    assert [len(b["uri"]) for b in batches] == [4, 4, 4, 1]
    assert np.concatenate([b["uri"] for b in batches]).tolist() == list(range(13))
    assert np.concatenate([b["crop"] for b in batches]).tolist() == [10 * i for i in range(13)]


def test_a_run_without_ray_shows_its_progress(tmp_path, monkeypatch, capsys):
    """A progress bar where progress bars are wanted (ISA_PROGRESS=1), else plain lines as it goes."""
    _write_scenes(tmp_path / "images", 6)
    monkeypatch.setenv("ISA_PROGRESS", "1")
    run(str(tmp_path / "images"), str(tmp_path / "bar"), _config(LOCAL, "cache.batch_size=4"))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("isa embed: 6 images [") for line in bar), bar
    monkeypatch.setenv("ISA_PROGRESS", "0")
    monkeypatch.setattr(local_runs, "PROGRESS_LINE_S", 0.0)
    run(str(tmp_path / "images"), str(tmp_path / "lines"), _config(LOCAL, "cache.batch_size=4"))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" · ")[0] for line in lines] == [
        "isa embed: 4 images embedded so far",
        "isa embed: 6 images embedded so far",
    ]
