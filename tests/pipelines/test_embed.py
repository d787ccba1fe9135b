"""``isa embed`` on a real local Ray instance: bad inputs, fidelity, resume, exactly-once, S3."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from _cluster import command_line, parent_of
from PIL import Image, ImageOps

from isa.cache import CacheError, Manifest
from isa.config import load_config
from isa.data.synthetic import generate_world, render_scene
from isa.errors import IsaError
from isa.images import content_id
from isa.teacher import register_project_configs
from pipelines import lease
from pipelines.cli import main as cli_main
from pipelines.embed import (
    DECODE_RETRIES,
    decode_settings,
    decoded,
    dry_run,
    pipeline,
    prepare_cache,
    run,
    start_ledger,
    tower_in_driver,
)
from pipelines.lease import LEASE_FILE, Lease, LeaseHeld
from pipelines.teacher import teacher_fingerprint

TEACHER = ["teacher.name=isa-tiny-ViT", "teacher.pretrained=none"]
SMALL = ["cache.decode_batch_size=8", "cache.batch_size=8", "cache.rows_per_shard=16", "cache.local_grid=2"]


def _config(*overrides: str):
    return load_config(None, [*TEACHER, *SMALL, *overrides])


def _write_scenes(folder: Path, count: int, seed: int = 0) -> list[Path]:
    world = generate_world(seed=seed, num_images=max(30, count), num_triplets=4, image_size=64)
    paths = []
    for index, scene in enumerate(list(world.images.values())[:count]):
        path = folder / ("nested" if index % 5 == 0 else "") / f"scene-{index:03d}.{'jpg' if index % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_scene(scene, 48 + index % 3 * 16).save(path)
        paths.append(path)
    return paths


def _bad_inputs(folder: Path, good: Path) -> dict[str, str]:
    """Every kind of bad input; returns file name -> words its rejection reason must hold."""
    data = good.read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image at all")
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    corrupt = bytearray(png.getvalue())
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = bytes(64)  # damage the compressed pixel data
    (folder / "corrupt.png").write_bytes(bytes(corrupt))
    Image.new("RGB", (400, 300), (1, 2, 3)).save(folder / "bomb.png")  # over the pixel limit set below
    (folder / "bomb-declared.png").write_bytes(_declared_bomb())
    jpeg = io.BytesIO()
    Image.open(good).convert("RGB").save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 2 // 3])
    return {
        "empty.jpg": "empty",
        "notes.txt": "not an image",
        "truncated.png": "undecodable",
        "truncated.jpg": "undecodable",
        "corrupt.png": "undecodable",
        "bomb.png": "decompression bomb",
        "bomb-declared.png": "decompression bomb",
    }


def _declared_bomb() -> bytes:
    """A real decompression bomb: a PNG of 3 kB that declares 50000 x 50000 pixels (2.5 G), its data all zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    side = 50_000
    pixels = zlib.compress(b"\0" * (side + 1) * 64, 9)  # 64 rows of the 50000 declared
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _unusual_images(folder: Path) -> list[str]:
    """Valid images of every unusual kind (modes, encodings, animations, EXIF that does not parse); their names."""
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    base.convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    ycck = bytearray((folder / "cmyk.jpg").read_bytes())
    adobe = ycck.index(b"Adobe")
    ycck[adobe + 11] = 2  # the APP14 marker's colour transform: YCCK
    (folder / "ycck.jpg").write_bytes(bytes(ycck))
    base.save(folder / "progressive.jpg", "JPEG", progressive=True)
    grey = np.asarray(base.convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey).save(folder / "sixteen-bit.png")  # mode I;16
    palette = base.convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.save(folder / "palette-transparency.png", transparency=0)
    base.convert("LA").save(folder / "grey-alpha.png")
    frames = [base.transpose(Image.FLIP_TOP_BOTTOM), base]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 9  # no such orientation
    base.save(folder / "orientation-9.jpg", "JPEG", exif=exif.tobytes())
    exif[0x0112] = 6
    buffer = io.BytesIO()
    base.save(buffer, "JPEG", exif=exif.tobytes())
    damaged = bytearray(buffer.getvalue())
    tiff = damaged.index(b"Exif\0\0") + 6
    damaged[tiff + 8 : tiff + 10] = b"\xff\xff"  # the IFD claims 65535 entries
    (folder / "exif-corrupt.jpg").write_bytes(bytes(damaged))
    return [
        "cmyk.jpg",
        "ycck.jpg",
        "progressive.jpg",
        "sixteen-bit.png",
        "palette-transparency.png",
        "grey-alpha.png",
        "animated.gif",
        "animated.webp",
        "orientation-9.jpg",
        "exif-corrupt.jpg",
    ]


def _reference_image(path: str) -> Image.Image:
    """The image open_clip's users hand it: oriented, RGB; 16-bit greyscale by its 8 high bits (Pillow's own
    conversion clips it to white)."""
    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode.startswith("I"):
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    return image.convert("RGB")


