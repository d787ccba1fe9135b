"""``isa embed INPUT OUTPUT``: cache the teacher's image embeddings with Ray Data.

read (folder | s3 prefix | list file | tar shards | parquet) -> decode and validate (CPU tasks) -> teacher
image tower (actor pool, one GPU each when present; or the driver itself on one CPU machine) -> Parquet shards +
``_isa_cache.json``. A local folder or list file into a local cache on a machine with no cluster to join runs the
same steps without Ray (``cache.runner``, :mod:`pipelines.embed.local`).
Resumable and idempotent: a rerun skips what the cache holds; bad inputs go to ``_errors/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from isa.cache import (
    DUPLICATES_DIR,
    ERRORS_DIR,
    MANIFEST_FILE,
    Manifest,
    check_same_settings,
    list_parts,
    own_entry,
    read_manifest,
    write_manifest,
)
from isa.config import CacheConfig, Config, ConfigError, given_keys, load_config
from isa.errors import IsaError
from isa.storage import absolute_uri, count_rows, filesystem, remove_staging
from pipelines.artifact import check_folder
from pipelines.console import progress_wanted
from pipelines.embed import ledger as ledgers
from pipelines.embed.decode import admit_batch, count_new, decode_batch, rebatched, write_shard
from pipelines.embed.guard import TIMEOUT_SETTING, given_up_message
from pipelines.embed.ledger import Ledger, LocalLedger
from pipelines.embed.local import Decoders, Progress, local_batches, local_input, on_this_disk
from pipelines.embed.prefetch import Prefetched
from pipelines.embed.sources import check_input, read_sources, source_options
from pipelines.embed.tower import TeacherEmbedder
from pipelines.lease import Fence, Lease
from pipelines.stage import config_parser, data_context, init_ray, ray_joined
from pipelines.teacher import choose_teacher, load_teacher_here, teacher_fingerprint

if TYPE_CHECKING:
    import ray.data

    from isa.teacher import Teacher

# Shard writers at a time. Ray Data hands the CPU budget no operator claims to the most downstream operator
# without a cap; uncapped, that is the writer, which hardly uses it, and decoding is held back.
WRITERS = 2
# Attempts of a decode task whose worker died. Ray Data's own default retries forever, so an image that
# kills its decoding process would hold the job up for good.
DECODE_RETRIES = 3


def decode_task_options() -> dict[str, int]:
    """Remote options of every decode task (map_batches' ``ray_remote_args_fn``)."""
    return {"max_retries": DECODE_RETRIES}


@contextlib.contextmanager
def given_up_told(ledger: Ledger | LocalLedger, dry_run: bool = False) -> Iterator[None]:
    """Around a run's (or dry run's) decoding: where it fails because a decode task's process died on every
    attempt, an :class:`IsaError` naming the inputs instead of Ray's error."""
    try:
        yield
    except Exception as error:
        if ledger.attempts is None:  # without Ray: the run's own helpers, watched by the run
            raise
        import ray

        if not isinstance(error, ray.exceptions.WorkerCrashedError):
            raise
        given_up = ray.get(ledger.attempts.given_up.remote(1 + DECODE_RETRIES))
        if given_up:
            raise IsaError(given_up_message(given_up, 1 + DECODE_RETRIES, dry_run)) from error
        raise


@dataclass
class Summary:
    """What one run did."""

    read: int  # inputs seen
    skipped: int  # already in the cache before this run
    cached: int  # new rows
    rejected: int  # new rows in _errors/
    duplicates: int  # same bytes as an image already cached
    seconds: float
    dry_run: bool = False  # counted only: nothing decoded, embedded or written

    def line(self) -> str:
        if self.dry_run:
            new = self.read - self.skipped - self.duplicates
            return (
                f"dry run: read {self.read} · new {new} · skipped {self.skipped} · duplicates {self.duplicates} · "
                "nothing written"
            )
        rate = (self.read - self.skipped) / self.seconds if self.seconds > 0 else 0.0
        return (
            f"read {self.read} · cached {self.cached} · skipped {self.skipped} · rejected {self.rejected} · "
            f"duplicates {self.duplicates} · {rate:.1f} images/s"
        )


def parser() -> argparse.ArgumentParser:
    """``isa embed``'s arguments."""
    parser = config_parser(
        "isa embed",
        "Cache teacher image embeddings (and student-ready JPEGs) as Parquet.",
        [
            ("input", "folder, s3:// prefix, list file (.txt/.csv/.parquet), .tar shards or parquet with image bytes"),
            ("output", "cache folder (local path or fsspec URI)"),
        ],
    )
    parser.add_argument(
        "--teacher",
        help="open_clip model name (teacher.name) (default: the teacher of the cache resumed, else ViT-L-14)",
    )
    parser.add_argument(
        "--pretrained",
        help="open_clip pretrained tag, weights file, or none (teacher.pretrained) "
        "(default: the teacher of the cache resumed, else openai)",
    )
    parser.add_argument("--local-grid", type=int, help="LAR grid g, 0 = none (cache.local_grid)")
    parser.add_argument("--image-size", type=int, help="short side of the cached JPEG (cache.image_size)")
    parser.add_argument("--no-images", action="store_true", help="gallery-only cache: no image column")
    parser.add_argument("--dtype", choices=["float16", "float32"], help="embedding dtype (cache.dtype)")
    parser.add_argument("--batch-size", type=int, help="images per teacher forward (cache.batch_size)")
    parser.add_argument("--num-actors", type=int, help="teacher actors (cache.num_actors)")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="when another run is writing to OUTPUT, wait until it ends instead of refusing (docs/cli.md, one "
        "writer per cache)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="count the inputs that are new, skipped (already in the cache) and duplicates; write nothing",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[str, str, Config]:
    args = parser().parse_intermixed_args(argv)
    flags = {
        "teacher.name": args.teacher,
        "teacher.pretrained": args.pretrained,
        "cache.local_grid": args.local_grid,
        "cache.image_size": args.image_size,
        "cache.store_images": False if args.no_images else None,
        "cache.dtype": args.dtype,
        "cache.batch_size": args.batch_size,
        "cache.num_actors": args.num_actors,
    }
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    output = absolute_uri(args.output)
    config = load_config(args.config, overrides)
    given = given_keys(args.config, overrides)
    fs, root = filesystem(output)  # a cache is resumed with its own teacher; another one given is refused
    manifest = read_manifest(fs, root) if fs.isdir(root) else None
    config = choose_teacher(config, given, [(f"teacher cache {output}", manifest.teacher)] if manifest else [])
    return absolute_uri(args.input), output, config


KIND = "teacher cache"  # what pipelines.artifact's messages call the output folder
COMMAND = "isa embed"  # the lease's holder


def check_start(input_uri: str, output: str, config: Config) -> None:
    """The refusals that need no cluster and no model, made before Ray starts (and again by :func:`check`).

    Raises:
        InputError: the input does not exist, holds no files or cannot be read as its kind.
        ArtifactError: the output is a file, or a folder holding anything but a teacher cache.
        CacheError: the output is a cache made with another teacher model or other settings.
    """
    fs, root = filesystem(output)
    check_input(input_uri, config.cache, exclude=root)
    if check_folder(output, KIND, own_entry, marker=MANIFEST_FILE):
        existing = read_manifest(fs, root)
        if existing is not None:
            check_planned_settings(existing, config, output)


def check_planned_settings(existing: Manifest, config: Config, output: str) -> None:
    """Refuse an existing cache whose teacher model or settings differ from this run's, before a teacher is loaded
    (its weights are compared by :func:`check`, once the teacher's fingerprint is known).

    Raises:
        CacheError: naming the settings that differ, the cache's and this run's.
    """
    cache, teacher = config.cache, config.teacher
    same_model = existing.teacher.get("model") == teacher.name
    planned = Manifest(
        teacher=existing.teacher if same_model else {"model": teacher.name, "pretrained": teacher.pretrained},
        embed_dim=existing.embed_dim,  # the teacher's: known once it is loaded
        local_grid=cache.local_grid,
        dtype=cache.dtype,
        image_size=cache.image_size if cache.store_images else None,
        tower_dtype=cache.tower_dtype,
        schema_version=existing.schema_version,
    )
    check_same_settings(existing, planned, output)


def check(input_uri: str, output: str, config: Config, teacher: Teacher | None = None) -> Manifest:
    """Every refusal before embedding starts; returns the manifest this run writes with.

    ``teacher``: the teacher, when this process has loaded it (a tower in the driver); else its fingerprint is
    made in a Ray task.

    Raises:
        InputError, ArtifactError: from :func:`check_start`.
        CacheError: the output is a cache made with another teacher or other settings.
        TeacherNotSupportedError: the teacher cannot be loaded here (or the loader's own error).
    """
    check_start(input_uri, output, config)
    fingerprint = teacher.fingerprint() if teacher is not None else teacher_fingerprint(config.teacher)
    wanted = Manifest(
        teacher=fingerprint,
        embed_dim=fingerprint["embed_dim"],
        local_grid=config.cache.local_grid,
        dtype=config.cache.dtype,
        image_size=config.cache.image_size if config.cache.store_images else None,
        tower_dtype=config.cache.tower_dtype,
    )
    fs, root = filesystem(output)
    existing = read_manifest(fs, root)
    if existing is not None:
        check_same_settings(existing, wanted, output)
    return wanted


def prepare_cache(
    output: str, wanted: Manifest, counts: dict[str, int] | None = None
) -> tuple[Manifest, dict[str, int]]:
    """Create or check the cache folder; return its manifest and the row counts already on disk (``counts``: those
    of :func:`disk_counts`, when known)."""
    fs, root = filesystem(output)
    existing = read_manifest(fs, root)
    if existing is None:
        write_manifest(fs, root, wanted)
        existing = wanted
    check_same_settings(existing, wanted, output)
    remove_staging(fs, root)
    return existing, disk_counts(output) if counts is None else counts


def disk_counts(output: str) -> dict[str, int]:
    fs, root = filesystem(output)
    return {
        "cached": count_rows(fs, list_parts(fs, root)),
        "rejected": count_rows(fs, list_parts(fs, posixpath.join(root, ERRORS_DIR))),
        "duplicates": count_rows(fs, list_parts(fs, posixpath.join(root, DUPLICATES_DIR))),
    }


def start_ledger(
    output: str, rows_per_shard: int = CacheConfig.ledger_rows, counts: dict[str, int] | None = None
) -> Ledger:
    """A ledger that knows every URI and id the cache already accounts for, split over one shard (actor) per
    ``rows_per_shard`` rows of the cache (``cache.ledger_rows``; ``counts``: :func:`disk_counts`, when known)."""
    fs, root = filesystem(output)
    if counts is None:
        counts = disk_counts(output) if fs.isdir(root) else {}
    return ledgers.start_ledger(output, sum(counts.values()), rows_per_shard)


def admitted(input_uri: str, output: str, config: Config, ledger: Ledger) -> ray.data.Dataset:
    """The inputs the cache does not account for yet: the listing, block by block, each block asking the ledger."""
    _, root = filesystem(output)
    return read_sources(input_uri, config.cache, exclude=root).map_batches(
        admit_batch, batch_size=None, fn_kwargs={"ledger": ledger}, **source_options()
    )


def tower_device(cache: CacheConfig) -> str:
    """The teacher tower's device: ``cache.device``, where auto is a GPU when the cluster has one."""
    if cache.device != "auto":
        return cache.device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def driver_decode_tasks() -> int:
    """Decode tasks at a time beside a tower in the driver. That tower runs on this machine's CPU, where a forward
    costs tens of times the decoding of its inputs: a task per 8 cores keeps it fed, and each task more is one
    more process starting and taking cores from the tower."""
    return max(1, (os.cpu_count() or 1) // 8)


def tower_in_driver(cache: CacheConfig) -> bool:
    """Whether the tower runs in this process (``cache.tower_in``). auto: when the cluster is one node, this
    process's, and the tower runs on its CPU: the cores the actors would get are this machine's anyway, and
    running there saves the actor's start and a second load of the model (the fingerprint's)."""
    if cache.tower_in != "auto":
        return cache.tower_in == "driver"
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    return tower_device(cache) == "cpu" and len(nodes) == 1 and nodes[0]["NodeID"] == here


def runner(input_uri: str, output: str, config: Config, ray_started: bool, rows: int | None = None) -> str:
    """How a run executes, ``"local"`` or ``"ray"`` (``cache.runner``; ``ray_started``: this process has joined a Ray
    instance already; ``rows``: the cache's rows, when known). auto: local when nothing calls for Ray: no Ray
    instance joined and none named by ``RAY_ADDRESS``, an input this process can list
    (:func:`~pipelines.embed.local.local_input`), a cache on this machine's disk holding at most
    ``cache.ledger_rows`` rows, and a tower that may run on this machine's CPU, which has no GPU.

    Raises:
        ConfigError: ``cache.runner=local`` for a run that cannot go without Ray, naming why.
    """
    cache = config.cache
    if cache.runner == "ray":
        return "ray"
    refusals = [reason for reason in (local_input(input_uri, cache), _local_output(output)) if reason]
    if cache.tower_in == "actors" or cache.device == "cuda":
        refusals.append(
            f"cache.tower_in={cache.tower_in} and cache.device={cache.device} ask for Ray's actors or a GPU"
        )
    if cache.runner == "local":
        if refusals:
            raise ConfigError(f"cache.runner=local runs without Ray, which this run cannot: {'; '.join(refusals)}")
        return "local"
    if refusals or ray_started or os.environ.get("RAY_ADDRESS"):
        return "ray"
    if rows is None:
        fs, root = filesystem(output)
        rows = sum(disk_counts(output).values()) if fs.isdir(root) else 0
    if rows > cache.ledger_rows:
        return "ray"  # a ledger split over shards
    if cache.device == "auto":
        import torch  # the tower in this process needs it anyway

        return "ray" if torch.cuda.is_available() else "local"
    return "local"


def _local_output(output: str) -> str | None:
    return None if on_this_disk(output) else "the cache is not on this machine's disk"


def decode_settings(cache: CacheConfig, manifest: Manifest) -> dict:
    """What decode tasks decode with besides the manifest: the pixel limit, the reduced JPEG decoding size
    (``cache.fast_decode``: the larger of the teacher's side and the cached image's), the student JPEG quality,
    the longest an input may take (:class:`~pipelines.embed.guard.InputWatch`)."""
    teacher_side = max(manifest.teacher["preprocess"]["size"])
    return {
        "max_pixels": cache.max_image_pixels,
        "draft_short_side": max(teacher_side, manifest.image_size or 0) if cache.fast_decode else None,
        "jpeg_quality": cache.jpeg_quality,
        **read_settings(cache),
    }


def read_settings(cache: CacheConfig) -> dict:
    """What every task reading inputs reads with: the longest an input may take
    (:class:`~pipelines.embed.guard.InputWatch`)."""
    return {TIMEOUT_SETTING: cache.input_timeout_s}


def expected_decoding(config: Config) -> tuple[dict, dict] | None:
    """What the run's decoding will read of its manifest (the teacher's preprocessing, the cached image size) and
    its decode settings, told before the teacher is loaded (:func:`isa.teacher.expected_preprocess`); None where
    it cannot be told. A run without Ray decodes with it while its teacher loads
    (:func:`~pipelines.embed.local.local_batches`)."""
    from isa.teacher import expected_preprocess

    preprocess = expected_preprocess(config.teacher.name, config.teacher.pretrained)
    if preprocess is None:
        return None
    cache = config.cache
    manifest = Manifest(
        teacher={"preprocess": preprocess},
        embed_dim=0,  # not read by decoding
        local_grid=cache.local_grid,
        dtype=cache.dtype,
        image_size=cache.image_size if cache.store_images else None,
        tower_dtype=cache.tower_dtype,
    )
    return dataclasses.asdict(manifest), decode_settings(cache, manifest)


def decoded(
    input_uri: str,
    output: str,
    config: Config,
    manifest: Manifest | None,
    ledger: Ledger,
    fence: Fence | None = None,
    tasks: int | None = None,
) -> ray.data.Dataset:
    """sources -> admission -> decode (CPU tasks): the new inputs' crops for the tower.

    ``manifest``: the cache's; None: the driver publishes it (and the decode settings) through the ledger once it
    has it (:func:`decode_settings`, :meth:`Ledger.publish`), and the decode tasks wait for it.
    ``fence``: the run's lease, checked by every task before each file it publishes (:mod:`pipelines.lease`).
    ``tasks``: decode tasks at a time (default: as many as the cluster's CPUs allow, ``cache.decode_cpus`` each).
    """
    import ray.data

    cache = config.cache
    if manifest is None:
        from isa.teacher import configured_image_size

        teacher_side = configured_image_size(config.teacher.name) or 224
    else:
        teacher_side = max(manifest.teacher["preprocess"]["size"])
    # each decode call's crops go on as a block of their own: Ray Data would otherwise gather a task's outputs into
    # blocks of up to 128 MiB (850 crops at 224 px), and the tower would wait for as many decodes before its first
    # batch; the datasets keep the setting they were made with
    with data_context(target_max_block_size=cache.decode_batch_size * teacher_side**2 * 3):
        inputs = admitted(input_uri, output, config, ledger)
    return inputs.map_batches(
        decode_batch,
        batch_size=cache.decode_batch_size,
        fn_kwargs={
            "ledger": ledger,
            "output": output,
            "manifest": None if manifest is None else dataclasses.asdict(manifest),
            "settings": None if manifest is None else decode_settings(cache, manifest),
            "attempts": ledger.attempts,  # a batch whose process died is decoded again input by input
            "fence": fence,
        },
        num_cpus=cache.decode_cpus,
        **({"compute": ray.data.TaskPoolStrategy(size=tasks)} if tasks else {}),
        # retried when its worker dies; and an operator with a remote-options function is never fused, so
        # decoding stays in CPU tasks beside the teacher actors instead of running inside them
        ray_remote_args_fn=decode_task_options,
    )


def pipeline(
    input_uri: str, output: str, config: Config, manifest: Manifest, ledger: Ledger, fence: Fence | None = None
) -> ray.data.Dataset:
    """:func:`decoded` -> teacher (actor pool) -> shard writers; yields rows written."""
    import ray.data

    cache = config.cache
    device = tower_device(cache)
    meta = dataclasses.asdict(manifest)
    return (
        decoded(input_uri, output, config, manifest, ledger, fence)
        .map_batches(
            TeacherEmbedder,
            # two calls in flight per actor: one batches its inputs/outputs while the other runs the tower (the
            # tower itself runs one call at a time), so the GPU does not wait on batching
            compute=ray.data.ActorPoolStrategy(size=cache.num_actors, max_concurrent_calls_per_actor=2),
            batch_size=cache.batch_size,
            num_cpus=cache.actor_cpus,
            num_gpus=1 if device == "cuda" else 0,
            fn_constructor_kwargs={
                "manifest": meta,
                "cache_dir": config.teacher.cache_dir,
                "device": device,
                "threads": math.ceil(cache.actor_cpus),
            },
        )
        .map_batches(
            write_shard,
            batch_size=cache.rows_per_shard,
            num_cpus=0.25,  # serialisation and one upload: mostly waiting
            compute=ray.data.TaskPoolStrategy(size=WRITERS),
            fn_kwargs={"output": output, "manifest": meta, "fence": fence},
        )
    )


def embed_in_driver(
    batches: Iterable[dict[str, np.ndarray]],
    tower: TeacherEmbedder,
    output: str,
    manifest: Manifest,
    config: Config,
    fence: Fence,
    progress: Callable[[int], None] | None = None,
) -> None:
    """The tower in this process: :func:`decoded`'s batches (of ``cache.batch_size``) in, shards of
    ``cache.rows_per_shard`` rows out, each written by a thread beside the tower (the next batches run while a
    shard is written). ``progress``: told how many rows each batch embedded."""
    meta = dataclasses.asdict(manifest)
    writes: list[Future] = []

    def embedded() -> Iterator[dict[str, np.ndarray]]:
        for batch in batches:
            if len(batch["uri"]):
                rows = tower(batch)
                if progress is not None:
                    progress(len(rows["uri"]))
                yield rows

    with ThreadPoolExecutor(max_workers=1) as writer:
        for rows in rebatched(embedded(), config.cache.rows_per_shard):
            writes.append(writer.submit(write_shard, rows, output=output, manifest=meta, fence=fence))
            for done in [w for w in writes if w.done()]:
                done.result()  # a failed write stops the run now
                writes.remove(done)
        for pending in writes:
            pending.result()


def dry_run(input_uri: str, output: str, config: Config) -> Summary:
    """Count what :func:`run` would do (new, skipped and duplicate inputs) without decoding, embedding or writing
    anything: no manifest either, for a new output."""
    check(input_uri, output, config)
    ledger = start_ledger(output, config.cache.ledger_rows)
    started = time.perf_counter()
    duplicates = 0
    try:
        counting = admitted(input_uri, output, config, ledger).map_batches(
            count_new,
            batch_size=config.cache.decode_batch_size,
            fn_kwargs={"ledger": ledger, "settings": read_settings(config.cache), "attempts": ledger.attempts},
            ray_remote_args_fn=decode_task_options,
        )
        with given_up_told(ledger, dry_run=True):
            for batch in counting.iter_batches(batch_size=None):
                duplicates += int(batch["duplicates"].sum())
        seen = ledger.counts()
    finally:
        ledger.kill()
    return Summary(
        read=seen["read"],
        skipped=seen["skipped"],
        cached=0,
        rejected=0,
        duplicates=duplicates,
        seconds=time.perf_counter() - started,
        dry_run=True,
    )


def run(input_uri: str, output: str, config: Config, lease: Lease | None = None) -> Summary:
    """Embed every new input of ``input_uri`` into the cache at ``output``.

    ``lease``: the output's (:mod:`pipelines.lease`), taken by the caller; else this run takes it (a held output is
    refused) and releases it at the end.
    """
    if lease is None:
        with Lease.acquire(output, COMMAND) as held:
            return run(input_uri, output, config, held)
    fs, root = filesystem(output)
    before = disk_counts(output) if fs.isdir(root) else {"cached": 0, "rejected": 0, "duplicates": 0}
    local = runner(input_uri, output, config, ray_joined(), sum(before.values())) == "local"
    decoders = Decoders(driver_decode_tasks()) if local else None  # forked before any thread or model of this run
    ledger: Ledger | LocalLedger
    # on Ray, the ledger's actors start while the teacher loads
    ledger = LocalLedger(output) if local else start_ledger(output, config.cache.ledger_rows, before)
    device, teacher, batches = "cpu" if local else tower_device(config.cache), None, None
    try:
        if local or tower_in_driver(config.cache):
            # the inputs are listed and admitted (and Ray's decode tasks start) while the teacher loads here; on
            # Ray they are decoded once the cache's manifest is written and published to the decoding, without Ray
            # with what it is expected to be meanwhile; nothing is written before
            if decoders is not None:
                expected = expected_decoding(config)
                chunks = local_batches(input_uri, output, config, ledger, decoders, lease.fence, expected)
            else:
                inputs = decoded(input_uri, output, config, None, ledger, lease.fence, driver_decode_tasks())
                chunks = inputs.iter_batches(batch_size=config.cache.batch_size, batch_format="numpy")
            batches = Prefetched(chunks)
            teacher = load_teacher_here(config.teacher, device)  # torch and open_clip here only when the tower is
        manifest, _ = prepare_cache(output, check(input_uri, output, config, teacher), before)
        if batches is not None:
            ledger.publish(dataclasses.asdict(manifest), decode_settings(config.cache, manifest))
    except BaseException:
        if batches is not None:
            batches.close()
        ledger.kill()
        if decoders is not None:
            decoders.close()
        raise
    started = time.perf_counter()
    progress = Progress(progress_wanted()) if local else None  # Ray Data shows its own
    if batches is not None:  # the tower in this process, its teacher loaded
        import torch

        threads = torch.get_num_threads()  # this process's, given back at the end
        try:
            with batches, given_up_told(ledger):
                tower = TeacherEmbedder(
                    dataclasses.asdict(manifest), config.teacher.cache_dir, device, os.cpu_count() or 1, teacher
                )
                embed_in_driver(batches, tower, output, manifest, config, lease.fence, progress)
        finally:
            torch.set_num_threads(threads)
            if decoders is not None:
                decoders.close()
            if progress is not None:
                progress.close()
    else:
        with given_up_told(ledger):
            for _ in pipeline(input_uri, output, config, manifest, ledger, lease.fence).iter_batches(batch_size=None):
                pass  # rows are written by the shard writers; only their counts come back
    seconds = time.perf_counter() - started
    # every writer of this run has renamed its file by now; a temporary left is a killed earlier run's, whose
    # last tasks can still be writing just after it dies (after this run's start removed the older ones)
    remove_staging(fs, root)
    after = disk_counts(output)
    seen = ledger.counts()
    ledger.kill()  # its processes and the keys they hold go now, not when the driver exits
    if after != manifest.counts:
        manifest.counts = after
        lease.check()
        write_manifest(fs, root, manifest)
    return Summary(
        read=seen["read"],
        skipped=seen["skipped"],
        cached=after["cached"] - before["cached"],
        rejected=after["rejected"] - before["rejected"],
        duplicates=after["duplicates"] - before["duplicates"],
        seconds=seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    input_uri, output, config = parse_args(argv)
    args = parser().parse_intermixed_args(argv)
    dry = args.dry_run
    check_start(input_uri, output, config)
    lease = None if dry else Lease.acquire(output, COMMAND, args.wait)  # before Ray: a held output is refused now
    try:
        if dry or runner(input_uri, output, config, ray_joined()) == "ray":
            init_ray()
        else:
            progress_wanted()  # an invalid ISA_PROGRESS is refused now
            print(
                "isa embed: in this process, without Ray (a local input into a local cache on one CPU machine: "
                "cache.runner=ray to use Ray)",
                flush=True,
            )
        summary = dry_run(input_uri, output, config) if dry else run(input_uri, output, config, lease)
    finally:
        if lease is not None:
            lease.release()
    print(f"isa embed: {summary.line()}")
    if not dry:
        print(f"cache: {output}")
    return 0
