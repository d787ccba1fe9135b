"""Images/s of ``isa embed`` against a plain single-process loop, side by side in one run.

Both embed the same 640x480 JPEGs with the same teacher and batch size; the plain loop is what a user
would otherwise write (PIL decode, open_clip's preprocess, ``encode_image`` in batches). On a GPU the
script also measures the teacher tower's own forward rate on ready-made tensors, the ceiling the
pipeline is compared with (benchmarks/RESULTS.md).

    python benchmarks/embed_throughput.py --teacher ViT-B-32 --images 512            # CPU
    python benchmarks/embed_throughput.py --teacher ViT-L-14 --images 20000 --device cuda --fast-decode \\
        --batch-size 256 --plain-images 1024                                            # one GPU
    ... --tower-dtype bfloat16    # the tower's weights in bf16 too (cache.tower_dtype), in both loops
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from isa.config import load_config
from isa.teacher import load_teacher


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-like 640x480 JPEGs (gradients, mild noise, random shapes), every file different.

    Written by one process per core; image ``i`` is the same whatever the number of processes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    workers = min(os.cpu_count() or 1, max(1, count // 256))
    bounds = [count * k // workers for k in range(workers + 1)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = pool.map(_write_jpegs, [folder] * workers, bounds[:-1], bounds[1:], [seed] * workers)
        return [path for part in parts for path in part]


def _write_jpegs(folder: Path, start: int, stop: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640]
    bases = []
    for _ in range(16):
        base = np.stack(
            [(x * rng.uniform(0.1, 0.4) + y * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 256 for _ in range(3)],
            axis=-1,
        )
        bases.append(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    paths = []
    for index in range(start, stop):
        shapes = np.random.default_rng([seed, index])
        image = Image.fromarray(bases[index % len(bases)])
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = shapes.integers(0, 560), shapes.integers(0, 400)
            draw.ellipse(
                (x0, y0, x0 + shapes.integers(20, 200), y0 + shapes.integers(20, 200)),
                fill=tuple(int(v) for v in shapes.integers(0, 255, 3)),
            )
        path = folder / f"img-{index:06d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], name: str, pretrained: str, batch: int, device: str, dtype: str) -> float:
    """Single process: decode, preprocess, forward in batches, the tower as the pipeline runs it (``dtype``:
    ``cache.tower_dtype``). Returns images/s (model load excluded)."""
    teacher = load_teacher(name, pretrained, device=device)
    teacher.model.to(getattr(torch, dtype))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and dtype == "float32")
    started = time.perf_counter()
    with torch.inference_mode(), autocast:
        for start in range(0, len(paths), batch):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + batch]]
            pixels = torch.stack([teacher.preprocess(image) for image in images]).to(device, getattr(torch, dtype))
            F.normalize(teacher.model.encode_image(pixels).float(), dim=-1).cpu()
    if device == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - started)


def tower_forward(name: str, pretrained: str, batch: int, steps: int = 20, device: str = "cuda") -> dict[str, float]:
    """The image tower alone on ready-made tensors on ``device``: the ceiling, as the pipeline runs it (fp32
    weights, bf16 autocast) and with its weights cast to bf16. Returns their images/s and the cosine of each
    one's embeddings to the fp32 tower's."""
    teacher = load_teacher(name, pretrained, device=device)
    size = teacher.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    with torch.inference_mode():
        reference = F.normalize(teacher.model.encode_image(pixels).float(), dim=-1)
        figures = {}
        for mode in ("autocast", "bf16 weights"):
            if mode == "bf16 weights":
                teacher.model.to(torch.bfloat16)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "autocast"):
                inputs = pixels.to(torch.bfloat16) if mode == "bf16 weights" else pixels
                emb = F.normalize(teacher.model.encode_image(inputs).float(), dim=-1)
                figures[f"cosine, {mode}"] = float((emb * reference).sum(-1).min())
                for _ in range(3):
                    teacher.model.encode_image(inputs)
                sync()
                started = time.perf_counter()
                for _ in range(steps):
                    teacher.model.encode_image(inputs)
                sync()
                figures[mode] = steps * batch / (time.perf_counter() - started)
    del teacher
    if device == "cuda":
        torch.cuda.empty_cache()  # the pipeline's actor needs the GPU next
    return figures


def pipeline(folder: Path, output: Path, args: argparse.Namespace) -> tuple[float, float]:
    """``isa embed`` on a local Ray instance.

    Returns:
        images/s end to end (the first run: start-up of workers and actors included) and in steady state:
        the marginal rate between two later runs on the same instance, all images and a quarter of them,
        ``(N - n) / (t_N - t_n)``, which takes out what every run pays once.
    """
    import ray

    from pipelines.embed import run

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    overrides = [
        f"teacher.name={args.teacher}",
        f"teacher.pretrained={args.pretrained}",
        f"cache.batch_size={args.batch_size}",
        f"cache.num_actors={args.actors}",
        f"cache.actor_cpus={args.actor_cpus}",
        f"cache.decode_cpus={args.decode_cpus}",
        f"cache.device={args.device}",
        f"cache.fast_decode={args.fast_decode}",
        f"cache.tower_dtype={args.tower_dtype}",
        f"cache.store_images={args.images_column}",
        "cache.local_grid=0",
        *([f"cache.decode_batch_size={args.decode_batch_size}"] if args.decode_batch_size else []),
        f"cache.rows_per_shard={args.batch_size * 4}",
    ]
    config = load_config(None, overrides)
    first = run(str(folder), str(output / "first"), config)
    quarter = folder.parent / "quarter"
    quarter.mkdir()
    for path in sorted(folder.iterdir())[: args.images // 4]:
        os.link(path, quarter / path.name)
    small = run(str(quarter), str(output / "quarter"), config)
    full = run(str(folder), str(output / "again"), config)
    ray.shutdown()
    assert first.cached == full.cached == args.images and small.cached == args.images // 4, (first, small, full)
    steady = (full.cached - small.cached) / (full.seconds - small.seconds)
    return first.cached / first.seconds, steady


def measured(figures: dict[str, float | None]) -> None:
    """Print figures as soon as they are measured: a run cut short keeps what it got."""
    for label, value in figures.items():
        print(f"measured: {label}: {'not run' if value is None else f'{value:,.5g}'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none", help="speed does not depend on the weights")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--decode-cpus", type=float, default=1.0)
    parser.add_argument("--decode-batch-size", type=int, help="images per decode task (default: the config's)")
    parser.add_argument("--fast-decode", action="store_true", help="reduced-size JPEG decoding in the pipeline")
    parser.add_argument("--tower-dtype", choices=["float32", "bfloat16"], default="float32", help="cache.tower_dtype")
    parser.add_argument("--images-column", action="store_true", help="also cache student JPEGs (more work)")
    parser.add_argument("--plain-images", type=int, default=0, help="images for the plain loop (0: all)")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain loop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp) / "images", args.images)
        # each figure is printed as soon as it is measured: a run cut short keeps what it got
        tower = tower_forward(args.teacher, args.pretrained, 256) if args.device == "cuda" else {}
        measured(tower)
        baseline = None
        if not args.no_plain:
            subset = paths[: args.plain_images or None]
            baseline = plain_loop(subset, args.teacher, args.pretrained, args.batch_size, args.device, args.tower_dtype)
            measured({"plain loop": baseline})
        ours, steady = pipeline(Path(tmp) / "images", Path(tmp) / "cache", args)
        measured({"isa embed, end to end": ours, "isa embed, steady state": steady})
        rows = [
            ("plain single-process loop", baseline),
            ("isa embed, end to end (start-up included)", ours),
            ("isa embed, steady state", steady),
        ]
        if tower:
            rows[:0] = [
                ("teacher tower forward only (bf16 autocast, as the pipeline runs it)", tower["autocast"]),
                ("teacher tower forward only, weights cast to bf16", tower["bf16 weights"]),
            ]
    print(
        f"\n{args.teacher} · {args.images} JPEGs 640x480 · batch {args.batch_size} · {args.device} · "
        f"{os.cpu_count()} cores · fast_decode={args.fast_decode} · tower {args.tower_dtype} · "
        f"images column={args.images_column} · "
        + ("no plain loop" if args.no_plain else f"plain loop on {args.plain_images or args.images} images")
    )
    print("| what | images/s |\n|---|---|")
    for label, rate in rows:
        print(f"| {label} | {'not run' if rate is None else f'{rate:,.1f}'} |")
    if baseline:
        print(f"ratio isa embed / plain loop: {ours / baseline:.2f}x end to end, {steady / baseline:.2f}x steady state")
    if tower:
        ceiling = tower["autocast" if args.tower_dtype == "float32" else "bf16 weights"]  # as the pipeline ran it
        print(f"isa embed / tower forward: {ours / ceiling:.0%} end to end, {steady / ceiling:.0%} steady state")
        print(
            "smallest cosine to the fp32 tower (256 random inputs): "
            f"{tower['cosine, autocast']:.5f} autocast, {tower['cosine, bf16 weights']:.5f} bf16 weights"
        )


if __name__ == "__main__":
    main()
