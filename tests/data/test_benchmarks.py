"""Benchmark readers: each official layout read back against the synthetic world's own truth."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from isa.data.benchmarks import (
    Benchmark,
    BenchmarkFormatError,
    Query,
    read_benchmark,
    read_circo,
    read_cirr,
    read_fashioniq,
)
from isa.data.synthetic import CIRCO_ASPECTS, FASHIONIQ_CATEGORIES, WorldPaths, generate_world, write_world

CIRR_FILE_SPLITS = {"train": "train", "val": "val", "test": "test1"}  # world split -> CIRR file split


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> WorldPaths:
    world = generate_world(seed=5, num_images=60, num_triplets=30, image_size=32)
    return write_world(world, tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def manifest(paths: WorldPaths) -> dict:
    return json.loads(paths.manifest.read_text(encoding="utf-8"))


def _load(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _dump(path: Path, value: object) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def _names(manifest: dict, benchmark: str, world_names: list[str]) -> list[str]:
    return [str(manifest["images"][name][benchmark]) for name in world_names]


def _all_queries(benchmark: Benchmark) -> list[Query]:
    return [query for group in benchmark.queries.values() for query in group]


def _check_images(benchmark: Benchmark) -> None:
    """Every gallery image and every query image has a URI, and every URI is a file."""
    assert set(benchmark.galleries) == set(benchmark.queries)
    named = {name for gallery in benchmark.galleries.values() for name in gallery}
    for query in _all_queries(benchmark):
        named |= {query.reference, *query.ground_truths, *query.members}
    assert named <= set(benchmark.images)
    assert all(Path(uri).is_file() for uri in benchmark.images.values())


def _cirr_copy(paths: WorldPaths, tmp_path: Path) -> Path:
    return Path(shutil.copytree(paths.cirr, tmp_path / "cirr"))


# ------------------------------------------------------------------------------------------------- CIRR


@pytest.mark.parametrize("split", ["train", "val"])
def test_cirr_matches_the_world(paths: WorldPaths, manifest: dict, split: str) -> None:
    file_split = CIRR_FILE_SPLITS[split]
    benchmark = read_cirr(str(paths.cirr), file_split)
    assert (benchmark.name, benchmark.split, benchmark.has_targets) == ("cirr", file_split, True)
    assert set(benchmark.galleries["all"]) == set(_names(manifest, "cirr", manifest["splits"][split]))
    assert len(benchmark.galleries["all"]) == len(manifest["splits"][split])
    triplets = manifest["triplets"][split]
    raw = _load(paths.cirr / "cirr" / "captions" / f"cap.rc2.{file_split}.json")
    assert len(benchmark.queries["all"]) == len(triplets) == len(raw)
    for query, triplet, entry in zip(benchmark.queries["all"], triplets, raw):
        reference, target = _names(manifest, "cirr", [triplet["reference"], triplet["target"]])
        assert (query.reference, query.target, query.modifiers) == (reference, target, (triplet["modifier"],))
        assert query.ground_truths == (target,)
        assert query.query_id == str(entry["pairid"])
        assert query.members == tuple(entry["img_set"]["members"]) and len(query.members) == 6
        assert {reference, target} <= set(query.members) <= set(benchmark.galleries["all"])
    _check_images(benchmark)


@pytest.mark.parametrize("split", ["test", "test1"])
def test_cirr_test_split_has_no_targets(paths: WorldPaths, manifest: dict, split: str) -> None:
    benchmark = read_cirr(str(paths.cirr), split)
    assert (benchmark.split, benchmark.has_targets) == ("test1", False)
    triplets = manifest["triplets"]["test"]
    assert [q.reference for q in benchmark.queries["all"]] == [
        manifest["images"][t["reference"]]["cirr"] for t in triplets
    ]
    assert all(q.target is None and q.ground_truths == () and len(q.members) == 6 for q in benchmark.queries["all"])
    assert set(benchmark.galleries["all"]) == set(_names(manifest, "cirr", manifest["splits"]["test"]))
    _check_images(benchmark)


def test_cirr_images_under_img_raw(paths: WorldPaths, tmp_path: Path) -> None:
    root = _cirr_copy(paths, tmp_path)
    (root / "img_raw").mkdir()
    for folder in ("train", "dev", "test1"):
        (root / folder).rename(root / "img_raw" / folder)
    raw, plain = read_cirr(str(root), "val"), read_cirr(str(paths.cirr), "val")
    assert dataclasses.replace(raw, images={}) == dataclasses.replace(plain, images={})
    assert raw.images.keys() == plain.images.keys()
    assert all(uri.startswith(str(root / "img_raw" / "dev")) for uri in raw.images.values())
    _check_images(raw)


def test_cirr_images_in_neither_root(paths: WorldPaths, tmp_path: Path) -> None:
    root = _cirr_copy(paths, tmp_path)
    shutil.rmtree(root / "dev")
    with pytest.raises(BenchmarkFormatError, match=re.escape(str(root / "img_raw" / "dev"))) as raised:
        read_cirr(str(root), "val")
    assert str(root / "dev") in str(raised.value)


# -------------------------------------------------------------------------------------------- FashionIQ


@pytest.mark.parametrize("split", ["train", "val"])
def test_fashioniq_matches_the_world(paths: WorldPaths, manifest: dict, split: str) -> None:
    benchmark = read_fashioniq(str(paths.fashioniq), split)
    assert (benchmark.name, benchmark.split, benchmark.has_targets) == ("fashioniq", split, True)
    assert set(benchmark.galleries) == set(FASHIONIQ_CATEGORIES)
    images = manifest["images"]
    for category, shapes in FASHIONIQ_CATEGORIES.items():
        members = [name for name in manifest["splits"][split] if images[name]["shape"] in shapes]
        assert set(benchmark.galleries[category]) == set(_names(manifest, "fashioniq", members))
        triplets = [
            t
            for t in manifest["triplets"][split]
            if {images[t["reference"]]["shape"], images[t["target"]]["shape"]} <= set(shapes)
        ]
        assert len(benchmark.queries[category]) == len(triplets)
        for index, (query, triplet) in enumerate(zip(benchmark.queries[category], triplets)):
            reference, target = _names(manifest, "fashioniq", [triplet["reference"], triplet["target"]])
            assert query.query_id == f"{category}/{index}" and query.category == category
            assert (query.reference, query.target, query.ground_truths) == (reference, target, (target,))
            assert query.modifiers == (triplet["modifier"].strip(".?, "), triplet["modifier_alt"].strip(".?, "))
            assert query.reference in benchmark.galleries[category]  # the reference stays in the gallery
    _check_images(benchmark)


def test_fashioniq_test_split_and_categories(paths: WorldPaths, manifest: dict) -> None:
    benchmark = read_fashioniq(str(paths.fashioniq), "test", categories=("dress",))
    assert (benchmark.split, benchmark.has_targets, set(benchmark.queries)) == ("test", False, {"dress"})
    shapes = FASHIONIQ_CATEGORIES["dress"]
    expected = [
        manifest["images"][t["reference"]]["fashioniq"]
        for t in manifest["triplets"]["test"]
        if manifest["images"][t["reference"]]["shape"] in shapes
    ]
    assert [q.reference for q in benchmark.queries["dress"]] == expected
    assert all(q.target is None and q.ground_truths == () for q in benchmark.queries["dress"])
    _check_images(benchmark)


def test_fashioniq_accepts_other_image_extensions(paths: WorldPaths, tmp_path: Path) -> None:
    root = Path(shutil.copytree(paths.fashioniq, tmp_path / "fashioniq"))
    for image in (root / "images").glob("*.png"):
        image.rename(image.with_suffix(".jpg"))
    benchmark = read_fashioniq(str(root), "val")
    assert benchmark.galleries == read_fashioniq(str(paths.fashioniq), "val").galleries
    assert all(uri.endswith(".jpg") for uri in benchmark.images.values())
    _check_images(benchmark)


def test_fashioniq_image_without_a_file(paths: WorldPaths, tmp_path: Path) -> None:
    root = Path(shutil.copytree(paths.fashioniq, tmp_path / "fashioniq"))
    asin = _load(root / "image_splits" / "split.shirt.val.json")[0]
    (root / "images" / f"{asin}.png").unlink()
    with pytest.raises(BenchmarkFormatError, match=re.escape(asin)):
        read_fashioniq(str(root), "val")


def test_fashioniq_captions_are_stripped_of_surrounding_punctuation(paths: WorldPaths, tmp_path: Path) -> None:
    root = Path(shutil.copytree(paths.fashioniq, tmp_path / "fashioniq"))
    captions = root / "captions" / "cap.dress.val.json"
    entries = _load(captions)
    entries[0]["captions"] = [" is red and shorter. ", "has long sleeves?,"]
    captions.write_text(json.dumps(entries))
    query = read_fashioniq(str(root), "val", categories=("dress",)).queries["dress"][0]
    assert query.modifiers == ("is red and shorter", "has long sleeves")
    entries[0]["captions"] = ["is red", " .? "]  # nothing left of a caption: refused, naming the entry
    captions.write_text(json.dumps(entries))
    with pytest.raises(BenchmarkFormatError, match="'captions' is empty"):
        read_fashioniq(str(root), "val", categories=("dress",))


def test_fashioniq_target_outside_its_category_gallery_is_refused(paths: WorldPaths, tmp_path: Path) -> None:
    root = Path(shutil.copytree(paths.fashioniq, tmp_path / "fashioniq"))
    target = _load(root / "captions" / "cap.dress.val.json")[0]["target"]
    split = root / "image_splits" / "split.dress.val.json"
    split.write_text(json.dumps([name for name in _load(split) if name != target]))  # its file stays in images/
    with pytest.raises(
        BenchmarkFormatError, match=rf"target '{re.escape(target)}' of query dress/0 is not in the dress"
    ):
        read_fashioniq(str(root), "val", categories=("dress",))


# ------------------------------------------------------------------------------------------------ CIRCO


def test_circo_matches_the_world(paths: WorldPaths, manifest: dict) -> None:
    benchmark = read_circo(str(paths.circo), "val")
    assert (benchmark.name, benchmark.split, benchmark.has_targets) == ("circo", "val", True)
    assert set(benchmark.galleries["all"]) == set(_names(manifest, "circo", list(manifest["images"])))
    triplets = manifest["triplets"]["val"]
    raw = _load(paths.circo / "annotations" / "val.json")
    assert len(benchmark.queries["all"]) == len(triplets)
    for query, triplet, entry in zip(benchmark.queries["all"], triplets, raw):
        reference, target = _names(manifest, "circo", [triplet["reference"], triplet["target"]])
        assert (query.reference, query.target, query.modifiers) == (reference, target, (triplet["modifier"],))
        assert query.ground_truths == tuple(_names(manifest, "circo", triplet["ground_truths"]))
        assert query.query_id == str(entry["id"]) and query.shared_concept == entry["shared_concept"]
        assert {CIRCO_ASPECTS[change] for change in triplet["changes"]} <= set(query.aspects)
        assert ("statement_with_conjunction" in query.aspects) == (len(triplet["changes"]) > 1)
        assert query.reference in benchmark.galleries["all"]  # the reference stays in the gallery
    _check_images(benchmark)


def test_circo_test_split_has_no_targets(paths: WorldPaths, manifest: dict) -> None:
    benchmark = read_circo(str(paths.circo), "test")
    assert (benchmark.split, benchmark.has_targets) == ("test", False)
    assert [q.reference for q in benchmark.queries["all"]] == [
        str(manifest["images"][t["reference"]]["circo"]) for t in manifest["triplets"]["test"]
    ]
    for query in benchmark.queries["all"]:
        assert (query.target, query.ground_truths, query.aspects) == (None, (), ())
        assert query.shared_concept
    _check_images(benchmark)


def test_circo_without_semantic_aspects(paths: WorldPaths, tmp_path: Path) -> None:
    root = Path(shutil.copytree(paths.circo, tmp_path / "circo"))
    annotations = root / "annotations" / "val.json"
    _dump(annotations, [{k: v for k, v in e.items() if k != "semantic_aspects"} for e in _load(annotations)])
    benchmark = read_circo(str(root), "val")
    assert all(query.aspects == () for query in benchmark.queries["all"])
    assert [q.target for q in benchmark.queries["all"]] == [
        q.target for q in read_circo(str(paths.circo), "val").queries["all"]
    ]


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("name", ["cirr", "fashioniq", "circo"])
def test_read_benchmark_dispatches(paths: WorldPaths, name: str) -> None:
    root = str(getattr(paths, name))
    direct = {"cirr": read_cirr, "fashioniq": read_fashioniq, "circo": read_circo}[name](root, "val")
    assert read_benchmark(name, root, "val") == direct


def test_unknown_benchmark_name(paths: WorldPaths) -> None:
    with pytest.raises(BenchmarkFormatError, match=r"'coco'.*cirr, fashioniq, circo"):
        read_benchmark("coco", str(paths.cirr), "val")


@pytest.mark.parametrize(
    ("reader", "split"),
    [(read_cirr, "dev"), (read_fashioniq, "test1"), (read_circo, "train")],
    ids=lambda value: getattr(value, "__name__", str(value)),  # the same ids in every process (pytest-xdist)
)
def test_bad_split_name(paths: WorldPaths, reader, split: str) -> None:
    with pytest.raises(BenchmarkFormatError, match=f"unknown split '{split}'"):
        reader(str(paths.root), split)


# ------------------------------------------------------------------------------------------ malformed


def test_missing_captions_file(paths: WorldPaths, tmp_path: Path) -> None:
    root = _cirr_copy(paths, tmp_path)
    captions = root / "cirr" / "captions" / "cap.rc2.val.json"
    captions.unlink()
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{captions}: file not found")):
        read_cirr(str(root), "val")


def test_invalid_json(paths: WorldPaths, tmp_path: Path) -> None:
    root = _cirr_copy(paths, tmp_path)
    captions = root / "cirr" / "captions" / "cap.rc2.val.json"
    captions.write_text('[{"pairid": 1,', encoding="utf-8")
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{captions}: invalid JSON")):
        read_cirr(str(root), "val")


def test_entry_missing_a_key(paths: WorldPaths, tmp_path: Path) -> None:
    root = _cirr_copy(paths, tmp_path)
    captions = root / "cirr" / "captions" / "cap.rc2.val.json"
    entries = _load(captions)
    del entries[3]["caption"]
    _dump(captions, entries)
    expected = f"{captions}: entry 3 has no 'caption' (expected keys pairid, reference, target_hard, caption, img_set)"
    with pytest.raises(BenchmarkFormatError, match=re.escape(expected)):
        read_cirr(str(root), "val")


def test_entry_with_a_wrong_type(paths: WorldPaths, tmp_path: Path) -> None:
    root = Path(shutil.copytree(paths.circo, tmp_path / "circo"))
    annotations = root / "annotations" / "val.json"
    entries = _load(annotations)
    entries[1]["gt_img_ids"] = [str(i) for i in entries[1]["gt_img_ids"]]
    _dump(annotations, entries)
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{annotations}: entry 1: 'gt_img_ids[0]' is str")):
        read_circo(str(root), "val")


@pytest.mark.parametrize("value", [{"not": "a list"}, [1, 2]], ids=["object", "numbers"])
def test_not_a_list_of_objects(paths: WorldPaths, tmp_path: Path, value: object) -> None:
    root = Path(shutil.copytree(paths.fashioniq, tmp_path / "fashioniq"))
    captions = root / "captions" / "cap.dress.val.json"
    _dump(captions, value)
    with pytest.raises(BenchmarkFormatError, match=re.escape(str(captions))):
        read_fashioniq(str(root), "val")


def test_unknown_image_in_a_query(paths: WorldPaths, tmp_path: Path) -> None:
    root = _cirr_copy(paths, tmp_path)
    captions = root / "cirr" / "captions" / "cap.rc2.val.json"
    entries = _load(captions)
    entries[2]["img_set"]["members"][4] = "dev-999-0-img0"
    _dump(captions, entries)
    pattern = rf"{re.escape(str(captions))}: entry 2 \(pairid {entries[2]['pairid']}\).*'dev-999-0-img0'"
    with pytest.raises(BenchmarkFormatError, match=pattern):
        read_cirr(str(root), "val")


def test_unknown_reference_in_circo(paths: WorldPaths, tmp_path: Path) -> None:
    root = Path(shutil.copytree(paths.circo, tmp_path / "circo"))
    annotations = root / "annotations" / "test.json"
    entries = _load(annotations)
    entries[0]["reference_img_id"] = 999999999
    _dump(annotations, entries)
    with pytest.raises(BenchmarkFormatError, match=r"reference image '999999999' is not in .*image_info"):
        read_circo(str(root), "test")


# ---------------------------------------------------------------------------------------------------- S3


def test_cirr_from_s3(paths: WorldPaths, s3_endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("isa-benchmarks")
    for path in sorted(paths.cirr.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"isa-benchmarks/cirr/{path.relative_to(paths.cirr).as_posix()}", path.read_bytes())
    remote, local = read_cirr("s3://isa-benchmarks/cirr", "val"), read_cirr(str(paths.cirr), "val")
    assert dataclasses.replace(remote, images={}) == dataclasses.replace(local, images={})
    assert remote.images.keys() == local.images.keys()
    assert all(uri.startswith("s3://isa-benchmarks/cirr/dev/") for uri in remote.images.values())
    assert all(fs.exists(uri) for uri in remote.images.values())