def _exif_rotated(path: Path) -> None:
    image = Image.new("RGB", (60, 40), (0, 0, 0))
    image.paste((250, 250, 0), (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    image.save(path, "JPEG", exif=exif.tobytes())


def _cache(root: Path) -> pa.Table:
    return pq.read_table(sorted(glob.glob(str(root / "part-*.parquet"))))


def _reference_model():
    register_project_configs()  # the project's small configs, known to this process's open_clip
    torch.manual_seed(0)  # load_teacher's random init uses seed 0 too
    model, _, preprocess = open_clip.create_model_and_transforms("isa-tiny-ViT", pretrained=None)
    return model.eval(), preprocess


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    good = _write_scenes(folder, 24)
    bad = _bad_inputs(folder, good[0])
    shutil.copy(good[3], folder / "copy-of-scene-003.jpg")  # same bytes, another path
    _exif_rotated(folder / "rotated.jpg")
    unusual = _unusual_images(folder)
    return folder, good + [folder / name for name in unusual], bad


def test_folder_with_every_bad_input_kind(ray_session, image_folder, tmp_path):
    folder, good, bad = image_folder
    out = tmp_path / "cache"
    summary = run(str(folder), str(out), _config("cache.dtype=float32", "cache.max_image_pixels=100000"))
    valid = len(good) + 1  # + rotated.jpg
    assert (summary.read, summary.cached, summary.rejected, summary.duplicates) == (
        valid + len(bad) + 1,
        valid,
        len(bad),
        1,
    )
    assert summary.skipped == 0
    errors = {Path(r["uri"]).name: r["reason"] for r in pq.read_table(out / "_errors").to_pylist()}
    assert errors.keys() == bad.keys()
    for name, words in bad.items():
        assert words in errors[name], (name, errors[name])
    duplicates = pq.read_table(out / "_duplicates").to_pylist()
    assert len(duplicates) == 1 and duplicates[0]["id"] == content_id(good[3].read_bytes())

    table = _cache(out)
    assert table.num_rows == valid and len(set(table["id"].to_pylist())) == valid
    model, preprocess = _reference_model()
    rows = table.to_pylist()
    for row in rows:
        image = _reference_image(row["uri"])
        assert row["id"] == content_id(Path(row["uri"]).read_bytes())
        assert (row["width"], row["height"]) == image.size
        with torch.no_grad():
            expected = F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)[0]
        assert np.abs(np.array(row["teacher_emb"]) - expected.numpy()).max() <= 1e-5
        cached_image = Image.open(io.BytesIO(row["image"]))
        assert cached_image.format == "JPEG" and min(cached_image.size) == min(min(image.size), 256)
    rotated = next(r for r in rows if r["uri"].endswith("rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (40, 60)  # EXIF orientation applied
    sizes = {Path(r["uri"]).name: (r["width"], r["height"]) for r in rows}
    assert sizes["exif-corrupt.jpg"] == (48, 64) and sizes["orientation-9.jpg"] == (64, 48)
    grey = np.asarray(Image.open(io.BytesIO(next(r for r in rows if "sixteen" in r["uri"])["image"])))
    assert 40 < grey.mean() < 215  # the picture, not white


def test_local_grid_fp16_fidelity_and_a_rerun_writes_nothing(ray_session, image_folder, tmp_path, clip_teacher, capsys):
    folder, good, _ = image_folder
    out = tmp_path / "cache"
    run(str(folder), str(out), _config("cache.max_image_pixels=100000"))
    table = _cache(out)
    assert table.schema.field("teacher_emb").type.value_type == pa.float16()
    model, preprocess = _reference_model()
    for row in table.to_pylist()[:8]:
        image = _reference_image(row["uri"])
        pixels = preprocess(image)[None]
        with torch.no_grad():
            expected = F.normalize(model.encode_image(pixels), dim=-1)[0]
            _, local = clip_teacher.encode_image_local(pixels, 2)
        got = torch.tensor(np.array(row["teacher_emb"], dtype=np.float32))
        assert F.cosine_similarity(got, expected, dim=0) >= 0.9999
        got_local = torch.tensor(np.array(row["teacher_local"], dtype=np.float32)).view(4, -1)
        assert F.cosine_similarity(got_local, local[0], dim=-1).min() >= 0.9999
    # one node, this process's: the tower ran in this process, and wrote shards of cache.rows_per_shard rows
    assert tower_in_driver(_config().cache)
    shard_rows = sorted(pq.ParquetFile(path).metadata.num_rows for path in out.glob("part-*.parquet"))
    assert shard_rows[1:] == [16] * (len(shard_rows) - 1) and 0 < shard_rows[0] <= 16, shard_rows
    # the tower on an actor pool writes the same rows; with the actor and decoding holding both CPUs, the listing
    # still runs (it reserves none)
    on_actors = run(
        str(folder),
        str(tmp_path / "actors"),
        _config(
            "cache.max_image_pixels=100000", "cache.tower_in=actors", "cache.actor_cpus=1.5", "cache.decode_cpus=0.5"
        ),
    )
    assert on_actors.cached == table.num_rows
    by_uri = {row["uri"]: row for row in _cache(tmp_path / "actors").to_pylist()}
    for row in table.to_pylist():
        twin = by_uri[row["uri"]]
        assert (twin["id"], twin["width"], twin["height"], twin["image"]) == (
            row["id"],
            row["width"],
            row["height"],
            row["image"],
        )
        for column in ("teacher_emb", "teacher_local"):
            a, b = (torch.tensor(np.array(r[column], dtype=np.float32)).view(-1) for r in (row, twin))
            assert F.cosine_similarity(a, b, dim=0) >= 0.9999, column
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    # the ledger split over two shards still finds every input the cache accounts for
    again = run(str(folder), str(out), _config("cache.max_image_pixels=100000", "cache.ledger_rows=16"))
    assert (again.cached, again.rejected, again.duplicates) == (0, 0, 0) and again.skipped == again.read
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written

    # a dry run counts two new images and a copy of a cached one (found in another shard than its URI's), writes
    # nothing, and leaves a new output uncreated
    _write_scenes(folder / "more", 2, seed=1)
    shutil.copy(good[5], folder / "more" / "copy-of-scene-005.png")
    dry = [*TEACHER, *SMALL, "--dry-run", "cache.ledger_rows=8"]
    assert cli_main(["embed", str(folder), str(out), *dry]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"isa embed: dry run: read {again.read + 3} · new 2 · skipped {again.read} · duplicates 1 · nothing written"
    ]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert cli_main(["embed", str(folder), str(tmp_path / "fresh"), *dry]) == 0
    # every readable file is new but the two copies (bad ones included: a run records them in _errors/)
    assert f"read {again.read + 3} · new {again.read + 1} · skipped 0 · duplicates 2 ·" in capsys.readouterr().out
    assert not (tmp_path / "fresh").exists()


def _process_of(client_port: int, server_port: int) -> int | None:
    """The process that holds the loopback TCP connection from ``client_port`` to ``server_port``.

    Both ports: Linux lets connections to different servers share a local port, so another process (another
    test's) may hold a connection from ``client_port`` too.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()  # sl, local address:port, remote address:port, ..., inode (hex ports)
            ports = (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16))
            if ports == (client_port, server_port):
                inodes.add(f"socket:[{fields[9]}]")
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            if any(os.readlink(f"{proc}/fd/{fd}") in inodes for fd in os.listdir(f"{proc}/fd")):
                return int(proc[6:])
        except OSError:
            continue
    return None


def test_the_deadly_servers_victim_is_the_process_of_that_very_connection():
    """Two connections from one local port to two servers, one held by another process (as another test's
    processes may hold one): each server's victim is the process of its own connection."""
    import socket

    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    clients = [socket.socket() for _ in servers]
    for client in clients:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    clients[0].bind(("127.0.0.1", 0))
    port = clients[0].getsockname()[1]
    clients[1].bind(("127.0.0.1", port))
    for client, server in zip(clients, servers):
        client.connect(server.getsockname())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[clients[1].fileno()])
    clients[1].close()
    try:
        assert _process_of(port, servers[0].getsockname()[1]) == os.getpid()
        assert _process_of(port, servers[1].getsockname()[1]) == other.pid
    finally:
        other.kill()
        other.wait()
        for sock in [*servers, clients[0]]:
            sock.close()


@contextlib.contextmanager
def _deadly_server():
    """An HTTP server on loopback whose every request kills the process that sent it (SIGKILL): an input whose
    reading kills the process decoding it, as a crashing decoder would. A request for a path holding "deadlier"
    also kills that process's parent when it is a Ray worker (an input whose decoding in a child takes the decode
    task's process down too). Yields its URL and the pids it killed."""
    killed: list[int] = []

    class Deadly(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            pid = _process_of(self.client_address[1], self.server.server_address[1])
            if pid is not None and pid != os.getpid():
                victims = [pid]
                if "deadlier" in self.path and command_line(parent := parent_of(pid)).startswith("ray::"):
                    victims.append(parent)
                for victim in victims:
                    os.kill(victim, signal.SIGKILL)
                killed.extend(victims)
            self.close_connection = True

        do_GET = do_HEAD

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deadly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", killed
    finally:
        server.shutdown()
        server.server_close()


def test_other_input_kinds_list_tar_parquet(ray_session, tmp_path):
    good = _write_scenes(tmp_path / "images", 12)
    listing = tmp_path / "list.txt"
    stuck = tmp_path / "stuck.png"
    os.mkfifo(stuck)  # a read that never ends (nobody writes), as on a hung network mount
    with _deadly_server() as (url, killed):
        inputs = [*map(str, good[:6]), str(tmp_path / "missing.jpg"), str(stuck), f"{url}/deadly.jpg"]
        listing.write_text("\n".join(inputs) + "\n")
        one_call = ["cache.decode_batch_size=16", "cache.input_timeout_s=2"]  # the list's inputs in one decode call
        # a dry run reads every input too: the stuck and the deadly one count as new (a run rejects them)
        counted = dry_run(str(listing), str(tmp_path / "from-list"), _config(*one_call))
        assert (counted.read, counted.skipped, counted.duplicates) == (9, 0, 0) and len(killed) == 1, killed
        assert not (tmp_path / "from-list").exists()
        listed = run(str(listing), str(tmp_path / "from-list"), _config(*one_call))
    assert (listed.cached, listed.rejected) == (6, 3)
    reasons = {Path(r["uri"]).name: r["reason"] for r in pq.read_table(tmp_path / "from-list" / "_errors").to_pylist()}
    assert "unreadable" in reasons["missing.jpg"]
    # the worker ended with the batch (the stuck read), then each input was decoded alone in a child: the stuck
    # one and the deadly one are rejected with how their child ended, not retried again
    assert reasons["stuck.png"] == "reading and decoding it took longer than 2 s (cache.input_timeout_s)"
    assert reasons["deadly.jpg"] == "the decoding process died on it (killed by SIGKILL)"
    assert len(killed) == 2, killed  # a child in the dry run, one in the run: each first attempt ended at the stuck one

    shards = tmp_path / "shards"
    shards.mkdir()
    for index, chunk in enumerate((good[:5], good[5:10])):
        with tarfile.open(shards / f"shard-{index}.tar", "w") as archive:
            for path in chunk:
                archive.add(path, arcname=f"{path.stem}.{path.suffix[1:]}")
                meta = tmp_path / f"{path.stem}.json"
                meta.write_text("{}")
                archive.add(meta, arcname=f"{path.stem}.json")  # webdataset metadata: not an image
    (shards / "shard-2.tar").write_bytes(b"this is not a tar archive")
    tars = run(str(shards), str(tmp_path / "from-tar"), _config())
    assert (tars.cached, tars.rejected) == (10, 1)
    uris = _cache(tmp_path / "from-tar")["uri"].to_pylist()
    assert all("#scene-" in u and u.split("#")[0].endswith(".tar") for u in uris)

    parquet = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"name": [p.name for p in good], "image": [p.read_bytes() for p in good]}), parquet)
    from_parquet = run(str(parquet), str(tmp_path / "from-parquet"), _config("cache.uri_column=name"))
    assert from_parquet.cached == 12
    table = _cache(tmp_path / "from-parquet")
    assert sorted(table["uri"].to_pylist()) == sorted(p.name for p in good)
    assert sorted(table["id"].to_pylist()) == sorted(content_id(p.read_bytes()) for p in good)

    unnamed = tmp_path / "unnamed.parquet"  # no URI column: a row is named by its file and its bytes' hash
    pq.write_table(pa.table({"image": [p.read_bytes() for p in good[:3]]}), unnamed)
    assert run(str(unnamed), str(tmp_path / "from-unnamed"), _config()).cached == 3
    uris = _cache(tmp_path / "from-unnamed")["uri"].to_pylist()
    assert all(u.split("#sha256=")[0].endswith("unnamed.parquet") for u in uris)
    assert {u.split("#sha256=")[1] for u in uris} == {hashlib.sha256(p.read_bytes()).hexdigest() for p in good[:3]}


