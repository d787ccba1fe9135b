"""``pipelines.tracking``: where each stage's MLflow records go, and the shared logging rules, on real stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from _cluster import command_line, session_processes
from _mlflow_server import job_runner
from _ports import free_port
from peak_memory import pss_bytes

from isa.checkpoint import capture_rng_state, load_checkpoint, save_checkpoint
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
    monkeypatch.chdir(tmp_path)  # a relative SQLite path, absolute for the Ray workers, which run elsewhere
    assert tracking.tracking_uri("sqlite:///x.db", None) == f"sqlite:///{tmp_path.resolve()}/x.db"
    assert tracking.tracking_uri("sqlite:////abs/x.db", None) == "sqlite:////abs/x.db"


def _checkpoint(folder: Path, run_id: str | None = None, tracking_uri: str | None = None) -> Path:
    """A small checkpoint folder in the training stage's format: weights, optimizer state, config, state."""
    weights = {"student.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "logit_scale": torch.ones(())}
    config = {"config": {"train": {"tracking_uri": tracking_uri}}, "teacher": {"name": "isa-tiny-ViT"}}
    state = {"step": 7, "rng": capture_rng_state(), **({"mlflow_run_id": run_id} if run_id else {})}
    optimizer = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(1000)}}, "param_groups": []}, "scheduler": {}}
    return save_checkpoint(folder, config=config, weights=weights, state=state, optimizer=optimizer)


def test_store_folder_artifact_location_and_ui_command(tmp_path, monkeypatch):
    assert tracking.store_folder("runs/a") == tracking.store_folder("runs/a/") == "runs"
    assert tracking.store_folder("a") == "." and tracking.store_folder("s3://bucket/runs/a") == "s3://bucket/runs"
    monkeypatch.chdir(tmp_path)
    assert tracking.sqlite_file("sqlite:///runs/mlflow.db") == tmp_path / "runs" / "mlflow.db"  # from the cwd
    assert tracking.sqlite_file(f"sqlite:///{tmp_path}/x.db") == tmp_path / "x.db"
    assert tracking.sqlite_file("http://mlflow:5000") is None and tracking.sqlite_file(None) is None
    location = tracking.artifact_location(f"sqlite:///{tmp_path}/runs/mlflow.db", "isa eval/2")
    assert location == (tmp_path / "runs" / "mlartifacts" / "isa_eval_2").as_uri()
    assert tracking.artifact_location("http://mlflow:5000", "isa") is None  # the server decides
    assert (
        tracking.ui_command("sqlite:////a b/mlflow.db")
        == f"{tracking.LOCAL_UI} --backend-store-uri 'sqlite:////a b/mlflow.db'"
    )
    assert tracking.ui_command("http://mlflow:5000") == "open http://mlflow:5000 (the MLflow server)"


