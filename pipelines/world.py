"""``isa world OUTPUT``: write the deterministic synthetic world in the official benchmark layouts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from isa.data.synthetic import generate_world, write_world
from pipelines.stage import stage_parser


def parser() -> argparse.ArgumentParser:
    """``isa world``'s arguments."""
    parser = stage_parser("isa world", __doc__)
    parser.add_argument("output", help="folder to write (images/, captions.jsonl, cirr/, fashioniq/, circo/)")
    parser.add_argument("--seed", type=int, default=0, help="the world's random seed")
    parser.add_argument("--num-images", type=int, default=600, help="random base scenes (targets are added)")
    parser.add_argument("--num-triplets", type=int, default=200, help="composed-retrieval triplets in all")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    world = generate_world(args.seed, args.num_images, args.num_triplets, args.image_size)
    paths = write_world(world, args.output)
    counts = {split: len(triplets) for split, triplets in world.triplets.items()}
    print(f"wrote {len(world.images)} images and triplets {counts} to {paths.root}")
    for name in ("cirr", "fashioniq", "circo"):
        print(f"  {name:<9} {getattr(paths, name)}")
    return 0
