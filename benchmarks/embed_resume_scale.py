"""``isa embed`` resuming at scale: a cache holding N - NEW rows and a list file of N URIs, NEW of them new.

The cache is written quickly with pyarrow (the real schema, shard names and manifest; synthetic URIs, ids and
embeddings); the NEW inputs are real small JPEGs. The stage runs as a user runs it (``isa embed LIST CACHE``, a
subprocess starting its own local Ray), beside a plain baseline in the same run: the same command embedding
only the NEW JPEGs into an empty cache. What the resume costs beyond the baseline is its bookkeeping (listing,
telling skipped from new, counting). Memory is sampled from outside (PSS, ``benchmarks/peak_memory.py``): the
driver, and the largest other process (Ray's workers and actors, raylet, GCS) at its own peak. The script then
checks the cache holds every input exactly once.

    python benchmarks/embed_resume_scale.py --inputs 1000000 --work /tmp/embed-scale
    python benchmarks/embed_resume_scale.py --inputs 10000000 --work /tmp/embed-scale   # ~3 GB of disk
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import PeakMemory  # noqa: E402

from isa.cache import Manifest, cache_schema, list_parts, shard_name, write_manifest  # noqa: E402
from isa.storage import filesystem, write_table  # noqa: E402
from isa.teacher import load_teacher  # noqa: E402

TEACHER = ["--teacher", "isa-tiny-ViT", "--pretrained", "none"]
SETTINGS = ["--no-images", "--local-grid", "0", "cache.device=cpu"]
ROWS_PER_FILE = 2048  # cache.rows_per_shard's default


def manifest() -> Manifest:
    fingerprint = load_teacher("isa-tiny-ViT", "none").fingerprint()  # in this process: it starts no Ray
    return Manifest(fingerprint, fingerprint["embed_dim"], local_grid=0, dtype="float16", image_size=None)


def synthetic_uri(index: int) -> str:
    return f"/synthetic/photos/{index // 10000:05d}/img-{index:09d}.jpg"


def write_cache(root: Path, rows: int, meta: Manifest) -> None:
    """A cache of ``rows`` synthetic rows, shards of ``ROWS_PER_FILE`` named as the stage names them."""
    fs, path = filesystem(str(root))
    schema = cache_schema(meta.embed_dim, 0, "float16", with_images=False)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((ROWS_PER_FILE, meta.embed_dim)).astype(np.float16)
    values = pa.array(emb.reshape(-1), pa.float16())
    for start in range(0, rows, ROWS_PER_FILE):
        uris = [synthetic_uri(i) for i in range(start, min(start + ROWS_PER_FILE, rows))]
        ids = [hashlib.sha256(u.encode()).hexdigest() for u in uris]
        n = len(uris)
        table = pa.Table.from_pydict(
            {
                "id": pa.array(ids, pa.string()),
                "uri": pa.array(uris, pa.string()),
                "width": pa.array(np.full(n, 64, np.int32)),
                "height": pa.array(np.full(n, 48, np.int32)),
                "teacher_emb": pa.FixedSizeListArray.from_arrays(values[: n * meta.embed_dim], meta.embed_dim),
            },
            schema=schema,
        )
        write_table(fs, f"{path}/{shard_name(uris)}", table)
    meta = dataclasses.replace(meta, counts={"cached": rows, "rejected": 0, "duplicates": 0})
    write_manifest(fs, path, meta)


def write_jpegs(folder: Path, count: int) -> list[str]:
    """``count`` small JPEGs, every file different."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for index in range(count):
        path = folder / f"new-{index:06d}.jpg"
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path, quality=85)
        paths.append(str(path))
    return paths


def write_list(path: Path, synthetic: int, new: list[str]) -> None:
    with path.open("w") as out:
        for start in range(0, synthetic, 100_000):
            out.write("".join(synthetic_uri(i) + "\n" for i in range(start, min(start + 100_000, synthetic))))
        out.write("".join(u + "\n" for u in new))


