"""The synthetic world: determinism, the official file layouts, triplet semantics and honest rendering."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isa.data.synthetic import (
    ATTRIBUTES,
    BACKGROUND_COLOURS,
    CIRCO_ASPECTS,
    COLOURS,
    FASHIONIQ_CATEGORIES,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    TEXTURES,
    Jitter,
    Scene,
    World,
    WorldPaths,
    caption_for,
    generate_world,
    render_background,
    render_scene,
    write_world,
)

OFFICIAL_ASPECTS = {
    "cardinality",
    "addition",
    "negation",
    "direct_addressing",
    "compare_change",
    "comparative_statement",
    "statement_with_conjunction",
    "spatial_relations_background",
    "viewpoint",
}
CIRR_SPLITS = {"train": "train", "val": "val", "test": "test1"}


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(seed=3, num_images=90, num_triplets=48)


@pytest.fixture(scope="module")
def paths(world: World, tmp_path_factory: pytest.TempPathFactory) -> WorldPaths:
    return write_world(world, tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def manifest(paths: WorldPaths) -> dict:
    return json.loads(paths.manifest.read_text())


def _load(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _decodes(path: Path, size: int) -> bool:
    with Image.open(path) as image:
        image.load()
        return image.mode == "RGB" and image.size == (size, size)


# ----------------------------------------------------------------------------------------- determinism


def test_generation_is_a_pure_function_of_its_arguments() -> None:
    assert generate_world(1, 40, 12) == generate_world(1, 40, 12)
    assert generate_world(1, 40, 12) != generate_world(2, 40, 12)


def test_same_seed_writes_byte_identical_files(tmp_path: Path) -> None:
    first = _file_hashes(write_world(generate_world(5, 40, 12), tmp_path / "a").root)
    second = _file_hashes(write_world(generate_world(5, 40, 12), tmp_path / "b").root)
    other = _file_hashes(write_world(generate_world(6, 40, 12), tmp_path / "c").root)
    assert len(first) > 100
    assert first == second
    assert first != other
    shared = set(first) & set(other)
    assert sum(first[name] != other[name] for name in shared) > len(shared) // 2


def test_rejects_sizes_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="num_images"):
        generate_world(num_images=10)
    with pytest.raises(ValueError, match="num_triplets"):
        generate_world(num_triplets=-1)
    with pytest.raises(ValueError, match="image_size"):
        generate_world(image_size=8)
    with pytest.raises(ValueError, match="colour"):
        Scene("circle", "pink", "small", "left", "white", "plain")


# ------------------------------------------------------------------------------------------- the world


def test_splits_partition_the_images(world: World) -> None:
    members = [name for split in SPLITS for name in world.splits[split]]
    assert sorted(members) == sorted(world.images)
    assert len(members) == len(set(members))
    assert all(len(world.splits[split]) >= 6 for split in SPLITS)
    assert set(world.captions) == set(world.images)


def test_captions_name_every_attribute(world: World) -> None:
    for name, scene in world.images.items():
        caption = world.captions[name]
        assert caption == caption_for(scene)
        for word in (scene.shape, scene.colour, scene.size, scene.position, scene.background, scene.texture):
            assert word in caption


def test_triplets_change_exactly_the_named_attributes(world: World) -> None:
    split_of = {name: split for split, names in world.splits.items() for name in names}
    count = 0
    for split, triplets in world.triplets.items():
        for triplet in triplets:
            reference, target = world.images[triplet.reference], world.images[triplet.target]
            changed = tuple(name for name in ATTRIBUTES if reference.attributes[name] != target.attributes[name])
            assert changed == triplet.changes and 1 <= len(changed) <= 2
            assert split_of[triplet.reference] == split_of[triplet.target] == split
            assert triplet.modifier != triplet.modifier_alt
            for text in (triplet.modifier, triplet.modifier_alt):
                for name in changed:
                    assert target.attributes[name] in text, (text, name)
            count += 1
    assert count == 48


def test_ground_truths_are_every_image_with_the_target_attributes(world: World) -> None:
    for triplet in itertools.chain.from_iterable(world.triplets.values()):
        wanted = world.images[triplet.target].attributes
        expected = {name for name, scene in world.images.items() if scene.attributes == wanted}
        assert triplet.ground_truths[0] == triplet.target
        assert len(triplet.ground_truths) == len(set(triplet.ground_truths))
        assert set(triplet.ground_truths) == expected
    several = [len(t.ground_truths) > 1 for split in ("val", "test") for t in world.triplets[split]]
    assert all(several)


def test_images_with_equal_attributes_differ(world: World) -> None:
    triplet = world.triplets["val"][0]
    first, second = triplet.ground_truths[:2]
    assert world.images[first].attributes == world.images[second].attributes
    assert render_scene(world.images[first], 64).tobytes() != render_scene(world.images[second], 64).tobytes()


# ------------------------------------------------------------------------------ plain images and captions


def test_captions_jsonl_points_at_decodable_images(world: World, paths: WorldPaths) -> None:
    lines = paths.captions.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(world.images)
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"image", "caption"}
        assert _decodes(paths.root / record["image"], 64)
        assert record["caption"] == world.captions[Path(record["image"]).stem]


def test_written_png_is_the_rendered_scene(world: World, paths: WorldPaths) -> None:
    name, scene = next(iter(world.images.items()))
    with Image.open(paths.images / f"{name}.png") as image:
        assert np.array_equal(np.asarray(image), np.asarray(render_scene(scene, 64)))


# ------------------------------------------------------------------------------------------------ CIRR


def test_cirr_layout(world: World, paths: WorldPaths) -> None:
    root = paths.cirr
    seen_images: set[str] = set()
    pair_ids: list[int] = []
    for split, file_split in CIRR_SPLITS.items():
        relpaths = _load(root / "cirr" / "image_splits" / f"split.rc2.{file_split}.json")
        assert isinstance(relpaths, dict) and len(relpaths) == len(world.splits[split])
        assert not seen_images & set(relpaths)
        seen_images |= set(relpaths)
        folder = {"train": "train", "val": "dev", "test": "test1"}[split]
        for name, relpath in relpaths.items():
            assert re.fullmatch(rf"{folder}-\d+-[0-3]-img[01]", name)
            pattern = rf"\./train/\d+/{name}\.png" if split == "train" else rf"\./{folder}/{name}\.png"
            assert re.fullmatch(pattern, relpath)
            assert _decodes(root / relpath, 64)
        entries = _load(root / "cirr" / "captions" / f"cap.rc2.{file_split}.json")
        assert len(entries) == len(world.triplets[split])
        for entry in entries:
            _check_cirr_entry(entry, relpaths, test=split == "test")
            pair_ids.append(entry["pairid"])
    assert len(pair_ids) == len(set(pair_ids))


def _check_cirr_entry(entry: dict, relpaths: dict, test: bool) -> None:
    keys = ["pairid", "reference", "caption", "img_set"]
    if not test:
        keys = ["pairid", "reference", "target_hard", "target_soft", "caption", "img_set"]
    assert list(entry) == keys
    assert isinstance(entry["pairid"], int) and isinstance(entry["caption"], str) and entry["caption"]
    img_set = entry["img_set"]
    assert list(img_set) == ["id", "members", "reference_rank"] + ([] if test else ["target_rank"])
    members = img_set["members"]
    assert isinstance(img_set["id"], int) and len(members) == 6 == len(set(members))
    assert all(member in relpaths for member in members)
    assert members[img_set["reference_rank"]] == entry["reference"]
    if not test:
        assert members[img_set["target_rank"]] == entry["target_hard"]
        assert entry["target_soft"] == {entry["target_hard"]: 1.0}
        assert entry["target_hard"] != entry["reference"]


# ------------------------------------------------------------------------------------------- FashionIQ


def test_fashioniq_layout(world: World, paths: WorldPaths, manifest: dict) -> None:
    root = paths.fashioniq
    by_asin = {record["fashioniq"]: name for name, record in manifest["images"].items()}
    assert len(by_asin) == len(world.images)
    listed: list[str] = []
    for category, shapes in FASHIONIQ_CATEGORIES.items():
        for split in SPLITS:
            names = _load(root / "image_splits" / f"split.{category}.{split}.json")
            assert isinstance(names, list) and names
            listed += names
            for asin in names:
                assert re.fullmatch(r"B0[0-9A-Z]{8}", asin)
                assert world.images[by_asin[asin]].shape in shapes
                assert _decodes(root / "images" / f"{asin}.png", 64)
            entries = _load(root / "captions" / f"cap.{category}.{split}.json")
            assert entries, (category, split)
            for entry in entries:
                _check_fashioniq_entry(entry, set(names), test=split == "test")
    assert len(listed) == len(set(listed)) == len(world.images)


def _check_fashioniq_entry(entry: dict, names: set[str], test: bool) -> None:
    assert list(entry) == (["candidate", "captions"] if test else ["target", "candidate", "captions"])
    assert entry["candidate"] in names
    assert len(entry["captions"]) == 2 and all(isinstance(c, str) and c for c in entry["captions"])
    if not test:
        assert entry["target"] in names and entry["target"] != entry["candidate"]


# ----------------------------------------------------------------------------------------------- CIRCO


def test_circo_layout(world: World, paths: WorldPaths, manifest: dict) -> None:
    root = paths.circo
    info = _load(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    assert {"info", "licenses", "images"} <= set(info)
    ids = [image["id"] for image in info["images"]]
    assert len(ids) == len(set(ids)) == len(world.images)
    for image in info["images"]:
        assert {"id", "file_name", "width", "height", "license", "coco_url", "date_captured"} <= set(image)
        assert re.fullmatch(r"\d{12}\.jpg", image["file_name"]) and int(image["file_name"][:12]) == image["id"]
        assert (image["width"], image["height"]) == (64, 64)
        assert _decodes(root / "COCO2017_unlabeled" / "unlabeled2017" / image["file_name"], 64)
    by_id = {record["circo"]: name for name, record in manifest["images"].items()}
    assert set(by_id) == set(ids)
    for split in ("val", "test"):
        entries = _load(root / "annotations" / f"{split}.json")
        assert len(entries) == len(world.triplets[split]) > 0
        assert [entry["id"] for entry in entries] == list(range(len(entries)))
        for entry in entries:
            _check_circo_entry(entry, world, by_id, test=split == "test")


def _check_circo_entry(entry: dict, world: World, by_id: dict[int, str], test: bool) -> None:
    keys = ["reference_img_id", "relative_caption", "shared_concept", "id"]
    if not test:
        keys = [
            "reference_img_id",
            "target_img_id",
            "relative_caption",
            "shared_concept",
            "gt_img_ids",
            "id",
            "semantic_aspects",
        ]
    assert list(entry) == keys
    assert isinstance(entry["reference_img_id"], int) and entry["reference_img_id"] in by_id
    assert entry["relative_caption"] and entry["shared_concept"].startswith("a")
    if test:
        return
    gts = entry["gt_img_ids"]
    assert gts[0] == entry["target_img_id"] and len(gts) == len(set(gts)) >= 2
    target = world.images[by_id[entry["target_img_id"]]].attributes
    assert all(world.images[by_id[gt]].attributes == target for gt in gts)
    assert entry["reference_img_id"] not in gts
    assert entry["semantic_aspects"] and set(entry["semantic_aspects"]) <= OFFICIAL_ASPECTS
    assert set(CIRCO_ASPECTS.values()) <= OFFICIAL_ASPECTS


# ------------------------------------------------------------------------------------------- rendering


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((colour - np.asarray(palette[name])) ** 2)))


def _region(x: float, y: float) -> str:
    """Where a centroid lies, from its coordinates as fractions of the image side."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "center"
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _observe(image: np.ndarray, background: np.ndarray) -> dict[str, str]:
    """What an image shows: the object is where it differs from its background-only rendering."""
    mask = np.any(image != background, axis=-1)  # (S, S)
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    assert len(xs) >= 20, "the object is (almost) invisible"
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / size
    rest = image[~mask].astype(np.float64)  # (N, 3)
    return {
        "colour": _nearest(np.median(image[mask], axis=0), COLOURS),
        "position": _region(xs.mean() / size, ys.mean() / size),
        "size": "large" if extent >= 0.275 else "small",
        "background": _nearest(np.median(rest, axis=0), BACKGROUND_COLOURS),
        "texture": "plain" if rest.std(axis=0).mean() < 4.0 else "textured",
    }


