"""``isa train``: distil the light query encoder from a teacher cache with Ray Train.

cache (Parquet) -> Ray Data: split by id hash, decode + augment on CPU tasks -> per-worker shards ->
Ray Train with the torch backend (DDP on the student, frozen teacher text tower per worker) -> checkpoints
+ MLflow. The driver never imports torch: the teacher's fingerprint comes from a one-off task and the trainer
is Ray Train's ``DataParallelTrainer`` with :class:`~pipelines.train_backend.DistributedTorch` (``TorchTrainer``'s
backend).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import random
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import ray
import ray.data
import ray.train

from isa.cache import (
    Manifest,
    filesystem,
    fingerprint_mismatch,
    full_uri,
    list_parts,
    read_column_values,
    read_manifest,
)
from isa.config import Config, ConfigError, from_dict, parse_overrides, to_dict
from pipelines.common import config_parser, init_ray, resolve_config
from pipelines.embed_teacher import teacher_fingerprint
from pipelines.train_backend import DistributedTorch, Trainer
from pipelines.train_remote import is_validation, split_and_view, train_loop

RUN_CONFIG_FILE = "isa_config.json"
VIEW_ROWS = 256  # rows per call of the decode-and-view tasks


class TrainError(ValueError):
    """The run cannot start: a problem with the cache, the teacher or the cluster, named in the message."""


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = config_parser("isa train", "Distil the light query encoder from a teacher cache (Ray Train).")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (its config, plus any overrides)",
    )
    args = parser.parse_intermixed_args(argv)
    if args.resume is None:
        return resolve_config(args.config, args.overrides)
    fs, path = filesystem(args.resume)
    try:
        saved = json.loads(fs.cat_file(posixpath.join(path, RUN_CONFIG_FILE)))
    except FileNotFoundError:
        raise SystemExit(f"isa: {args.resume} is not an isa train run (no {RUN_CONFIG_FILE})") from None
    try:  # the run's own config, then the command line on top; the output stays the run directory
        config = from_dict(parse_overrides(args.overrides), base=from_dict(saved))
        return from_dict({"train": {"output": args.resume}}, base=config)
    except ConfigError as error:
        raise SystemExit(f"isa: {error}") from None


def check_cache(config: Config, fingerprint: dict) -> tuple[list[str], Manifest]:
    """The cache's shard URIs and manifest, or a TrainError naming what is wrong with the cache."""
    uri = config.train.cache
    if not uri:
        raise TrainError("no teacher cache given: set train.cache=URI (made by isa embed)")
    fs, root = filesystem(uri)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise TrainError(f"no teacher cache at {uri}: it has no _isa_cache.json (make one with isa embed)")
    parts = list_parts(fs, root)
    if not parts:
        raise TrainError(f"teacher cache {uri} is empty: no part-*.parquet shards")
    if manifest.image_size is None:
        raise TrainError(f"teacher cache {uri} has no image column (a gallery-only cache); embed without --no-images")
    if config.loss.lar_weight > 0 and manifest.local_grid == 0:
        raise TrainError(
            f"LAR is on (loss.lar_weight={config.loss.lar_weight}) but cache {uri} has no teacher_local; "
            "embed with cache.local_grid>0 or set loss.lar_weight=0"
        )
    mismatch = fingerprint_mismatch(fingerprint, manifest.teacher)
    if mismatch:
        raise TrainError(f"cache {uri} does not match the configured teacher: {mismatch}")
    return [full_uri(fs, p) for p in parts], manifest


def check_resources(config: Config) -> None:
    """Refuse (instead of hanging) when the cluster cannot hold the workers plus one CPU for the data tasks."""
    have = ray.cluster_resources()
    workers = config.train.num_workers
    need_cpu = workers * config.train.worker_cpus + 1
    need_gpu = workers if config.train.use_gpu else 0
    if have.get("CPU", 0) < need_cpu or have.get("GPU", 0) < need_gpu:
        raise TrainError(
            f"train.num_workers={workers} needs {need_cpu:g} CPUs ({config.train.worker_cpus:g} per worker "
            f"(train.worker_cpus) + 1 for data loading) and {need_gpu} GPUs; the cluster has "
            f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs"
        )


def training_rows(config: Config, parts: list[str]) -> int:
    """Rows of the cache's shards ``parts`` outside the held-out split (read from the id column only)."""
    fs, _ = filesystem(config.train.cache)
    ids = read_column_values(fs, parts, ["id"])["id"].to_pylist()
    return sum(not is_validation(i, config.train.val_fraction) for i in ids)


def pass_order(parts: list[str], passes: int, seed: int) -> list[str]:
    """The shards of ``passes`` passes over the cache, one after another, each pass in its own random order."""
    rng = random.Random(seed)
    return [part for _ in range(passes) for part in rng.sample(parts, len(parts))]


