"""``pipelines.tracking``: where each stage's MLflow records go, and the shared logging rules, on real stores."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from isa.config import Config
from isa.errors import IsaError
from pipelines import tracking


def test_tracking_uri_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri("http://mlflow:5000", str(tmp_path)) == "http://mlflow:5000"
    assert tracking.tracking_uri(None, str(tmp_path / "run")) == f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db"
    assert tracking.tracking_uri(None, None) is None  # a stage tracked only when told where (isa eval)
    with pytest.raises(IsaError, match="s3://bucket/run is not a local folder"):
        tracking.tracking_uri(None, "s3://bucket/run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.tracking_uri(None, "s3://bucket/run") == "http://env:5000"
    assert tracking.tracking_uri("", None) == "http://env:5000"
    assert tracking.tracking_uri("sqlite:///x.db", None) == "sqlite:///x.db"


def test_runs_params_and_the_rank_zero_tracker(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    first = tracking.start_run(client, "isa-test", "a", {"k": "v"})
    second = tracking.start_run(client, "isa-test", "b")
    experiment = client.get_experiment_by_name("isa-test")
    assert {client.get_run(r).info.experiment_id for r in (first, second)} == {experiment.experiment_id}
    params = {f"p{i:03d}": i for i in range(250)} | {"long": "x" * 900, "none": None}
    tracking.log_params(client, first, params)  # more than one batch of 100
    logged = client.get_run(first).data.params
    assert len(logged) == 252 and logged["p249"] == "249" and logged["none"] == "None"
    assert logged["long"] == "x" * tracking.PARAM_LENGTH
    assert client.get_run(first).data.tags["k"] == "v"

    assert tracking.RankZeroTracker(False, uri, "isa-test", "rank1", None).run_id is None  # other ranks: nothing
    tracker = tracking.RankZeroTracker(True, uri, "isa-test", "train", None, {"t": "1"})
    tracker.params({"a": 1})
    tracker.metrics({"loss": 2.5}, step=10)
    tracker.metrics({"loss": 1.5}, step=20)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    alias = Config().train.model_alias  # the default alias is one MLflow accepts
    tracker.finish(folder, {"config": {}}, "isa-student", alias)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train" and run.data.tags["t"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(10, 2.5), (20, 1.5)]
    assert {f.path for f in client.list_artifacts(tracker.run_id)} == {"checkpoint", "config.json"}
    version = client.get_model_version_by_alias("isa-student", alias)
    assert version.run_id == tracker.run_id and version.source.endswith("/checkpoint")

    again = tracking.RankZeroTracker(True, uri, "isa-test", "ignored", tracker.run_id)  # a resumed run
    assert again.run_id == tracker.run_id and client.get_run(tracker.run_id).info.status == "RUNNING"
    assert mlflow.active_run() is None  # no fluent state left behind