def test_an_input_that_takes_its_decode_task_down_is_left_out_and_the_attempts_are_bounded(ray_session, tmp_path):
    """An input whose decoding kills the decode task's own process even when a child decodes it: the attempt after
    that leaves it out (rejected with its reason) and the rest is cached. Each later attempt leaves out one more
    such input; a batch holding more of them than the attempts allow ends the run (or dry run) after exactly 1 +
    DECODE_RETRIES attempts, never retried for ever, naming them."""
    good = _write_scenes(tmp_path / "images", 5)
    one_call = _config("cache.decode_batch_size=16")  # each list's inputs in one decode call
    one, many = tmp_path / "one.txt", tmp_path / "many.txt"
    kills = {}  # phase -> the processes the server killed
    with _deadly_server() as (url, killed):
        one.write_text("\n".join([*map(str, good[:4]), f"{url}/deadlier.jpg"]) + "\n")
        many.write_text("\n".join([str(good[4]), *(f"{url}/deadlier-{i}.jpg" for i in range(3))]) + "\n")
        done = run(str(one), str(tmp_path / "one"), one_call)
        kills["one"] = set(killed)
        killed.clear()
        with pytest.raises(IsaError, match="died on each of its 4 attempts") as failed:
            run(str(many), str(tmp_path / "many"), one_call)
        kills["many"] = set(killed)
        killed.clear()
        with pytest.raises(IsaError, match="died on each of its 4 attempts") as counted:  # a dry run reads them too
            dry_run(str(many), str(tmp_path / "many"), one_call)
        kills["dry run"] = set(killed)
    # the first attempt's process (decoding the batch itself), then the second's child and the process itself
    assert len(kills["one"]) == 3, kills
    assert (done.cached, done.rejected) == (4, 1)
    reasons = {Path(r["uri"]).name: r["reason"] for r in pq.read_table(tmp_path / "one" / "_errors").to_pylist()}
    assert reasons == {"deadlier.jpg": "the decode task's process died while it was being decoded"}
    assert sorted(_cache(tmp_path / "one")["id"].to_pylist()) == sorted(content_id(p.read_bytes()) for p in good[:4])
    # attempt 1: the process; attempts 2, 3 and 4: a child and the process, each leaving out one more input
    assert len(kills["many"]) == len(kills["dry run"]) == 1 + 2 * DECODE_RETRIES, kills
    # the messages name the three inputs, in the order they took the attempts down; nothing of the batch cached
    for failure in (failed, counted):
        named = str(failure.value).split("the inputs being decoded when it died: ")[1].split(". ")[0]
        assert [Path(uri).name for uri in named.split(", ")] == [f"deadlier-{i}.jpg" for i in range(3)], named
    assert "Nothing of that batch is cached" in str(failed.value) and "cached" not in str(counted.value)
    assert not list((tmp_path / "many").glob("part-*.parquet"))


