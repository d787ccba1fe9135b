"""A small deterministic synthetic world for tests and the no-network quickstart.

Each image shows one object (a shape kind, a colour, a size, a position) on a background (a colour and
a texture), with small per-image jitter so that images with equal attributes are not byte-identical. Each
image has a caption, and composed-retrieval triplets (reference, modifier text, target) change one or two
attributes of the reference. The world is written in the official file layouts of CIRR, FashionIQ and
CIRCO, so that benchmark readers are exercised on the real formats. Nothing is ever downloaded, and
everything is a pure function of ``(seed, num_images, num_triplets, image_size)``: two writes with the
same arguments produce byte-identical files.

Layout written by :func:`write_world`::

    root/
    ├── images/<scene>.png             every image of the world (PNG)
    ├── captions.jsonl                 {"image": "images/<scene>.png", "caption": "..."} per line
    ├── world.json                     manifest (not a benchmark format): seed, image size, splits, per
    │                                  image its attributes, caption, split and benchmark names; triplets
    ├── cirr/                          CIRR dataset root, as the CLIP4Cir / SEARLE loaders expect it
    │   ├── cirr/
    │   │   ├── captions/cap.rc2.{train,val,test1}.json
    │   │   │       [{"pairid": int, "reference": name, "target_hard": name,
    │   │   │         "target_soft": {name: float}, "caption": str,
    │   │   │         "img_set": {"id": int, "members": [6 names], "reference_rank": int,
    │   │   │                     "target_rank": int}}, ...]
    │   │   │       (test1: no "target_hard", "target_soft" nor "img_set.target_rank")
    │   │   └── image_splits/split.rc2.{train,val,test1}.json
    │   │           {name: "./train/<k>/<name>.png" | "./dev/<name>.png" | "./test1/<name>.png"}
    │   ├── train/<k>/train-<n>-<k>-img<j>.png
    │   ├── dev/dev-<n>-<k>-img<j>.png
    │   └── test1/test1-<n>-<k>-img<j>.png
    ├── fashioniq/
    │   ├── captions/cap.{dress,shirt,toptee}.{train,val,test}.json
    │   │       [{"target": asin, "candidate": asin, "captions": [str, str]}, ...]
    │   │       (test: {"candidate", "captions"} only, as in the official release)
    │   ├── image_splits/split.{dress,shirt,toptee}.{train,val,test}.json      [asin, ...]
    │   └── images/<asin>.png
    └── circo/
        ├── annotations/{val,test}.json
        │       val:  [{"reference_img_id": int, "target_img_id": int, "relative_caption": str,
        │               "shared_concept": str, "gt_img_ids": [int, ...], "id": int,
        │               "semantic_aspects": [str, ...]}, ...]   (gt_img_ids[0] == target_img_id)
        │       test: [{"reference_img_id", "relative_caption", "shared_concept", "id"}, ...]
        └── COCO2017_unlabeled/
            ├── annotations/image_info_unlabeled2017.json
            │       {"info", "licenses", "images": [{"license", "file_name", "coco_url", "height",
            │        "width", "date_captured", "flickr_url", "id"}, ...], "categories": []}
            └── unlabeled2017/<12-digit zero-padded id>.jpg

The official CIRR README keeps the images under ``cirr/img_raw/``; the split files hold paths relative to
the image root either way, and the common loaders use the dataset root shown above.

Splits: the images form a disjoint train / val / test partition. CIRR uses all three (test is
``test1``); FashionIQ maps its three categories onto disjoint shape kinds (:data:`FASHIONIQ_CATEGORIES`)
and keeps the triplets whose reference and target both belong to the category; CIRCO uses the val and
test triplets as queries and every image of the world as its gallery, like the COCO unlabeled set.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from isa.errors import IsaError

RGB = tuple[int, int, int]

WORLD_TEACHER = "isa-world-ViT"  # open_clip config (isa/model_configs) of the teacher aligned on this world
WORLD_TEACHER_STEPS = 400  # its contrastive steps in isa quickstart and isa world --teacher
WORLD_TEACHER_FOLDER = "teacher"  # where those two keep its weights, in their output folder

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, RGB] = {  # object colours
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUND_COLOURS: dict[str, RGB] = {  # kept apart from the object colours
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
    "brown": (120, 80, 40),
    "teal": (0, 128, 128),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "gradient")
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "background", "texture")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUND_COLOURS),
    "texture": TEXTURES,
}
SPLITS: tuple[str, ...] = ("train", "val", "test")
FASHIONIQ_CATEGORIES: dict[str, tuple[str, ...]] = {  # category -> its shape kinds (disjoint)
    "dress": ("circle", "diamond"),
    "shirt": ("square", "cross"),
    "toptee": ("triangle", "star"),
}
CIRCO_ASPECTS: dict[str, str] = {  # changed attribute -> official CIRCO semantic aspect
    "shape": "compare_change",
    "colour": "direct_addressing",
    "size": "comparative_statement",
    "position": "spatial_relations_background",
    "background": "spatial_relations_background",
    "texture": "spatial_relations_background",
}

_POSITION_CENTRES: dict[str, tuple[float, float]] = {  # (x, y) as fractions of the image size
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
_SIZE_RADII: dict[str, float] = {"small": 0.11, "large": 0.2}  # object radius, fraction of image size
_WHERE: dict[str, str] = {  # position as said in a caption
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_COMPARATIVE: dict[str, str] = {"small": "smaller", "large": "larger"}
_TONE_BLEND = 0.25  # how far the texture tone moves from the background colour
_NOISE = 3  # per-pixel noise amplitude, in RGB levels
_SPLIT_FRACTIONS: tuple[tuple[str, float], ...] = (("train", 0.6), ("val", 0.2), ("test", 0.2))
_CIRR_SPLITS: dict[str, str] = {"train": "train", "val": "val", "test": "test1"}  # world -> file split
_CIRR_FOLDERS: dict[str, str] = {"train": "train", "val": "dev", "test": "test1"}  # name prefix, folder
_COCO_MAX_ID = 581929  # largest id of the COCO 2017 unlabeled images

_TEMPLATES: dict[str, tuple[str, ...]] = {  # one change, phrased several ways
    "shape": (
        "make it a {new}",
        "turn the {old} into a {new}",
        "a {new} instead of a {old}",
        "replace the {old} with a {new}",
    ),
    "colour": (
        "make it {new}",
        "change the colour to {new}",
        "paint the {shape} {new}",
        "{new} instead of {old}",
    ),
    "size": ("make it {comparative}", "make the {shape} {comparative}", "a {comparative} {shape}"),
    "position": ("move it to the {new}", "place the {shape} at the {new}", "shift the {shape} to the {new}"),
    "background": (
        "make the background {new}",
        "change the background colour to {new}",
        "put it on a {new} background",
    ),
    "texture": (
        "put it on a {new} background",
        "make the background {new}",
        "use a {new} background instead of a {old} one",
    ),
}
_SHAPE_AND_COLOUR_TEMPLATES: tuple[str, ...] = (
    "make the {old_colour} {old_shape} a {new_colour} {new_shape}",
    "replace the {old_colour} {old_shape} with a {new_colour} {new_shape}",
    "a {new_colour} {new_shape} instead of a {old_colour} {old_shape}",
)


@dataclass(frozen=True)
class Jitter:
    """Small per-image perturbations, so that images with equal attributes differ."""

    dx: float = 0.0  # horizontal offset of the object centre, fraction of the image size
    dy: float = 0.0  # vertical offset of the object centre, fraction of the image size
    scale: float = 1.0  # multiplier of the object radius
    rotation: float = 0.0  # object rotation in degrees (a circle ignores it)
    object_shift: RGB = (0, 0, 0)  # offset added to the object colour
    background_shift: RGB = (0, 0, 0)  # offset added to the background colour and its tone
    phase: float = 0.0  # texture phase in [0, 1): stripe and dot offset, gradient direction
    noise_seed: int = 0  # seed of the per-pixel noise


@dataclass(frozen=True)
class Scene:
    """The attributes of one image, plus its jitter."""

    shape: str  # object shape kind, one of SHAPES
    colour: str  # object colour, one of COLOURS
    size: str  # object size, one of SIZES
    position: str  # object position, one of POSITIONS
    background: str  # background colour, one of BACKGROUND_COLOURS
    texture: str  # background texture, one of TEXTURES
    jitter: Jitter = field(default_factory=Jitter)  # per-image perturbations

    def __post_init__(self) -> None:
        for name, value in self.attributes.items():
            if value not in ATTRIBUTE_VALUES[name]:
                raise ValueError(f"{name}={value!r} is not one of {ATTRIBUTE_VALUES[name]}")

    @property
    def attributes(self) -> dict[str, str]:
        """The six attributes by name, in :data:`ATTRIBUTES` order (jitter excluded)."""
        return {name: getattr(self, name) for name in ATTRIBUTES}


@dataclass(frozen=True)
class Triplet:
    """A composed-retrieval query: the target is the reference with ``changes`` applied."""

    reference: str  # image name of the reference
    target: str  # image name of the target, in the reference's split
    modifier: str  # the change in words, e.g. "move it to the right"
    modifier_alt: str  # another phrasing of the same change
    changes: tuple[str, ...]  # names of the changed attributes, in ATTRIBUTES order
    ground_truths: tuple[str, ...]  # every image of the world with the target's attributes, target first


@dataclass(frozen=True)
class World:
    """Images, captions, a disjoint train / val / test partition and triplets per split."""

    seed: int  # the seed it was generated from
    image_size: int  # default side of the rendered images, in pixels
    images: dict[str, Scene]  # image name -> scene, in generation order
    captions: dict[str, str]  # image name -> caption
    splits: dict[str, tuple[str, ...]]  # split -> image names; the splits partition the images
    triplets: dict[str, list[Triplet]]  # split -> triplets whose reference and target are in that split


@dataclass(frozen=True)
class WorldPaths:
    """Where :func:`write_world` put each part of the world."""

    root: Path  # the folder everything was written to
    images: Path  # every image as PNG
    captions: Path  # captions.jsonl
    manifest: Path  # world.json
    cirr: Path  # CIRR dataset root (cirr/, train/, dev/, test1/)
    fashioniq: Path  # FashionIQ dataset root (captions/, image_splits/, images/)
    circo: Path  # CIRCO dataset root (annotations/, COCO2017_unlabeled/)


@dataclass(frozen=True)
class _BenchmarkNames:
    """How each world image is named inside each benchmark."""

    cirr: dict[str, str]  # world name -> CIRR image name
    cirr_paths: dict[str, str]  # world name -> path relative to the CIRR dataset root
    fashioniq: dict[str, str]  # world name -> ASIN-like FashionIQ name
    circo: dict[str, int]  # world name -> COCO image id


# ---------------------------------------------------------------------------------------------- captions


def caption_for(scene: Scene) -> str:
    """Describes a scene in words, e.g. "a large red circle on the left on a striped grey background"."""
    return (
        f"a {scene.size} {scene.colour} {scene.shape} {_WHERE[scene.position]} "
        f"on a {scene.texture} {scene.background} background"
    )


def _shared_concept(scene: Scene, changes: Sequence[str]) -> str:
    """Describes what the reference and the target have in common (CIRCO's ``shared_concept``)."""
    kept = [scene.size if "size" not in changes else "", scene.colour if "colour" not in changes else ""]
    noun = scene.shape if "shape" not in changes else "shape"
    words = ["a", *[word for word in kept if word], noun]
    if "position" not in changes:
        words.append(_WHERE[scene.position])
    background = [
        scene.texture if "texture" not in changes else "",
        scene.background if "background" not in changes else "",
    ]
    if any(background):
        words += ["on a", *[word for word in background if word], "background"]
    return _with_articles(" ".join(words))


def _with_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _phrase(rng: random.Random, scene: Scene, changes: Mapping[str, str]) -> tuple[str, str]:
    """Two different phrasings of the changes ``{attribute: new value}`` applied to ``scene``."""
    if set(changes) == {"shape", "colour"}:
        first, second = rng.sample(_SHAPE_AND_COLOUR_TEMPLATES, 2)
        fields = {
            "old_shape": scene.shape,
            "new_shape": changes["shape"],
            "old_colour": scene.colour,
            "new_colour": changes["colour"],
        }
        return _with_articles(first.format(**fields)), _with_articles(second.format(**fields))
    pairs = [rng.sample(_TEMPLATES[name], 2) for name in changes]
    fields = [_template_fields(scene, name, new) for name, new in changes.items()]
    phrasings = tuple(
        " and ".join(templates[which].format(**values) for templates, values in zip(pairs, fields, strict=True))
        for which in (0, 1)
    )
    return _with_articles(phrasings[0]), _with_articles(phrasings[1])


def _template_fields(scene: Scene, name: str, new: str) -> dict[str, str]:
    old = scene.attributes[name]
    return {"old": old, "new": new, "shape": scene.shape, "comparative": _COMPARATIVE.get(new, new)}


# -------------------------------------------------------------------------------------------- generation


def generate_world(seed: int = 0, num_images: int = 600, num_triplets: int = 200, image_size: int = 64) -> World:
    """Generates the synthetic world, a pure function of its arguments.

    ``num_images`` random scenes are split 60 / 20 / 20 into train / val / test. Triplets are spread 50 /
    25 / 25 over the splits; a target whose attributes no image of the reference's split has is added to
    that split, and for val and test targets one to three more images with the same attributes are added
    to train, so that CIRCO queries have several ground truths while CIRR and FashionIQ val / test
    galleries keep one target per query. The world therefore holds at least ``num_images`` images.

    Args:
        seed: Seed of every random choice.
        num_images: Number of random base scenes (at least 30, so that every split can fill a CIRR
            image set of six).
        num_triplets: Number of triplets over all splits.
        image_size: Default side of rendered images in pixels (at least 32).

    Returns:
        The world.
    """
    _check_sizes(num_images, num_triplets, image_size)
    rng = random.Random(seed)
    builder = _WorldBuilder()
    scenes = [_random_scene(rng) for _ in range(num_images)]
    for scene, split in zip(scenes, _split_labels(rng, num_images), strict=True):
        builder.add(scene, split)
    drafts = {
        split: [_draft_triplet(builder, rng, split, index) for index in range(count)]
        for split, count in _triplet_counts(num_triplets).items()
    }
    return builder.build(seed, image_size, drafts)


class WorldSizeError(IsaError):
    """A world size out of range (the message names it and the limit)."""


def _check_sizes(num_images: int, num_triplets: int, image_size: int) -> None:
    if num_images < 30:
        raise WorldSizeError(f"num_images (--num-images) must be at least 30, got {num_images}")
    if num_triplets < 0:
        raise WorldSizeError(f"num_triplets (--num-triplets) must not be negative, got {num_triplets}")
    if image_size < 32:
        raise WorldSizeError(f"image_size (--image-size) must be at least 32, got {image_size}")


def _split_labels(rng: random.Random, count: int) -> list[str]:
    """A random train / val / test label per image, in the proportions of ``_SPLIT_FRACTIONS``."""
    labels: list[str] = []
    for split, fraction in _SPLIT_FRACTIONS[1:]:
        labels += [split] * round(fraction * count)
    labels = ["train"] * (count - len(labels)) + labels
    rng.shuffle(labels)
    return labels


def _triplet_counts(num_triplets: int) -> dict[str, int]:
    quarter = num_triplets // 4
    return {"train": num_triplets - 2 * quarter, "val": quarter, "test": quarter}


def _random_scene(rng: random.Random) -> Scene:
    values = {name: rng.choice(ATTRIBUTE_VALUES[name]) for name in ATTRIBUTES}
    return Scene(**values, jitter=_random_jitter(rng))


def _random_jitter(rng: random.Random) -> Jitter:
    return Jitter(
        dx=round(rng.uniform(-0.03, 0.03), 4),
        dy=round(rng.uniform(-0.03, 0.03), 4),
        scale=round(rng.uniform(0.9, 1.1), 4),
        rotation=round(rng.uniform(-8.0, 8.0), 2),
        object_shift=(rng.randint(-10, 10), rng.randint(-10, 10), rng.randint(-10, 10)),
        background_shift=(rng.randint(-8, 8), rng.randint(-8, 8), rng.randint(-8, 8)),
        phase=round(rng.random(), 4),
        noise_seed=rng.getrandbits(32),
    )


@dataclass(frozen=True)
class _Draft:
    """A triplet before its ground truths are known (later triplets may still add images)."""

    reference: str
    target: str
    modifier: str
    modifier_alt: str
    changes: tuple[str, ...]


class _WorldBuilder:
    """Collects images and their splits while triplets are drafted."""

    def __init__(self) -> None:
        self.images: dict[str, Scene] = {}
        self.split_of: dict[str, str] = {}

    def add(self, scene: Scene, split: str) -> str:
        name = f"scene-{len(self.images):06d}"
        self.images[name] = scene
        self.split_of[name] = split
        return name

    def in_split(self, split: str) -> list[str]:
        return [name for name, label in self.split_of.items() if label == split]

    def matching(self, attributes: Mapping[str, str], split: str | None = None) -> list[str]:
        """Images (of ``split``, or of any split) whose attributes equal ``attributes``."""
        return [
            name
            for name, scene in self.images.items()
            if scene.attributes == attributes and split in (None, self.split_of[name])
        ]

    def build(self, seed: int, image_size: int, drafts: Mapping[str, list[_Draft]]) -> World:
        triplets = {split: [self._finish(draft) for draft in drafts[split]] for split in SPLITS}
        return World(
            seed=seed,
            image_size=image_size,
            images=dict(self.images),
            captions={name: caption_for(scene) for name, scene in self.images.items()},
            splits={split: tuple(self.in_split(split)) for split in SPLITS},
            triplets=triplets,
        )

    def _finish(self, draft: _Draft) -> Triplet:
        others = self.matching(self.images[draft.target].attributes)
        ground_truths = (draft.target, *[name for name in others if name != draft.target])
        return Triplet(
            reference=draft.reference,
            target=draft.target,
            modifier=draft.modifier,
            modifier_alt=draft.modifier_alt,
            changes=draft.changes,
            ground_truths=ground_truths,
        )


def _draft_triplet(builder: _WorldBuilder, rng: random.Random, split: str, index: int) -> _Draft:
    reference = _pick_reference(builder, rng, split, index)
    scene = builder.images[reference]
    changes = _pick_changes(rng, scene)
    target = _find_or_add_target(builder, rng, split, scene, changes)
    modifier, modifier_alt = _phrase(rng, scene, changes)
    return _Draft(reference, target, modifier, modifier_alt, tuple(changes))


def _pick_reference(builder: _WorldBuilder, rng: random.Random, split: str, index: int) -> str:
    """A reference image of ``split``, rotating over the FashionIQ categories so that each gets queries."""
    shapes = list(FASHIONIQ_CATEGORIES.values())[index % len(FASHIONIQ_CATEGORIES)]
    names = builder.in_split(split)
    candidates = [name for name in names if builder.images[name].shape in shapes]
    return rng.choice(candidates or names)


def _pick_changes(rng: random.Random, scene: Scene) -> dict[str, str]:
    """One attribute (70 %) or two attributes to change, with their new values, in ATTRIBUTES order."""
    count = 1 if rng.random() < 0.7 else 2
    names = sorted(rng.sample(ATTRIBUTES, count), key=ATTRIBUTES.index)
    old = scene.attributes
    return {name: rng.choice([value for value in ATTRIBUTE_VALUES[name] if value != old[name]]) for name in names}


def _find_or_add_target(
    builder: _WorldBuilder, rng: random.Random, split: str, scene: Scene, changes: Mapping[str, str]
) -> str:
    attributes = {**scene.attributes, **changes}
    existing = builder.matching(attributes, split)
    if existing:
        return rng.choice(existing)
    target = builder.add(Scene(**attributes, jitter=_random_jitter(rng)), split)
    if split != "train":
        for _ in range(rng.randint(1, 3)):
            builder.add(Scene(**attributes, jitter=_random_jitter(rng)), "train")
    return target


# --------------------------------------------------------------------------------------------- rendering


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draws a scene: its textured background, its object, then the per-pixel noise.

    Args:
        scene: What to draw.
        image_size: Side of the square image in pixels.

    Returns:
        An RGB image of ``image_size`` x ``image_size`` pixels.
    """
    return _render(scene, image_size, with_object=True)


def render_background(scene: Scene, image_size: int) -> Image.Image:
    """Draws a scene without its object (same background and noise as :func:`render_scene`).

    The pixels where the two renderings differ are exactly the object's.

    Args:
        scene: Whose background to draw.
        image_size: Side of the square image in pixels.

    Returns:
        An RGB image of ``image_size`` x ``image_size`` pixels.
    """
    return _render(scene, image_size, with_object=False)


def _render(scene: Scene, image_size: int, with_object: bool) -> Image.Image:
    image = Image.fromarray(_background_pixels(scene, image_size))
    if with_object:
        _draw_object(ImageDraw.Draw(image), scene, image_size)
    return _add_noise(image, scene.jitter.noise_seed)


def _shifted(colour: RGB, shift: RGB) -> np.ndarray:
    return np.clip(np.add(colour, shift), 0, 255).astype(np.float64)


def _background_pixels(scene: Scene, image_size: int) -> np.ndarray:
    base = _shifted(BACKGROUND_COLOURS[scene.background], scene.jitter.background_shift)  # (3,)
    towards = 255.0 if base.mean() < 128 else 0.0  # dark backgrounds get a lighter tone, light a darker
    tone = base + _TONE_BLEND * (towards - base)  # (3,)
    weight = _texture_weight(scene.texture, image_size, scene.jitter.phase)[..., None]  # (S, S, 1)
    pixels = base * (1.0 - weight) + tone * weight  # (S, S, 3)
    return np.rint(pixels).astype(np.uint8)


def _texture_weight(texture: str, image_size: int, phase: float) -> np.ndarray:
    """Per pixel, how much of the texture tone it shows: (S, S) in [0, 1]."""
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    if texture == "striped":
        period = max(4, image_size // 8)
        return (((xs + ys + phase * period) % period) < period / 3).astype(np.float64)
    if texture == "dotted":
        period = max(6, image_size // 6)
        dx = (xs + phase * period) % period - period / 2
        dy = (ys + phase * period) % period - period / 2
        return (dx**2 + dy**2 <= (0.2 * period) ** 2).astype(np.float64)
    if texture == "gradient":
        ramp = ys / (image_size - 1)
        return ramp if phase < 0.5 else 1.0 - ramp
    return np.zeros((image_size, image_size))


def _draw_object(draw: ImageDraw.ImageDraw, scene: Scene, image_size: int) -> None:
    jitter = scene.jitter
    fx, fy = _POSITION_CENTRES[scene.position]
    cx, cy = (fx + jitter.dx) * image_size, (fy + jitter.dy) * image_size
    radius = _SIZE_RADII[scene.size] * jitter.scale * image_size
    fill = tuple(int(v) for v in _shifted(COLOURS[scene.colour], jitter.object_shift))
    if scene.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        return
    angle = math.radians(jitter.rotation)
    cos, sin = math.cos(angle), math.sin(angle)
    points = [
        (cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in _unit_outline(scene.shape)
    ]
    draw.polygon(points, fill=fill)


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """The polygon of a shape around (0, 0) with circumradius about 1, y pointing down."""
    if shape == "square":
        half = 0.85
        return [(-half, -half), (half, -half), (half, half), (-half, half)]
    if shape == "triangle":
        return [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "star":
        return [
            (
                (1.0 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * k)),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * k)),
            )
            for k in range(10)
        ]
    if shape == "cross":
        w = 0.33  # half the width of an arm
        quarter = [(-w, -1.0), (w, -1.0), (w, -w)]  # the top arm; the other three are its rotations
        return [point for turn in range(4) for point in _quarter_turns(quarter, turn)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    raise ValueError(f"no outline for shape {shape!r}")


def _quarter_turns(points: list[tuple[float, float]], turns: int) -> list[tuple[float, float]]:
    for _ in range(turns):
        points = [(-y, x) for x, y in points]
    return points


def _add_noise(image: Image.Image, seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-_NOISE, _NOISE + 1, size=(image.height, image.width, 3))
    pixels = np.asarray(image, dtype=np.int16) + noise  # (S, S, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- writing


def world_paths(root: str | os.PathLike) -> WorldPaths:
    """Where :func:`write_world` puts each part of a world written to ``root``."""
    base = Path(root)
    return WorldPaths(
        root=base,
        images=base / "images",
        captions=base / "captions.jsonl",
        manifest=base / "world.json",
        cirr=base / "cirr",
        fashioniq=base / "fashioniq",
        circo=base / "circo",
    )


def write_world(world: World, root: str | os.PathLike, image_size: int | None = None) -> WorldPaths:
    """Writes the world: plain images and captions, and the CIRR, FashionIQ and CIRCO layouts.

    The layout is described in the module docstring. Files already in ``root`` are overwritten, never
    deleted: write into a fresh folder to get exactly one world.

    Args:
        world: What to write.
        root: Folder to write into (created if missing).
        image_size: Side of the written images in pixels; ``None`` takes ``world.image_size``.

    Returns:
        The paths of the roots of each part.
    """
    size = world.image_size if image_size is None else image_size
    paths = world_paths(root)
    names = _benchmark_names(world)
    _write_images(world, paths, names, size)
    _write_captions(world, paths)
    _write_cirr(world, paths.cirr, names)
    _write_fashioniq(world, paths.fashioniq, names)
    _write_circo(world, paths.circo, names, size)
    _write_manifest(world, paths, names, size)
    return paths


def _benchmark_names(world: World) -> _BenchmarkNames:
    cirr: dict[str, str] = {}
    cirr_paths: dict[str, str] = {}
    for split, names in world.splits.items():
        folder = _CIRR_FOLDERS[split]
        for index, name in enumerate(names):
            pair = index // 8
            cirr[name] = f"{folder}-{pair}-{(index // 2) % 4}-img{index % 2}"
            subfolder = f"{pair % 100}/" if split == "train" else ""
            cirr_paths[name] = f"./{folder}/{subfolder}{cirr[name]}.png"
    count = len(world.images)
    asins = _asins(random.Random(f"{world.seed}:fashioniq"), count)
    coco_ids = random.Random(f"{world.seed}:circo").sample(range(1, _COCO_MAX_ID + 1), count)
    return _BenchmarkNames(
        cirr=cirr,
        cirr_paths=cirr_paths,
        fashioniq=dict(zip(world.images, asins, strict=True)),
        circo=dict(zip(world.images, coco_ids, strict=True)),
    )


def _asins(rng: random.Random, count: int) -> list[str]:
    """Distinct Amazon-style product ids, e.g. "B00E9AWYWO"."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    found: dict[str, None] = {}
    while len(found) < count:
        found["B0" + "".join(rng.choice(alphabet) for _ in range(8))] = None
    return list(found)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_json(path: Path, value: object, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=indent), encoding="utf-8")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _write_images(world: World, paths: WorldPaths, names: _BenchmarkNames, image_size: int) -> None:
    for name, scene in world.images.items():
        image = render_scene(scene, image_size)
        png, jpeg = _encoded(image, "PNG"), _encoded(image, "JPEG")
        _write_bytes(paths.images / f"{name}.png", png)
        _write_bytes(paths.cirr / names.cirr_paths[name], png)
        _write_bytes(paths.fashioniq / "images" / f"{names.fashioniq[name]}.png", png)
        _write_bytes(paths.circo / "COCO2017_unlabeled" / "unlabeled2017" / _coco_file_name(names.circo[name]), jpeg)


