"""``isa world OUTPUT``: write the deterministic synthetic world in the official benchmark layouts."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from isa.data.synthetic import (
    WORLD_TEACHER,
    WORLD_TEACHER_FOLDER,
    WORLD_TEACHER_STEPS,
    generate_world,
    world_paths,
    write_world,
)
from isa.errors import IsaError
from pipelines.artifact import check_folder
from pipelines.stage import stage_parser


def parser() -> argparse.ArgumentParser:
    """``isa world``'s arguments."""
    parser = stage_parser("isa world", __doc__)
    parser.add_argument("output", help="folder to write (images/, captions.jsonl, cirr/, fashioniq/, circo/)")
    parser.add_argument("--seed", type=int, default=0, help="the world's random seed")
    parser.add_argument("--num-images", type=int, default=600, help="random base scenes (targets are added)")
    parser.add_argument("--num-triplets", type=int, default=200, help="composed-retrieval triplets in all")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the world already in OUTPUT (its own files only)"
    )
    parser.add_argument(
        "--teacher", action="store_true", help=f"also train its teacher ({WORLD_TEACHER}) as isa quickstart does"
    )
    parser.add_argument("--teacher-steps", type=int, default=WORLD_TEACHER_STEPS, help="its contrastive steps")
    return parser


KIND = "synthetic world"  # what pipelines.artifact's messages call the folder


class WorldError(IsaError):
    """The output folder holds a world already (and --overwrite was not given)."""


def world_entries(output: str) -> dict[str, Path]:
    """The entries a world has at the top of its folder, by name (its images, captions, manifest, layouts, and the
    teacher ``--teacher`` trains on it)."""
    paths = world_paths(output)
    teacher = paths.root / WORLD_TEACHER_FOLDER
    parts = (paths.images, paths.captions, paths.manifest, paths.cirr, paths.fashioniq, paths.circo, teacher)
    return {path.name: path for path in parts}


def check_output(output: str, overwrite: bool) -> bool:
    """The output folder rule (:func:`pipelines.artifact.check_folder`): new, empty, or a world (``world.json``)
    that ``overwrite`` replaces. Returns whether there is a world to remove first.

    Raises:
        ArtifactError: the folder holds anything but a world's own files (named).
        WorldError: the folder holds a world and ``overwrite`` is off.
    """
    entries = world_entries(output)
    marker = world_paths(output).manifest.name
    if not check_folder(output, KIND, entries.__contains__, marker=marker):
        return False
    if not overwrite:
        raise WorldError(
            f"OUT {output} already holds a synthetic world: --overwrite replaces it, or name another folder"
        )
    return True


def remove_world(output: str) -> None:
    """Remove a world's own files (the manifest first: a half-removed folder is no world)."""
    entries = world_entries(output)
    for name in [world_paths(output).manifest.name, *entries]:
        path = entries[name]
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    replace = check_output(args.output, args.overwrite)
    world = generate_world(args.seed, args.num_images, args.num_triplets, args.image_size)  # before any write
    if replace:
        remove_world(args.output)
    paths = write_world(world, args.output)
    counts = {split: len(triplets) for split, triplets in world.triplets.items()}
    print(f"wrote {len(world.images)} images and triplets {counts} to {paths.root}")
    for name in ("cirr", "fashioniq", "circo"):
        print(f"  {name:<9} {getattr(paths, name)}")
    if args.teacher:
        print(teacher_usage(train_teacher(paths.root, args.teacher_steps, args.seed)))
    return 0


def train_teacher(root: Path, steps: int, seed: int) -> Path:
    """The world's teacher, trained as :mod:`pipelines.quickstart` trains it, in ROOT/teacher/; its weights file."""
    from pipelines import quickstart  # Ray and torch: only with --teacher

    print(f"training the world teacher ({steps} contrastive steps) ...", flush=True)
    return quickstart.make_teacher(root, root, steps, seed)


def teacher_usage(weights: Path) -> str:
    """How the stages use the trained teacher: every stage takes it as --teacher/--pretrained or teacher.* keys."""
    weights = weights.resolve()  # absolute: stages submitted to a cluster resolve paths there
    root = weights.parent.parent
    return (
        f"world teacher: {weights}\n"
        f"use it in every stage (a random teacher scores at chance on this world):\n"
        f"  isa embed {root / 'cirr' / 'train'} CACHE --teacher {WORLD_TEACHER} --pretrained {weights}\n"
        f"  isa eval --benchmark cirr --dataset-root {root / 'cirr'} --teacher {WORLD_TEACHER} --pretrained {weights}\n"
        f"  (or teacher.name={WORLD_TEACHER} teacher.pretrained={weights})"
    )