def test_gallery_only_cache_and_settings_mismatch(ray_session, tmp_path):
    good = _write_scenes(tmp_path / "images", 6)
    out = tmp_path / "gallery"
    run(str(tmp_path / "images"), str(out), _config("cache.store_images=false", "cache.local_grid=0"))
    table = _cache(out)
    assert "image" not in table.column_names and "teacher_local" not in table.column_names
    assert table.num_rows == len(good)
    with pytest.raises(CacheError) as error:
        run(
            str(tmp_path / "images"),
            str(out),
            load_config(None, ["teacher.name=isa-tiny-ViT-custom-text", "teacher.pretrained=none", *SMALL]),
        )
    assert "isa-tiny-ViT-custom-text" in str(error.value) and "isa-tiny-ViT (" in str(error.value)
    assert not (out / LEASE_FILE).exists()  # a run that fails releases the cache's lease


def test_a_bfloat16_tower_stays_close_and_a_cache_keeps_one_tower_dtype(ray_session, tmp_path):
    _write_scenes(tmp_path / "images", 6)
    full, half = tmp_path / "float32", tmp_path / "bfloat16"
    run(str(tmp_path / "images"), str(full), _config("cache.dtype=float32"))
    run(str(tmp_path / "images"), str(half), _config("cache.dtype=float32", "cache.tower_dtype=bfloat16"))
    assert json.loads((half / "_isa_cache.json").read_text())["tower_dtype"] == "bfloat16"
    rows = {r["id"]: r for r in _cache(full).to_pylist()}
    for row in _cache(half).to_pylist():
        for column, cells in (("teacher_emb", 1), ("teacher_local", 4)):
            got = torch.tensor(np.array(row[column], dtype=np.float32)).view(cells, -1)
            expected = torch.tensor(np.array(rows[row["id"]][column], dtype=np.float32)).view(cells, -1)
            assert F.cosine_similarity(got, expected, dim=-1).min() >= 0.999
            assert (got - expected).abs().max() > 1e-4  # computed in bf16 indeed
    with pytest.raises(CacheError, match="tower_dtype") as error:
        run(str(tmp_path / "images"), str(half), _config("cache.dtype=float32"))
    assert "tower bfloat16" in str(error.value) and "tower float32" in str(error.value)


