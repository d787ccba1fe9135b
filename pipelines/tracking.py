"""MLflow, the project's rules in one place: where records go, which experiment, how parameters are logged, how
a run ends, what a training run's model artifact holds, and the rank-0 logger of a training run.

Every stage talks to MLflow through ``MlflowClient`` with an explicit run id (no active-run state), so a stage
can record into a run another process opened (``isa tune``'s parent runs, ``eval.run_id``). mlflow is imported
inside the functions: drivers that only decide where records go stay light.

Where records go by default: one SQLite store per output tree, its artifacts beside it. A training run records
into ``mlflow.db`` in the run folder's parent (Ray Train's storage folder, which holds the sibling runs), a sweep
or suite into its sweep folder, ``isa eval`` into its first checkpoint's training store (else its output
folder); each experiment such a stage creates keeps its artifacts in ``mlartifacts/EXPERIMENT`` beside the
store, never in a process's working directory. ``mlflow ui --backend-store-uri sqlite:///.../mlflow.db`` opens
it all (:func:`ui_command`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isa.errors import IsaError

PARAMS_PER_CALL = 100  # MLflow takes at most 100 parameters in one batch
PARAM_LENGTH = 500  # characters of a parameter value kept
STORE_FILE = "mlflow.db"  # the default store: SQLite, in the stage's store folder
ARTIFACTS_FOLDER = "mlartifacts"  # beside a SQLite store: one folder of artifacts per experiment
MODEL_ARTIFACT = "model"  # a training run's model: the final checkpoint's weights and config, no optimizer
RUN_DIR_TAG = "isa.run_dir"  # on a training run: its run folder, so the driver can end a run its workers could not
TRAINING_RUN_TAG = "isa.training_run_id"  # on an eval run: the training run of its first checkpoint


def tracking_uri(explicit: str | None, folder: str | None) -> str | None:
    """Where a stage's records go: ``explicit``, else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in ``folder``; a
    SQLite path is made absolute from this process's working folder (Ray's workers run in another).

    Args:
        explicit: the stage's own setting (``train.tracking_uri``, ``eval.tracking_uri``).
        folder: the local folder whose ``mlflow.db`` is the stage's default store (:func:`store_folder` for a
            training run, the sweep folder for ``isa tune``); None: no default (the result is then None).

    Raises:
        IsaError: ``folder`` is remote (an object store cannot hold a SQLite file) and nothing else is set.
    """
    if explicit:
        return absolute(explicit)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute(os.environ["MLFLOW_TRACKING_URI"])
    if folder is None:
        return None
    if "://" in folder:
        raise IsaError(f"set train.tracking_uri or MLFLOW_TRACKING_URI: {folder} is not a local folder for mlflow.db")
    return f"sqlite:///{Path(folder).resolve() / STORE_FILE}"


def store_folder(run_dir: str) -> str:
    """The folder whose ``mlflow.db`` records a training run by default: the run folder's parent, the storage
    folder Ray Train keeps the run in beside its sibling runs (``runs/a`` -> ``runs``, ``a`` -> ``.``)."""
    return posixpath.dirname(run_dir.rstrip("/")) or "."


def sqlite_file(uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///PATH`` store (a relative PATH from the working directory); None for any
    other store."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?")[0]
    return None if not path or path == ":memory:" else Path(path).resolve()


def absolute(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute (any other store as it is)."""
    database = sqlite_file(uri)
    if database is None or uri.startswith("sqlite:////"):
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{database}" + (f"?{query}" if query else "")


def artifact_location(uri: str | None, experiment: str) -> str | None:
    """Where a new experiment in the store ``uri`` keeps its artifacts: ``mlartifacts/EXPERIMENT`` beside a SQLite
    store (an absolute file URI); None where the store or server decides (a tracking server, a file store, which
    keeps them inside itself)."""
    database = sqlite_file(uri)
    if database is None:
        return None
    name = re.sub(r"[^\w.-]+", "_", experiment).strip("._") or "experiment"
    return (database.parent / ARTIFACTS_FOLDER / name).as_uri()


