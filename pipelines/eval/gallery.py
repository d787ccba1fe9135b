"""Galleries for ``isa eval``: embedded through ``isa embed`` (a gallery-only cache, reused) and read back.

The benchmark's images (gallery and references) are listed in a text file and embedded by the embed stage
itself, so a rerun reuses the cache and a different teacher is refused by the cache's fingerprint check.
Rows are matched to image names through their URIs (a duplicate file maps to the id of its first copy).
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from isa.cache import DUPLICATES_DIR, ERRORS_DIR, fingerprint_mismatch, list_parts, read_manifest
from isa.config import Config
from isa.data.benchmarks import Benchmark
from isa.errors import IsaError
from isa.storage import filesystem, read_column_values
from pipelines import embed
from pipelines.eval.outputs import split_name


class EvalError(IsaError):
    """The evaluation cannot run as asked; the message says why."""


@dataclass
class Embeddings:
    """Teacher image embeddings of named images."""

    index: dict[str, int]  # image name -> row
    matrix: torch.Tensor  # (N, D) as cached (float16 or float32), L2-normalized
    ids: set[str]  # content ids of the benchmark's images

    def rows(self, names: list[str] | tuple[str, ...]) -> torch.Tensor:
        return self.matrix[torch.as_tensor([self.index[n] for n in names], dtype=torch.long)]


def gallery_uri(config: Config) -> str:
    """``eval.gallery_cache``, else ``OUTPUT/gallery-BENCHMARK-SPLIT`` (the split as the files name it)."""
    ev = config.eval
    return ev.gallery_cache or posixpath.join(ev.output, f"gallery-{ev.benchmark}-{split_name(config)}")


def embed_benchmark(benchmark: Benchmark, config: Config, cache: str) -> embed.Summary:
    """Embed every image of the benchmark into the gallery-only cache at ``cache`` (new images only)."""
    fs, root = filesystem(config.eval.output)
    fs.makedirs(root, exist_ok=True)
    listing = posixpath.join(root, f"images-{benchmark.name}-{benchmark.split}.txt")
    with fs.open(listing, "w") as handle:
        handle.write("".join(f"{uri}\n" for uri in sorted(set(benchmark.images.values()))))
    gallery_only = dataclasses.replace(config.cache, store_images=False, local_grid=0)
    return embed.run(fs.unstrip_protocol(listing), cache, dataclasses.replace(config, cache=gallery_only))


def _uri_ids(cache: str, cached: pa.Table) -> tuple[dict[str, str], dict[str, str]]:
    """URI -> content id for cached and duplicate rows; URI -> reason for rejected ones."""
    fs, root = filesystem(cache)
    dups = read_column_values(fs, list_parts(fs, posixpath.join(root, DUPLICATES_DIR)), ["uri", "id"])
    errors = read_column_values(fs, list_parts(fs, posixpath.join(root, ERRORS_DIR)), ["uri", "reason"])
    ids = dict(zip(cached["uri"].to_pylist(), cached["id"].to_pylist()))
    ids.update(zip(dups["uri"].to_pylist(), dups["id"].to_pylist()))
    return ids, dict(zip(errors["uri"].to_pylist(), errors["reason"].to_pylist()))


def _matrix(column: pa.ChunkedArray) -> torch.Tensor:
    """A fixed_size_list column as (N, D)."""
    flat = column.combine_chunks()
    width = flat.type.list_size
    return torch.from_numpy(np.asarray(flat.flatten().to_numpy(zero_copy_only=False)).reshape(-1, width).copy())


def load_embeddings(benchmark: Benchmark, cache: str) -> Embeddings:
    """Every benchmark image's cached teacher embedding, by name.

    Raises:
        EvalError: an image was rejected by the embed stage (named, with the reason) or is missing.
    """
    fs, root = filesystem(cache)
    table = read_column_values(fs, list_parts(fs, root), ["id", "uri", "teacher_emb"])  # one read of the cache
    uri_id, rejected = _uri_ids(cache, table)
    bad = [f"{n} ({rejected[u]})" for n, u in benchmark.images.items() if u in rejected]
    missing = [n for n, u in benchmark.images.items() if u not in uri_id and u not in rejected]
    if bad or missing:
        detail = "; ".join(bad[:5] + [f"{n} (not in the cache)" for n in missing[:5]])
        raise EvalError(
            f"{len(bad) + len(missing)} {benchmark.name} images have no embedding in {cache}, e.g. {detail}: the "
            "official protocol needs every gallery image"
        )
    row_of = {image_id: row for row, image_id in enumerate(table["id"].to_pylist())}
    matrix = _matrix(table["teacher_emb"])
    index = {name: row_of[uri_id[uri]] for name, uri in benchmark.images.items()}
    return Embeddings(index=index, matrix=matrix, ids={uri_id[uri] for uri in benchmark.images.values()})


def load_distractors(cache: str, fingerprint: dict, exclude: set[str], count: int) -> torch.Tensor:
    """The first ``count`` distractor embeddings by id, none equal to a benchmark image: (count, D).

    Raises:
        EvalError: no cache, another teacher, or fewer usable rows than ``count``.
    """
    fs, root = filesystem(cache)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise EvalError(f"distractor cache {cache} has no _isa_cache.json: run 'isa embed' into it first")
    mismatch = fingerprint_mismatch(fingerprint, manifest.teacher)
    if mismatch:
        raise EvalError(f"distractor cache {cache} was embedded by another teacher: {mismatch}")
    table = read_column_values(fs, list_parts(fs, root), ["id", "teacher_emb"])
    ids = table["id"].to_pylist()
    # an image that is also in the benchmark would be a second copy of a ground truth or reference
    usable = sorted((image_id, row) for row, image_id in enumerate(ids) if image_id not in exclude)
    if len(usable) < count:
        raise EvalError(f"distractor cache {cache} has {len(usable)} images not in the benchmark, fewer than {count}")
    rows = torch.as_tensor([row for _, row in usable[:count]], dtype=torch.long)
    return _matrix(table["teacher_emb"])[rows]
