"""Images/s of ``isa embed`` against a plain single-process loop, side by side in one run.

Both embed the same 640x480 JPEGs with the same teacher and batch size; the plain loop is what a user
would otherwise write (PIL decode, open_clip's preprocess, ``encode_image`` in batches), run twice: with
full JPEG decoding and with the reduced-size decoding ``cache.fast_decode`` gives ``isa embed`` (PIL's
``draft``, the same scale rule). Each repeat runs the plain loops and ``isa embed`` one after the other, in
alternating order, and prints two ratios: same decode (``isa embed`` against the plain loop that decodes as
it does) and each side's best (against the faster plain loop). Every time counts the model load; ``isa
embed``'s end to end counts everything its ``run()`` does (the teacher fingerprint, actor, task or helper start-up,
the shard writes). On CPU ``isa embed`` runs twice a round: without Ray (``cache.runner=local``, what ``isa embed``
picks on a machine with no cluster to join) and on a fresh local Ray instance, whose own start is printed apart.
On a GPU the
script also measures the teacher tower's own forward rate on ready-made tensors, the ceiling the pipeline is
compared with (benchmarks/RESULTS.md).

    python benchmarks/embed_throughput.py --teacher ViT-B-32 --images 512 --batch-size 32 --fast-decode \\
        --actor-cpus 1.5 --decode-cpus 0.5 --repeats 3                                   # CPU
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


def open_image(path: Path, draft_short_side: int | None) -> Image.Image:
    """The plain loop's decode: PIL in full, or at the reduced DCT scale ``isa embed``'s ``cache.fast_decode``
    asks for (the smallest whose short side is still ``draft_short_side``)."""
    image = Image.open(path)
    if draft_short_side:
        scale = draft_short_side / min(image.size)
        image.draft("RGB", (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return image.convert("RGB")


def plain_loop(
    paths: list[Path], name: str, pretrained: str, batch: int, device: str, dtype: str, fast_decode: bool = False
) -> float:
    """Single process: decode (``fast_decode``: at reduced size), preprocess, forward in batches, the tower as the
    pipeline runs it (``dtype``: ``cache.tower_dtype``). Returns images/s, the model load included."""
    started = time.perf_counter()
    teacher = load_teacher(name, pretrained, device=device)
    teacher.model.to(getattr(torch, dtype))
    draft = teacher.image_size if fast_decode else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and dtype == "float32")
    with torch.inference_mode(), autocast:
        for start in range(0, len(paths), batch):
            images = [open_image(p, draft) for p in paths[start : start + batch]]
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


def pipeline(
    folder: Path, output: Path, args: argparse.Namespace, runner: str, steady: bool = True, label: str = ""
) -> dict[str, float]:
    """``isa embed`` with ``cache.runner=runner``: on a fresh local Ray instance (ray) or without Ray (local); each
    figure is printed as soon as it is measured, after ``label``.

    Returns:
        ``ray start`` (seconds to start the instance, in no rate; ray only), ``end to end`` (images/s of the first
        run: everything ``run()`` does, the teacher fingerprint, worker, actor or helper start-up included) and,
        with ``steady``, ``steady state``: the marginal rate between two later runs (on the same instance), all
        images and a quarter of them, ``(N - n) / (t_N - t_n)``, which takes out what every run pays once.
    """
    import ray

    import pipelines.teacher
    from pipelines.embed import run, tower_in_driver

    label = f"{label}isa embed ({'on Ray' if runner == 'ray' else 'without Ray'}), "
    figures: dict[str, float] = {}
    if runner == "ray":
        started = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        figures["ray start"] = time.perf_counter() - started
        measured({f"{label}ray start": figures["ray start"]})
    overrides = [
        f"cache.runner={runner}",
        f"teacher.name={args.teacher}",
        f"teacher.pretrained={args.pretrained}",
        f"cache.batch_size={args.batch_size}",
        f"cache.tower_in={args.tower_in}",
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
    if runner == "ray":
        print(f"isa embed's tower runs {'in the driver' if tower_in_driver(config.cache) else 'on actors'}", flush=True)
    pipelines.teacher._FINGERPRINTS.clear()  # a cold run: an earlier repeat's fingerprint is not reused
    output.mkdir(parents=True)
    started = time.perf_counter()
    first = run(str(folder), str(output / "first"), config)
    figures["end to end"] = first.cached / (time.perf_counter() - started)
    assert first.cached == args.images, first
    measured({f"{label}end to end": figures["end to end"]})
    if steady:
        quarter = output / "quarter-input"
        quarter.mkdir()
        for path in sorted(folder.iterdir())[: args.images // 4]:
            os.link(path, quarter / path.name)
        small = run(str(quarter), str(output / "quarter"), config)
        full = run(str(folder), str(output / "again"), config)
        assert full.cached == args.images and small.cached == args.images // 4, (small, full)
        figures["steady state"] = (full.cached - small.cached) / (full.seconds - small.seconds)
        measured({f"{label}steady state": figures["steady state"]})
    if runner == "ray":
        ray.shutdown()
    return figures


def measured(figures: dict[str, float | None]) -> None:
    """Print figures as soon as they are measured: a run cut short keeps what it got."""
    for label, value in figures.items():
        print(f"measured: {label}: {'not run' if value is None else f'{value:,.5g}'}", flush=True)


def load() -> str:
    """The machine's 1-minute load average (others' work included)."""
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none", help="speed does not depend on the weights")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tower-in", choices=["auto", "driver", "actors"], default="auto", help="cache.tower_in")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--decode-cpus", type=float, default=1.0)
    parser.add_argument("--decode-batch-size", type=int, help="images per decode task (default: the config's)")
    parser.add_argument("--fast-decode", action="store_true", help="reduced-size JPEG decoding in isa embed")
    parser.add_argument("--tower-dtype", choices=["float32", "bfloat16"], default="float32", help="cache.tower_dtype")
    parser.add_argument("--images-column", action="store_true", help="also cache student JPEGs (more work)")
    parser.add_argument("--plain-images", type=int, default=0, help="images for the plain loops (0: all)")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain loops")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of plain loops and isa embed, interleaved")
    parser.add_argument("--no-steady", action="store_true", help="leave out the steady-state runs")
    parser.add_argument(
        "--runner",
        choices=["both", "ray", "local"],
        default="both",
        help="cache.runner of the isa embed runs: both (on CPU; a GPU run goes on Ray), ray or local",
    )
    args = parser.parse_args()
    plain_modes = [] if args.no_plain else [("full decode", False), ("reduced-size decode", True)]
    runners = ["ray"] if args.device == "cuda" or args.runner == "ray" else ["local", "ray"]
    if args.runner == "local":
        runners = ["local"]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp) / "images", args.images)
        # each figure is printed as soon as it is measured: a run cut short keeps what it got
        tower = tower_forward(args.teacher, args.pretrained, 256) if args.device == "cuda" else {}
        measured(tower)
        for repeat in range(args.repeats):
            figures: dict[str, float] = {}
            order = ["plain", "isa"] if repeat % 2 == 0 else ["isa", "plain"]  # alternate who goes first
            for side in order:
                if side == "plain":
                    for label, fast in plain_modes if repeat % 2 == 0 else plain_modes[::-1]:
                        figures[f"load before plain loop, {label}"] = float(load())
                        subset = paths[: args.plain_images or None]
                        figures[f"plain loop, {label}"] = plain_loop(
                            subset, args.teacher, args.pretrained, args.batch_size, args.device, args.tower_dtype, fast
                        )
                        measured({f"round {repeat + 1}: plain loop, {label}": figures[f"plain loop, {label}"]})
                else:
                    figures["load before isa embed"] = float(load())
                    for runner in runners if repeat % 2 == 0 else runners[::-1]:
                        ours = pipeline(
                            Path(tmp) / "images",
                            Path(tmp) / f"cache-{repeat}-{runner}",
                            args,
                            runner,
                            not args.no_steady,
                            f"round {repeat + 1}: ",
                        )
                        figures.update({f"isa embed ({runner}), {key}": value for key, value in ours.items()})
            rounds.append(figures)
    print(
        f"\n{args.teacher} · {args.images} JPEGs 640x480 · batch {args.batch_size} · {args.device} · "
        f"{os.cpu_count()} cores · isa embed fast_decode={args.fast_decode} · tower {args.tower_dtype} in "
        f"{args.tower_in} · "
        f"images column={args.images_column} · actor cpus {args.actor_cpus} · decode cpus {args.decode_cpus} · "
        + ("no plain loop" if args.no_plain else f"plain loops on {args.plain_images or args.images} images")
    )
    if tower:
        print(f"teacher tower forward only (bf16 autocast, as the pipeline runs it): {tower['autocast']:,.1f} img/s")
        print(f"teacher tower forward only, weights cast to bf16: {tower['bf16 weights']:,.1f} img/s")
    same = "plain loop, reduced-size decode" if args.fast_decode else "plain loop, full decode"
    names = {"local": "without Ray", "ray": "on Ray"}
    print(
        "| round | load (plain, isa) | plain, full decode | plain, reduced-size decode "
        + "".join(f"| isa embed {names[r]}: end to end, steady " for r in runners)
        + "| Ray start (s) "
        + "".join(f"| {names[r]}, same decode: end to end, steady | each side's best " for r in runners)
        + "|"
    )
    print("|---" * (5 + 3 * len(runners)) + "|")
    for number, figures in enumerate(rounds, 1):
        plain = {label: figures.get(f"plain loop, {label}") for label, _ in plain_modes}
        best = max(plain.values()) if plain else None
        loads = "/".join(f"{v:.1f}" for k, v in figures.items() if k.startswith("load before plain"))

        def ratio(a: float | None, b: float | None) -> str:
            return "–" if a is None or b is None else f"{a / b:.2f}×"

        def rate(value: float | None) -> str:
            return "–" if value is None else f"{value:,.1f}"

        ours = {r: figures[f"isa embed ({r}), end to end"] for r in runners}
        steady = {r: figures.get(f"isa embed ({r}), steady state") for r in runners}
        start = figures.get("isa embed (ray), ray start")
        print(
            f"| {number} | {loads or '–'}, {figures['load before isa embed']:.1f} | {rate(plain.get('full decode'))} "
            f"| {rate(plain.get('reduced-size decode'))} "
            + "".join(f"| {rate(ours[r])}, {rate(steady[r])} " for r in runners)
            + f"| {'–' if start is None else f'{start:.1f}'} "
            + "".join(
                f"| {ratio(ours[r], figures.get(same))}, {ratio(steady[r], figures.get(same))} "
                f"| {ratio(ours[r], best)}, {ratio(steady[r], best)} "
                for r in runners
            )
            + "|"
        )
    if tower:
        ceiling = tower["autocast" if args.tower_dtype == "float32" else "bf16 weights"]  # as the pipeline ran it
        ours = rounds[-1]["isa embed (ray), end to end"]
        steady = rounds[-1].get("isa embed (ray), steady state") or 0.0
        print(f"isa embed / tower forward: {ours / ceiling:.0%} end to end, {steady / ceiling:.0%} steady state")
        print(
            "smallest cosine to the fp32 tower (256 random inputs): "
            f"{tower['cosine, autocast']:.5f} autocast, {tower['cosine, bf16 weights']:.5f} bf16 weights"
        )


if __name__ == "__main__":
    main()