def _write_captions(world: World, paths: WorldPaths) -> None:
    lines = [
        json.dumps({"image": f"images/{name}.png", "caption": caption}) for name, caption in world.captions.items()
    ]
    paths.captions.parent.mkdir(parents=True, exist_ok=True)
    paths.captions.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _coco_file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


# CIRR


def _write_cirr(world: World, root: Path, names: _BenchmarkNames) -> None:
    rng = random.Random(f"{world.seed}:cirr")
    pair_id = 0
    for split, file_split in _CIRR_SPLITS.items():
        entries = []
        for set_id, triplet in enumerate(world.triplets[split]):
            entries.append(_cirr_entry(world, rng, triplet, pair_id, set_id, split, names.cirr))
            pair_id += 1
        _write_json(root / "cirr" / "captions" / f"cap.rc2.{file_split}.json", entries)
        relpaths = {names.cirr[name]: names.cirr_paths[name] for name in world.splits[split]}
        _write_json(root / "cirr" / "image_splits" / f"split.rc2.{file_split}.json", relpaths)


def _cirr_entry(
    world: World,
    rng: random.Random,
    triplet: Triplet,
    pair_id: int,
    set_id: int,
    split: str,
    cirr: Mapping[str, str],
) -> dict:
    members = _img_set_members(world, rng, triplet, split)
    img_set: dict = {"id": set_id, "members": [cirr[name] for name in members]}
    img_set["reference_rank"] = members.index(triplet.reference)
    if split == "test":
        return {
            "pairid": pair_id,
            "reference": cirr[triplet.reference],
            "caption": triplet.modifier,
            "img_set": img_set,
        }
    img_set["target_rank"] = members.index(triplet.target)
    return {
        "pairid": pair_id,
        "reference": cirr[triplet.reference],
        "target_hard": cirr[triplet.target],
        "target_soft": {cirr[triplet.target]: 1.0},
        "caption": triplet.modifier,
        "img_set": img_set,
    }


