"""``isa tune`` on a real local Ray and a real MLflow server: ASHA, nesting, kill-and-resume, refused configs.

One 3-trial sweep serves the first two tests (a sweep on 2 CPU cores costs minutes): it starts as ``isa tune`` in a
subprocess, is SIGKILLed once Tune has recorded its first trial as finished, and is finished by
``isa tune --resume``. ASHA must stop the trial whose loss is built to be far worse (LAR weight 5 adds ~5 x 4.5 to
the loss the sweep minimizes). Its storage is ``s3://`` (as the shipped configs set it): the tests' S3 endpoint
holds Tune's own state, every trial's run and the sweep's files.
"""

from __future__ import annotations

import json
import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tune_helpers import tiny_config, write_yaml

from isa.storage import filesystem
from pipelines.cli import main as isa
from tune.cleanup import RECORDS
from tune.space import param_space as to_param_space
from tune.space import parse_space

GRID = [0.3, 0.1, 5.0]  # loss.lar_weight of trials 0, 1, 2 (Tune's grid order); the last is built to lose
STEPS = 2  # one report per step: ASHA's rung at report 1, max_t 2
MODEL = {"model/config.json", "model/state.json", "model/student.safetensors"}  # a trial's model artifact
BUCKET = "isa-sweeps"


def _s3(folder: str):
    """The sweep's S3 filesystem and the folder's path in it, with no listing remembered from earlier calls."""
    fs, path = filesystem(folder)
    fs.invalidate_cache()
    return fs, path


