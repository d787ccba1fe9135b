"""Readers for the official file layouts of CIRR, FashionIQ and CIRCO.

Each reader turns one split of a benchmark into a :class:`Benchmark`: the images by name with the URI of
their file, the galleries to rank and the composed queries (reference, modifier text, target and, where the
benchmark has them, ground truths, the CIRR image set and the CIRCO semantic aspects). Every path goes
through fsspec, so a root may be a local folder or an ``s3://`` prefix. A missing file or a malformed entry
raises :class:`BenchmarkFormatError` naming the file and what was expected, never a bare ``KeyError``.

Layouts read (``root`` is the argument of the reader)::

    CIRR       root/cirr/captions/cap.rc2.{split}.json         [{"pairid", "reference", "target_hard",
                                                                  "caption", "img_set": {"members"}}, ...]
               root/cirr/image_splits/split.rc2.{split}.json   {name: "./dev/<name>.png"}
               root/[img_raw/]dev/<name>.png                   the image root: root, or root/img_raw
    FashionIQ  root/captions/cap.{category}.{split}.json       [{"candidate", "target", "captions"}, ...]
               root/image_splits/split.{category}.{split}.json [asin, ...]
               root/images/<asin>.<ext>
    CIRCO      root/annotations/{split}.json                   [{"id", "reference_img_id", "target_img_id",
                                                                  "relative_caption", "shared_concept",
                                                                  "gt_img_ids", "semantic_aspects"}, ...]
               root/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   {"images": [{"id",
                                                                  "file_name"}, ...]}
               root/COCO2017_unlabeled/unlabeled2017/<file_name>

Test splits carry no targets: their queries have ``target=None`` and the benchmark ``has_targets=False``.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from isa.errors import IsaError
from isa.storage import filesystem, full_uri

CIRR_SPLITS: dict[str, str] = {"train": "train", "val": "val", "test1": "test1", "test": "test1"}  # name -> file
FASHIONIQ_SPLITS: tuple[str, ...] = ("train", "val", "test")
FASHIONIQ_CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")
FASHIONIQ_STRIP = ".?, "  # stripped from both ends of each caption (Pic2Word and SEARLE do the same)
CIRCO_SPLITS: tuple[str, ...] = ("val", "test")
TEST_SPLITS: frozenset[str] = frozenset({"test", "test1"})  # splits without targets
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CIRR_RAW_FOLDER = "img_raw"  # where the official CIRR download keeps the images
COCO_FOLDER = "COCO2017_unlabeled"
ALL = "all"  # the gallery key of CIRR and CIRCO


class BenchmarkFormatError(IsaError):
    """A dataset file is missing or malformed; the message names the path and what was expected."""


@dataclass(frozen=True)
class Query:
    """One composed query: a reference image and the text that modifies it."""

    query_id: str  # CIRR: str(pairid); CIRCO: str(id); FashionIQ: f"{category}/{index in the captions file}"
    reference: str  # reference image name (a key of Benchmark.images)
    modifiers: tuple[str, ...]  # CIRR/CIRCO: (caption,); FashionIQ: (caption1, caption2) in file order
    target: str | None  # target image name; None on test splits
    ground_truths: tuple[str, ...] = ()  # CIRCO: gt_img_ids as names; CIRR/FashionIQ: (target,) or () on test
    members: tuple[str, ...] = ()  # CIRR img_set.members (names)
    aspects: tuple[str, ...] = ()  # CIRCO semantic_aspects (val only)
    shared_concept: str | None = None  # CIRCO
    category: str | None = None  # FashionIQ


@dataclass(frozen=True)
class Benchmark:
    """One split of a benchmark: images, galleries and queries."""

    name: str  # "cirr" | "fashioniq" | "circo"
    split: str  # file split actually read ("val", "test1", ...)
    images: dict[str, str]  # image name -> full URI of the file (every gallery image and every reference)
    galleries: dict[str, tuple[str, ...]]  # gallery key -> names; CIRR, CIRCO: {"all": ...}; FashionIQ: {category: ...}
    queries: dict[str, tuple[Query, ...]]  # same keys as galleries
    has_targets: bool  # False on test splits


# ------------------------------------------------------------------------------------------- JSON entries


@dataclass(frozen=True)
class _Entry:
    """One JSON object of a dataset file, with where it came from for error messages."""

    fields: Mapping[str, Any]  # the object as parsed
    where: str  # "<uri>: entry <i>"
    expected: tuple[str, ...]  # the keys the reader requires, for the message

    def get(self, key: str, kind: type) -> Any:
        """The value of a required key, checked to be of ``kind`` (``bool`` never counts as ``int``)."""
        if key not in self.fields:
            raise BenchmarkFormatError(f"{self.where} has no {key!r} (expected keys {', '.join(self.expected)})")
        return self._checked(key, self.fields[key], kind)

    def get_list(self, key: str, kind: type, default: list | None = None) -> tuple:
        """A list of ``kind`` values; a missing key gives ``default`` when one is given."""
        if default is not None and key not in self.fields:
            return tuple(default)
        values = self.get(key, list)
        for index, value in enumerate(values):
            self._checked(f"{key}[{index}]", value, kind)
        return tuple(values)

    def nested(self, key: str, expected: tuple[str, ...]) -> _Entry:
        """A required sub-object, e.g. CIRR's ``img_set``."""
        return _Entry(self.get(key, dict), f"{self.where} {key!r}", expected)

    def _checked(self, key: str, value: Any, kind: type) -> Any:
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        raise BenchmarkFormatError(f"{self.where}: {key!r} is {type(value).__name__}, expected {kind.__name__}")