def _img_set_members(world: World, rng: random.Random, triplet: Triplet, split: str) -> list[str]:
    """Six images of the split: reference, target and four look-alikes that are no ground truth."""
    excluded = {triplet.reference, *triplet.ground_truths}
    candidates = [name for name in world.splits[split] if name not in excluded]
    rng.shuffle(candidates)
    reference, target = world.images[triplet.reference], world.images[triplet.target]
    candidates.sort(key=lambda name: -(_shared(world.images[name], reference) + _shared(world.images[name], target)))
    members = [triplet.reference, triplet.target, *candidates[:4]]
    rng.shuffle(members)
    return members


def _shared(first: Scene, second: Scene) -> int:
    return sum(a == b for a, b in zip(first.attributes.values(), second.attributes.values(), strict=True))


# FashionIQ


def _write_fashioniq(world: World, root: Path, names: _BenchmarkNames) -> None:
    asin = names.fashioniq
    for category, shapes in FASHIONIQ_CATEGORIES.items():
        for split in SPLITS:
            images = [asin[name] for name in world.splits[split] if world.images[name].shape in shapes]
            _write_json(root / "image_splits" / f"split.{category}.{split}.json", images)
            entries = [
                _fashioniq_entry(triplet, split, asin)
                for triplet in world.triplets[split]
                if {world.images[triplet.reference].shape, world.images[triplet.target].shape} <= set(shapes)
            ]
            _write_json(root / "captions" / f"cap.{category}.{split}.json", entries, indent=4)


