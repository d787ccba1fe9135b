"""MLflow for sweeps and suites: one parent run, one nested child run per trial.

The child runs are the train stage's own runs: each trial passes ``mlflow.parentRunId`` and its trial id to the
train stage, whose rank-0 tracker creates the run with those tags (params, per-report metrics, and at the end the
model: the final checkpoint's weights and config, without the optimizer). This module makes the parent, closes
children whose trial ASHA stopped (their train run never reached its end), and records the best trial on the
parent. Only ``MlflowClient`` calls: no active-run state.
"""

from __future__ import annotations

import math
import posixpath
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from isa.checkpoint_files import REQUIRED_FILES
from pipelines.tracking import MODEL_ARTIFACT, client, log_model, log_params, start_run

TRIAL_TAG = "isa.trial_id"  # on every child run: the Tune trial id
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
STATUS_TAG = "isa.tune.status"  # completed | stopped early | failed


def start_parent(uri: str, experiment: str, name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
    """A new parent run named ``name`` (the sweep folder's name); returns its id."""
    mlflow = client(uri)
    run_id = start_run(mlflow, experiment, name, tags)
    log_params(mlflow, run_id, params)
    return run_id


def reopen(uri: str, run_id: str) -> None:
    """Mark a parent run running again (a resumed sweep)."""
    client(uri).update_run(run_id, status="RUNNING")


def end(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status)


def log_dict(uri: str, run_id: str, value: Any, name: str) -> None:
    client(uri).log_dict(run_id, value, name)


def log_files(uri: str, run_id: str, paths: list[str], artifact_path: str | None = None) -> None:
    mlflow = client(uri)
    for path in paths:
        mlflow.log_artifact(run_id, path, artifact_path=artifact_path)


def children(uri: str, parent_run_id: str) -> dict[str, Any]:
    """The child runs of a parent by trial id (the newest one when a trial was restarted before its checkpoint)."""
    mlflow = client(uri)
    parent = mlflow.get_run(parent_run_id)
    runs = mlflow.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}'", max_results=10000
    )
    found: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        trial = run.data.tags.get(TRIAL_TAG)
        if trial:
            found[trial] = run
    return found


def discard_children(uri: str, parent_run_id: str, trial_id: str) -> None:
    """Delete a trial's child runs that hold no resumable progress (the trial restarts from scratch).

    A trial interrupted before its first checkpoint leaves an open run that its restart cannot continue; MLflow's
    delete is a soft delete (the run can be restored), and every trial keeps exactly one child run.
    """
    mlflow = client(uri)
    parent = mlflow.get_run(parent_run_id)
    query = f"tags.{PARENT_TAG} = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    for run in mlflow.search_runs([parent.info.experiment_id], filter_string=query):
        mlflow.delete_run(run.info.run_id)


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a Tune result (no strings, booleans, nested dicts, NaN)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def close_child(uri: str, run: Any, status: str, metrics: Mapping[str, float], checkpoint: str | None) -> None:
    """Record a trial's final metrics and status on its child run; close it when its train run did not finish.

    A trial stopped by ASHA (or failed) leaves its train run open (or ended by the trial's driver): its last
    checkpoint's model becomes the ``model`` artifact and the run ends as KILLED (stopped early) or FAILED.
    """
    mlflow = client(uri)
    run_id = run.info.run_id
    for key, value in metrics.items():
        mlflow.log_metric(run_id, f"final/{key}", value)
    mlflow.set_tag(run_id, STATUS_TAG, status)
    if run.info.status == "FINISHED":  # the train run reached its end: model and status are its own
        return
    if checkpoint and status != "failed" and not _has_model(mlflow, run_id):
        _log_model(mlflow, run_id, checkpoint)  # over a model whose upload the trial's stop cut short
    mlflow.set_terminated(run_id, "FAILED" if status == "failed" else "KILLED")


def _has_model(mlflow: Any, run_id: str) -> bool:
    """Whether the run's ``model`` artifact holds every file of a model (a trial stopped while its train run
    uploaded one leaves some of them)."""
    names = {posixpath.basename(artifact.path) for artifact in mlflow.list_artifacts(run_id, MODEL_ARTIFACT)}
    return set(REQUIRED_FILES) <= names


def _log_model(mlflow: Any, run_id: str, checkpoint: str) -> None:
    """The model of ``CHECKPOINT/isa`` (a Ray Train checkpoint folder, local or remote) as the ``model`` artifact."""
    from fsspec.implementations.local import LocalFileSystem

    from isa.storage import filesystem

    fs, path = filesystem(checkpoint.rstrip("/") + "/isa")
    if not fs.exists(path):
        return
    if isinstance(fs, LocalFileSystem):
        log_model(mlflow, run_id, path)
        return
    with tempfile.TemporaryDirectory() as folder:
        fs.get(path, str(Path(folder) / "isa"), recursive=True)
        log_model(mlflow, run_id, Path(folder) / "isa")


def log_best(uri: str, parent_run_id: str, trial_id: str, run_id: str | None, metrics: dict, config: dict) -> None:
    """The best trial on the parent: tags naming it, ``best/*`` metrics and its whole config as ``best_config.json``."""
    mlflow = client(uri)
    mlflow.set_tag(parent_run_id, "best_trial_id", trial_id)
    if run_id:
        mlflow.set_tag(parent_run_id, "best_run_id", run_id)
    for key, value in metrics.items():
        mlflow.log_metric(parent_run_id, f"best/{key}", value)
    mlflow.log_dict(parent_run_id, config, "best_config.json")