def test_the_printed_ui_command_shows_the_store_in_one_lean_server(tmp_path):
    """The command a stage prints, run in a shell as a user would (on a free port), answers with the store's
    experiments from one server process and its one worker: no MLflow job runner, well under the 2.3 GB that
    ``mlflow ui``'s defaults take (memory: PSS, shared pages counted once)."""
    store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    mlflow.MlflowClient(tracking_uri=store).create_experiment("isa-shown")
    port = free_port()
    command = f"{tracking.ui_command(store)} --host 127.0.0.1 --port {port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # mlflow beside isa, as for a user
    shell = subprocess.Popen(["bash", "-c", command], env=env, start_new_session=True, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline, names = time.monotonic() + 180, None
        while names is None:
            assert shell.poll() is None and time.monotonic() < deadline, "the UI did not start"
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
                with urllib.request.urlopen(url, timeout=5) as response:
                    names = {e["name"] for e in json.loads(response.read())["experiments"]}
            except OSError:
                time.sleep(0.3)
        assert "isa-shown" in names
        processes = [p for p in session_processes(shell.pid) if not command_line(p).startswith("bash ")]
        assert len(processes) == 2, [command_line(p) for p in processes]  # mlflow ui and its uvicorn worker
        assert not job_runner(processes)
        assert sum(pss_bytes(p) for p in processes) < 2**30
    finally:
        os.killpg(shell.pid, signal.SIGTERM)
        shell.wait(timeout=30)


def test_experiments_keep_their_artifacts_beside_the_store_not_in_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    uri = "sqlite:///runs/mlflow.db"  # relative to the working directory, as a user may write it
    (work / "runs").mkdir()
    client = tracking.client(uri)
    run_id = tracking.start_run(client, "isa", "a")
    client.log_dict(run_id, {"k": 1}, "x.json")
    expected = work / "runs" / "mlartifacts" / "isa"
    assert client.get_experiment_by_name("isa").artifact_location == expected.as_uri()
    assert (expected / run_id / "artifacts" / "x.json").is_file()
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)  # an existing experiment keeps its location, from wherever the run is made
    later = tracking.start_run(tracking.client(f"sqlite:///{work / 'runs' / 'mlflow.db'}"), "isa", "b")
    assert client.get_run(later).info.artifact_uri == f"{expected.as_uri()}/{later}/artifacts"
    assert sorted(p.name for p in work.iterdir()) == ["runs"] and not list(other.iterdir())  # no mlruns/


