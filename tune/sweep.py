"""``isa tune``: Ray Tune over the train stage, one Ray Train run per trial, ASHA on the validation metric,
MLflow nesting.

Each trial runs :func:`pipelines.train.run` (there is no second training loop) with Ray Train V2's
``TuneReportCallback``, so every ``ray.train.report`` of the trial's rank 0 reaches Tune and its scheduler.
A sweep folder (``tune.storage``/``tune.name``) holds::

    isa_sweep.json                        what the sweep started with: base config, space or suite rows, MLflow parent
    tuner.pkl, experiment_state-*.json    Ray Tune's own state (``Tuner.restore`` reads it)
    TRIAL_ID/                             one folder per trial, named by its Tune trial id (never a timestamp)
        result.json, params.json, ...     Tune's records of the trial
        train/                            the trial's train run (train.output): checkpoint_*/isa, isa_config.json
        .isa_placement_groups/            its Train worker placement groups, until released (tune.cleanup)

The trial driver reserves no CPU (it only waits, like Ray Train's own controller); the trial's training workers
reserve ``tune.cpus_per_trial`` / ``tune.gpus_per_trial`` when its trainer starts, and
``tune.max_concurrent_trials`` (automatic by default) keeps more trials from starting than the cluster can train.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from isa.checkpoint_files import complete_checkpoints
from isa.config import Config, ConfigError, flatten, from_dict, parse_overrides, to_dict
from isa.storage import filesystem, ray_storage, write_bytes
from pipelines import train
from pipelines.artifact import check_folder
from pipelines.stage import config_parser, init_ray
from pipelines.teacher import known_fingerprints, remember, teacher_fingerprint
from pipelines.tracking import tracking_uri, ui_command
from pipelines.train import metrics as train_metrics
from tune import tracking
from tune.cleanup import RecordPlacementGroups, ReleasePlacementGroups, release
from tune.space import (
    TUNE_METRICS,
    SweepError,
    check_metric,
    nested,
    param_space,
    parse_space,
    plain,
)

SWEEP_FILE = "isa_sweep.json"
ROW_KEY = "row"  # a suite's trials sweep this key over the row names
TRAIN_FOLDER = "train"  # a trial's train run, inside the trial folder
DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}  # Tune needs a non-empty bundle; the driver only waits


@dataclass(frozen=True)
class Plan:
    """What a sweep or suite starts with; stored as ``isa_sweep.json`` so ``--resume`` can rebuild it."""

    kind: str  # "sweep" or "ablation"
    config: Config  # every trial's base (tune section included); the trial's overrides go on top
    folder: str  # the sweep folder (absolute local path or URI)
    tracking_uri: str  # MLflow, for the parent and every child run
    space: dict = field(default_factory=dict)  # sweep: the space mapping as written
    rows: dict = field(default_factory=dict)  # suite: row name -> nested config overrides
    parent_run_id: str | None = None  # MLflow parent run
    suite: str = ""  # suite name

    def to_json(self) -> str:
        fields = {k: getattr(self, k) for k in ("kind", "tracking_uri", "space", "rows", "parent_run_id", "suite")}
        return json.dumps({**fields, "config": to_dict(self.config)}, indent=2)

    @classmethod
    def from_json(cls, text: str, folder: str) -> Plan:
        data = json.loads(text)
        return cls(**{**data, "config": from_dict(data["config"]), "folder": folder})


@dataclass(frozen=True)
class TrialRecord:
    """One finished, stopped or failed trial."""

    trial_id: str  # Tune's trial id; also the trial folder's name
    name: str  # the trial id (sweeps) or the row name (suites)
    status: str  # "completed", "stopped early" or "failed"
    overrides: dict[str, Any]  # the trial's dotted config keys and values
    metrics: dict[str, float]  # its last reported metrics (the train stage's and Tune's counters)
    run_dir: str  # its train run folder
    run_id: str | None  # its MLflow child run
    error: str | None = None


@dataclass(frozen=True)
class Outcome:
    """A finished sweep: every trial, the best one (sweeps) and where the records are."""

    plan: Plan
    trials: list[TrialRecord]
    best: TrialRecord | None


def load_sweep_file(path: str | None, overrides: Sequence[str] = (), base: Config | None = None) -> tuple[Config, Any]:
    """A sweep YAML: any config sections (``tune:`` included) plus ``space:``, on ``base``; overrides go on top.

    Raises:
        ConfigError: an unreadable file, an unknown section or key, a bad value.
    """
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"sweep file not found: {path}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"sweep file {path} is not valid YAML: {error}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"sweep file {path} must hold a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    space = data.pop("space", None)
    config = from_dict(parse_overrides(overrides), base=from_dict(data, base=base))
    return config, space


def folder_of(config: Config, default_name: str) -> str:
    """``tune.storage``/``tune.name`` as an absolute local path or a URI."""
    storage = config.tune.storage.rstrip("/")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return posixpath.join(storage, config.tune.name or default_name)


def tracking_uri_of(config: Config, folder: str) -> str:
    """train.tracking_uri, else MLFLOW_TRACKING_URI, else SQLite in the sweep folder (the train stage's rule)."""
    return tracking_uri(config.train.tracking_uri, folder)


def trial_config(config: Config, tracking_uri: str) -> Config:
    """The base config with the per-trial resources of the tune section and the sweep's tracking URI."""
    tune, train = config.tune, {"tracking_uri": tracking_uri}
    if tune.gpus_per_trial:
        train |= {"num_workers": tune.gpus_per_trial, "use_gpu": True}
    elif tune.gpus_per_trial == 0:
        train["use_gpu"] = False
    if tune.cpus_per_trial:
        train["worker_cpus"] = tune.cpus_per_trial / train.get("num_workers", config.train.num_workers)
    return from_dict({"train": train}, base=config)


def check(config: Config, space: Any) -> Plan:
    """Check a sweep completely, before Ray Tune starts anything: :func:`check_start`, then the checks that need
    the cluster (the teacher's fingerprint, one trial's resources).

    Raises:
        ConfigError: an unknown swept key or a value the config refuses (naming the key).
        SweepError: an empty space, a metric the trainer never reports, a missing searcher, an existing folder.
        TrainError: a missing or mismatched cache, or a cluster too small for one trial.
    """
    plan = check_start(config, space)
    check_training(plan.config)
    return plan


def check_start(config: Config, space: Any) -> Plan:
    """The refusals that need no cluster, made before Ray starts: the space, the metric, the searcher, the sweep
    folder, the train stage's own (its settings and its cache).

    Raises:
        ConfigError, SweepError, TrainError, ArtifactError: as :func:`check`, and a sweep folder of other things.
    """
    params = parse_space(space, config)
    check_metric(config, params)
    searcher(config)  # fails early when the searcher's package is missing
    folder = folder_of(config, "sweep")
    refuse_existing(folder)
    tracking_uri = tracking_uri_of(config, folder)
    config = trial_config(config, tracking_uri)
    check_training_start(config)
    return Plan("sweep", config, folder, tracking_uri, space=json.loads(json.dumps(space)))


def check_sweep_folder(folder: str, kind: str) -> bool:
    """The output folder rule (:func:`pipelines.artifact.check_folder`) for a sweep or suite folder: new, empty, or
    one holding a sweep (its :data:`SWEEP_FILE`; everything in it is the sweep's). Returns whether it holds one."""
    return check_folder(folder, kind, lambda name: True, marker=SWEEP_FILE)


def refuse_existing(folder: str) -> None:
    if check_sweep_folder(folder, "sweep"):
        raise SweepError(f"{folder} already holds a sweep: continue it with --resume {folder}, or set tune.name")


def check_training_start(config: Config) -> None:
    """The train stage's own checks that need no cluster (its settings, its cache), made once for the whole sweep
    (each trial has its own run folder, checked when it starts)."""
    train.check_before_ray(config, start=None)
    train.check_cache(config)


def check_training(config: Config) -> None:
    """The train stage's own checks (teacher, cache, cluster, steps), made once for the whole sweep (each trial has
    its own run folder, checked when it starts)."""
    train.check(config, start=None)


def searcher(config: Config, max_concurrent: int = 0) -> tuple[Any, int | None]:
    """Tune's search algorithm for ``tune.search`` (Optuna only when it is installed) and the
    ``TuneConfig.max_concurrent_trials`` that goes with it (Tune ignores that for a variant generator, which
    limits its trials itself)."""
    if config.tune.search == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise SweepError("tune.search=optuna needs the optuna package: pip install 'isa[tune]'") from None
        return OptunaSearch(seed=config.tune.seed), max_concurrent or None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=config.tune.seed, max_concurrent=max_concurrent), None


