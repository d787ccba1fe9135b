"""What ``isa train``'s input costs on the host, at the GPU setting (views of 224 px, batch 256), side by side:

- making one training view (a cached 256 px JPEG decoded, cropped to 224 px and flipped): views/s per core;
- iterating Ray Data batches in the training process (``iter_torch_batches``), unshuffled, with Ray's local
  shuffle buffer of 4 batches, and with ``isa.shuffle.mixed_batches`` over 4 batches (on the CPU here; on a
  GPU the pool lives on the GPU): CPU time of the process per batch, and the ratio to unshuffled.

    python benchmarks/train_ingest.py [--batches 24]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from embed_throughput import make_jpegs  # this folder's photo-like JPEGs
from PIL import Image

from isa.augment import train_view, views
from isa.images import encode_jpeg, resize_short_side
from isa.shuffle import mixed_batches

BATCH, VIEW, POOL = 256, 224, 4


def view_rate(images: int = 64, repeats: int = 4) -> float:
    """Training views per second on one core, from cached (256 px short side) JPEGs."""
    with tempfile.TemporaryDirectory() as tmp:
        photos = [Image.open(p).convert("RGB") for p in make_jpegs(Path(tmp), images)]
    cached = [encode_jpeg(resize_short_side(photo, 256)) for photo in photos]
    transform = train_view(VIEW, 0.6, True)
    started = time.perf_counter()
    views(cached * repeats, transform, VIEW)
    return images * repeats / (time.perf_counter() - started)


def cpu_per_batch(batches: Iterable) -> float:
    """Milliseconds of this process's CPU per batch, from the end of the first batch."""
    done, started = 0, None
    for _ in batches:
        done += 1
        if started is None:
            started = time.process_time()
    return 1000 * (time.process_time() - started) / (done - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=24)
    args = parser.parse_args()
    import ray

    rate = view_rate()
    print(f"measured: training views per core: {rate:,.0f}/s", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def rows(batch: dict) -> dict:
        n = len(batch["id"])
        return {
            "view": np.random.randint(0, 255, (n, VIEW, VIEW, 3), dtype=np.uint8),
            "teacher_emb": np.random.randn(n, 768).astype(np.float32),
            "teacher_local": np.random.randn(n, 16 * 768).astype(np.float32),
        }

    data = ray.data.range(BATCH * args.batches, override_num_blocks=2 * args.batches).map_batches(rows).materialize()

    def stream(shuffle: int | None = None):
        return data.iterator().iter_torch_batches(
            batch_size=BATCH, drop_last=True, local_shuffle_buffer_size=shuffle, device="cpu"
        )

    plain = cpu_per_batch(stream())
    ray_shuffle = cpu_per_batch(stream(POOL * BATCH))
    pool = cpu_per_batch(mixed_batches(stream(), POOL))
    ray.shutdown()
    print(f"\nbatch {BATCH} of {VIEW} px views · {args.batches} batches · CPU time of the training process")
    print("| what | ms of CPU per batch | ratio to unshuffled |\n|---|---|---|")
    for label, ms in (
        ("unshuffled", plain),
        (f"Ray Data local shuffle buffer, {POOL} batches", ray_shuffle),
        (f"mixed_batches pool of {POOL} batches, on the CPU", pool),
    ):
        print(f"| {label} | {ms:.1f} | {ms / plain:.2f}x |")
    print(f"training views per core: {rate:,.0f}/s")


if __name__ == "__main__":
    main()
