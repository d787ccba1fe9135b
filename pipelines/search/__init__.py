"""``isa search --checkpoint CHECKPOINT --index INDEX QUERIES OUT``: many composed queries at once, with Ray Data.

queries (JSONL or CSV: an ``image`` URI and a ``text`` per row) -> an actor pool, each actor holding the query
encoder (student + the teacher's text tower, a GPU each when the cluster has them) and the gallery index ->
the top-k gallery images per query -> Parquet or JSONL files in OUT, then ``_isa_search.json`` (written last:
a folder without it is not a finished search). Every input column is kept; ``results`` holds the hits best
first, ``error`` says why a query has none (an unreadable image), so one bad row never stops the run.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.csv
import ray
import ray.data

from isa.cache import fingerprint_mismatch
from isa.config import TeacherConfig
from isa.errors import IsaError
from isa.storage import absolute_uri, filesystem
from pipelines.artifact import FILES_KEY, ArtifactError, check_output, read_artifact, seal_artifact
from pipelines.stage import HelpFormatter, init_ray
from pipelines.teacher import checkpoint_teacher

MANIFEST_FILE = "_isa_search.json"
KIND = "search result"  # what pipelines.artifact's messages call the output folder
FORMATS = ("parquet", "jsonl")
QUERY_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
HIT = pa.struct([("id", pa.string()), ("uri", pa.string()), ("score", pa.float32())])
BATCH = 32  # queries per actor call: one student batch and one text-tower batch


class SearchError(IsaError):
    """The batch search cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Plan:
    """What :func:`check` resolved: the run needs nothing else."""

    queries: str  # the query file's URI
    query_format: str  # jsonl | csv
    checkpoint: str  # the checkpoint folder's URI
    teacher: TeacherConfig  # the teacher the checkpoint was trained against
    index: str
    output: str
    output_format: str  # parquet | jsonl
    k: int
    actors: int
    batch_size: int


def parser() -> argparse.ArgumentParser:
    """``isa search``'s arguments."""
    parser = argparse.ArgumentParser(
        prog="isa search",
        description="Many composed queries at once: the top-k gallery images of each, through Ray Data.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("queries", help="JSONL or CSV with an 'image' URI and a 'text' per query (any fsspec URI)")
    parser.add_argument("output", help="folder for the results (any fsspec URI)")
    parser.add_argument("--checkpoint", required=True, help="student checkpoint or training run folder")
    parser.add_argument("--index", required=True, help="gallery index made by isa index")
    parser.add_argument("--k", type=int, default=50, help="gallery images per query")
    parser.add_argument("--format", choices=FORMATS, default="parquet", help="result files")
    parser.add_argument("--actors", type=int, default=1, help="query encoders at once (one GPU each when present)")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="queries per encoder call")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier isa search")
    return parser


def _query_columns(uri: str, query_format: str) -> list[str]:
    """The columns of a query file, from its header or first line."""
    with fsspec.open(uri, "rb") as handle:
        first = handle.readline()
    if not first.strip():
        raise SearchError(f"query file {uri} holds no queries")
    if query_format == "csv":
        return list(pyarrow.csv.read_csv(pa.py_buffer(first)).schema.names)
    try:
        row = json.loads(first)
    except ValueError as error:
        raise SearchError(f"query file {uri}: its first line is not a JSON object ({error})") from None
    if not isinstance(row, dict):
        raise SearchError(f'query file {uri}: each line must be a JSON object such as {{"image": ..., "text": ...}}')
    return list(row)


def check(args: argparse.Namespace) -> Plan:
    """Every refusal before Ray starts: the query file, the checkpoint, the index, their teachers, the output.

    Raises:
        SearchError, CheckpointError, ArtifactError: naming the problem.
    """
    suffix = posixpath.splitext(args.queries)[1].lower()
    if suffix not in QUERY_FORMATS:
        raise SearchError(f"query file {args.queries}: expected .jsonl, .json (one object per line) or .csv")
    fs, path = filesystem(args.queries)
    if not fs.isfile(path):
        raise SearchError(f"query file {args.queries} not found")
    columns = _query_columns(args.queries, QUERY_FORMATS[suffix])
    if "image" not in columns:
        raise SearchError(f"query file {args.queries} has no 'image' column (found {', '.join(columns) or 'none'})")
    if args.k < 1 or args.actors < 1 or args.batch_size < 1:
        raise SearchError("--k, --actors and --batch-size must be at least 1")
    teacher, fingerprint, checkpoint = checkpoint_teacher(args.checkpoint)
    index = read_artifact(args.index, "_isa_index.json", "gallery index")
    mismatch = fingerprint_mismatch(index["teacher"], fingerprint)
    if mismatch:
        raise SearchError(f"the checkpoint and the index were made by different teachers: {mismatch}")
    _check_output(args.output, args.overwrite)
    return Plan(  # local paths absolute: the actors run in another folder on a cluster
        queries=absolute_uri(args.queries),
        query_format=QUERY_FORMATS[suffix],
        checkpoint=absolute_uri(checkpoint),
        teacher=teacher,
        index=absolute_uri(args.index),
        output=absolute_uri(args.output),
        output_format=args.format,
        k=args.k,
        actors=args.actors,
        batch_size=args.batch_size,
    )