def test_killed_run_resumes_exactly_once(ray_session, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    good = _write_scenes(folder, 160)
    shutil.copy(good[7], folder / "dup.png")
    out = tmp_path / "cache"
    args = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "embed",
        str(folder),
        str(out),
        *TEACHER,
        "cache.decode_batch_size=4",
        "cache.batch_size=4",
        "cache.rows_per_shard=4",
        "cache.local_grid=0",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # a second run into the same cache, of some of its images and new ones, while the first runs: refused
    others = tmp_path / "others.txt"
    others.write_text("\n".join(map(str, [*good[:5], *_write_scenes(tmp_path / "new", 3, seed=1)])) + "\n")
    while not (out / LEASE_FILE).exists():
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.02)
    second = subprocess.Popen(
        [*args[:4], str(others), *args[5:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(glob.glob(str(out / "part-*.parquet"))) < 3:
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    log.close()
    partial = pq.read_table(sorted(glob.glob(str(out / "part-*.parquet")))).num_rows
    assert 0 < partial < len(good), "the kill did not land midway"
    _, refusal = second.communicate(timeout=120)
    assert second.returncode == 2, refusal
    assert refusal.startswith(f"isa embed: error: OUT {out} is being written by another run (isa embed of user ")
    assert f"pid {process.pid} on " in refusal and len(refusal.strip().splitlines()) == 1

    # the killed run's lease stays until it is stale, then a rerun takes it over
    with pytest.raises(LeaseHeld, match=f"pid {process.pid} on "):
        run(str(folder), str(out), _config("cache.local_grid=0"))
    monkeypatch.setattr(lease, "STALE_AFTER_S", 0.5)
    time.sleep(1)
    summary = run(str(folder), str(out), _config("cache.local_grid=0", "cache.ledger_rows=8"))  # 2 shards or more
    ids = _cache(out)["id"].to_pylist()
    expected = {content_id(p.read_bytes()) for p in good}
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected  # exactly once
    # the killed run's tasks may still publish a few files until its lease is taken over: what the rerun found is
    # skipped, whatever it was, and every input is accounted for once
    assert summary.read == len(good) + 1 and summary.skipped >= partial and summary.rejected == 0
    assert summary.skipped + summary.cached + summary.duplicates == summary.read
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name] and not (out / LEASE_FILE).exists()


def test_s3_input_and_output(ray_session, s3_endpoint, tmp_path):
    import s3fs

    good = _write_scenes(tmp_path / "images", 8)
    fs = s3fs.S3FileSystem()
    fs.mkdir("isa-test-bucket")
    for path in good:
        fs.pipe_file(f"isa-test-bucket/inputs/{path.relative_to(tmp_path / 'images')}", path.read_bytes())
    fs.pipe_file("isa-test-bucket/inputs/broken.jpg", b"\xff\xd8\xff broken")
    summary = run("s3://isa-test-bucket/inputs", "s3://isa-test-bucket/cache", _config())
    assert (summary.cached, summary.rejected) == (8, 1)
    assert fs.exists("isa-test-bucket/cache/_isa_cache.json")
    parts = [p for p in fs.ls("isa-test-bucket/cache") if p.rsplit("/", 1)[-1].startswith("part-")]
    table = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts])
    assert sorted(table["id"].to_pylist()) == sorted(content_id(p.read_bytes()) for p in good)
    assert all(u.startswith("s3://isa-test-bucket/inputs/") for u in table["uri"].to_pylist())
    again = run("s3://isa-test-bucket/inputs", "s3://isa-test-bucket/cache", _config())
    assert again.cached == 0 and again.skipped == 9
    assert not fs.exists(f"isa-test-bucket/cache/{LEASE_FILE}")  # taken and released on S3 by each run