def test_runs_end_finished_failed_or_killed(tmp_path):
    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {}
    for name, error in [("ok", None), ("failed", ValueError("bad input")), ("killed", KeyboardInterrupt())]:
        runs[name] = tracking.start_run(client, "isa-test", name)
        try:
            with tracking.ending(client, runs[name]):
                if error is not None:
                    raise error
        except (ValueError, KeyboardInterrupt) as raised:
            assert raised is error  # the block's own error goes on
    statuses = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert statuses == {"ok": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
    # a training run its workers left open is ended by the driver, found by its run folder's tag
    mine = tracking.start_run(client, "isa-test", "a", {tracking.RUN_DIR_TAG: "/runs/a"})
    sibling = tracking.start_run(client, "isa-test", "b", {tracking.RUN_DIR_TAG: "/runs/b"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.end_open_runs(uri, "isa-test", {tracking.RUN_DIR_TAG: "/runs/a"}, "FAILED") == [mine]
    assert client.get_run(mine).info.status == "FAILED" and client.get_run(sibling).info.status == "RUNNING"
    assert tracking.end_open_runs(uri, "no-such-experiment", {tracking.RUN_DIR_TAG: "/runs/a"}, "FAILED") == []


def test_eval_records_into_the_training_store_else_its_output(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    checkpoint = _checkpoint(runs / "a" / "checkpoint_000007" / "isa", run_id="abc")
    output = str(tmp_path / "eval")
    # no store beside the run yet: the eval output's own store, no training run to link
    assert tracking.eval_tracking(None, [str(runs / "a")], output) == tracking.TrainingRecord(
        f"sqlite:///{tmp_path / 'eval' / 'mlflow.db'}", None
    )
    tracking.client(f"sqlite:///{runs / 'mlflow.db'}").search_experiments()  # the training run's store exists
    beside = tracking.TrainingRecord(f"sqlite:///{runs / 'mlflow.db'}", "abc")
    assert tracking.eval_tracking(None, [str(runs / "a")], output) == beside  # a run folder
    assert tracking.eval_tracking(None, [str(checkpoint), "other"], output) == beside  # its checkpoint folder
    assert tracking.eval_tracking("http://mlflow:5000", [str(checkpoint)], output).uri == "http://mlflow:5000"
    assert tracking.eval_tracking(None, [], output).uri == f"sqlite:///{tmp_path / 'eval' / 'mlflow.db'}"
    assert tracking.eval_tracking(None, [], "s3://bucket/eval").uri is None  # not tracked: nowhere to keep it
    assert tracking.eval_tracking(None, [str(tmp_path / "none")], output).run_id is None
    # a sweep's trial names its store in its config (the sweep folder's), wherever its run folder is
    sweep = tmp_path / "sweep"
    trial = _checkpoint(sweep / "t1" / "train" / "checkpoint_000001" / "isa", "def", f"sqlite:///{sweep}/mlflow.db")
    tracking.client(f"sqlite:///{sweep / 'mlflow.db'}").search_experiments()
    assert tracking.eval_tracking(None, [str(trial)], output) == tracking.TrainingRecord(
        f"sqlite:///{sweep}/mlflow.db", "def"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.eval_tracking(None, [str(trial)], output).uri == "http://env:5000"


def test_runs_params_the_rank_zero_tracker_and_a_refused_record(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
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
    assert tracker.settle(30) == []  # MLflow took every record: a checkpoint keeps none
    folder = _checkpoint(tmp_path / "run" / "checkpoint_000007" / "isa", run_id=tracker.run_id)
    assert (folder / "optimizer.pt").is_file()
    alias = Config().train.model_alias  # the default alias is one MLflow accepts
    tracker.finish(folder, {"config": {}}, "isa-student", alias, wait_s=30, output=str(tmp_path / "run"))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train" and run.data.tags["t"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(10, 2.5), (20, 1.5)]
    assert {f.path for f in client.list_artifacts(tracker.run_id)} == {"model", "config.json"}
    # the model: weights, config and a state without optimizer or RNG, under the store's folder
    assert {f.path for f in client.list_artifacts(tracker.run_id, "model")} == {
        "model/config.json", "model/student.safetensors", "model/state.json"
    }  # fmt: skip
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts" / "isa-test").as_uri())
    version = client.get_model_version_by_alias("isa-student", alias)
    assert version.run_id == tracker.run_id and version.source == f"{run.info.artifact_uri}/model"
    downloaded = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "got"))
    model = load_checkpoint(downloaded)  # the project's own loader
    saved = load_checkpoint(folder)
    assert model.optimizer is None and saved.optimizer is not None
    assert model.weights.keys() == saved.weights.keys()
    assert all(torch.equal(model.weights[k], saved.weights[k]) for k in saved.weights)
    assert model.config == saved.config and "rng" not in model.state
    assert model.state["step"] == 7 and model.state["mlflow_run_id"] == tracker.run_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got", "mlartifacts", "mlflow.db", "run"]  # no mlruns/

    again = tracking.RankZeroTracker(True, uri, "isa-test", "ignored", tracker.run_id)  # a resumed run
    assert (
        again.settle(30) == []
        and again.run_id == tracker.run_id
        and client.get_run(tracker.run_id).info.status == "RUNNING"
    )
    assert mlflow.active_run() is None  # no fluent state left behind

    # a record the store turns away (a parameter again with another value): told once with MLflow's reason and
    # kept with the unsent records; the records after it still go
    capsys.readouterr()
    outbox = tracking.Outbox(uri, first, "isa train")
    outbox.params({"p001": "another"})
    outbox.metrics({"loss": 1.0}, step=10)
    assert outbox.wait(60)
    left = outbox.close(0, str(tmp_path / "refused"))
    assert [(record["op"], record["params"]) for record in left] == [("params", {"p001": "another"})]
    assert "Changing param values is not allowed" in left[0]["error"]
    err = capsys.readouterr().err
    assert "isa train: MLflow refused a record (params): " in err and "does not answer" not in err, err
    assert f"1 MLflow record(s) not sent to {uri} (params)" in err
    assert client.get_run(first).data.params["p001"] == "1"
    assert [m.step for m in client.get_metric_history(first, "loss")] == [10]


def test_the_outbox_keeps_records_while_the_mlflow_server_is_down_and_sends_them_when_it_answers(
    tmp_path, capsys, monkeypatch, mlflow_server_process
):
    """An :class:`~pipelines.tracking.Outbox` (``isa eval``'s records; rank 0's in ``isa train``) against a real
    ``mlflow server`` that is down, comes up, goes down again: the stage is told once per outage, every record
    arrives once, and what was not taken at the end is kept and sent later by the documented one-liner."""
    import subprocess
    import sys

    monkeypatch.setattr(tracking, "RETRY_S", (0.2, 1.0))  # sent again soon after the server is back
    server = mlflow_server_process
    server.stop()  # down from the first record
    try:
        outbox = tracking.Outbox(server.uri, None, "isa eval")
        outbox.create_run("isa-outbox-test", "eval-images-val", {tracking.TRAINING_RUN_TAG: "abc"})
        outbox.params({"eval.batch_size": 8})
        outbox.metrics({"loss": 2.0}, step=1)
        assert not outbox.wait(1) and outbox.down and outbox.run_id is None  # the caller was never held up
        server.start()
        outbox.metrics({"loss": 1.0}, step=2)
        assert outbox.wait(120) and not outbox.down and outbox.run_id is not None
        run_id = outbox.run_id
        err = capsys.readouterr().err
        assert err.count("does not answer") == 1 and err.count("answers again") == 1, err
        assert f"isa eval: MLflow at {server.uri} does not answer" in err and "isa eval goes on" in err

        server.stop()  # down at the end: the records left are kept in the output folder
        outbox.metrics({"loss": 0.5}, step=3)
        outbox.put({"op": "text", "file": "table.md", "text": "| a |\n", "artifact_path": "eval-images-val"})
        outbox.put({"op": "terminate", "status": "FINISHED"})
        left = outbox.close(0.5, str(tmp_path / "out"))
        assert [record["op"] for record in left] == ["metrics", "text", "terminate"]
        kept = tmp_path / "out" / tracking.UNSENT_FOLDER
        err = capsys.readouterr().err
        assert err.count("does not answer") == 1, err
        assert f"3 MLflow record(s) not sent to {server.uri} (metrics, terminate, text); kept in {kept}" in err
        assert f"send them with: python -m pipelines.tracking {kept}" in err
    finally:
        if server.process is None:
            server.start()
    command = [sys.executable, "-m", "pipelines.tracking", str(kept)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "sent 3 MLflow record(s)" in done.stdout, done.stderr
    assert not kept.exists()
    client = tracking.client(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TRAINING_RUN_TAG] == "abc"
    assert run.data.params == {"eval.batch_size": "8"}
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0), (3, 0.5)]  # each once
    assert [a.path for a in client.list_artifacts(run_id, "eval-images-val")] == ["eval-images-val/table.md"]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_server_that_never_answers_holds_up_no_caller_and_its_records_are_kept(tmp_path, capsys, monkeypatch):
    """A server that takes the connection and never answers (a hung MLflow): each request ends at the HTTP
    timeout (the environment's own ``MLFLOW_HTTP_REQUEST_TIMEOUT`` wins over the project's), the records wait,
    and at the end they are kept."""
    import socket
    import time

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # connections are taken by the kernel and never read
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        outbox = tracking.Outbox(uri, "0" * 32, "isa train")
        outbox.metrics({"loss": 1.0}, step=5)  # returns at once: the thread is the one that waits
        deadline = time.monotonic() + 60
        while not outbox.down and time.monotonic() < deadline:
            time.sleep(0.1)
        assert outbox.down and outbox.pending()[0]["step"] == 5
        left = outbox.close(0, str(tmp_path / "run"))
    assert [record["op"] for record in left] == ["metrics"]
    err = capsys.readouterr().err
    assert err.count("does not answer") == 1 and "timed out" in err, err
    kept = (tmp_path / "run" / tracking.UNSENT_FOLDER / tracking.UNSENT_RECORDS).read_text().splitlines()
    assert [json.loads(line) for line in kept] == [{"uri": uri, "run_id": "0" * 32}, left[0]]