def _experiment_state(folder: str) -> dict[str, str]:
    """Trial id -> status in Tune's newest experiment state file (what ``Tuner.restore`` reads)."""
    fs, path = _s3(folder)
    files = sorted(fs.glob(posixpath.join(path, "experiment_state-*.json")))  # named by session start
    if not files:
        return {}
    try:
        data = json.loads(fs.cat_file(files[-1]))
    except (json.JSONDecodeError, FileNotFoundError):  # replaced meanwhile
        return {}
    trials = [json.loads(t[0]) if isinstance(t[0], str) else t[0] for t in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def _recorded_groups(folder: str, but: str) -> list[str]:
    """The placement groups recorded by the trials other than ``but`` (tune/cleanup.py)."""
    fs, path = _s3(folder)
    return [p for p in fs.glob(posixpath.join(path, "*", RECORDS, "*")) if f"/{but}/" not in p]


def _results(trial_dir: str) -> list[dict]:
    fs, path = _s3(trial_dir)
    lines = fs.cat_file(posixpath.join(path, "result.json")).decode().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _files(trial: str) -> dict[str, tuple]:
    """A finished trial's record: its train run's files (content and time of upload), Tune's records of it
    (content).

    Tune rewrites its own record files of restored trials at the end of a resumed run (same content, new time).
    """
    fs, path = _s3(trial)
    found = fs.find(posixpath.join(path, "train"), detail=True)
    train = {name[len(path) + 1 :]: (fs.cat_file(name), info["LastModified"]) for name, info in found.items()}
    records = {
        name: (fs.cat_file(posixpath.join(path, name)),) for name in ("result.json", "progress.csv", "params.json")
    }
    return {**train, **records}


@pytest.fixture(scope="module")
def interrupted_sweep(ray_session, s3_endpoint, tune_cache, mlflow_server, tmp_path_factory):
    """Start the sweep in a subprocess, kill it after trial 0 is recorded finished, resume it here; its storage on
    the tests' S3 endpoint (faults off: Ray Train's storage on flaky S3, the same filesystem, is
    tests/pipelines/test_storage_faults.py's)."""
    root = tmp_path_factory.mktemp("sweep")
    fs, _ = filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    config = tiny_config(
        tune_cache,
        f"s3://{BUCKET}/sweeps",
        mlflow_server,
        train={"max_steps": STEPS, "checkpoint_every": 1, "num_to_keep": 5},
        tune={"name": "asha", "metric": "loss", "mode": "min", "max_t": STEPS, "reduction_factor": 2},
    )
    config["tune"].update({"scheduler": "asha", "grace_period": 1, "max_concurrent_trials": 1})
    sweep = write_yaml(root / "sweep.yaml", {**config, "space": {"loss.lar_weight": {"grid": GRID}}})
    folder = f"s3://{BUCKET}/sweeps/asha"
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    args = [sys.executable, "-m", "pipelines.cli", "tune", "--config", str(sweep)]
    log = tmp_path_factory.mktemp("sweep-log") / "tune.log"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": log.open("w")}
    process = subprocess.Popen(args, env=env, start_new_session=True, **quiet)
    deadline = time.monotonic() + 400
    first = None
    while time.monotonic() < deadline and first is None:
        assert process.poll() is None, f"the sweep ended before it could be interrupted: {log.read_text()[-3000:]}"
        first = next((t for t, s in sorted(_experiment_state(folder).items()) if s == "TERMINATED"), None)
        time.sleep(0.2)
    # The kill lands while the next trial trains, once its controller has recorded its workers' placement group:
    # the resumed sweep must release that group (Ray may not when the killed job ends, and the restarted
    # trial's data tasks would wait forever for the instance's 2 CPUs)
    while time.monotonic() < deadline and not _recorded_groups(folder, first):
        assert process.poll() is None, f"the sweep ended before it could be interrupted: {log.read_text()[-3000:]}"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert first is not None, "no trial finished before the deadline"
    state_at_kill = _experiment_state(folder)
    snapshot = _files(f"{folder}/{first}")
    assert isa(["tune", "--resume", folder]) == 0
    assert [p.name for p in root.iterdir()] == ["sweep.yaml"]  # nothing of the sweep on the local disk
    return {"folder": folder, "first": first, "state_at_kill": state_at_kill, "snapshot": snapshot}


def _runs(uri: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("isa-tune-tests")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, runs


@pytest.mark.slow
def test_sweep_finishes_asha_stops_the_bad_trial_and_mlflow_nests_trials(interrupted_sweep, mlflow_server):
    folder = interrupted_sweep["folder"]
    state = _experiment_state(folder)
    assert len(state) == 3 and set(state.values()) == {"TERMINATED"}, state
    fs, path = _s3(folder)
    stored = json.loads(fs.cat_file(posixpath.join(path, "isa_sweep.json")))
    # Ray Tune's own state is in the bucket (Tuner.restore read it there to resume the sweep)
    assert fs.exists(posixpath.join(path, "tuner.pkl")) and fs.glob(posixpath.join(path, "experiment_state-*.json"))
    client, runs = _runs(mlflow_server)
    (parent,) = [r for r in runs if r.info.run_id == stored["parent_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "asha"
    assert sorted(r.info.run_name for r in children) == sorted(state)  # one child per trial, named by its id
    by_weight = {float(r.data.params["loss.lar_weight"]): r for r in children}
    assert sorted(by_weight) == sorted(GRID)
    for trial_id in state:  # each trial's train run lives in its own folder
        assert fs.glob(posixpath.join(path, trial_id, "train", "checkpoint_*", "isa", "student.safetensors"))
    # ASHA: the trial built to lose stopped at the first rung; the others trained to their last step
    bad = by_weight[5.0]
    assert _results(f"{folder}/{bad.info.run_name}")[-1]["step"] < STEPS
    # ASHA's stop reaches the trial's workers a poll or two after their first report; on a fast machine they may
    # have trained the last step and finished the train run by then: the record tells which happened
    if bad.info.status == "FINISHED":
        assert bad.data.tags["isa.tune.status"] == "completed"
        assert max(m.step for m in client.get_metric_history(bad.info.run_id, "loss")) == STEPS
    else:
        assert bad.info.status == "KILLED" and bad.data.tags["isa.tune.status"] == "stopped early"
    assert {a.path for a in client.list_artifacts(bad.info.run_id, "model")} == MODEL  # its last checkpoint's model
    for weight in (0.3, 0.1):
        good = by_weight[weight]
        assert _results(f"{folder}/{good.info.run_name}")[-1]["step"] == STEPS
        assert good.info.status == "FINISHED" and good.data.tags["isa.tune.status"] == "completed"
        assert good.data.metrics["final/step"] == STEPS and "val_image_R1" in good.data.metrics
        assert {a.path for a in client.list_artifacts(good.info.run_id, "model")} == MODEL  # no optimizer state
    # the best trial (lowest last loss) is recorded on the parent, with its whole config
    best = min(children, key=lambda r: r.data.metrics["final/loss"])
    assert best is not bad
    assert parent.data.tags["best_trial_id"] == best.info.run_name
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/loss"] == pytest.approx(best.data.metrics["final/loss"])
    best_config = json.loads(Path(client.download_artifacts(parent.info.run_id, "best_config.json")).read_text())
    assert best_config["loss"]["lar_weight"] == float(best.data.params["loss.lar_weight"])
    assert best_config["tune"]["metric"] == "loss" and best_config["student"]["image_size"] == 64


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(interrupted_sweep, mlflow_server):
    folder, first = interrupted_sweep["folder"], interrupted_sweep["first"]
    assert interrupted_sweep["state_at_kill"][first] == "TERMINATED"
    assert any(s != "TERMINATED" for s in interrupted_sweep["state_at_kill"].values()) or len(
        interrupted_sweep["state_at_kill"]
    ) < len(GRID), "the kill landed after the whole sweep"
    # the finished trial was not touched: its train run's checkpoints and files, Tune's records of its reports
    assert _files(f"{folder}/{first}") == interrupted_sweep["snapshot"]
    assert [r["step"] for r in _results(f"{folder}/{first}")] == list(range(1, STEPS + 1))
    client, runs = _runs(mlflow_server)
    fs, path = _s3(folder)
    stored = json.loads(fs.cat_file(posixpath.join(path, "isa_sweep.json")))
    mine = [r for r in runs if r.data.tags.get("isa.trial_id") == first]
    assert len(mine) == 1, "the finished trial was trained again"
    assert mine[0].data.tags["mlflow.parentRunId"] == stored["parent_run_id"]
    history = client.get_metric_history(mine[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # logged once per step, not twice
    parents = [r for r in runs if r.data.tags.get("isa.sweep") == folder]
    assert [r.info.run_id for r in parents] == [stored["parent_run_id"]]  # the resumed sweep kept its parent run


def _sweep_args(tmp_path: Path, cache: str, space, **tune: object) -> list[str]:
    config = tiny_config(cache, tmp_path / "sweeps", f"sqlite:///{tmp_path / 'mlflow.db'}", tune={"name": "bad"})
    config["tune"].update(tune)
    return ["--config", str(write_yaml(tmp_path / "sweep.yaml", {**config, "space": space}))]


LR = {"train.lr": {"grid": [1e-3, 1e-2]}}


@pytest.mark.parametrize(
    ("space", "tune", "overrides", "words"),
    [
        ({"token_learner.num_tokenz": {"grid": [1, 2]}}, {}, [], ["'token_learner.num_tokenz'", "'num_tokens'"]),
        ({"train.lr": {"grid": ["fast"]}}, {}, [], ["'train.lr'", "float"]),
        ({"token_learner.heads": {"grid": [3]}}, {}, [], ["'token_learner.dim'", "heads"]),
        ({"student.backbone": {"choice": ["resnet_9000"]}}, {}, [], ["'student.backbone'", "resnet_9000"]),
        ({}, {}, [], ["space is empty"]),
        (None, {}, [], ["space is empty"]),
        ({"train.lr": {"normal": [0, 1]}}, {}, [], ["'train.lr'", "unknown spec 'normal'"]),
        ({"train.lr": {"loguniform": [0, 1]}}, {}, [], ["'train.lr'", "loguniform"]),
        (LR, {"metric": "val_image_R10"}, [], ["'val_image_R10'", "val_image_R1"]),
        ({"loss.lar_weight": {"grid": [0.0, 0.3]}}, {"metric": "lar"}, [], ["'lar'", "never reported"]),
        (LR, {"search": "bayes"}, [], ["'tune.search'", "'grid'", "'optuna'"]),
        (LR, {"scheduler": "hyperband"}, [], ["'tune.scheduler'", "'asha'"]),
        (LR, {}, ["tune.schedular=asha"], ["'tune.schedular'", "'scheduler'"]),
        (LR, {"grace_period": 5, "max_t": 2}, [], ["'tune.grace_period'"]),
    ],
)
def test_bad_sweeps_fail_before_any_trial(ray_session, tune_cache, tmp_path, capsys, space, tune, overrides, words):
    args = _sweep_args(tmp_path, tune_cache, space, **tune)
    assert isa(["tune", *args, *overrides]) == 2
    error = capsys.readouterr().err
    assert all(word in error for word in words), error
    assert not (tmp_path / "sweeps").exists()  # nothing started: no sweep folder, no trial


def test_optuna_search_needs_optuna(ray_session, tune_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an environment without optuna gives: ImportError
    assert isa(["tune", *_sweep_args(tmp_path, tune_cache, LR, search="optuna")]) == 2
    assert "tune.search=optuna needs the optuna package" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_optuna_search_suggests_configs_inside_the_space(ray_session):
    from isa.config import from_dict
    from tune.space import param_space, parse_space
    from tune.sweep import searcher

    config = from_dict({"tune": {"search": "optuna", "seed": 3}})
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "token_learner.num_tokens": {"grid": [1, 4, 16]}}
    search, _ = searcher(config)
    search.set_search_properties("val_image_R1", "max", param_space(parse_space(space, config), "optuna"))
    suggestions = [search.suggest(f"trial-{i}") for i in range(6)]
    for suggestion in suggestions:  # real Optuna samples, inside the declared domains
        assert 1e-4 <= suggestion["train"]["lr"] <= 1e-2
        assert suggestion["token_learner"]["num_tokens"] in (1, 4, 16)
    assert len({s["train"]["lr"] for s in suggestions}) == 6


def test_existing_sweep_folder_and_resume_of_a_non_sweep_are_refused(ray_session, tune_cache, tmp_path, capsys):
    args = _sweep_args(tmp_path, tune_cache, LR)
    (tmp_path / "sweeps" / "bad").mkdir(parents=True)
    (tmp_path / "sweeps" / "bad" / "isa_sweep.json").write_text("{}")
    assert isa(["tune", *args]) == 2
    assert "already holds a sweep" in capsys.readouterr().err
    assert isa(["tune", "--resume", str(tmp_path)]) == 2
    assert "is not a sweep folder" in capsys.readouterr().err
    assert isa(["tune", "--resume", str(tmp_path), "train.lr=1"]) == 2
    suite = {"kind": "ablation", "config": {}, "tracking_uri": "sqlite:///x.db", "suite": "tokens"}
    (tmp_path / "isa_sweep.json").write_text(json.dumps(suite))
    assert isa(["tune", "--resume", str(tmp_path)]) == 2
    assert "run isa ablate --suite tokens again" in capsys.readouterr().err


def test_space_specs_become_tune_domains():
    from ray import tune

    from isa.config import Config

    space = {
        "token_learner.num_tokens": {"grid": [1, 4]},
        "student.backbone": {"choice": ["efficientnet_b0", "mobilenetv3_large_100"]},
        "loss.lar_weight": {"uniform": [0.0, 1.0]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "token_learner.depth": {"randint": [1, 3]},
    }
    params = parse_space(space, Config())
    grid = to_param_space(params, "grid")
    assert grid["token_learner"]["num_tokens"] == tune.grid_search([1, 4])
    assert isinstance(grid["student"]["backbone"], tune.search.sample.Categorical)
    assert isinstance(grid["train"]["lr"].get_sampler(), tune.search.sample.LogUniform)
    depth = grid["token_learner"]["depth"]
    assert (depth.lower, depth.upper) == (1, 4)  # both ends included: Tune's upper end is exclusive
    sampled = to_param_space(params, "random")  # random and Optuna search sample the grid keys too
    assert isinstance(sampled["token_learner"]["num_tokens"], tune.search.sample.Categorical)