def _in_a_new_process(known: list, config: object) -> dict:
    """``config``'s fingerprint in a process of its own that took the fingerprints ``known`` (as a trial of
    ``isa tune`` does)."""
    import ray

    def fingerprint(known: list, config: object) -> dict:  # pickled by value: a test module is not importable
        from pipelines.teacher import remember, teacher_fingerprint

        remember(known)
        return teacher_fingerprint(config)

    return ray.get(ray.remote(num_cpus=0, max_calls=1)(fingerprint).remote(known, config))


def _write_random_teacher(path: Path, seed: int) -> None:
    """A random tiny teacher's weights at ``path`` (safetensors): the same size for every seed."""
    from safetensors.torch import save_file

    from isa.teacher import load_teacher

    model = load_teacher("isa-tiny-ViT", "none", seed=seed).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def test_teacher_fingerprint_is_reused_until_its_weights_file_changes(ray_session, tmp_path):
    """Within a process, and in another process that took this one's fingerprints (``isa tune``'s trials): reused
    for the same teacher config and weights file (size, modification time), never for a file changed since."""
    from isa.config import TeacherConfig
    from isa.teacher import load_teacher
    from pipelines.teacher import known_fingerprints, teacher_fingerprint

    path = tmp_path / "teacher.safetensors"
    write = functools.partial(_write_random_teacher, path)
    write(1)
    config = TeacherConfig(name="isa-tiny-ViT", pretrained=str(path))
    first = teacher_fingerprint(config)
    assert first == load_teacher("isa-tiny-ViT", str(path)).fingerprint()
    first["weights_sha256"] = "changed by the caller"  # each caller gets its own copy
    assert teacher_fingerprint(config) == load_teacher("isa-tiny-ViT", str(path)).fingerprint()
    stat = path.stat()
    write(2)  # other weights of the same size: under the old mtime the process keeps its fingerprint
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (
        teacher_fingerprint(config)["weights_sha256"]
        == load_teacher("isa-tiny-ViT", "none", seed=1).fingerprint()["weights_sha256"]
    )
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new file, whatever the clock
    handed_before = [(key, {**print_, "weights_sha256": "handed"}) for key, print_ in known_fingerprints()]
    second = teacher_fingerprint(config)
    assert second == load_teacher("isa-tiny-ViT", str(path)).fingerprint()
    handed = [(key, {**print_, "weights_sha256": "handed"}) for key, print_ in known_fingerprints()]
    assert _in_a_new_process(handed, config)["weights_sha256"] == "handed"  # reused there: nothing loaded
    assert _in_a_new_process(handed_before, config) == second  # taken before the file changed: loaded there
    assert second["weights_sha256"] != teacher_fingerprint(TeacherConfig("isa-tiny-ViT", "none"))["weights_sha256"]
    write(1)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert teacher_fingerprint(config)["weights_sha256"] != second["weights_sha256"]


def test_a_teacher_loaded_by_a_stage_is_the_fingerprint_of_the_later_ones(ray_session, tmp_path):
    """A stage that loads the teacher in its process (``isa eval``, a tower in ``isa embed``'s driver) leaves its
    fingerprint to the later stages there: taken while the weights file is unchanged, read again once it changed."""
    from isa.config import TeacherConfig
    from isa.teacher import load_teacher
    from pipelines.teacher import load_teacher_here, teacher_fingerprint

    path = tmp_path / "loaded.safetensors"
    write = functools.partial(_write_random_teacher, path)
    write(1)
    config = TeacherConfig(name="isa-tiny-ViT", pretrained=str(path))
    loaded = load_teacher_here(config).fingerprint()
    stat = path.stat()
    write(2)  # other weights under the size and time the stage loaded: what it loaded is the answer, nothing read
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert teacher_fingerprint(config) == loaded
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # changed: read again
    assert teacher_fingerprint(config) == load_teacher("isa-tiny-ViT", str(path)).fingerprint() != loaded