def _expected(scene: Scene) -> dict[str, str]:
    texture = "plain" if scene.texture == "plain" else "textured"
    return {
        "colour": scene.colour,
        "position": scene.position,
        "size": scene.size,
        "background": scene.background,
        "texture": texture,
    }


def _render_pair(scene: Scene, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(render_scene(scene, size)), np.asarray(render_background(scene, size))


def test_rendering_shows_every_object_attribute() -> None:
    jitters = [
        Jitter(),
        Jitter(dx=0.03, dy=-0.03, scale=1.1, rotation=8.0, object_shift=(10, -10, 10), noise_seed=1),
        Jitter(dx=-0.03, dy=0.03, scale=0.9, rotation=-8.0, object_shift=(-10, 10, -10), noise_seed=2),
    ]
    combos = itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)
    for index, (shape, colour, size, position) in enumerate(combos):
        scene = Scene(shape, colour, size, position, "grey", "striped", jitters[index % len(jitters)])
        assert _observe(*_render_pair(scene)) == _expected(scene), scene


def test_rendering_shows_every_background() -> None:
    for index, (background, texture) in enumerate(itertools.product(BACKGROUND_COLOURS, TEXTURES)):
        shift = (8, -8, 8) if index % 2 else (-8, 8, -8)
        jitter = Jitter(background_shift=shift, phase=index / 20, noise_seed=index)
        scene = Scene("star", "red", "small", "center", background, texture, jitter)
        assert _observe(*_render_pair(scene)) == _expected(scene), scene


def test_every_world_image_shows_its_caption(world: World) -> None:
    for scene in world.images.values():
        assert _observe(*_render_pair(scene)) == _expected(scene), caption_for(scene)


def test_written_jpeg_still_shows_the_object_colour(world: World, paths: WorldPaths, manifest: dict) -> None:
    folder = paths.circo / "COCO2017_unlabeled" / "unlabeled2017"
    for name in list(world.images)[:30]:
        scene = world.images[name]
        image, background = _render_pair(scene)
        mask = np.any(image != background, axis=-1)
        with Image.open(folder / f"{manifest['images'][name]['circo']:012d}.jpg") as decoded:
            pixels = np.asarray(decoded, dtype=np.float64)
        assert _nearest(np.median(pixels[mask], axis=0), COLOURS) == scene.colour


def test_image_size_is_configurable() -> None:
    scene = Scene("cross", "blue", "large", "right", "white", "dotted", Jitter(noise_seed=7))
    for size in (32, 96, 160):
        image = render_scene(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
        assert _observe(*_render_pair(scene, size)) == _expected(scene)