def _fashioniq_entry(triplet: Triplet, split: str, asin: Mapping[str, str]) -> dict:
    captions = [triplet.modifier, triplet.modifier_alt]
    if split == "test":
        return {"candidate": asin[triplet.reference], "captions": captions}
    return {"target": asin[triplet.target], "candidate": asin[triplet.reference], "captions": captions}


# CIRCO


def _write_circo(world: World, root: Path, names: _BenchmarkNames, image_size: int) -> None:
    coco = names.circo
    for split in ("val", "test"):
        entries = [
            _circo_entry(world, triplet, query_id, split, coco)
            for query_id, triplet in enumerate(world.triplets[split])
        ]
        _write_json(root / "annotations" / f"{split}.json", entries, indent=4)
    info = {
        "info": {
            "description": "isa synthetic world in the COCO 2017 unlabeled image-info format",
            "url": "",
            "version": "1.0",
            "year": 2017,
            "contributor": "isa",
            "date_created": "2017/09/01",
        },
        "licenses": [{"url": "", "id": 1, "name": "synthetic"}],
        "images": [_coco_image(coco[name], image_size) for name in world.images],
        "categories": [],
    }
    _write_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", info)


def _circo_entry(world: World, triplet: Triplet, query_id: int, split: str, coco: Mapping[str, int]) -> dict:
    reference = world.images[triplet.reference]
    shared_concept = _shared_concept(reference, triplet.changes)
    if split == "test":
        return {
            "reference_img_id": coco[triplet.reference],
            "relative_caption": triplet.modifier,
            "shared_concept": shared_concept,
            "id": query_id,
        }
    return {
        "reference_img_id": coco[triplet.reference],
        "target_img_id": coco[triplet.target],
        "relative_caption": triplet.modifier,
        "shared_concept": shared_concept,
        "gt_img_ids": [coco[name] for name in triplet.ground_truths],
        "id": query_id,
        "semantic_aspects": _semantic_aspects(triplet.changes),
    }