@pytest.mark.parametrize("runner", ["ray", "local"])
def test_a_tower_in_the_driver_refused_its_teacher_writes_nothing(ray_session, tmp_path, runner):
    """The decode tasks (or, without Ray, the decode helpers) start while the driver loads its teacher; they decode
    and write nothing until the cache's manifest is written and published to them. A teacher the cache refuses (same
    model and weights file, other weights) ends the run with nothing added, a bad input and a copy included."""
    from safetensors.torch import save_file

    from isa.teacher import load_teacher

    weights = tmp_path / "teacher.safetensors"
    folder, out = tmp_path / "images", tmp_path / "cache"
    good = _write_scenes(folder, 3)
    driver = ["cache.tower_in=driver", "cache.local_grid=0", f"teacher.pretrained={weights}", f"cache.runner={runner}"]
    for seed in (1, 2):
        model = load_teacher("isa-tiny-ViT", "none", seed=seed).model
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        os.utime(weights, ns=(0, seed * 1_000_000_000))  # another file for the fingerprint's cache too
        if seed == 1:
            assert run(str(folder), str(out), _config(*driver)).cached == len(good)
            before = sorted(p.relative_to(out) for p in out.rglob("*"))
            (folder / "notes.txt").write_text("not an image")
            shutil.copy(good[0], folder / "copy.png")
    with pytest.raises(CacheError, match="weights"):
        run(str(folder), str(out), _config(*driver))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_prefetched_reads_ahead_hands_on_its_error_and_stops_when_closed():
    from pipelines.embed.prefetch import Prefetched

    reading = threading.Event()

    def listing():
        reading.set()
        yield from (1, 2)
        raise OSError("listing failed")

    prefetched = Prefetched(listing())
    assert reading.wait(10)  # before anyone iterates
    got = []
    with pytest.raises(OSError, match="listing failed"):
        got.extend(prefetched)
    assert got == [1, 2]

    closed = threading.Event()

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.set()

    with Prefetched(endless(), depth=1) as ahead:
        assert next(iter(ahead)) == 0
    assert closed.wait(10)  # the source is closed, not left reading


def test_decoding_runs_in_tasks_of_its_own_beside_the_teacher_actors(ray_session, tmp_path, capsys):
    """Equal CPUs per decode task and per actor (the defaults): Ray Data must still not fuse decoding into the
    actor, where one actor would decode every image in turn. Each decode call's crops go on as a block of their
    own, so the tower starts after the first call, not after a whole listing block."""
    _write_scenes(tmp_path / "images", 5)
    config = load_config(None, [*TEACHER, "cache.decode_batch_size=2"])
    assert config.cache.decode_cpus == config.cache.actor_cpus
    fingerprint = teacher_fingerprint(config.teacher)
    wanted = Manifest(fingerprint, fingerprint["embed_dim"], local_grid=0, dtype="float16", image_size=256)
    manifest, _ = prepare_cache(str(tmp_path / "cache"), wanted)
    ledger = start_ledger(str(tmp_path / "cache"))
    capsys.readouterr()
    try:
        pipeline(str(tmp_path / "images"), str(tmp_path / "cache"), config, manifest, ledger).explain()
        inputs = decoded(str(tmp_path / "images"), str(tmp_path / "cache"), config, manifest, ledger)
        blocks = sorted(len(block["uri"]) for block in inputs.iter_batches(batch_size=None))
        # made before the manifest is known (a tower in the driver): listed and admitted, but decoded only once
        # the manifest is published through the ledger
        waiting = decoded(str(tmp_path / "images"), str(tmp_path / "cache"), config, None, ledger)
        later: list[int] = []
        reader = threading.Thread(
            target=lambda: later.extend(len(b["uri"]) for b in waiting.iter_batches(batch_size=None))
        )
        reader.start()
        reader.join(timeout=5)
        assert reader.is_alive() and later == []
        ledger.publish(dataclasses.asdict(manifest), decode_settings(config.cache, manifest))
        reader.join(timeout=120)
        assert sorted(later) == blocks
    finally:
        ledger.kill()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(decode_batch)]" in optimized, optimized
    assert "ActorPoolMapOperator[MapBatches(TeacherEmbedder)]" in optimized, optimized
    assert blocks == [1, 2, 2]  # one listing block of 5, decoded in calls of 2


# a child process decodes 16 photos of 12 MP (46 MiB each once decoded) and prints how far its resident memory
# rose at its peak, sampled every 2 ms: a task that held the batch's decoded images would rise by more than
# 16 x 46 MiB (held images stay, so sampling cannot miss them)
DECODE_PEAK = """
import io, json, os, sys, threading, time
from PIL import Image
from pipelines.embed.decode import decode_rows

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

manifest = json.loads(sys.argv[1])
photo = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")
buffer = io.BytesIO()
photo.save(buffer, "JPEG", quality=90)
del photo
rows = [(f"photo-{index}.jpg", buffer.getvalue(), None) for index in range(16)]
peak, done = [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], resident())
        time.sleep(0.002)

before = resident()
sampler = threading.Thread(target=sample)
sampler.start()
decoded, errors = decode_rows(rows, manifest, {"max_pixels": 10**8, "draft_short_side": None, "jpeg_quality": 90})
done.set()
sampler.join()
assert len(decoded) == 16 and not errors and decoded[0].crop.shape == (32, 32, 3), (len(decoded), errors)
assert (decoded[0].width, decoded[0].height) == (4000, 3000)
print(max(peak[0], resident()) - before)
"""