def embed(listing: Path, cache: Path, log: Path) -> tuple[float, PeakMemory, str]:
    """``isa embed LISTING CACHE`` in a subprocess with its own local Ray; wall time, memory, output. Started again
    when Ray's own start times out (it waits 30 s for its raylet: too short on a machine loaded far beyond its
    cores), as nothing has run then."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_agent_register_timeout_ms", "120000")  # the raylet's wait for its agent, on a loaded machine
    command = [sys.executable, "-m", "pipelines.cli", "embed", str(listing), str(cache), *TEACHER, *SETTINGS]
    for _ in range(30):
        started = time.perf_counter()
        with log.open("w") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            with PeakMemory(process.pid, interval=0.5) as memory:
                code = process.wait()
        seconds = time.perf_counter() - started
        text = log.read_text()
        if code == 0 or "timed out during startup" not in text:
            break
        print("Ray's start timed out; starting again")
        for leftover in cache.glob(".*.tmp-*") if cache.exists() else []:  # the failed start's staging files
            leftover.unlink()
    if code != 0:
        raise SystemExit(f"isa embed failed ({code}):\n{text[-3000:]}")
    return seconds, memory, text


def peaks(memory: PeakMemory, driver: int) -> tuple[int, list[tuple[int, str]]]:
    """The driver's own peak PSS, and every other process's own peak with its name, largest first."""
    own: dict[int, tuple[int, str]] = {}
    for snapshot in memory.snapshots:
        for pss, pid, name in snapshot:
            if pss > own.get(pid, (0, ""))[0]:
                own[pid] = (pss, name)
    others = sorted(((pss, name) for pid, (pss, name) in own.items() if pid != driver), reverse=True)
    return own.get(driver, (0, ""))[0], others


def describe(driver: int, others: list[tuple[int, str]], top: int = 6) -> str:
    lines = [f"  driver {driver / 1e6:.0f} MB; the other processes' own peaks, largest first:"]
    lines += [f"    {pss / 1e6:6.0f} MB  {name}" for pss, name in others[:top]]
    return "\n".join(lines)


def summary_counts(text: str) -> dict[str, int]:
    line = next(line for line in text.splitlines() if line.startswith("isa embed: read"))
    return {k: int(v) for k, v in re.findall(r"(read|cached|skipped|rejected|duplicates) (\d+)", line)}


def check_exactly_once(cache: Path, total: int, new: list[str]) -> None:
    fs, root = filesystem(str(cache))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in list_parts(fs, root))
    assert rows == total, f"the cache holds {rows} rows, expected {total}"
    fresh = set(new)
    uris, ids = [], []
    for part in list_parts(fs, root):
        table = pq.read_table(part, columns=["uri", "id"])
        head = table["uri"][0].as_py()
        if head.startswith("/synthetic/"):
            continue
        uris += table["uri"].to_pylist()
        ids += table["id"].to_pylist()
    assert sorted(uris) == sorted(fresh), "the new inputs are not cached exactly once"
    expected = {hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in new}
    assert len(ids) == len(set(ids)) and set(ids) == expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="N: inputs in the list file")
    parser.add_argument("--new", type=int, default=10_000, help="inputs not in the cache yet (real JPEGs)")
    parser.add_argument("--work", default="/tmp/embed-resume-scale", help="scratch folder (deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (the inputs, for --reuse)")
    parser.add_argument("--reuse", action="store_true", help="reuse the inputs a --keep run left in --work")
    args = parser.parse_args()
    work = Path(args.work)
    reuse = args.reuse and (work / "inputs-ready").exists()
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    try:
        meta = manifest()
        started = time.perf_counter()
        if reuse:  # the inputs of a kept run; the caches it wrote into go back to the inputs
            shutil.rmtree(work / "baseline", ignore_errors=True)
            shutil.rmtree(work / "cache", ignore_errors=True)
            shutil.copytree(work / "cache-input", work / "cache")
            new = (work / "new.txt").read_text().split()
        else:
            new = write_jpegs(work / "new", args.new)
            write_cache(work / "cache", args.inputs - args.new, meta)
            write_list(work / "inputs.txt", args.inputs - args.new, new)
            (work / "new.txt").write_text("".join(u + "\n" for u in new))
        if args.keep and not reuse:
            shutil.copytree(work / "cache", work / "cache-input")
            (work / "inputs-ready").touch()
        print(
            f"setup: {args.inputs - args.new} cached rows, {args.inputs} URIs in {time.perf_counter() - started:.0f} s"
        )

        base_s, base_mem, base_text = embed(work / "new.txt", work / "baseline", work / "baseline.log")
        print(f"baseline (only the {args.new} new, empty cache): {base_s:.1f} s; {base_text.splitlines()[-2]}")
        print(describe(*peaks(base_mem, base_mem.root)))

        seconds, memory, text = embed(work / "inputs.txt", work / "cache", work / "resume.log")
        counts = summary_counts(text)
        print(f"resume (N = {args.inputs}): {seconds:.1f} s; {counts}")
        print(describe(*peaks(memory, memory.root), top=10))
        print(
            f"  bookkeeping (resume - baseline): {seconds - base_s:.1f} s; ratio resume/baseline {seconds / base_s:.2f}"
        )
        print(memory.report(top=8))
        assert counts["skipped"] == args.inputs - args.new and counts["cached"] == args.new, counts
        check_exactly_once(work / "cache", args.inputs, new)
        print("exactly once: yes")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
