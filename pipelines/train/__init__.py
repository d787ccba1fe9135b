"""``isa train``: distil the light query encoder from a teacher cache with Ray Train.

cache (Parquet) -> Ray Data: split by id hash, decode and augment on CPU tasks (:mod:`pipelines.train.data`)
-> per-worker shards -> Ray Train, DDP on the student beside a frozen teacher per worker
(:mod:`pipelines.train.loop`) -> checkpoints + MLflow.

Neither the driver nor Ray Train's controller imports torch (about 0.35 GB each, which the 2-core quickstart's
4 GB cannot spare): the teacher's fingerprint comes from a one-off task (:mod:`pipelines.teacher`), and the
trainer is Ray Train's ``DataParallelTrainer`` with :class:`TorchWorkers`, whose workers join their torch
process group themselves (:func:`pipelines.train.loop.join_process_group`). ``TorchTrainer`` would hand its
``TorchConfig`` to the controller, and unpickling it imports torch there and in the driver.
"""

from __future__ import annotations

import argparse
import json
import math
import posixpath
import signal
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.backend import Backend, BackendConfig

from isa.cache import Manifest, fingerprint_mismatch, list_parts, read_manifest
from isa.config import Config, given_keys, load_config, parse_overrides, saved_dict, to_dict
from isa.errors import IsaError
from isa.storage import filesystem, full_uri, ray_storage, redact_uri
from pipelines import ray_compat, tracking
from pipelines.artifact import check_folder
from pipelines.stage import config_parser, init_ray
from pipelines.teacher import TEACHER_CHOICE, choose_teacher, teacher_fingerprint
from pipelines.train.data import datasets, ingest_options, training_rows
from pipelines.train.runs import (
    RUN_CONFIG_FILE,
    RunFolder,
    RunFolderError,
    Start,
    check_run_folder,
    check_steps_left,
    resumed_config,
)


class SharedDevices(Backend):
    """Every worker sees all the GPUs of its node and takes its own by local rank (``ray.train.torch.get_device``),
    so NCCL between the workers of a node can use direct peer access, as under ``TorchTrainer``."""

    share_cuda_visible_devices: bool = True


@dataclass
class TorchWorkers(BackendConfig):
    """Ray Train's backend for ``isa train``'s workers; they set up torch.distributed in the training function."""

    @property
    def backend_cls(self) -> type[Backend]:
        return SharedDevices


class TrainError(IsaError):
    """The run cannot start: a problem with the cache, the teacher or the cluster, named in the message."""


@dataclass(frozen=True)
class Plan:
    """What :func:`check` found: everything a run needs before it starts."""

    config: Config
    fingerprint: dict[str, Any]  # the configured teacher's
    parts: list[str]  # the cache's shard URIs
    manifest: Manifest  # the cache's
    steps_per_epoch: int
    total_steps: int
    tracking_uri: str


def parser() -> argparse.ArgumentParser:
    """``isa train``'s arguments."""
    parser = config_parser("isa train", "Distil the light query encoder from a teacher cache (Ray Train).")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, with its own config; overrides may change "
        "only the steps, the resources and the checkpointing (docs/cli.md)",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> Config:
    """The run's config: see :func:`config_of`."""
    return config_of(parser().parse_intermixed_args(argv))


def config_of(args: argparse.Namespace) -> Config:
    """The config of a new run (``--config``, overrides; without a teacher setting, ``teacher.name`` or
    ``teacher.pretrained``, the teacher of its cache), or of a resume (``--resume RUN_DIR``: the run's config, the
    overrides on top, ``train.output`` the run folder).

    Raises:
        ConfigError: a bad config file or override.
        RunFolderError: ``--resume`` of a folder that holds no run, or with ``--config``.
    """
    if args.resume is None:
        config = load_config(args.config, args.overrides)
        given = given_keys(args.config, args.overrides)
        return config if TEACHER_CHOICE <= given else with_cache_teacher(config, given)  # given: checked in check()
    if args.config:
        raise RunFolderError("--resume continues a run with its own config: give overrides only, without --config")
    return resumed_config(args.resume, parse_overrides(args.overrides))


