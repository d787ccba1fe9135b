"""``isa embed`` as a user runs it, against the plain loop as a user would run it: both as commands, timed from
start to exit (Python's start, imports, Ray's start where there is one, the model load, the writes), side by side.

Each round runs, in alternating order: the plain loop of ``embed_throughput.py`` as a script (reduced-size JPEG
decoding when ``--fast-decode``, as ``isa embed``'s ``cache.fast_decode``), ``isa embed`` with ``cache.runner=auto``
(what it picks on this machine: without Ray here, with no cluster to join) and with ``cache.runner=ray`` (a local
Ray instance started by the command). ``RAY_ADDRESS`` is unset for all of them.

    python benchmarks/embed_cli.py --teacher ViT-B-32 --images 512 --batch-size 32 --fast-decode --rounds 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embed_throughput import make_jpegs

PLAIN = """
import sys
from pathlib import Path
sys.path.insert(0, {benchmarks!r})
from embed_throughput import plain_loop
paths = sorted(Path({folder!r}).iterdir())
plain_loop(paths, {teacher!r}, {pretrained!r}, {batch}, "cpu", "float32", {fast})
"""


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Seconds from start to exit of ``command``, and its last output line; a failure stops the benchmark."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return seconds, lines[-2] if len(lines) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none", help="speed does not depend on the weights")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fast-decode", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_jpegs(folder, args.images)
        plain = PLAIN.format(
            benchmarks=str(Path(__file__).parent),
            folder=str(folder),
            teacher=args.teacher,
            pretrained=args.pretrained,
            batch=args.batch_size,
            fast=args.fast_decode,
        )
        embed = [sys.executable, "-m", "pipelines.cli", "embed", str(folder)]
        settings = ["--teacher", args.teacher, "--pretrained", args.pretrained, "--batch-size", str(args.batch_size)]
        settings += ["--local-grid", "0", "--no-images", f"cache.fast_decode={args.fast_decode}"]
        sides = {
            "plain loop": lambda n: [sys.executable, "-c", plain],
            "isa embed (auto)": lambda n: [*embed, f"{tmp}/auto-{n}", *settings],
            "isa embed (Ray)": lambda n: [*embed, f"{tmp}/ray-{n}", *settings, "cache.runner=ray"],
        }
        for number in range(args.rounds):
            names = list(sides) if number % 2 == 0 else list(sides)[::-1]
            seconds = {}
            for name in names:
                seconds[name], said = timed(sides[name](number), env)
                print(f"measured: round {number + 1}: {name}: {seconds[name]:.1f} s {said}", flush=True)
            rows.append(seconds)
    print(
        f"\n{args.teacher} · {args.images} JPEGs 640x480 · batch {args.batch_size} · {os.cpu_count()} cores · "
        f"fast decode {args.fast_decode} · seconds from start to exit; ratio = plain loop's time / isa embed's"
    )
    print("| round | plain loop (s) | isa embed, auto (s) | isa embed, Ray (s) | auto: ratio | Ray: ratio |")
    print("|---|---|---|---|---|---|")
    for number, seconds in enumerate(rows, 1):
        plain_s, auto_s, ray_s = seconds["plain loop"], seconds["isa embed (auto)"], seconds["isa embed (Ray)"]
        ratios = f"{plain_s / auto_s:.2f}× | {plain_s / ray_s:.2f}×"
        print(f"| {number} | {plain_s:.1f} | {auto_s:.1f} | {ray_s:.1f} | {ratios} |")


if __name__ == "__main__":
    main()
