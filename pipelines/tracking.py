"""MLflow, the project's rules in one place: where records go, which experiment, how parameters are logged, how
a run ends, what a training run's model artifact holds, and the rank-0 logger of a training run.

Every stage talks to MLflow through ``MlflowClient`` with an explicit run id (no active-run state), so a stage
can record into a run another process opened (``isa tune``'s parent runs, ``eval.run_id``). mlflow is imported
inside the functions: drivers that only decide where records go stay light.

Where records go by default: one SQLite store per output tree, its artifacts beside it. A training run records
into ``mlflow.db`` in the run folder's parent (Ray Train's storage folder, which holds the sibling runs), a sweep
or suite into its sweep folder, ``isa eval`` into its first checkpoint's training store (else its output
folder); each experiment such a stage creates keeps its artifacts in ``mlartifacts/EXPERIMENT`` beside the
store, never in a process's working directory. The command :func:`ui_command` prints (``mlflow ui`` on the
store, one lean server) opens it all.

``isa train`` (rank 0) and ``isa eval`` record through an :class:`Outbox`: a background thread sends the records
in order, so an MLflow server that is down or slow holds up and fails neither; what it has not taken by the
stage's end is kept in ``OUTPUT/mlflow-unsent`` for :func:`replay` (``python -m pipelines.tracking FOLDER``).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isa.errors import IsaError

PARAMS_PER_CALL = 100  # MLflow takes at most 100 parameters in one batch
METRICS_PER_CALL = 1000  # MLflow takes at most 1000 metrics in one batch
PARAM_LENGTH = 500  # characters of a parameter value kept
STORE_FILE = "mlflow.db"  # the default store: SQLite, in the stage's store folder
ARTIFACTS_FOLDER = "mlartifacts"  # beside a SQLite store: one folder of artifacts per experiment
MODEL_ARTIFACT = "model"  # a training run's model: the final checkpoint's weights and config, no optimizer
RUN_DIR_TAG = "isa.run_dir"  # on a training run: its run folder, so the driver can end a run its workers could not
TRAINING_RUN_TAG = "isa.training_run_id"  # on an eval run: the training run of its first checkpoint
UNSENT_FOLDER = "mlflow-unsent"  # in a stage's output: the records MLflow had not taken when the stage ended
UNSENT_RECORDS = "records.jsonl"  # in it: the store and run, then one record a line, in order
RETRY_S = (1.0, 10.0)  # an unanswered record is sent again after 1 s, then twice as long each time, at most 10 s
# MLflow's own retries of one HTTP request: its defaults (7 retries, backoff factor 2, 120 s timeout) hold a call
# for minutes and log a warning per retry; an Outbox sends a record again itself, on its own schedule (RETRY_S),
# and a driver's call fails in seconds. Set where unset, by client(): a user's own settings win.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


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


# ``mlflow ui`` for one person on a local store: one server process, without MLflow's job runner (isa submits no
# MLflow jobs). With mlflow's defaults the UI of a SQLite store is 15 processes and about 2.3 GB; this way 2 and
# about 0.4 GB (benchmarks/RESULTS.md).
LOCAL_UI = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1"


def ui_command(uri: str) -> str:
    """The one command that shows a store's records: :data:`LOCAL_UI` on a local store, the server's own address."""
    from isa.storage import redact_uri

    if uri.startswith(("http://", "https://")):
        return f"open {redact_uri(uri)} (the MLflow server)"
    return f"{LOCAL_UI} --backend-store-uri {shlex.quote(redact_uri(uri))}"


SUPPRESS_URL_PRINTING = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # MLflow's "View run at URI" line


def client(uri: str | None) -> Any:
    """An ``MlflowClient`` for the tracking URI, MLflow's HTTP retries bounded (:data:`HTTP_SETTINGS`); MLflow
    prints no run address where the URI holds a password (it would print it whole)."""
    import mlflow

    from isa.storage import redact_uri

    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    if uri and redact_uri(uri) != uri:
        os.environ[SUPPRESS_URL_PRINTING] = "true"
    return mlflow.MlflowClient(tracking_uri=uri)


def prepare_store(uri: str | None) -> None:
    """Make a SQLite store's tables now, in this process: a new store is otherwise made by whichever process
    records first, and two making it at once (a training worker's outbox and the driver ending its run) fail."""
    if sqlite_file(uri) is not None:
        client(uri).search_experiments(max_results=1)


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


class Outbox:
    """MLflow records of one run, sent in order by a background thread, so the stage never waits for MLflow.

    A record MLflow does not take (the server down, slow or failing) stays at the head of the queue and is sent
    again after :data:`RETRY_S`; the stage goes on, told once (on stderr) when MLflow stops answering and once
    when it answers again. A record MLflow refuses (a 4xx answer) is told, set aside and kept with the unsent
    ones. :meth:`close` waits a bounded time for the rest and keeps what is left in ``OUTPUT/mlflow-unsent``,
    which :func:`replay` (``python -m pipelines.tracking OUTPUT/mlflow-unsent``) sends later. Sending a record
    twice is harmless: a metric keeps its timestamp, a parameter its value.

    Args:
        uri: the tracking URI.
        run_id: the run to record into; None: a :meth:`create_run` record comes first.
        label: who speaks in the messages (``isa train``).
        records: records kept from an earlier process (a checkpoint's :meth:`pending`), sent first.
    """

    def __init__(self, uri: str, run_id: str | None, label: str, records: Iterable[dict] = ()):
        self.uri = uri
        self.run_id = run_id
        self.label = label
        self.down = False  # the last attempt failed: MLflow does not answer
        self._records: deque[dict] = deque(records)
        self._refused: list[dict] = []
        self._closed = False
        self._changed = threading.Condition()
        self._client: Any = None
        with contextlib.suppress(Exception):  # else the sender thread makes it, and says why it cannot
            # in the stage's thread: MLflow imports modules lazily, and one that two threads import at once can fail
            # half-initialized
            self._client = client(uri)
        self._thread = threading.Thread(target=self._send_all, name="isa-mlflow", daemon=True)
        self._thread.start()

    def put(self, record: dict) -> None:
        """Queue one record (:func:`send`'s kinds)."""
        with self._changed:
            self._records.append(record)
            self._changed.notify_all()

    def create_run(self, experiment: str, name: str, tags: Mapping[str, str] | None = None) -> None:
        self.put({"op": "create_run", "experiment": experiment, "name": name, "tags": dict(tags or {})})

    def params(self, params: Mapping[str, Any]) -> None:
        self.put({"op": "params", "params": {key: str(value)[:PARAM_LENGTH] for key, value in params.items()}})

    def metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        values = {key: float(value) for key, value in metrics.items()}
        self.put({"op": "metrics", "metrics": values, "step": step or 0, "timestamp": _now_ms()})

    def pending(self) -> list[dict]:
        """The records not taken yet, in order (the one being sent first)."""
        with self._changed:
            return [dict(record) for record in self._records]

    def wait(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for every record to be sent; whether they were."""
        deadline = time.monotonic() + seconds
        with self._changed:
            while self._records and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            return not self._records

    def close(self, wait_s: float, output: str | None) -> list[dict]:
        """Wait at most ``wait_s`` for the records; keep what is left (and what MLflow refused) in
        ``output/mlflow-unsent`` (None: nowhere) and say so; returns those records."""
        self.wait(wait_s)
        with self._changed:
            self._closed = True
            left = [*self._refused, *self._records]
            self._records.clear()
            self._changed.notify_all()
        if left and output is not None:
            folder = keep_unsent(output, self.uri, self.run_id, left)
            _say(
                f"{self.label}: {len(left)} MLflow record(s) not sent to {_shown(self.uri)} "
                f"({', '.join(sorted({r['op'] for r in left}))}); kept in {folder}; "
                f"send them with: python -m pipelines.tracking {shlex.quote(folder)}"
            )
        elif left:
            _say(f"{self.label}: {len(left)} MLflow record(s) not sent to {_shown(self.uri)}")
        return left

    def _send_all(self) -> None:
        mlflow, delay = self._client, RETRY_S[0]
        while True:
            with self._changed:
                while not self._records and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                record = self._records[0]
            try:
                mlflow = mlflow or client(self.uri)
                send(mlflow, record, self)
            except Exception as error:
                if refused(error):
                    self._set_aside(record, error)
                    continue
                if not self.down:
                    self.down = True
                    _say(
                        f"{self.label}: MLflow at {_shown(self.uri)} does not answer ({_reason(error)}); "
                        f"{self.label} goes on, its records are kept and sent when MLflow answers"
                    )
                with self._changed:
                    if not self._closed:
                        self._changed.wait(delay)
                delay = min(delay * 2, RETRY_S[1])
                continue
            with self._changed:
                if self._records and self._records[0] is record:
                    self._records.popleft()
                self._changed.notify_all()
                left = len(self._records)
            if self.down:
                self.down, delay = False, RETRY_S[0]
                _say(f"{self.label}: MLflow at {_shown(self.uri)} answers again; sending the {left} kept record(s)")

    def _set_aside(self, record: dict, error: Exception) -> None:
        _say(f"{self.label}: MLflow refused a record ({record['op']}): {_reason(error)}; it is kept with the unsent")
        with self._changed:
            if self._records and self._records[0] is record:
                self._records.popleft()
            self._refused.append({**record, "error": _reason(error)})
            self._changed.notify_all()


def send(mlflow: Any, record: dict, run: Any) -> None:
    """Send one record into ``run.run_id`` (``run``: an :class:`Outbox` or anything with a settable ``run_id``).

    Kinds (``op``): ``create_run`` (sets ``run.run_id``), ``resume_run``, ``params``, ``metrics``, ``model`` (a
    local model folder, as :func:`log_model` makes it), ``dict`` and ``text`` (an artifact file), ``register`` (a
    registered model version of the run's ``model`` and its alias), ``terminate``.
    """
    from mlflow.entities import Metric

    op = record["op"]
    if op == "create_run":
        run.run_id = start_run(mlflow, record["experiment"], record["name"], record["tags"])
    elif op == "resume_run":
        mlflow.update_run(run.run_id, status="RUNNING")
    elif op == "params":
        log_params(mlflow, run.run_id, record["params"])
    elif op == "metrics":
        at, step = record["timestamp"], record["step"]
        metrics = [Metric(key, value, at, step) for key, value in record["metrics"].items()]
        for start in range(0, len(metrics), METRICS_PER_CALL):
            mlflow.log_batch(run.run_id, metrics=metrics[start : start + METRICS_PER_CALL])
    elif op == "model":
        mlflow.log_artifacts(run.run_id, record["folder"], artifact_path=MODEL_ARTIFACT)
    elif op == "dict":
        mlflow.log_dict(run.run_id, record["value"], record["file"])
    elif op == "text":
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / record["file"]
            local.write_text(record["text"])
            mlflow.log_artifact(run.run_id, str(local), artifact_path=record.get("artifact_path"))
    elif op == "register":
        register(mlflow, run.run_id, record)
    elif op == "terminate":
        mlflow.set_terminated(run.run_id, record["status"])
    else:
        raise IsaError(f"unknown MLflow record {op!r}")


def register(mlflow: Any, run_id: str, record: dict) -> None:
    """A registered model version (``record['name']``) whose source is the run's ``model`` artifact, with the alias
    ``record['alias']``; the version made is kept in the record, so sending it again makes no second one."""
    import mlflow as mlflow_module

    if "version" not in record:
        try:
            mlflow.create_registered_model(record["name"])
        except mlflow_module.exceptions.MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{mlflow.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
        record["version"] = mlflow.create_model_version(record["name"], source=source, run_id=run_id).version
    mlflow.set_registered_model_alias(record["name"], record["alias"], record["version"])


def refused(error: Exception) -> bool:
    """Whether MLflow answered and refused (a 4xx answer: sending it again would not help); imports nothing, so it
    never fails itself (the sender thread asks it of any error)."""
    status = getattr(error, "get_http_status_code", None)  # MLflow's MlflowException
    return callable(status) and 400 <= status() < 500


def keep_unsent(output: str, uri: str, run_id: str | None, records: list[dict]) -> str:
    """Write ``records`` to ``output/mlflow-unsent`` (any fsspec URI): the store and run first, then a record a
    line; a model folder is copied beside them. Returns the folder."""
    from isa.storage import filesystem

    fs, root = filesystem(output)
    folder = posixpath.join(root, UNSENT_FOLDER)
    fs.makedirs(folder, exist_ok=True)
    lines = [json.dumps({"uri": _shown(uri), "run_id": run_id})]  # no secret saved: replay() is told it
    for index, record in enumerate(records):
        if record["op"] == "model":
            name = f"model-{index}"
            fs.put(str(record["folder"]).rstrip("/") + "/", posixpath.join(folder, name), recursive=True)
            record = {**record, "folder": name}
        lines.append(json.dumps(record))
    fs.pipe_file(posixpath.join(folder, UNSENT_RECORDS), ("\n".join(lines) + "\n").encode())
    return output.rstrip("/") + "/" + UNSENT_FOLDER if "://" in output else str(Path(root) / UNSENT_FOLDER)


def replay(folder: str, uri: str | None = None) -> int:
    """Send the records kept in ``folder`` (:func:`keep_unsent`) to their store, in order, then remove the folder;
    returns how many were sent. A failure leaves the folder as it was (it can be sent again).

    Args:
        folder: an ``mlflow-unsent`` folder (any fsspec URI).
        uri: the store; None: ``MLFLOW_TRACKING_URI``, else the one the folder names (saved with its secret hidden).

    Raises:
        IsaError: the store's secret is needed and not given.
    """
    from isa.storage import filesystem

    fs, root = filesystem(folder)
    header, *records = [json.loads(line) for line in fs.cat_file(posixpath.join(root, UNSENT_RECORDS)).splitlines()]
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or header["uri"]
    if "***@" in uri:
        raise IsaError(f"{uri} was saved without its secret: give the tracking URI, or set MLFLOW_TRACKING_URI")

    class Run:
        run_id = header["run_id"]

    mlflow = client(uri)
    with tempfile.TemporaryDirectory() as local:
        for record in records:
            record.pop("error", None)
            if record["op"] == "model":
                copy = Path(local) / record["folder"]
                fs.get(posixpath.join(root, record["folder"]) + "/", str(copy), recursive=True)
                record["folder"] = str(copy)
            send(mlflow, record, Run)
    fs.rm(root, recursive=True)
    return len(records)


class RankZeroTracker:
    """A training run's MLflow run, written by rank 0 only (an :class:`Outbox`: training never waits for MLflow
    nor fails for it); every call is a no-op on the other ranks.

    Args:
        enabled: whether this process records (rank 0).
        uri: the tracking URI.
        experiment: the experiment's name.
        run_name: the name of a new run.
        run_id: the run to continue (a resumed training run), None for a new one.
        tags: tags of a new run (``isa tune`` nests trial runs under its parent with ``mlflow.parentRunId``).
        kept: records a checkpoint kept unsent (:meth:`pending`), sent first; a new run they create is the run.
    """

    def __init__(
        self,
        enabled: bool,
        uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None,
        tags: Mapping[str, str] | None = None,
        kept: Iterable[dict] = (),
    ):
        self.enabled = enabled
        self._run_id = run_id
        if not enabled:
            return
        kept = list(kept)
        self.outbox = Outbox(uri, run_id, "isa train", kept)
        if run_id is not None:
            self.outbox.put({"op": "resume_run"})
        elif not any(record["op"] == "create_run" for record in kept):
            self.outbox.create_run(experiment, run_name, tags)

    @property
    def run_id(self) -> str | None:
        """The MLflow run (None: not created yet, MLflow has not answered)."""
        return self.outbox.run_id if self.enabled else self._run_id

    def params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            self.outbox.params(params)

    def metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            self.outbox.metrics(metrics, step)

    def settle(self, seconds: float) -> list[dict]:
        """Give MLflow at most ``seconds`` to take the queued records, unless it does not answer (no wait then);
        returns the records still pending (a checkpoint keeps them)."""
        if not self.enabled:
            return []
        if not self.outbox.down:
            self.outbox.wait(seconds)
        return self.outbox.pending()

    def finish(
        self, checkpoint_dir: Path, config: dict, model_name: str | None, alias: str, wait_s: float, output: str
    ) -> None:
        """The final checkpoint's model (:func:`isa.checkpoint_files.write_model`: no optimizer) and the config as
        artifacts, optionally a registered model version of that model with an alias, the run ended FINISHED;
        waits at most ``wait_s`` for MLflow and keeps what it did not take in ``output/mlflow-unsent``."""
        if not self.enabled:
            return
        from isa.checkpoint_files import write_model

        folder = tempfile.mkdtemp(prefix="isa-model-")
        model = write_model(checkpoint_dir, Path(folder) / MODEL_ARTIFACT)
        self.outbox.put({"op": "model", "folder": str(model)})
        self.outbox.put({"op": "dict", "value": config, "file": "config.json"})
        if model_name:
            self.outbox.put({"op": "register", "name": model_name, "alias": alias})
        self.outbox.put({"op": "terminate", "status": "FINISHED"})
        if not self.outbox.close(wait_s, output):
            shutil.rmtree(folder, ignore_errors=True)


class TrackingAccessError(IsaError):
    """The MLflow server turns this process's credentials away."""


ACCESS_CHECK_TIMEOUT_S = 10  # the one request check_access makes


def check_access(uri: str | None) -> None:
    """Refuse, before a stage starts, an MLflow server that answers this process's requests with 401 or 403.

    One request (search one experiment) with the credentials MLflow itself sends: ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` (a server behind MLflow's basic-auth app), or ``MLFLOW_TRACKING_TOKEN``. A server
    that does not answer is not refused here: records wait for it (:class:`Outbox`).

    Raises:
        TrackingAccessError: naming the server (without any password in its URI) and what to set.
    """
    if not uri or not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=ACCESS_CHECK_TIMEOUT_S,
            raise_on_status=False,
        )
    except Exception:  # noqa: BLE001 - unreachable or slow: the Outbox keeps the records until it answers
        return
    if response.status_code in (401, 403):
        given = "MLFLOW_TRACKING_USERNAME" in os.environ or "MLFLOW_TRACKING_TOKEN" in os.environ
        what = "refused the credentials given" if given else "asks for credentials and none were given"
        raise TrackingAccessError(
            f"MLflow server {_shown(uri)} {what} ({response.status_code}): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of that server"
        )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _shown(uri: str) -> str:
    """A URI as it is shown: its secret hidden."""
    from isa.storage import redact_uri

    return redact_uri(uri)


def _reason(error: Exception) -> str:
    """An error in one short line, secrets hidden."""
    text = _shown(" ".join(str(error).split())) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.tracking FOLDER [TRACKING_URI]``: send the records kept in FOLDER (:func:`replay`)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m pipelines.tracking OUTPUT/mlflow-unsent [TRACKING_URI]", file=sys.stderr)
        return 2
    try:
        sent = replay(args[0], args[1] if len(args) == 2 else None)
    except IsaError as error:
        print(f"python -m pipelines.tracking: error: {error}", file=sys.stderr)
        return 2
    print(f"sent {sent} MLflow record(s); {args[0]} removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