def _read_json(fs: fsspec.AbstractFileSystem, path: str, expected: str) -> Any:
    """Parses a JSON file; a missing or unparsable file raises naming the file and ``expected``."""
    uri = full_uri(fs, path)
    try:
        with fs.open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise BenchmarkFormatError(f"{uri}: file not found (expected {expected})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchmarkFormatError(f"{uri}: invalid JSON ({error}); expected {expected}") from None


def _read_entries(fs: fsspec.AbstractFileSystem, path: str, expected: tuple[str, ...]) -> list[_Entry]:
    """A JSON file holding a list of objects, each required to have the ``expected`` keys."""
    description = f"a list of objects with keys {', '.join(expected)}"
    data = _read_json(fs, path, description)
    uri = full_uri(fs, path)
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{uri}: top level is {type(data).__name__}, expected {description}")
    entries = []
    for index, fields in enumerate(data):
        if not isinstance(fields, dict):
            raise BenchmarkFormatError(f"{uri}: entry {index} is {type(fields).__name__}, expected an object")
        entries.append(_Entry(fields, f"{uri}: entry {index}", expected))
    return entries


def _known(name: str, images: Mapping[str, str], where: str, role: str, listing: str) -> str:
    """``name`` itself, once checked to be one of ``images``."""
    if name not in images:
        raise BenchmarkFormatError(f"{where}: {role} image {name!r} is not in {listing}")
    return name


def _unique_ids(queries: Sequence[Query], uri: str) -> tuple[Query, ...]:
    seen: set[str] = set()
    for query in queries:
        if query.query_id in seen:
            raise BenchmarkFormatError(f"{uri}: query id {query.query_id} appears twice (expected unique ids)")
        seen.add(query.query_id)
    return tuple(queries)


def file_split(benchmark: str, split: str) -> str:
    """The split as the benchmark's files name it (CIRR: ``test`` is ``test1``), the one name of that split in
    everything an evaluation writes; a split that is not an alias is returned as given."""
    return CIRR_SPLITS.get(split, split) if benchmark == "cirr" else split


def _split_name(benchmark: str, split: str, valid: Sequence[str]) -> str:
    if split not in valid:
        raise BenchmarkFormatError(f"{benchmark}: unknown split {split!r} (expected one of {', '.join(valid)})")
    return split


# ------------------------------------------------------------------------------------------------- CIRR


def read_cirr(root: str, split: str) -> Benchmark:
    """Reads one split of CIRR.

    Args:
        root: the CIRR dataset root (holding ``cirr/captions`` and ``cirr/image_splits``), local or a URI.
        split: ``train``, ``val``, ``test1`` or its alias ``test``.

    Returns:
        The split, with one gallery ``"all"``: every image of ``split.rc2.{split}.json``.

    Raises:
        BenchmarkFormatError: unknown split, missing file, malformed entry or a query image not in the split.
    """
    split = file_split("cirr", _split_name("cirr", split, tuple(CIRR_SPLITS)))
    fs, base = filesystem(root)
    split_path = posixpath.join(base, "cirr", "image_splits", f"split.rc2.{split}.json")
    relpaths = _cirr_image_split(fs, split_path)
    image_root = _cirr_image_root(fs, base, next(iter(relpaths.values())))
    images = {name: full_uri(fs, posixpath.normpath(posixpath.join(image_root, rel))) for name, rel in relpaths.items()}
    has_targets = split not in TEST_SPLITS
    captions_path = posixpath.join(base, "cirr", "captions", f"cap.rc2.{split}.json")
    expected = ("pairid", "reference", "target_hard", "caption", "img_set")
    entries = _read_entries(fs, captions_path, expected if has_targets else _without(expected, "target_hard"))
    listing = full_uri(fs, split_path)
    queries = _unique_ids([_cirr_query(entry, images, has_targets, listing) for entry in entries], listing)
    return Benchmark("cirr", split, images, {ALL: tuple(images)}, {ALL: queries}, has_targets)


def _without(keys: tuple[str, ...], key: str) -> tuple[str, ...]:
    return tuple(k for k in keys if k != key)


def _cirr_image_split(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, str]:
    """``split.rc2.{split}.json``: image name -> path relative to the image root."""
    expected = 'an object {name: "./dev/<name>.png"}'
    relpaths = _read_json(fs, path, expected)
    uri = full_uri(fs, path)
    if not isinstance(relpaths, dict) or not relpaths:
        raise BenchmarkFormatError(f"{uri}: expected {expected} with at least one image")
    for name, rel in relpaths.items():
        if not isinstance(rel, str):
            raise BenchmarkFormatError(f"{uri}: image {name!r} has a {type(rel).__name__} path, expected str")
    return relpaths


def _cirr_image_root(fs: fsspec.AbstractFileSystem, base: str, first: str) -> str:
    """The folder the split file's paths are relative to: the dataset root, or its ``img_raw`` folder."""
    candidates = (base, posixpath.join(base, CIRR_RAW_FOLDER))
    for candidate in candidates:
        if fs.exists(posixpath.normpath(posixpath.join(candidate, first))):
            return candidate
    tried = " nor ".join(full_uri(fs, posixpath.normpath(posixpath.join(c, first))) for c in candidates)
    raise BenchmarkFormatError(f"CIRR image {first!r} found neither at {tried} (expected the images under root)")


def _cirr_query(entry: _Entry, images: Mapping[str, str], has_targets: bool, listing: str) -> Query:
    pairid = entry.get("pairid", int)
    where = f"{entry.where} (pairid {pairid})"
    reference = _known(entry.get("reference", str), images, where, "reference", listing)
    target = _known(entry.get("target_hard", str), images, where, "target", listing) if has_targets else None
    members = entry.nested("img_set", ("members",)).get_list("members", str)
    for member in members:
        _known(member, images, where, "img_set member", listing)
    return Query(
        query_id=str(pairid),
        reference=reference,
        modifiers=(entry.get("caption", str),),
        target=target,
        ground_truths=(target,) if target is not None else (),
        members=members,
    )


# -------------------------------------------------------------------------------------------- FashionIQ


def read_fashioniq(root: str, split: str, categories: Sequence[str] = FASHIONIQ_CATEGORIES) -> Benchmark:
    """Reads one split of FashionIQ, one gallery per category.

    Args:
        root: the dataset root holding ``captions/``, ``image_splits/`` and ``images/``, local or a URI.
        split: ``train``, ``val`` or ``test``.
        categories: the categories to read, e.g. ``("dress",)``.

    Returns:
        The split; the gallery of a category is its ``split.{category}.{split}.json`` image list (the
        reference stays in it), and query ids are ``"{category}/{index in the captions file}"``.

    Raises:
        BenchmarkFormatError: unknown split, missing file, malformed entry or an image without a file.
    """
    _split_name("fashioniq", split, FASHIONIQ_SPLITS)
    fs, base = filesystem(root)
    files = _image_files(fs, posixpath.join(base, "images"))
    has_targets = split not in TEST_SPLITS
    galleries = {category: _fashioniq_gallery(fs, base, category, split, files) for category in categories}
    queries = {
        category: _fashioniq_queries(fs, base, category, split, files, galleries[category], has_targets)
        for category in categories
    }
    used = [name for gallery in galleries.values() for name in gallery]
    used += [name for group in queries.values() for query in group for name in (query.reference, query.target)]
    images = {name: files[name] for name in dict.fromkeys(used) if name is not None}
    return Benchmark("fashioniq", split, images, galleries, queries, has_targets)


def _image_files(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, str]:
    """Lists ``folder`` once: file stem -> full URI, for files with an image extension."""
    uri = full_uri(fs, folder)
    try:
        paths = sorted(fs.ls(folder, detail=False))
    except FileNotFoundError:
        raise BenchmarkFormatError(f"{uri}: folder not found (expected images/<asin>.png)") from None
    files: dict[str, str] = {}
    for path in paths:
        stem, extension = posixpath.splitext(posixpath.basename(path))
        if extension.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in files:
            raise BenchmarkFormatError(f"{uri}: two files for image {stem!r}: {files[stem]} and {full_uri(fs, path)}")
        files[stem] = full_uri(fs, path)
    return files


def _fashioniq_gallery(
    fs: fsspec.AbstractFileSystem, base: str, category: str, split: str, files: Mapping[str, str]
) -> tuple[str, ...]:
    """``split.{category}.{split}.json``: the category's image names, each required to have a file."""
    path = posixpath.join(base, "image_splits", f"split.{category}.{split}.json")
    names = _read_json(fs, path, "a list of image names")
    uri = full_uri(fs, path)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise BenchmarkFormatError(f"{uri}: expected a list of image names (str)")
    missing = [name for name in names if name not in files]
    if missing:
        raise BenchmarkFormatError(
            f"{uri}: {len(missing)} image(s) have no file in images/, e.g. {', '.join(missing[:5])}"
        )
    return tuple(names)


def _fashioniq_queries(
    fs: fsspec.AbstractFileSystem,
    base: str,
    category: str,
    split: str,
    files: Mapping[str, str],
    gallery: Sequence[str],
    has_targets: bool,
) -> tuple[Query, ...]:
    path = posixpath.join(base, "captions", f"cap.{category}.{split}.json")
    expected = ("candidate", "target", "captions") if has_targets else ("candidate", "captions")
    listing = full_uri(fs, posixpath.join(base, "images"))
    members = frozenset(gallery)
    queries = []
    for index, entry in enumerate(_read_entries(fs, path, expected)):
        query = _fashioniq_query(entry, f"{category}/{index}", category, files, has_targets, listing)
        if query.target is not None and query.target not in members:  # it could never be found: a broken split
            raise BenchmarkFormatError(
                f"{entry.where}: the target {query.target!r} of query {query.query_id} is not in the {category} "
                f"gallery (image_splits/split.{category}.{split}.json)"
            )
        queries.append(query)
    return tuple(queries)


def _fashioniq_query(
    entry: _Entry, query_id: str, category: str, files: Mapping[str, str], has_targets: bool, listing: str
) -> Query:
    reference = _known(entry.get("candidate", str), files, entry.where, "candidate", listing)
    target = _known(entry.get("target", str), files, entry.where, "target", listing) if has_targets else None
    # stripped of surrounding punctuation and spaces before they are joined, as the reference implementations do
    modifiers = tuple(caption.strip(FASHIONIQ_STRIP) for caption in entry.get_list("captions", str))
    if not modifiers or not all(modifiers):
        raise BenchmarkFormatError(f"{entry.where}: 'captions' is empty (expected [caption1, caption2])")
    return Query(
        query_id=query_id,
        reference=reference,
        modifiers=modifiers,
        target=target,
        ground_truths=(target,) if target is not None else (),
        category=category,
    )


# ------------------------------------------------------------------------------------------------ CIRCO


def read_circo(root: str, split: str) -> Benchmark:
    """Reads one split of CIRCO.

    Args:
        root: the dataset root holding ``annotations/`` and ``COCO2017_unlabeled/``, local or a URI.
        split: ``val`` or ``test``.

    Returns:
        The split, with one gallery ``"all"``: every image of the COCO 2017 unlabeled image info (the
        reference stays in it). Image names are the COCO ids as strings.

    Raises:
        BenchmarkFormatError: unknown split, missing file, malformed entry or a query image not in the image info.
    """
    _split_name("circo", split, CIRCO_SPLITS)
    fs, base = filesystem(root)
    images, info_uri = _coco_images(fs, posixpath.join(base, COCO_FOLDER))
    has_targets = split not in TEST_SPLITS
    path = posixpath.join(base, "annotations", f"{split}.json")
    expected = ("id", "reference_img_id", "relative_caption", "shared_concept")
    if has_targets:
        expected += ("target_img_id", "gt_img_ids")
    entries = _read_entries(fs, path, expected)
    queries = _unique_ids([_circo_query(entry, images, has_targets, info_uri) for entry in entries], full_uri(fs, path))
    return Benchmark("circo", split, images, {ALL: tuple(images)}, {ALL: queries}, has_targets)


def _coco_images(fs: fsspec.AbstractFileSystem, coco: str) -> tuple[dict[str, str], str]:
    """The image info: str(id) -> URI of ``unlabeled2017/<file_name>``, and the info file's URI."""
    path = posixpath.join(coco, "annotations", "image_info_unlabeled2017.json")
    uri = full_uri(fs, path)
    info = _read_json(fs, path, 'an object {"images": [{"id", "file_name"}, ...]}')
    if not isinstance(info, dict):
        raise BenchmarkFormatError(f"{uri}: top level is {type(info).__name__}, expected an object with 'images'")
    listing = _Entry(info, uri, ("images",)).get_list("images", dict)
    images: dict[str, str] = {}
    for index, fields in enumerate(listing):
        image = _Entry(fields, f"{uri}: images[{index}]", ("id", "file_name"))
        file_path = posixpath.join(coco, "unlabeled2017", image.get("file_name", str))
        images[str(image.get("id", int))] = full_uri(fs, file_path)
    if not images:
        raise BenchmarkFormatError(f"{uri}: 'images' is empty (expected the COCO 2017 unlabeled images)")
    _first_image_exists(fs, next(iter(images.values())), uri)
    return images, uri


def _first_image_exists(fs: fsspec.AbstractFileSystem, first: str, info_uri: str) -> None:
    if not fs.exists(first):
        raise BenchmarkFormatError(f"{first}: file not found (the first image listed by {info_uri})")


def _circo_query(entry: _Entry, images: Mapping[str, str], has_targets: bool, listing: str) -> Query:
    query_id = entry.get("id", int)
    where = f"{entry.where} (id {query_id})"
    target, ground_truths = None, ()
    if has_targets:
        target = _known(str(entry.get("target_img_id", int)), images, where, "target", listing)
        ids = entry.get_list("gt_img_ids", int)
        ground_truths = tuple(_known(str(i), images, where, "ground truth", listing) for i in ids)
    return Query(
        query_id=str(query_id),
        reference=_known(str(entry.get("reference_img_id", int)), images, where, "reference", listing),
        modifiers=(entry.get("relative_caption", str),),
        target=target,
        ground_truths=ground_truths,
        aspects=entry.get_list("semantic_aspects", str, default=[]) if has_targets else (),
        shared_concept=entry.get("shared_concept", str),
    )


# --------------------------------------------------------------------------------------------- dispatch

READERS: dict[str, Callable[[str, str], Benchmark]] = {
    "cirr": read_cirr,
    "fashioniq": read_fashioniq,
    "circo": read_circo,
}


def read_benchmark(name: str, root: str, split: str) -> Benchmark:
    """Reads one split of the benchmark called ``name`` (``cirr``, ``fashioniq`` or ``circo``).

    Raises:
        BenchmarkFormatError: an unknown name (the message lists the valid ones), or any reader error.
    """
    if name not in READERS:
        raise BenchmarkFormatError(f"unknown benchmark {name!r} (expected one of {', '.join(READERS)})")
    return READERS[name](root, split)