def _semantic_aspects(changes: Sequence[str]) -> list[str]:
    aspects = ["statement_with_conjunction"] if len(changes) > 1 else []
    return list(dict.fromkeys(aspects + [CIRCO_ASPECTS[name] for name in changes]))


def _coco_image(image_id: int, image_size: int) -> dict:
    return {
        "license": 1,
        "file_name": _coco_file_name(image_id),
        "coco_url": "",
        "height": image_size,
        "width": image_size,
        "date_captured": "2017-01-01 00:00:00",
        "flickr_url": "",
        "id": image_id,
    }


# Manifest


def _write_manifest(world: World, paths: WorldPaths, names: _BenchmarkNames, image_size: int) -> None:
    split_of = {name: split for split, members in world.splits.items() for name in members}
    images = {
        name: {
            **asdict(scene),
            "caption": world.captions[name],
            "split": split_of[name],
            "cirr": names.cirr[name],
            "fashioniq": names.fashioniq[name],
            "circo": names.circo[name],
        }
        for name, scene in world.images.items()
    }
    manifest = {
        "seed": world.seed,
        "image_size": image_size,
        "splits": {split: list(members) for split, members in world.splits.items()},
        "images": images,
        "triplets": {split: [asdict(triplet) for triplet in triplets] for split, triplets in world.triplets.items()},
    }
    _write_json(paths.manifest, manifest, indent=1)