def _check_output(output: str, overwrite: bool) -> None:
    """The output folder rule (:func:`pipelines.artifact.check_output`): an earlier search's own files are those
    its manifest records; ``overwrite`` replaces them."""
    try:
        recorded = read_artifact(output, MANIFEST_FILE, KIND)[FILES_KEY]
    except ArtifactError:  # no complete earlier search: every entry is another's
        recorded = {}
    own = {name.split("/")[0] for name in recorded}
    check_output(output, MANIFEST_FILE, KIND, own.__contains__, overwrite)


class Searcher:
    """One actor: the query encoder and the gallery index, loaded once; a batch of queries in, hits out."""

    def __init__(self, checkpoint: str, teacher: TeacherConfig, index: str, k: int):
        import torch

        from isa.build import build_teacher
        from isa.checkpoint import find_checkpoint
        from isa.query import QueryEncoder
        from pipelines.eval import local_copy
        from pipelines.index.store import GalleryIndex

        device = "cuda" if torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory(prefix="isa-search-") as copies:  # a remote checkpoint's copy, once read
            local = str(find_checkpoint(local_copy(checkpoint, copies)))
            self.encoder = QueryEncoder.from_checkpoint(local, build_teacher(teacher, device), device)
        self.index = GalleryIndex.load(index)
        self.k = k

    def __call__(self, batch: pa.Table) -> pa.Table:
        from isa.images import ImageRejected
        from isa.query import student_views

        texts = batch["text"].to_pylist() if "text" in batch.column_names else [None] * batch.num_rows
        texts = [None if text is None else str(text) for text in texts]  # a CSV column of numbers reads as numbers
        views, rows, errors = [], [], [None] * batch.num_rows
        for row, uri in enumerate(batch["image"].to_pylist()):
            try:
                with fsspec.open(uri, "rb") as handle:
                    views.append(student_views([handle.read()], self.encoder.config)[0])
                rows.append(row)
            except (OSError, ValueError, ImageRejected) as error:  # unreadable or not an image: this row only
                errors[row] = f"{type(error).__name__}: {error}"
        results: list[list[dict]] = [[] for _ in range(batch.num_rows)]
        if rows:
            import numpy as np
            import torch

            sentence = self.encoder.sentences(np.stack(views)).sentence  # (B, M, w)
            texts_of = [(texts[row] or "").strip() for row in rows]
            queries = torch.empty(len(rows), self.encoder.teacher.embed_dim)  # (B, D)
            composed = [i for i, text in enumerate(texts_of) if text]
            alone = [i for i, text in enumerate(texts_of) if not text]
            if composed:
                queries[composed] = self.encoder.compose(sentence[composed], [(texts_of[i],) for i in composed]).cpu()
            if alone:
                queries[alone] = self.encoder.image_only(sentence[alone]).float().cpu()
            for row, hits in zip(rows, self.index.search(queries.float().numpy(), self.k)):
                results[row] = [{"id": h.id, "uri": h.uri, "score": float(h.score)} for h in hits]
        return batch.append_column("results", pa.array(results, pa.list_(HIT))).append_column(
            "error", pa.array(errors, pa.string())
        )


def actor_options() -> dict:
    """One GPU per actor when the cluster has GPUs, else one CPU."""
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) > 0 else {"num_cpus": 1}


def run(plan: Plan) -> dict:
    """Search every query; returns the manifest written to ``OUT/_isa_search.json``."""
    started = time.monotonic()
    fs, root = filesystem(plan.output)
    if fs.exists(root):
        fs.rm(root, recursive=True)  # check() allowed only an earlier isa search here
    queries = (
        ray.data.read_json(plan.queries, lines=True, file_extensions=None)
        if plan.query_format == "jsonl"
        else ray.data.read_csv(plan.queries, file_extensions=None)
    )
    results = queries.map_batches(
        Searcher,
        fn_constructor_kwargs={
            "checkpoint": plan.checkpoint,
            "teacher": plan.teacher,
            "index": plan.index,
            "k": plan.k,
        },
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        concurrency=plan.actors,
        **actor_options(),
    )
    fs.makedirs(root, exist_ok=True)
    if plan.output_format == "parquet":
        results.write_parquet(plan.output)
        written = ray.data.read_parquet(plan.output)
    else:
        results.write_json(plan.output)
        written = ray.data.read_json(plan.output, lines=True)
    errors = [row["error"] for row in written.select_columns(["error"]).iter_rows()]
    manifest = {
        "format": "isa-search",
        "format_version": 1,
        "queries": plan.queries,
        "checkpoint": plan.checkpoint,
        "index": plan.index,
        "k": plan.k,
        "output_format": plan.output_format,
        "seconds": round(time.monotonic() - started, 1),
        "searched": len(errors),
        "failed": sum(error is not None for error in errors),
    }
    return seal_artifact(plan.output, MANIFEST_FILE, manifest)


def main(argv: Sequence[str] | None = None) -> int:
    plan = check(parser().parse_args(argv))
    init_ray()
    manifest = run(plan)
    print(
        f"isa search: {manifest['searched']} queries, {manifest['failed']} without results (see their 'error'), "
        f"in {manifest['seconds']} s: {plan.output}"
    )
    return 0