def scheduler(config: Config) -> Any:
    """ASHA on ``tune.metric`` over ``training_iteration`` (one per train report), or none.

    ASHA only stops trials that fall behind at a rung: a trial that passes the last rung ends at its own last step
    (``stop_last_trials=False``), so its train run closes normally (final checkpoint, MLflow run finished).
    """
    if config.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    t = config.tune
    return ASHAScheduler(
        max_t=t.max_t, grace_period=t.grace_period, reduction_factor=t.reduction_factor, stop_last_trials=False
    )


def concurrency(config: Config) -> int:
    """``tune.max_concurrent_trials``, or as many trials as the cluster's CPUs and GPUs can train at once."""
    import ray

    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    have = ray.cluster_resources()
    workers = config.train.num_workers
    count = int(have.get("CPU", 0) // (workers * config.train.worker_cpus + 1))  # +1: the trial's data tasks
    if config.train.use_gpu:
        count = min(count, int(have.get("GPU", 0) // workers))
    return max(1, count)


def trial_name(trial: Any) -> str:
    """Trial (and MLflow run) names: the suite row, else the Tune trial id; never a timestamp."""
    return str(trial.config.get(ROW_KEY) or trial.trial_id)


def trial_folder(trial: Any) -> str:
    return trial.trial_id


def run_trial(
    params: dict,
    *,
    base: dict,
    folder: str,
    parent_run_id: str | None,
    rows: dict | None,
    kind: str,
    fingerprints: Sequence[tuple[tuple, Mapping[str, Any]]] = (),
) -> None:
    """The Tune trainable: one train-stage run with the trial's overrides, reporting to Tune; ``fingerprints``:
    the driver's teacher fingerprints (:func:`pipelines.teacher.known_fingerprints`), which the train run reuses
    for the same teacher."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    remember(fingerprints)

    trial_id = ray.tune.get_context().get_trial_id()
    row = params.get(ROW_KEY) if rows else None
    overrides = rows[row] if row is not None else {s: {k: plain(v) for k, v in kv.items()} for s, kv in params.items()}
    config = from_dict(overrides, base=from_dict(base))
    output = posixpath.join(folder, trial_id, TRAIN_FOLDER)
    config = from_dict({"train": {"output": output}}, base=config)
    tags = {tracking.TRIAL_TAG: trial_id, "isa.stage": kind, **({"isa.row": row} if row is not None else {})}
    if parent_run_id:
        tags[tracking.PARENT_TAG] = parent_run_id
        fs, path = filesystem(output)
        if not complete_checkpoints(fs, path):  # a restart from scratch
            tracking.discard_children(config.train.tracking_uri, parent_run_id, trial_id)
    callbacks = [TuneReportCallback(), RecordPlacementGroups(posixpath.join(folder, trial_id))]
    # a trial Tune restores continues the train run in its folder, with the same settings
    train.run(config, callbacks=callbacks, run_name=row or trial_id, mlflow_tags=tags, start="continue")


def _trainable(plan: Plan) -> Any:
    """The trainable with the plan bound; the base config's teacher is fingerprinted here, once for every trial
    that keeps it (a teacher fails to load here, before any trial starts)."""
    from ray import tune

    teacher_fingerprint(plan.config.teacher)
    fn = tune.with_parameters(
        run_trial,
        base=to_dict(plan.config),
        folder=plan.folder,
        parent_run_id=plan.parent_run_id,
        rows=plan.rows or None,
        kind=plan.kind,
        fingerprints=known_fingerprints(),
    )
    return tune.with_resources(fn, DRIVER_RESOURCES)


def _tuner(plan: Plan) -> Any:
    from ray import tune

    t = plan.config.tune
    if plan.kind == "sweep":
        space = param_space(parse_space(plan.space, plan.config), t.search)
        search, limit = searcher(plan.config, concurrency(plan.config))
        options = {"metric": t.metric, "mode": t.mode, "num_samples": t.num_samples}
        options["scheduler"] = scheduler(plan.config)
    else:  # every row once, to its end
        space = {ROW_KEY: tune.grid_search(list(plan.rows))}
        search, limit = searcher(from_dict({"tune": {"search": "grid"}}, base=plan.config), concurrency(plan.config))
        options = {}
    storage, name = posixpath.split(plan.folder)
    storage_path, storage_filesystem = ray_storage(storage)  # Tune's own state on object storage: isa.storage's S3
    return tune.Tuner(
        _trainable(plan),
        param_space=space,
        tune_config=tune.TuneConfig(
            search_alg=search,
            max_concurrent_trials=limit,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_folder,
            **options,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            callbacks=[ReleasePlacementGroups(plan.folder)],
        ),
    )


def start(plan: Plan, parent_params: Mapping[str, Any] | None = None) -> Outcome:
    """Open the MLflow parent run, store the plan, run every trial, record the results."""
    name = posixpath.basename(plan.folder)
    tags = {"isa.stage": plan.kind, "isa.sweep": plan.folder, **({"isa.suite": plan.suite} if plan.suite else {})}
    params = {**{k: v for k, v in flatten(plan.config).items() if k.startswith("tune.")}, **(parent_params or {})}
    parent = tracking.start_parent(plan.tracking_uri, plan.config.train.experiment, name, tags, params)
    plan = dataclasses.replace(plan, parent_run_id=parent)
    fs, path = filesystem(plan.folder)
    write_bytes(fs, posixpath.join(path, SWEEP_FILE), plan.to_json().encode())
    tracking.log_dict(plan.tracking_uri, parent, json.loads(plan.to_json()), SWEEP_FILE)
    return _run(plan, restore=False)


def load_plan(folder: str) -> Plan:
    """The plan stored in a sweep folder.

    Raises:
        SweepError: the folder holds no sweep.
    """
    folder = folder.rstrip("/")
    if "://" not in folder:
        folder = str(Path(folder).resolve())
    fs, path = filesystem(folder)
    try:
        return Plan.from_json(fs.cat_file(posixpath.join(path, SWEEP_FILE)).decode(), folder)
    except FileNotFoundError:
        raise SweepError(f"{folder} is not a sweep folder (no {SWEEP_FILE}): nothing to resume") from None


def resume(folder: str, kind: str = "sweep") -> Outcome:
    """Continue an interrupted sweep (or suite, ``kind="ablation"``): finished trials stay, unfinished ones go on.

    Raises:
        SweepError: the folder holds no sweep, or one of the other kind.
    """
    plan = load_plan(folder)
    if plan.kind != kind:
        again = f"run isa ablate --suite {plan.suite} again" if plan.kind == "ablation" else "use isa tune --resume"
        raise SweepError(f"{plan.folder} holds an {plan.kind} run, not a {kind}: {again} to continue it")
    if plan.parent_run_id:
        tracking.reopen(plan.tracking_uri, plan.parent_run_id)
    return _run(plan, restore=True)


def _run(plan: Plan, restore: bool) -> Outcome:
    """Fit (or restore and fit), record the trials; a sweep's parent run ends here, a suite's after its evaluation."""
    from ray import tune

    path, fs = ray_storage(plan.folder)
    try:
        if restore and tune.Tuner.can_restore(path, storage_filesystem=fs):
            tuner = tune.Tuner.restore(path, trainable=_trainable(plan), resume_errored=True, storage_filesystem=fs)
        else:  # a new sweep, or one stopped before Tune wrote its first state
            tuner = _tuner(plan)
        results = tuner.fit()
        release(plan.folder, [posixpath.basename(str(r.path).rstrip("/")) for r in results])
        outcome = _outcome(plan, results)
    except BaseException as error:
        if plan.parent_run_id:
            tracking.end(plan.tracking_uri, plan.parent_run_id, "FAILED" if isinstance(error, Exception) else "KILLED")
        raise
    if plan.parent_run_id and plan.kind == "sweep":
        tracking.end(plan.tracking_uri, plan.parent_run_id)
    return outcome


def _outcome(plan: Plan, results: Any) -> Outcome:
    """Records of every trial; child runs closed; the best trial (sweeps) logged on the parent."""
    runs = tracking.children(plan.tracking_uri, plan.parent_run_id) if plan.parent_run_id else {}
    trials = []
    for result in results:
        trial = _record(plan, result, runs)
        trials.append(trial)
        if trial.run_id:
            checkpoint = (result.metrics or {}).get("checkpoint_path")  # a path within Ray's storage filesystem
            if checkpoint:  # the same folder as a URI: its name in the trial's train run
                checkpoint = posixpath.join(trial.run_dir, posixpath.basename(str(checkpoint).rstrip("/")))
            tracking.close_child(plan.tracking_uri, runs[trial.trial_id], trial.status, trial.metrics, checkpoint)
    trials.sort(key=lambda t: t.trial_id)
    best = best_trial(plan.config, trials) if plan.kind == "sweep" else None
    if plan.parent_run_id:
        uri, parent = plan.tracking_uri, plan.parent_run_id
        if best is not None:
            config = to_dict(from_dict(nested(best.overrides), base=plan.config))
            tracking.log_best(uri, parent, best.trial_id, best.run_id, best.metrics, config)
        tracking.log_dict(uri, parent, [dataclasses.asdict(t) for t in trials], "trials.json")
    return Outcome(plan, trials, best)


def _record(plan: Plan, result: Any, runs: Mapping[str, Any]) -> TrialRecord:
    """A trial's record from its Tune result and its MLflow child run."""
    trial_id = posixpath.basename(str(result.path).rstrip("/"))
    run = runs.get(trial_id)
    status = "failed" if result.error else "completed"
    if status == "completed" and run is not None and run.info.status != "FINISHED":
        status = "stopped early"  # the train stage finishes its run at its last step; this one never got there
    wanted = {*train_metrics.ALL, *TUNE_METRICS}
    row = (result.config or {}).get(ROW_KEY)
    return TrialRecord(
        trial_id=trial_id,
        name=str(row) if row is not None else trial_id,
        status=status,
        overrides=flatten_nested(plan.rows[row] if row is not None else result.config or {}),
        metrics={k: v for k, v in tracking.numeric(result.metrics or {}).items() if k in wanted},
        run_dir=posixpath.join(plan.folder, trial_id, TRAIN_FOLDER),
        run_id=run.info.run_id if run is not None else None,
        error=str(result.error) if result.error else None,
    )


def flatten_nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (Tune's own keys such as ``row`` are left out)."""
    return {
        f"{section}.{key}": plain(value)
        for section, keys in values.items()
        if isinstance(keys, Mapping)
        for key, value in keys.items()
    }


def best_trial(config: Config, trials: list[TrialRecord]) -> TrialRecord | None:
    """The trial with the best last ``tune.metric`` (failed trials and non-finite values left out)."""
    metric, sign = config.tune.metric, 1 if config.tune.mode == "max" else -1
    scored = [t for t in trials if t.status != "failed" and math.isfinite(t.metrics.get(metric, math.nan))]
    return max(scored, key=lambda t: sign * t.metrics[metric], default=None)


def run(config: Config, space: Any) -> Outcome:
    """Check, then run a sweep; the parent run's params include the space as written."""
    plan = check(config, space)
    return start(plan, {f"space.{k}": json.dumps(v) for k, v in plan.space.items()})


def summary(outcome: Outcome) -> str:
    """Markdown: one line per trial (its swept values, status, reports, last metric), the best one marked."""
    metric = outcome.plan.config.tune.metric
    keys = sorted({k for t in outcome.trials for k in t.overrides})
    lines = [
        "| trial | " + " | ".join(keys) + f" | status | reports | {metric} |",
        "|---|" + "---|" * len(keys) + "---|---:|---:|",
    ]
    for t in outcome.trials:
        mark = " (best)" if outcome.best is not None and t.trial_id == outcome.best.trial_id else ""
        value = t.metrics.get(metric)
        cells = [str(t.overrides.get(k, "")) for k in keys]
        cells += [t.status + mark, str(int(t.metrics.get("training_iteration", 0)))]
        cells.append("–" if value is None else f"{value:.4g}")
        lines.append(f"| {t.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """``isa tune``'s arguments."""
    parser = config_parser(
        "isa tune",
        "Sweep hyperparameters of isa train with Ray Tune (ASHA, MLflow). --config takes a sweep file: any config "
        "sections, tune: (metric, mode, search, scheduler, ...) and space: (dotted key: {grid|choice|uniform|"
        "loguniform|randint: [...]}).",
    )
    parser.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR (finished trials stay)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.resume and (args.config or args.overrides):
        raise SweepError("--resume continues a sweep with its own settings; drop --config/overrides")
    if args.resume:
        load_plan(args.resume)  # a folder that holds no sweep is refused before Ray starts
        init_ray()
        outcome = resume(args.resume)
    else:
        config, space = load_sweep_file(args.config, args.overrides)
        check_start(config, space)
        init_ray()
        outcome = run(config, space)
    print(summary(outcome))
    if outcome.best is not None:
        print(f"best trial: {outcome.best.trial_id} · {outcome.best.overrides} · config in MLflow best_config.json")
    print(f"sweep folder: {outcome.plan.folder} (isa tune --resume {outcome.plan.folder} continues it)")
    uri = outcome.plan.tracking_uri
    print(f"MLflow: parent run {outcome.plan.parent_run_id} in {uri}; see it with: {ui_command(uri)}")
    return 0