def test_a_decode_task_holds_one_full_size_image_at_a_time():
    from isa.teacher import load_teacher

    preprocess = load_teacher("isa-tiny-ViT", "none").fingerprint()["preprocess"]
    manifest = json.dumps({"teacher": {"preprocess": preprocess}, "image_size": 256})
    child = subprocess.run([sys.executable, "-c", DECODE_PEAK, manifest], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    rise = int(child.stdout.split()[-1])
    assert rise < 250 * 2**20, f"decoding 16 photos of 12 MP raised the peak by {rise / 2**20:.0f} MiB"


def test_a_run_logged_to_a_file_reads_plainly(ray_session, tmp_path):
    """``isa embed > log 2>&1``: its summary, no progress bars or terminal escape sequences, no warning a user cannot
    act on (the run leaves fewer shards than writers, which Ray warns about), a log short enough to read."""
    _write_scenes(tmp_path / "images", 10)
    env = {k: v for k, v in os.environ.items() if k != "ISA_PROGRESS"}
    env["RAY_ADDRESS"] = ray_session
    log = tmp_path / "embed.log"
    holder = Lease.acquire(str(tmp_path / "cache"), "isa embed")  # another run writes there: --wait waits for it
    with log.open("w") as out:
        command = [sys.executable, "-m", "pipelines.cli", "embed", str(tmp_path / "images"), str(tmp_path / "cache")]
        command += [*TEACHER, *SMALL, "--wait"]
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "waiting for" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(1)
        assert process.poll() is None and not (tmp_path / "cache" / "_isa_cache.json").exists()  # still waiting
        holder.release()
        done = process.wait(timeout=300)
    text = log.read_text()
    assert done == 0, text[-3000:]
    assert f"isa embed: waiting for {tmp_path / 'cache'}, written by isa embed of user " in text
    assert f"pid {os.getpid()} on " in text
    assert "isa embed: read 10 · cached 10 · skipped 0 · rejected 0 · duplicates 0 · " in text
    assert _cache(tmp_path / "cache").num_rows == 10
    assert "\x1b" not in text and "\r" not in text  # no colors, no bars redrawn in place
    unactionable = ("Warning:", "ray_remote_args_fn", "concurrent tasks", "No pretrained weights")
    assert not [line for line in text.splitlines() if any(word in line for word in unactionable)], text
    assert len(text.splitlines()) <= 10, text  # about 4


def test_the_tower_takes_read_only_crops_without_a_warning(clip_teacher):
    """A batch of one block reaches the actor as a read-only view of the object store's copy."""
    from pipelines.embed.tower import TeacherEmbedder

    fingerprint = clip_teacher.fingerprint()
    embedder = TeacherEmbedder({"teacher": fingerprint, "local_grid": 2, "tower_dtype": "float32"}, None, "cpu", 1)
    side = max(fingerprint["preprocess"]["size"])
    crops = np.full((3, side, side, 3), 127, dtype=np.uint8)
    crops.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a tensor made from a read-only array
        out = embedder({"crop": crops})
    assert out["teacher_emb"].shape == (3, fingerprint["embed_dim"]) and out["teacher_local"].shape[:2] == (3, 4)


def test_a_list_file_read_in_byte_ranges_gives_each_line_once(tmp_path):
    """However a .txt list file is cut into ranges, the tasks reading them give every URI once, in order."""
    from pipelines.embed.sources import _read_lines

    lines = ["/a/1.jpg", "", "s3://bucket/ünïcode 2.png", "  /padded.jpg  ", "/b/" + "x" * 40 + ".jpg", "/c.jpg"]
    path = tmp_path / "list.txt"
    path.write_text("\r\n".join(lines))  # CRLF, a blank line, no newline at the end
    expected = [line.strip() for line in lines if line.strip()]
    size = path.stat().st_size
    for step in range(1, size + 2):
        got = []
        for start in range(0, size, step):
            for block in _read_lines({"start": [start], "end": [min(start + step, size)]}, str(path)):
                got += block["uri"].to_pylist()
        assert got == expected, step


def test_the_input_check_looks_at_a_folders_first_files_only(tmp_path, monkeypatch):
    """Before Ray starts, a folder of millions of files is not listed: the check reads its first few entries."""
    from isa.config import CacheConfig
    from pipelines.embed import sources

    folder = tmp_path / "images"
    (folder / "cache").mkdir(parents=True)
    for index in range(30):
        (folder / f"img-{index:02d}.jpg").write_bytes(b"x")
    (folder / ".hidden.jpg").write_bytes(b"x")
    (folder / "cache" / "part-0.parquet").write_bytes(b"x")
    seen = []
    walk = sources.walk_files

    def counted(*args, **kwargs):
        for path in walk(*args, **kwargs):
            seen.append(path)
            yield path

    monkeypatch.setattr(sources, "walk_files", counted)
    monkeypatch.setattr(sources, "SAMPLE_FILES", 4)
    assert sources.check_input(str(folder), CacheConfig(), exclude=str(folder / "cache")) == "folder"
    assert len(seen) == 4
    every = sorted(walk(sources.filesystem(str(folder))[0], str(folder), str(folder / "cache")))
    assert every == [str(folder / f"img-{index:02d}.jpg") for index in range(30)]  # hidden and excluded left out
    empty = tmp_path / "only-hidden"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    with pytest.raises(sources.InputError, match="no input files found under"):
        sources.check_input(str(empty), CacheConfig())