def with_cache_teacher(config: Config, given: Collection[str] = TEACHER_CHOICE) -> Config:
    """The config with its cache's teacher (``train.cache``'s manifest) in the teacher keys the user did not give
    (``given``: the dotted keys given); a teacher given is checked against it by name (by fingerprint in
    :func:`check`).

    Raises:
        TeacherMismatchError: the given teacher is another than the cache's, both named.
    """
    if not config.train.cache:
        return config
    fs, root = filesystem(config.train.cache)
    manifest = read_manifest(fs, root)
    sources = [(f"teacher cache {config.train.cache}", manifest.teacher)] if manifest else []
    return choose_teacher(config, given, sources)


def check_cache(config: Config) -> tuple[list[str], Manifest]:
    """The cache's shard URIs and manifest, or a TrainError naming what is wrong with the cache (its teacher is
    checked in :func:`check`)."""
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


def run_entry(name: str) -> bool:
    """Whether a name at the top of a run folder is one a run writes there: its config, Ray Train's checkpoints,
    run snapshot and hidden markers."""
    return name == RUN_CONFIG_FILE or name.startswith(("checkpoint_", "."))


def check_before_ray(config: Config, start: Start | None = "new") -> RunFolder | None:
    """The refusals that need neither Ray nor a read of the cache's shards: MLflow's reserved model alias, the run
    folder (:func:`pipelines.train.runs.check_run_folder`), a teacher named other than the cache's, an MLflow server
    that turns the credentials away. Returns what the run folder holds (None: no run, or ``start`` None).

    Args:
        start: as in :func:`check`.
    """
    if config.train.register_model and config.train.model_alias.lower() == "latest":
        raise TrainError("train.model_alias must not be 'latest': MLflow reserves that alias; choose another")
    folder = check_run_folder(config, start) if start is not None else None
    if start is not None and folder is None:  # no run there: an empty or new folder, never one of other things
        check_folder(config.train.output, "training run", run_entry)
    with_cache_teacher(config)
    tracking.check_access(tracking.tracking_uri(config.train.tracking_uri, tracking.store_folder(config.train.output)))
    return folder


def check(config: Config, start: Start | None = "new") -> Plan:
    """Every refusal before training starts: the run folder, the teacher, the cache, the steps, the cluster, the
    tracking store.

    Args:
        config: the resolved config.
        start: how the run starts with what ``train.output`` holds (:mod:`pipelines.train.runs`): ``new``,
            ``resume`` or ``continue``; None: the config has no run folder of its own (a sweep's base config).

    Raises:
        RunFolderError: the run folder holds a run (a new run), none or a finished one (a resume), or a run with
            settings a resume may not change.
        TeacherMismatchError: the configured teacher is named other than the cache's.
        TrainError: the cache is missing, empty, gallery-only, without the LAR grid or from another teacher; the
            cluster is too small; the cache makes no step of the global batch; MLflow's reserved model alias.
        IsaError: no tracking store can be chosen for a remote output.
    """
    folder = check_before_ray(config, start)
    parts, manifest = check_cache(config)
    n_train = training_rows(config, parts)
    steps_per_epoch = n_train // config.train.global_batch_size
    total = config.train.max_steps or config.train.epochs * steps_per_epoch
    if steps_per_epoch <= 0 or total <= 0:
        raise TrainError(
            f"{n_train} training images make no step of train.global_batch_size="
            f"{config.train.global_batch_size}; lower the batch size or set train.max_steps"
        )
    if start is not None:
        check_steps_left(folder, total, start)
    fingerprint = teacher_fingerprint(config.teacher)
    mismatch = fingerprint_mismatch(fingerprint, manifest.teacher)
    if mismatch:
        raise TrainError(f"cache {config.train.cache} does not match the configured teacher: {mismatch}")
    check_resources(config)
    uri = tracking.tracking_uri(config.train.tracking_uri, tracking.store_folder(config.train.output))
    return Plan(config, fingerprint, parts, manifest, steps_per_epoch, total, uri)


