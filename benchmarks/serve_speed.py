"""Queries per second and latency of ``isa serve``'s ``POST /search`` against the same encoder and index in-process.

Serve: the application of ``isa serve`` on a local Ray instance started as ``isa serve`` starts one, asked over
HTTP (multipart upload + text) by ``--concurrency`` client threads, each with its own connection. In-process:
:class:`isa.query.QueryEncoder` and :class:`pipelines.index.store.GalleryIndex` called by the same number of
threads in one process (decode, student, composition, search, per query). Both paths run the encoder with the
same number of torch threads, for each value of ``--threads``. Query images are the first gallery images of the
index (read from their URIs). Prints queries/s, p50 and p99 latency per path, threads and concurrency, and
Serve's share of in-process throughput: at equal threads, and each path at its best.

    python benchmarks/serve_speed.py --checkpoint RUN_OR_CHECKPOINT --index INDEX
    python benchmarks/serve_speed.py --tiny          # builds a tiny checkpoint and index itself (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import requests
import torch

TINY = ["teacher.name=isa-tiny-ViT", "teacher.pretrained=none", "student.backbone=mobilenetv3_large_100"]
TINY += ["student.image_size=64", "token_learner.dim=64", "token_learner.heads=4", "cache.image_size=64"]


def build_tiny(root: Path) -> tuple[str, str]:
    """A random-init tiny checkpoint and an exact index of a small synthetic gallery: (checkpoint, index)."""
    from isa.build import build_student, build_task, build_teacher
    from isa.checkpoint import save_checkpoint
    from isa.config import load_config, to_dict
    from isa.data.synthetic import generate_world, write_world
    from pipelines import embed
    from pipelines.cli import main as isa

    config = load_config(None, TINY)
    teacher = build_teacher(config.teacher)
    torch.manual_seed(0)
    task = build_task(config, teacher, build_student(config, teacher))
    saved = {"config": to_dict(config), "teacher": teacher.fingerprint()}
    checkpoint = root / "run" / "checkpoint_000000" / "isa"
    save_checkpoint(checkpoint, config=saved, weights=task.trainable_state_dict(), state={"step": 0})
    write_world(generate_world(seed=0, num_images=200, num_triplets=10, image_size=64), root / "world")
    gallery = load_config(None, [*TINY, "cache.store_images=false", "cache.local_grid=0", "cache.dtype=float32"])
    embed.run(str(root / "world" / "images"), str(root / "cache"), gallery)
    if isa(["index", str(root / "cache"), str(root / "index")]) != 0:
        raise SystemExit("isa index failed")
    return str(root / "run"), str(root / "index")


def measure(call: Callable[[int], None], concurrency: int, requests_total: int) -> dict:
    """Run ``call(i)`` for i < requests_total on ``concurrency`` threads: queries/s and latency percentiles (ms)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        started = time.perf_counter()
        call(i)
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up: connections, caches, first batches
        latencies.clear()
        started = time.perf_counter()
        list(pool.map(one, range(requests_total)))
        wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "qps": requests_total / wall,
        "p50": statistics.median(ordered) * 1000,
        "p99": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))] * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint or training run folder")
    parser.add_argument("--index", help="isa index folder")
    parser.add_argument("--tiny", action="store_true", help="build a tiny checkpoint and index first (smoke run)")
    parser.add_argument("--concurrency", default="1,8", help="client threads, comma-separated")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per path and concurrency")
    parser.add_argument("--queries", type=int, default=32, help="distinct query images (the first gallery images)")
    parser.add_argument("--text", default="is red and larger", help="the modifier text of every query")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--threads", default="1,2", help="torch threads of both paths' encoder, comma-separated")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    if not args.tiny and not (args.checkpoint and args.index):
        parser.error("give --checkpoint and --index, or --tiny")

    import ray
    from ray import serve

    from isa.build import build_teacher
    from isa.checkpoint import find_checkpoint
    from isa.config import TeacherConfig
    from isa.query import QueryEncoder, student_views
    from pipelines import serve as serve_stage
    from pipelines.eval import local_copy
    from pipelines.index.store import GalleryIndex

    # isa serve's own settings for a local instance; CPUs for the encoder replica and a little for the others
    for key, value in serve_stage.throughput_environment().items():
        os.environ.setdefault(key, value)
    threads = [int(t) for t in args.threads.split(",")]
    ray.init(num_cpus=max(threads) + 1, include_dashboard=False, log_to_driver=False)
    workdir = Path(tempfile.mkdtemp(prefix="isa-serve-speed-"))
    checkpoint, index_uri = build_tiny(workdir) if args.tiny else (args.checkpoint, args.index)

    index = GalleryIndex.load(index_uri)
    uris = [u for shard in index.shards for u in shard.uris][: args.queries]
    images = []
    for uri in uris:
        with fsspec.open(uri, "rb") as handle:
            images.append(handle.read())
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    # ---- in-process: the same encoder and index, called by threads
    prepared = serve_stage.check(serve_stage.ServeSettings(checkpoint=checkpoint, index=index_uri), False)
    teacher = build_teacher(TeacherConfig(**prepared.teacher_config))
    path = find_checkpoint(local_copy(checkpoint, str(workdir)))
    encoder = QueryEncoder.from_checkpoint(str(path), teacher)

    def in_process(i: int) -> None:
        data = images[i % len(images)]
        sentence = encoder.sentences(student_views([data], encoder.config)).sentence  # (1, M, w)
        query = encoder.compose(sentence, [(args.text,)]) if args.text else encoder.image_only(sentence)
        index.search(query.float().numpy(), args.k)

    sessions = threading.local()
    url = ""

    def over_http(i: int) -> None:
        if not hasattr(sessions, "session"):
            sessions.session = requests.Session()
        response = sessions.session.post(
            f"{url}search",
            files={"image": ("query.png", images[i % len(images)], "application/octet-stream")},
            data={"text": args.text, "k": str(args.k)},
        )
        response.raise_for_status()

    results: dict[tuple[str, int, int], dict] = {}  # (path, threads, concurrency) -> figures
    for count in threads:
        torch.set_num_threads(count)
        for c in concurrencies:
            results["in-process", count, c] = measure(in_process, c, args.requests)
        settings = serve_stage.ServeSettings(
            checkpoint=checkpoint, index=index_uri, port=args.port, num_cpus=0.25, encoder_cpus=count, batch_wait_ms=2
        )
        url = serve_stage.run(settings, serve_stage.check(settings, check_port_free=False))  # the proxy stays up
        for c in concurrencies:
            results["Serve (HTTP)", count, c] = measure(over_http, c, args.requests)
        serve.delete(settings.name)
    serve.shutdown()
    ray.shutdown()

    gallery = f"{index.count} images, {index.manifest['kind']}, {len(index.shards)} shard(s)"
    print(f"isa serve speed · {encoder.name} · gallery {gallery} · k={args.k}")
    print("| path | torch threads | concurrency | queries/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for (name, count, c), row in results.items():
        print(f"| {name} | {count} | {c} | {row['qps']:.1f} | {row['p50']:.1f} | {row['p99']:.1f} |")
    for c in concurrencies:
        for count in threads:
            ratio = results["Serve (HTTP)", count, c]["qps"] / results["in-process", count, c]["qps"]
            print(f"concurrency {c}, {count} thread(s): Serve / in-process throughput = {ratio:.2f}")
        best = {name: max(results[name, t, c]["qps"] for t in threads) for name in ("in-process", "Serve (HTTP)")}
        ratio = best["Serve (HTTP)"] / best["in-process"]
        print(f"concurrency {c}, each at its best: Serve / in-process throughput = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