def ui_command(uri: str) -> str:
    """The one command that shows a store's records: ``mlflow ui`` on a local store, the server's own address."""
    from isa.storage import redact_uri

    if uri.startswith(("http://", "https://")):
        return f"open {redact_uri(uri)} (the MLflow server)"
    return f"mlflow ui --backend-store-uri {shlex.quote(redact_uri(uri))}"


def client(uri: str | None) -> Any:
    """An ``MlflowClient`` for the tracking URI."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(mlflow: Any, name: str) -> str:
    """The id of the experiment called ``name``; a new one keeps its artifacts at :func:`artifact_location` (an
    existing one is used as it is, wherever its artifacts go)."""
    import mlflow as mlflow_module

    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(mlflow.tracking_uri, name))
    except mlflow_module.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":  # another process made it first
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


def start_run(mlflow: Any, experiment: str, name: str, tags: Mapping[str, str] | None = None) -> str:
    """A new run in the experiment called ``experiment``; returns its id."""
    from isa.storage import redact_strings

    tags = redact_strings(dict(tags or {}))  # a run folder's URI as every record keeps it
    return mlflow.create_run(experiment_id(mlflow, experiment), run_name=name, tags=tags).info.run_id


def log_params(mlflow: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Parameters as text (at most :data:`PARAM_LENGTH` characters each), in batches MLflow accepts."""
    from mlflow.entities import Param

    items = [Param(key, str(value)[:PARAM_LENGTH]) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_CALL):
        mlflow.log_batch(run_id, params=items[start : start + PARAMS_PER_CALL])


@contextmanager
def ending(mlflow: Any, run_id: str) -> Iterator[None]:
    """End the run when the block does: FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM (Ray's driver
    turns SIGTERM into ``SystemExit``)."""
    try:
        yield
    except Exception:
        mlflow.set_terminated(run_id, "FAILED")
        raise
    except BaseException:
        mlflow.set_terminated(run_id, "KILLED")
        raise
    mlflow.set_terminated(run_id, "FINISHED")