def run(
    config: Config,
    *,
    callbacks: Sequence[object] = (),
    run_name: str | None = None,
    mlflow_tags: Mapping[str, str] | None = None,
    start: Start = "new",
) -> ray.train.Result:
    """Check everything, then train; returns Ray Train's result (metrics and the last checkpoint).

    Args:
        config: the resolved config.
        start: ``new`` (``train.output`` must hold no run), ``resume`` (it must hold one with steps left), or
            ``continue`` (either; a run there must have the same settings): :mod:`pipelines.train.runs`.
        callbacks: extra Ray Train ``RunConfig`` callbacks (``isa tune`` passes Tune's ``TuneReportCallback``).
        run_name: MLflow name of a new run; None: the run folder's name.
        mlflow_tags: tags of a new MLflow run (``isa tune`` nests it with ``mlflow.parentRunId``).
    """
    plan = check(config, start)
    passes = math.ceil(plan.total_steps / plan.steps_per_epoch)
    data = datasets(plan.parts, config, passes=passes, manifest=plan.manifest)
    fs, run_dir = filesystem(config.train.output)
    fs.makedirs(run_dir, exist_ok=True)
    fs.pipe_file(posixpath.join(run_dir, RUN_CONFIG_FILE), json.dumps(saved_dict(config), indent=2).encode())
    tracking.prepare_store(plan.tracking_uri)
    storage, name = posixpath.split(config.train.output.rstrip("/"))
    storage_path, storage_filesystem = ray_storage(storage)  # object storage with the S3 settings of isa.storage
    trainer = ray_compat.Trainer(
        worker_loop,
        train_loop_config={
            "config": to_dict(config),
            "fingerprint": plan.fingerprint,
            "total_steps": plan.total_steps,
            "tracking_uri": plan.tracking_uri,
            "run_name": run_name or name,
            "run_dir": run_dir_uri(config.train.output),
            "mlflow_tags": {**(mlflow_tags or {}), tracking.RUN_DIR_TAG: run_dir_uri(config.train.output)},
        },
        backend_config=TorchWorkers(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.num_workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker={"CPU": config.train.worker_cpus, **({"GPU": 1} if config.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.num_to_keep),
            callbacks=list(callbacks),
            # Ray Train's own INFO lines (worker group, each report's metrics) stay in the session's logs/train;
            # the workers print a step line per record
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=data,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest_options()),
    )
    try:
        return fit(trainer)
    except BaseException as error:  # the workers could not end their run: it ends here, FAILED or KILLED
        status = "FAILED" if isinstance(error, Exception) else "KILLED"
        tags = {tracking.RUN_DIR_TAG: run_dir_uri(config.train.output)}
        try:
            tracking.end_open_runs(plan.tracking_uri, config.train.experiment, tags, status)
        except Exception as failure:  # the run's own error stays the one raised
            error.add_note(f"its MLflow run could not be ended: {failure}")
        raise


def run_dir_uri(output: str) -> str:
    """A run folder as one string wherever it is given from: a URI, or an absolute local path."""
    output = output.rstrip("/")
    return output if "://" in output else str(Path(output).resolve())


def worker_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point in each worker: :func:`pipelines.train.loop.train_loop`, imported there (torch)."""
    from pipelines.train.loop import train_loop

    train_loop(loop_config)


def fit(trainer: Any) -> ray.train.Result:
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
    args = parser().parse_intermixed_args(argv)
    config = config_of(args)
    start: Start = "new" if args.resume is None else "resume"
    check_before_ray(config, start)
    check_cache(config)  # every refusal that needs no cluster comes before Ray starts
    init_ray()
    result = run(config, start=start)
    metrics = {k: round(v, 4) for k, v in (result.metrics or {}).items() if isinstance(v, float)}
    print(f"isa train: finished at step {result.metrics.get('step')} · {metrics}")
    last = result.checkpoint and posixpath.join(
        run_dir_uri(config.train.output), posixpath.basename(result.checkpoint.path.rstrip("/")), "isa"
    )
    print(f"checkpoint: {last}")
    store = tracking.tracking_uri(config.train.tracking_uri, tracking.store_folder(config.train.output))
    shown = redact_uri(store or "")
    print(f"MLflow: experiment {config.train.experiment} in {shown}; see it with: {tracking.ui_command(store)}")
    return 0