def datasets(parts: list[str], config: Config, passes: int, cached_size: int | None = None) -> dict:
    """The train dataset (``passes`` passes in one stream) and the validation dataset.

    One stream for the whole run, rather than one per pass: each new stream would wait a few seconds for
    Ray Data to list, open and decode its first shards (measured: about 4 s per pass on 2 CPUs). The views
    are no larger than the cached images' short side ``cached_size``; the worker resizes them to the student's
    input, so no upsampled pixels fill the object store (the quickstart's 64 px cache feeds a 96 px student).
    """
    columns = ["id", "image", "teacher_emb"] + (["teacher_local"] if config.loss.lar_weight > 0 else [])
    split = {
        "fraction": config.train.val_fraction,
        "size": min(config.student.image_size, cached_size or config.student.image_size),
        "scale_min": config.train.crop_scale_min,
        "hflip": config.train.hflip,
    }
    context = ray.data.DataContext.get_current()
    v2 = context.use_datasource_v2
    context.use_datasource_v2 = False  # reader V2 reads a path listed twice only once; V1 reads every entry
    try:
        train = ray.data.read_parquet(pass_order(parts, passes, config.train.seed)).select_columns(columns)
    finally:
        context.use_datasource_v2 = v2
    views = {"batch_size": VIEW_ROWS}  # bounded memory per task, whatever the shard size
    train = train.map_batches(split_and_view, fn_kwargs={"validation": False, **split}, **views)
    val = ray.data.read_parquet(parts).select_columns(columns)
    val = val.map_batches(split_and_view, fn_kwargs={"validation": True, **split}, **views)
    val = val.limit(config.train.val_images)
    return {"train": train, "val": val}


def tracking_uri(config: Config) -> str:
    """train.tracking_uri, else MLFLOW_TRACKING_URI, else a SQLite file in a local output folder."""
    if config.train.tracking_uri:
        return config.train.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in config.train.output:
        raise TrainError("set train.tracking_uri or MLFLOW_TRACKING_URI when the output is not a local folder")
    return f"sqlite:///{Path(config.train.output).resolve() / 'mlflow.db'}"


def run(
    config: Config,
    *,
    callbacks: Sequence[object] = (),
    run_name: str | None = None,
    mlflow_tags: Mapping[str, str] | None = None,
) -> ray.train.Result:
    """Check everything, then train; returns Ray Train's result (metrics and the last checkpoint).

    Args:
        config: the resolved config.
        callbacks: extra Ray Train ``RunConfig`` callbacks (``isa tune`` passes Tune's ``TuneReportCallback``).
        run_name: MLflow name of a new run; None: the run folder's name.
        mlflow_tags: tags of a new MLflow run (``isa tune`` nests it with ``mlflow.parentRunId``).
    """
    fingerprint = teacher_fingerprint(config.teacher)
    parts, manifest = check_cache(config, fingerprint)
    check_resources(config)
    n_train = training_rows(config, parts)
    steps_per_epoch = n_train // config.train.global_batch_size
    total = config.train.max_steps or config.train.epochs * steps_per_epoch
    if steps_per_epoch <= 0 or total <= 0:
        raise TrainError(
            f"{n_train} training images make no step of train.global_batch_size="
            f"{config.train.global_batch_size}; lower the batch size or set train.max_steps"
        )
    data = datasets(parts, config, passes=math.ceil(total / steps_per_epoch), cached_size=manifest.image_size)
    fs, run_dir = filesystem(config.train.output)
    fs.makedirs(run_dir, exist_ok=True)
    fs.pipe_file(posixpath.join(run_dir, RUN_CONFIG_FILE), json.dumps(to_dict(config), indent=2).encode())
    storage, name = posixpath.split(config.train.output.rstrip("/"))
    trainer = Trainer(
        train_loop,
        backend_config=DistributedTorch(backend="nccl" if config.train.use_gpu else "gloo"),
        train_loop_config={
            "config": to_dict(config),
            "fingerprint": fingerprint,
            "total_steps": total,
            "tracking_uri": tracking_uri(config),
            "run_name": run_name or name,
            "mlflow_tags": dict(mlflow_tags or {}),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.num_workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker={"CPU": config.train.worker_cpus, **({"GPU": 1} if config.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage if "://" in storage else str(Path(storage or ".").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.num_to_keep),
            callbacks=list(callbacks),
        ),
        datasets=data,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return fit(trainer)


def fit(trainer: Trainer) -> ray.train.Result:
    """``trainer.fit()``, then the SIGINT handler as it was before.

    Ray Train's handler (to abort the run on Ctrl-C) keeps a handle to the run's controller, which keeps the
    controller and its data coordinators alive (about 0.4 GB) until the next run replaces the handler.
    """
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if handler is not None:  # None: a handler not installed from Python, nothing to put back
            signal.signal(signal.SIGINT, handler)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    init_ray()
    try:
        result = run(config)
    except TrainError as error:
        print(f"isa train: {error}")
        return 2
    metrics = {k: round(v, 4) for k, v in (result.metrics or {}).items() if isinstance(v, float)}
    print(f"isa train: finished at step {result.metrics.get('step')} · {metrics}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}/isa")
    print(f"MLflow: {tracking_uri(config)} (experiment {config.train.experiment})")
    return 0