def end_open_runs(uri: str, experiment: str, tags: Mapping[str, str], status: str) -> list[str]:
    """End every run still RUNNING in ``experiment`` that carries all of ``tags`` (a training run whose workers
    died before they could end it); returns their ids."""
    mlflow = client(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    from isa.storage import redact_uri

    conditions = [f"tags.`{key}` = '{redact_uri(value)}'" for key, value in tags.items()]
    conditions.append("attributes.status = 'RUNNING'")
    query = " and ".join(conditions)
    runs = mlflow.search_runs([found.experiment_id], filter_string=query, max_results=1000)
    for run in runs:
        mlflow.set_terminated(run.info.run_id, status)
    return [run.info.run_id for run in runs]


def log_model(mlflow: Any, run_id: str, checkpoint_dir: str | os.PathLike) -> str:
    """A local checkpoint folder's model (:func:`isa.checkpoint_files.write_model`: weights, config, a state without
    the optimizer, schedule and RNG) as the run's ``model`` artifact; returns the artifact's URI.

    A plain folder, not an MLflow flavour (``mlflow.pytorch`` would pickle the module): the project's own
    :func:`isa.checkpoint.load_checkpoint` reads it once downloaded.
    """
    from isa.checkpoint_files import write_model

    with tempfile.TemporaryDirectory() as folder:
        model = write_model(checkpoint_dir, Path(folder) / MODEL_ARTIFACT)
        mlflow.log_artifacts(run_id, str(model), artifact_path=MODEL_ARTIFACT)
    return f"{mlflow.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"


@dataclass(frozen=True)
class TrainingRecord:
    """Where the training run of a checkpoint recorded: its store (None: not found) and its run id."""

    uri: str | None
    run_id: str | None


def training_record(checkpoint: str) -> TrainingRecord:
    """The MLflow store and run of the training run that wrote ``checkpoint`` (a checkpoint or run folder, any
    fsspec URI): the store its config names (``train.tracking_uri``), else ``mlflow.db`` in its run folder's parent;
    a SQLite store counts only where its file exists here. Nothing found: ``TrainingRecord(None, None)``.
    """
    from isa.checkpoint_files import STATE_FILE, CheckpointError, saved_checkpoint
    from isa.storage import filesystem

    try:
        folder, saved = saved_checkpoint(checkpoint)
        fs, path = filesystem(folder)
        state = json.loads(fs.cat_file(posixpath.join(path, STATE_FILE)))
    except (CheckpointError, OSError, ValueError):
        return TrainingRecord(None, None)
    run_id = state.get("mlflow_run_id") if isinstance(state, dict) else None
    uri = (saved["config"].get("train") or {}).get("tracking_uri")
    parent = posixpath.dirname(folder.rstrip("/"))  # a run's checkpoint: RUN_DIR/checkpoint_*/isa
    if not uri and posixpath.basename(parent).startswith("checkpoint_") and "://" not in folder:
        uri = tracking_uri(None, store_folder(posixpath.dirname(parent)))
    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        uri = None
    return TrainingRecord(uri, run_id if uri else None)


def eval_tracking(explicit: str | None, checkpoints: list[str] | tuple[str, ...], output: str) -> TrainingRecord:
    """Where ``isa eval`` records (``uri`` None: not tracked) and the training run its first checkpoint came from.

    ``eval.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the first checkpoint's training store
    (:func:`training_record`), else ``mlflow.db`` in a local ``eval.output``. A remote output with nothing else
    set is not tracked: the metrics and report still go to the output.
    """
    found = training_record(checkpoints[0]) if checkpoints else TrainingRecord(None, None)
    uri = tracking_uri(explicit, None) or found.uri
    if uri and "***@" in uri:  # a store saved without its secret (isa.storage.redact_uri): the user names it
        raise IsaError(
            f"the training run of {checkpoints[0]} recorded to {uri}, saved without its password: "
            "set eval.tracking_uri or MLFLOW_TRACKING_URI"
        )
    if uri is None and "://" not in output:
        uri = tracking_uri(None, output)
    return TrainingRecord(uri, found.run_id)


class RankZeroTracker:
    """A training run's MLflow run, written by rank 0 only; every call is a no-op on the other ranks.

    Args:
        enabled: whether this process records (rank 0).
        uri: the tracking URI.
        experiment: the experiment's name.
        run_name: the name of a new run.
        run_id: the run to continue (a resumed training run), None for a new one.
        tags: tags of a new run (``isa tune`` nests trial runs under its parent with ``mlflow.parentRunId``).
    """

    def __init__(
        self,
        enabled: bool,
        uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None,
        tags: Mapping[str, str] | None = None,
    ):
        self.enabled = enabled
        self.run_id = run_id
        if not enabled:
            return
        self.mlflow = client(uri)
        if run_id is None:
            self.run_id = start_run(self.mlflow, experiment, run_name, tags)
        else:
            self.mlflow.update_run(run_id, status="RUNNING")

    def params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            log_params(self.mlflow, self.run_id, params)

    def metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            from mlflow.entities import Metric

            at = _now_ms()
            self.mlflow.log_batch(self.run_id, metrics=[Metric(k, float(v), at, step) for k, v in metrics.items()])

    def finish(self, checkpoint_dir: Path, config: dict, model_name: str | None, alias: str) -> None:
        """The final checkpoint's model (:func:`log_model`) and the config as artifacts; optionally a registered
        model version, whose source is that model artifact, with an alias."""
        if not self.enabled:
            return
        source = log_model(self.mlflow, self.run_id, checkpoint_dir)
        self.mlflow.log_dict(self.run_id, config, "config.json")
        if model_name:
            import mlflow

            try:
                self.mlflow.create_registered_model(model_name)
            except mlflow.exceptions.MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = self.mlflow.create_model_version(model_name, source=source, run_id=self.run_id)
            self.mlflow.set_registered_model_alias(model_name, alias, version.version)
        self.mlflow.set_terminated(self.run_id)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
