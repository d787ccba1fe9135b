"""A stopped trial's child run: its last checkpoint's model, whole, whatever its train run uploaded before the stop."""

from __future__ import annotations

import json

import mlflow
import torch
from _students import save_student

from isa.checkpoint import load_checkpoint
from tune.tracking import close_child


def _run(client: mlflow.MlflowClient, tmp_path, name: str) -> str:
    experiment = client.get_experiment_by_name("trials") or client.get_experiment(
        client.create_experiment("trials", artifact_location=(tmp_path / "artifacts").as_uri())
    )
    return client.create_run(experiment.experiment_id, run_name=name).info.run_id


def test_a_model_upload_cut_short_by_the_stop_is_completed_and_a_whole_one_is_kept(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    checkpoint = tmp_path / "train" / "checkpoint_000001"
    save_student(checkpoint / "isa", seed=1, step=1)
    earlier = save_student(tmp_path / "earlier" / "isa", seed=2, step=0)

    # the train run had uploaded only state.json of its model when the trial was stopped
    cut = _run(client, tmp_path, "cut")
    client.log_artifact(cut, str(checkpoint / "isa" / "state.json"), artifact_path="model")
    # this one had uploaded a whole model (of an earlier checkpoint) before its trial was stopped
    whole = _run(client, tmp_path, "whole")
    client.log_artifacts(whole, str(earlier), artifact_path="model")

    for run_id in (cut, whole):
        close_child(uri, client.get_run(run_id), "stopped early", {"loss": 1.5}, str(checkpoint))
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.metrics["final/loss"] == 1.5
        names = {a.path for a in client.list_artifacts(run_id, "model")}
        assert {"model/config.json", "model/state.json", "model/student.safetensors"} <= names

    model = load_checkpoint(client.download_artifacts(cut, "model", str(tmp_path / "got-cut")))
    saved = load_checkpoint(checkpoint / "isa")
    assert model.state["step"] == 1 and model.optimizer is None
    assert all(torch.equal(model.weights[k], saved.weights[k]) for k in saved.weights)
    kept = json.loads((tmp_path / "artifacts").joinpath(whole, "artifacts", "model", "state.json").read_text())
    assert kept["step"] == 0  # the whole model uploaded before the stop stays
