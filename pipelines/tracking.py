"""MLflow, the project's rules in one place: where records go, which experiment, how parameters are logged, and
the rank-0 logger of a training run.

Every stage talks to MLflow through ``MlflowClient`` with an explicit run id (no active-run state), so a stage
can record into a run another process opened (``isa tune``'s parent runs, ``eval.run_id``). mlflow is imported
inside the functions: drivers that only decide where records go stay light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from isa.errors import IsaError

PARAMS_PER_CALL = 100  # MLflow takes at most 100 parameters in one batch
PARAM_LENGTH = 500  # characters of a parameter value kept


def tracking_uri(explicit: str | None, output: str | None) -> str | None:
    """Where a stage's records go: ``explicit``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in ``output``.

    Args:
        explicit: the stage's own setting (``train.tracking_uri``, ``eval.tracking_uri``).
        output: the stage's local output folder, whose ``mlflow.db`` is the default store; None for a stage that
            is not tracked unless told where (the result is then None).

    Raises:
        IsaError: ``output`` is remote (an object store cannot hold a SQLite file) and nothing else is set.
    """
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if output is None:
        return None
    if "://" in output:
        raise IsaError(f"set train.tracking_uri or MLFLOW_TRACKING_URI: the output {output} is not a local folder")
    return f"sqlite:///{Path(output).resolve() / 'mlflow.db'}"


def client(uri: str | None) -> Any:
    """An ``MlflowClient`` for the tracking URI."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(mlflow: Any, name: str) -> str:
    """The id of the experiment called ``name``, created when it does not exist yet."""
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow.create_experiment(name)


def start_run(mlflow: Any, experiment: str, name: str, tags: Mapping[str, str] | None = None) -> str:
    """A new run in the experiment called ``experiment``; returns its id."""
    return mlflow.create_run(experiment_id(mlflow, experiment), run_name=name, tags=dict(tags or {})).info.run_id


def log_params(mlflow: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Parameters as text (at most :data:`PARAM_LENGTH` characters each), in batches MLflow accepts."""
    from mlflow.entities import Param

    items = [Param(key, str(value)[:PARAM_LENGTH]) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_CALL):
        mlflow.log_batch(run_id, params=items[start : start + PARAMS_PER_CALL])


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
        """Final checkpoint and config as artifacts; optionally a registered model version with an alias."""
        if not self.enabled:
            return
        self.mlflow.log_artifacts(self.run_id, str(checkpoint_dir), artifact_path="checkpoint")
        self.mlflow.log_dict(self.run_id, config, "config.json")
        if model_name:  # the checkpoint folder is the model: a version whose source is that artifact
            import mlflow

            try:
                self.mlflow.create_registered_model(model_name)
            except mlflow.exceptions.MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{self.mlflow.get_run(self.run_id).info.artifact_uri}/checkpoint"
            version = self.mlflow.create_model_version(model_name, source=source, run_id=self.run_id)
            self.mlflow.set_registered_model_alias(model_name, alias, version.version)
        self.mlflow.set_terminated(self.run_id)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
