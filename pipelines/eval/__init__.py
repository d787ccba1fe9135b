"""``isa eval``: FashionIQ, CIRR and CIRCO with the official protocols, image-only retrieval, baselines.

read the benchmark (official layout, any fsspec root) -> embed its images with ``isa embed`` (a gallery-only
cache, reused) -> encode queries per method (Ray tasks, GPU when present) -> rank -> official metrics,
test-server files, ``metrics.json``, ``table.md``, ``report.html``, the query-side cost table, MLflow.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import ray
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem

from isa.cache import MANIFEST_FILE, Manifest, own_entry, read_manifest
from isa.checkpoint import STATE_FILE, CheckpointError, find_checkpoint, is_checkpoint
from isa.checkpoint_files import latest_checkpoint, saved_checkpoint
from isa.config import Config, from_dict, given_keys, load_config
from isa.data.benchmarks import Benchmark, read_benchmark
from isa.storage import absolute_uri, filesystem, redact_uri
from isa.teacher import Teacher
from pipelines import tracking
from pipelines.artifact import check_folder
from pipelines.eval import outputs as out
from pipelines.eval import report
from pipelines.eval.cost import query_costs
from pipelines.eval.gallery import EvalError, embed_benchmark, gallery_uri, load_distractors, load_embeddings
from pipelines.eval.images import image_only_document
from pipelines.eval.outputs import IMAGE_ONLY, IMAGE_TEXT, TEXT_ONLY
from pipelines.eval.queries import Encoded, encode_student, encode_text_baseline, task_options, unique_references
from pipelines.eval.scoring import Ranked, metrics, rank_gallery, rank_members, submissions
from pipelines.stage import config_parser, init_ray
from pipelines.teacher import TEACHER_CHOICE, check_fingerprint, choose_teacher, load_teacher_here

CHECKPOINT_COPIES = "checkpoints"  # under eval.output: local copies of remote checkpoints


def scratch_folder(prefix: str) -> str:
    """A temporary folder of this process (local copies of remote checkpoints), removed when the process exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def local_copy(uri: str, output: str) -> str:
    """A local checkpoint for ``uri``: itself when local, else the latest remote checkpoint copied below OUTPUT.

    A copy is made under a hidden staging name, checked complete (every file the size its ``state.json`` records)
    and renamed into place whole; a copy in place that is not complete (cut short by a kill) is made again, never
    reused.

    Raises:
        CheckpointError: no checkpoint under a remote ``uri``, or its copy came out incomplete.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return uri
    folder = latest_checkpoint(fs, path)
    if folder is None:
        raise CheckpointError(f"no complete checkpoint at {uri}: expected checkpoint_*/isa/{STATE_FILE} below it")
    base = Path(output if "://" not in output else scratch_folder("isa-eval-"))
    target = base / CHECKPOINT_COPIES / out.slug(fs.unstrip_protocol(folder))
    if not is_checkpoint(target):
        _copy_whole(fs, folder, target)
    return str(target)


def _copy_whole(fs: fsspec.AbstractFileSystem, folder: str, target: Path) -> None:
    """Copy the checkpoint ``folder`` of ``fs`` to the local ``target``: staged, checked, renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        fs.get(folder + "/", str(staging) + "/", recursive=True)
        if not is_checkpoint(staging):
            raise CheckpointError(
                f"the copy of {fs.unstrip_protocol(folder)} is incomplete (a file missing or of another size than "
                "its state.json records): run again"
            )
        if target.exists():  # a copy cut short
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not is_checkpoint(target):  # another process's complete copy may have taken the name first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def parser() -> argparse.ArgumentParser:
    """``isa eval``'s arguments."""
    parser = config_parser("isa eval", "Evaluate student checkpoints and baselines with the official protocols.")
    benchmarks = ["cirr", "fashioniq", "circo", "images"]
    parser.add_argument("--benchmark", choices=benchmarks, help="the benchmark to evaluate on (eval.benchmark)")
    parser.add_argument("--dataset-root", help="official layout; 'images': a cache (eval.dataset_root)")
    parser.add_argument("--split", help="CIRR: train, val, test1 or test; others: val, test (eval.split)")
    parser.add_argument("--checkpoint", action="append", help="checkpoint or run, repeatable (eval.checkpoints)")
    parser.add_argument("--gallery-cache", help="gallery cache to create or reuse (eval.gallery_cache)")
    parser.add_argument("--output", help="folder for metrics, report, test-server files (eval.output)")
    parser.add_argument("--distractors", help="cache of distractor images for gallery scaling (eval.distractors)")
    parser.add_argument("--distractor-counts", help="e.g. 1000,10000 (eval.distractor_counts)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the teacher-only baseline rows")
    parser.add_argument(
        "--teacher",
        help="open_clip model name (teacher.name) "
        "(default: the teacher of the checkpoints or caches read, else ViT-L-14)",
    )
    parser.add_argument(
        "--pretrained",
        help="open_clip pretrained tag, weights file, or none (teacher.pretrained) "
        "(default: the teacher of the checkpoints or caches read, else openai)",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> Config:
    args = parser().parse_intermixed_args(argv)
    flags = {
        "eval.benchmark": args.benchmark,
        "eval.dataset_root": args.dataset_root,
        "eval.split": args.split,
        "eval.checkpoints": ",".join(args.checkpoint) if args.checkpoint else None,
        "eval.gallery_cache": args.gallery_cache,
        "eval.output": args.output,
        "eval.distractors": args.distractors,
        "eval.distractor_counts": args.distractor_counts,
        "eval.baselines": "false" if args.no_baselines else None,
        "teacher.name": args.teacher,
        "teacher.pretrained": args.pretrained,
    }
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    config = local_paths_absolute(load_config(args.config, overrides))
    if TEACHER_CHOICE <= given_keys(args.config, overrides):
        return config  # the teacher given, checked in check()
    return choose_teacher(config, given_keys(args.config, overrides), teacher_sources(config))


def local_paths_absolute(config: Config) -> Config:
    """The evaluation's paths as its Ray tasks read them wherever they run (:func:`isa.storage.absolute_uri`)."""
    ev = config.eval
    paths = {key: absolute_uri(getattr(ev, key)) for key in ("dataset_root", "output")}
    paths |= {key: absolute_uri(getattr(ev, key)) for key in ("gallery_cache", "distractors") if getattr(ev, key)}
    paths["checkpoints"] = [absolute_uri(uri) for uri in ev.checkpoints]
    return from_dict({"eval": paths}, base=config)


def teacher_sources(config: Config) -> list[tuple[str, dict[str, Any]]]:
    """What the evaluation reads that a teacher made, each with that teacher's fingerprint, read without loading a
    model: the checkpoints (the teacher they were trained against) and, where they exist, the gallery cache (for
    ``images``, the cache of the held-out images) and the distractor cache.

    Raises:
        CheckpointError: a checkpoint that is missing or unreadable.
    """
    ev = config.eval
    sources = []
    for path in ev.checkpoints:
        folder, saved = saved_checkpoint(path)
        sources.append((f"checkpoint {folder}", saved["teacher"]))
    gallery = (ev.dataset_root or config.train.cache) if ev.benchmark == "images" else gallery_uri(config)
    for what, uri in (("gallery cache", gallery), ("distractor cache", ev.distractors)):
        manifest = read_manifest(*filesystem(uri)) if uri else None
        if manifest is not None:
            sources.append((f"{what} {uri}", manifest.teacher))
    return sources


def check_teacher(config: Config) -> None:
    """The checkpoints and caches the evaluation reads come from one teacher, the configured one by name (by
    fingerprint once it is loaded, in :func:`run`).

    Raises:
        CheckpointError: a checkpoint that is missing or unreadable.
        TeacherMismatchError: two of them, or one and the configured teacher, name different teachers (both named).
    """
    choose_teacher(config, TEACHER_CHOICE, teacher_sources(config))


def encode_methods(benchmark: Benchmark, config: Config, checkpoints: list[str], reference_emb) -> list[Encoded]:
    """Every method's queries (all galleries' queries, in gallery order), encoded in parallel Ray tasks."""
    queries = [q for key in benchmark.galleries for q in benchmark.queries[key]]
    modifiers = [q.modifiers for q in queries]
    refs, index = unique_references([q.reference for q in queries])
    uris = [benchmark.images[name] for name in refs]
    batch, reported = config.eval.batch_size, config.eval.report_queries
    options = task_options()
    shown = max(index[:reported], default=-1) + 1  # references whose attention maps the report shows
    pending = [
        encode_student.options(**options).remote(path, config.teacher, uris, index, modifiers, batch, shown)
        for path in checkpoints
    ]
    text = (
        encode_text_baseline.options(**options).remote(config.teacher, modifiers, batch)
        if config.eval.baselines
        else None
    )
    methods = []
    for encoded in ray.get(pending):
        if encoded.attention is not None:  # keep the maps of the report's queries only, in query order
            encoded.attention = encoded.attention[index[:reported]]
        methods.append(encoded)
    if text is not None:
        text_emb = torch.tensor(ray.get(text))  # a copy: arrays from the object store are read-only
        image_emb = reference_emb([q.reference for q in queries]).float()
        methods.append(Encoded(TEXT_ONLY, text_emb.numpy()))
        methods.append(Encoded(IMAGE_ONLY, image_emb.numpy()))
        methods.append(Encoded(IMAGE_TEXT, F.normalize(image_emb + text_emb, dim=-1).numpy()))
    return _unique_names(methods)


def _unique_names(methods: list[Encoded]) -> list[Encoded]:
    seen: dict[str, int] = {}
    for method in methods:
        seen[method.name] = seen.get(method.name, 0) + 1
        if seen[method.name] > 1:
            method.name = f"{method.name} #{seen[method.name]}"
    return methods


def rank_method(benchmark: Benchmark, emb, method: Encoded, extra: torch.Tensor | None = None) -> dict[str, Ranked]:
    """Rankings of one method over every gallery of the benchmark, with ``extra`` distractor rows appended."""
    ranked, start = {}, 0
    for key, names in benchmark.galleries.items():
        queries = benchmark.queries[key]
        query_emb = torch.tensor(method.queries[start : start + len(queries)])
        start += len(queries)
        gallery = emb.rows(names)
        if extra is not None:
            gallery = torch.cat([gallery, extra.to(gallery.dtype)])
        cirr = benchmark.name == "cirr"
        top = rank_gallery(queries, query_emb, names, gallery, remove_reference=cirr)
        subset = rank_members(queries, query_emb, emb.rows) if cirr else None
        ranked[key] = Ranked(queries, top, subset)
    return ranked


OUTPUT_KIND = "isa eval output"  # what pipelines.artifact's messages call eval.output


def output_entry(name: str) -> bool:
    """Whether a name at the top of ``eval.output`` is one ``isa eval`` writes there (its outputs, gallery caches,
    image lists, checkpoint copies, MLflow store, MLflow records not sent)."""
    fixed = (out.METRICS_FILE, out.TABLE_FILE, out.REPORT_FILE, out.SUBMISSIONS_DIR, CHECKPOINT_COPIES)
    return (
        name in (*fixed, tracking.STORE_FILE, tracking.ARTIFACTS_FOLDER, tracking.UNSENT_FOLDER)
        or name.startswith("gallery-")
        or (name.startswith("images-") and name.endswith(".txt"))
    )


def check(config: Config) -> None:
    """Every refusal that needs no model and no cluster, made before Ray starts: the settings, the benchmark's
    files, the checkpoints, the caches and the output folder.

    Raises:
        EvalError: a missing setting, or a cache that is not one with what the benchmark needs.
        BenchmarkFormatError: the benchmark's files are missing or malformed.
        CheckpointError: a checkpoint that is not one.
        ArtifactError, CacheError: an output folder or gallery cache holding other things.
        TeacherMismatchError: the checkpoints and caches, or they and the configured teacher, name other teachers.
        TrackingAccessError: the MLflow server turns the credentials away.
    """
    ev = config.eval
    if ev.benchmark == "images":
        cache = ev.dataset_root or config.train.cache
        manifest = _cache_manifest(cache) if cache else None
        if manifest is None or manifest.image_size is None:
            raise EvalError(f"image-only retrieval needs a cache with images at {cache or 'eval.dataset_root'}")
        if not ev.checkpoints:
            raise EvalError("image-only retrieval needs at least one checkpoint (eval.checkpoints, --checkpoint)")
    elif not ev.dataset_root:
        raise EvalError("set eval.dataset_root (--dataset-root) to the benchmark's folder")
    else:
        fs, root = filesystem(ev.dataset_root)
        if not fs.isdir(root):
            raise EvalError(f"eval.dataset_root {ev.dataset_root} is not a folder: name the benchmark's dataset root")
        read_benchmark(ev.benchmark, ev.dataset_root, ev.split)
    for uri in ev.checkpoints:
        saved_checkpoint(uri)
    if ev.distractors and _cache_manifest(ev.distractors) is None:
        raise EvalError(f"eval.distractors {ev.distractors} is not a cache made by isa embed (no {MANIFEST_FILE})")
    check_folder(ev.output, OUTPUT_KIND, output_entry)
    if ev.benchmark != "images":
        check_folder(gallery_uri(config), "teacher cache", own_entry, marker=MANIFEST_FILE)
    check_teacher(config)
    tracking.check_access(tracking.eval_tracking(ev.tracking_uri, ev.checkpoints, ev.output).uri)


def _cache_manifest(uri: str) -> Manifest | None:
    fs, root = filesystem(uri)
    return read_manifest(fs, root)


def run(config: Config) -> dict:
    """Evaluate; returns the metrics document (also written to ``OUTPUT/metrics.json``), with the MLflow run and
    store it was recorded into (``mlflow_run_id``, ``mlflow_tracking_uri``; None when not tracked)."""
    check(config)
    teacher = load_teacher_here(config.teacher)
    check_fingerprint(teacher.fingerprint(), teacher_sources(config))  # same names, other weights: before embedding
    # each checkpoint's folder as a URI: the Ray tasks copy a remote one where they run (a copy on this machine
    # would be out of reach of the other nodes); the query-side cost is measured here, on a copy below eval.output
    checkpoints = [saved_checkpoint(path)[0] for path in config.eval.checkpoints]
    with out.mlflow_run(config) as record:  # from here on a failure ends the run FAILED (Ctrl-C: KILLED)
        if config.eval.benchmark == "images":
            document, samples, images = image_only_document(config, teacher, checkpoints), [], {}
        else:
            document, samples, images = cir_document(config, teacher, checkpoints)
        if config.eval.latency_runs:
            local = [str(find_checkpoint(local_copy(path, config.eval.output))) for path in checkpoints]
            costs = query_costs(teacher, local, config.eval.latency_runs, config.eval.latency_threads)
            document["cost"] = [dataclasses.asdict(c) for c in costs]
        table = out.document_table(document)
        title = f"isa eval · {config.eval.benchmark} {out.split_name(config)}"
        files = {
            out.METRICS_FILE: json.dumps(document, indent=2),
            out.TABLE_FILE: table,
            out.REPORT_FILE: report.render(title, table, samples, images),
        }
        for name, text in files.items():
            out.write_text(posixpath.join(config.eval.output, name), text)
        out.log_mlflow(config, record, document, files)
    document["mlflow_run_id"] = record.run_id if record else None
    document["mlflow_tracking_uri"] = record.uri if record else None
    return document


def cir_document(config: Config, teacher: Teacher, checkpoints: list[str]) -> tuple[dict, list, dict]:
    """Metrics, submission files and report samples of a composed-retrieval benchmark."""
    ev = config.eval
    benchmark = read_benchmark(ev.benchmark, ev.dataset_root, ev.split)
    cache = gallery_uri(config)
    summary = embed_benchmark(benchmark, config, cache)
    print(f"isa eval: gallery cache {cache}: {summary.line()}", flush=True)
    emb = load_embeddings(benchmark, cache)
    methods = encode_methods(benchmark, config, checkpoints, emb.rows)
    rankings = {m.name: rank_method(benchmark, emb, m) for m in methods}
    document = {
        "benchmark": benchmark.name,
        "split": benchmark.split,
        "gallery_cache": cache,
        "gallery_size": sum(len(names) for names in benchmark.galleries.values()),
        "queries": sum(len(q) for q in benchmark.queries.values()),
        "rows": {name: metrics(benchmark, r) for name, r in rankings.items()} if benchmark.has_targets else {},
    }
    if benchmark.has_targets and ev.distractor_counts:
        document["scaling"] = scaling(benchmark, config, emb, methods, teacher)
    if not benchmark.has_targets:
        files = {name: submissions(benchmark, r) for name, r in rankings.items()}
        document["submissions"] = out.write_submissions(ev.output, files)
    return document, report_samples(benchmark, methods, rankings, ev.report_queries), benchmark.images


def scaling(benchmark: Benchmark, config: Config, emb, methods: list[Encoded], teacher: Teacher) -> dict:
    """The same metrics with N distractor images added to every gallery (docs/method.md §5, gallery scaling)."""
    largest = load_distractors(
        config.eval.distractors, teacher.fingerprint(), emb.ids, max(config.eval.distractor_counts)
    )
    return {
        str(count): {m.name: metrics(benchmark, rank_method(benchmark, emb, m, largest[:count])) for m in methods}
        for count in config.eval.distractor_counts
    }


def report_samples(benchmark: Benchmark, methods: list[Encoded], rankings: dict, count: int) -> list:
    """The first ``count`` queries (over the galleries in order) with each method's top 5."""
    samples, position = [], 0
    for key in benchmark.galleries:
        for row, query in enumerate(benchmark.queries[key]):
            if position >= count:
                return samples
            results = {m.name: rankings[m.name][key].top[row][:5] for m in methods}
            attention = {m.name: m.attention[position] for m in methods if m.attention is not None}
            samples.append(report.Sample(query, results, attention))
            position += 1
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    check(config)
    init_ray()
    document = run(config)
    print(out.document_table(document))
    print(f"metrics: {posixpath.join(config.eval.output, out.METRICS_FILE)}")
    print(f"report:  {posixpath.join(config.eval.output, out.REPORT_FILE)}")
    for row, files in document.get("submissions", {}).items():
        print(f"test-server files ({row}): {', '.join(files)}")
    if document["mlflow_run_id"]:
        uri = document["mlflow_tracking_uri"]
        shown = redact_uri(uri)
        print(f"MLflow: run {document['mlflow_run_id']} in {shown}; see it with: {tracking.ui_command(uri)}")
    elif document["mlflow_tracking_uri"]:  # MLflow never answered: the outbox said where the records are kept
        shown = redact_uri(document["mlflow_tracking_uri"])
        print(f"MLflow: not recorded in {shown}: its records are kept in {config.eval.output}")
    else:
        print("MLflow: not recorded (a remote eval.output): set eval.tracking_uri or MLFLOW_TRACKING_URI to record")
    return 0
