"""``isa train`` on a real local Ray instance: learning, checkpoints, resume, worker failure, MLflow, errors."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.train
import torch
from _cluster import processes_titled

from isa.build import build_student, build_task, build_teacher
from isa.cache import read_manifest, write_manifest
from isa.checkpoint import is_checkpoint, load_checkpoint
from isa.config import from_dict, load_config
from isa.split import is_validation
from isa.storage import filesystem
from pipelines import tracking
from pipelines.teacher import TeacherMismatchError
from pipelines.train import RUN_CONFIG_FILE, TrainError, run
from pipelines.train.data import datasets, pass_order, training_rows
from pipelines.train.loop import InputWait

TEACHER = ["teacher.name=isa-tiny-ViT", "teacher.pretrained=none"]
STUDENT = [
    "student.backbone=mobilenetv3_large_100",
    "student.image_size=64",
    "token_learner.dim=64",
    "token_learner.heads=4",
]


def _settings(cache: str, output: Path, *overrides: str) -> list[str]:
    return [
        *TEACHER,
        *STUDENT,
        f"train.cache={cache}",
        f"train.output={output}",
        "train.global_batch_size=32",
        "train.val_fraction=0.2",
        "train.lr=1e-3",
        f"train.tracking_uri=sqlite:///{output.parent / 'mlflow.db'}",
        *overrides,
    ]


def _config(cache: str, output: Path, *overrides: str):
    return load_config(None, _settings(cache, output, *overrides))


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (a worker killed while Ray Train uploads one leaves a partial copy)."""
    return sorted(Path(p) for p in glob.glob(str(run_dir / "checkpoint_*" / "isa")) if is_checkpoint(p))


def _steps(run_dir: Path) -> list[int]:
    return sorted(json.loads((c / "state.json").read_text())["step"] for c in _checkpoints(run_dir))


def _train_worker_pids() -> list[int]:
    """Processes of the Ray Train workers of this test process's Ray instance (their process title is
    ``ray::RayTrainWorker...``), none of another Ray instance on this machine (another test process's)."""
    return processes_titled("RayTrainWorker", below=os.getpid())


@pytest.mark.slow
def test_short_run_learns_and_goes_on_through_a_killed_worker_and_an_mlflow_outage(
    train_cache, tmp_path, mlflow_server_process
):
    """``isa train``, 100 steps, against a real ``mlflow server``. Its worker is killed between its first and second
    checkpoints: the run goes on from the first (a restart from step 0 would record step 10 twice). The server is
    then stopped after the restarted worker's first record and started again once the run has trained on without
    it: the run goes on with no other restart and says so once. Each checkpoint once, each MLflow record once;
    the loss goes down, held-out retrieval is above chance, and the last checkpoint rebuilds the student."""
    import mlflow

    server = mlflow_server_process
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    run_dir, out, err = tmp_path / "run", tmp_path / "train.out", tmp_path / "train.err"
    killed: dict = {}
    outage: dict[str, float] = {}

    def kill_a_worker_after_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not _checkpoints(run_dir):
            time.sleep(0.05)
        for pid in _train_worker_pids():
            # what the run folder held when the worker was killed: the kill's place between the checkpoints
            killed["folders"] = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
            killed["ms"] = time.time() * 1000
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return

    def stop_after_the_restarted_workers_first_record_then_start_again():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "stopped" not in outage:
            found = client.get_experiment_by_name("isa-test")
            runs = client.search_runs([found.experiment_id]) if found else []
            history = client.get_metric_history(runs[0].info.run_id, "loss") if runs else []
            if "pid" in killed and any(m.timestamp > killed["ms"] for m in history):
                server.stop()
                outage["stopped"] = time.time() * 1000
                outage["checkpoints"] = len(_checkpoints(run_dir))
            time.sleep(0.2)
        # the run trains on while the server is down: two checkpoints more, a record made between them
        while time.monotonic() < deadline and len(_checkpoints(run_dir)) < outage.get("checkpoints", 99) + 2:
            time.sleep(0.2)
        server.start()
        outage["started"] = time.time() * 1000

    threads = [
        threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True),
        threading.Thread(target=stop_after_the_restarted_workers_first_record_then_start_again, daemon=True),
    ]
    for thread in threads:
        thread.start()
    steps = ["train.max_steps=100", "train.checkpoint_every=10", "train.log_every=10", "train.max_failures=2"]
    steps += ["train.num_to_keep=10", "train.tracking_wait_s=300"]
    mlflow_settings = [f"train.tracking_uri={server.uri}", "train.experiment=isa-test"]
    registry = ["train.register_model=isa-student", "train.model_alias=champion"]
    command = [str(Path(sys.executable).with_name("isa")), "train"]
    command += _settings(train_cache, run_dir, *steps, *mlflow_settings, *registry)
    with out.open("w") as stdout, err.open("w") as stderr:
        code = subprocess.Popen(command, cwd=tmp_path, env=_isa_env(), stdout=stdout, stderr=stderr).wait(timeout=600)
    for thread in threads:
        thread.join(timeout=300)
    if server.process is None:  # the session's server stays up for the other tests
        server.start()
    printed, errors = out.read_text(), err.read_text()
    assert code == 0, errors[-3000:]
    assert "pid" in killed, "no training worker was killed"
    assert len(killed["folders"]) == 1  # killed after the first checkpoint, before the second began
    assert "stopped" in outage and "started" in outage
    assert "isa train: finished at step 100" in printed + errors
    assert _steps(run_dir) == list(range(10, 101, 10))  # each checkpoint once
    text = printed + errors
    assert text.count("does not answer") == 1 and text.count("answers again") == 1, text
    assert "isa train goes on, its records are kept and sent when MLflow answers" in text
    assert tracking.UNSENT_FOLDER not in text and not (run_dir / tracking.UNSENT_FOLDER).exists()
    # one restart, the kill's (none for the outage): one worker printed every line after step 10, once each; the
    # killed one at most step 10's (printed once its checkpoint is saved: the kill may come first)
    lines = _step_lines(printed)
    after = [(pid, step) for pid, step in lines if step > 10]
    assert [step for _, step in after] == list(range(20, 101, 10)) and len({pid for pid, _ in after}) == 1, lines
    assert killed["pid"] not in {pid for pid, _ in after} and lines[: len(lines) - len(after)] in (
        [],
        [(killed["pid"], 10)],
    )

    # one MLflow run, continued by the restarted worker: each record once
    (found,) = client.search_runs([client.get_experiment_by_name("isa-test").experiment_id])
    assert found.info.status == "FINISHED"
    history = sorted(client.get_metric_history(found.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(10, 101, 10))  # each record once (log_every = 10)
    # the record of step 10 was made before the kill, the one of step 20 after it, by the restarted worker
    assert history[0].timestamp < killed["ms"] < history[1].timestamp
    assert any(outage["stopped"] < m.timestamp < outage["started"] for m in history)  # made while the server was down
    assert found.data.params["train.lr"] == "0.001" and found.data.params["student.backbone"] == "mobilenetv3_large_100"
    logged = {"loss", "gcd", "lar", "lr", "temperature", "samples_per_s", "input_wait_fraction"}
    assert logged | {"val_image_R1", "val_image_R5"} <= set(found.data.metrics)
    waits = [m.value for m in client.get_metric_history(found.info.run_id, "input_wait_fraction")]
    assert len(waits) == 10 and all(0 <= w <= 1 for w in waits)
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id, "model")}
    assert artifacts == {"model/student.safetensors", "model/config.json", "model/state.json"}  # no optimizer
    version = client.get_model_version_by_alias("isa-student", "champion")
    assert version.run_id == found.info.run_id and version.source == f"{found.info.artifact_uri}/model"
    # the loss goes down (history from the run's own MLflow records)
    gcd = [m.value for m in sorted(client.get_metric_history(found.info.run_id, "gcd"), key=lambda m: m.step)]
    # each record is the mean over its 10 steps: the last 30 steps' loss is well below the first 10 steps'
    assert len(gcd) == 10 and sum(gcd[-3:]) / 3 < 0.8 * gcd[0], gcd
    first = json.loads((_checkpoints(run_dir)[0] / "state.json").read_text())
    assert first["step"] == 10
    # image-only retrieval on held-out images at the last step, well above chance (chance R@k = k / #val)
    ids = pq.read_table(train_cache, columns=["id"])["id"].to_pylist()
    val_count = sum(is_validation(i, 0.2) for i in ids)
    assert 20 <= val_count <= 80
    recall = {k: found.data.metrics[f"val_image_R{k}"] for k in (1, 5)}
    # in hits, not percent: 2 of 55 is 3.6363635 in float32, below 200 / 55 in float64
    assert round(recall[5] * val_count / 100) >= 3 * 5, recall  # three times chance
    assert round(recall[1] * val_count / 100) >= 2, recall  # twice chance
    # the final checkpoint rebuilds the student and reproduces its outputs
    saved = load_checkpoint(_checkpoints(run_dir)[-1])
    rebuilt_config = from_dict(saved.config["config"])
    teacher = build_teacher(rebuilt_config.teacher)
    assert saved.config["teacher"]["weights_sha256"] == teacher.weights_sha256()
    task = build_task(rebuilt_config, teacher, build_student(rebuilt_config, teacher))
    fresh = {k: v.clone() for k, v in task.trainable_state_dict().items()}
    task.load_trainable_state_dict(saved.weights)  # strict: every saved tensor has its place
    loaded = task.trainable_state_dict()
    assert loaded.keys() == saved.weights.keys()
    assert all(torch.equal(loaded[k], saved.weights[k]) for k in loaded)
    assert any(not torch.equal(fresh[k], saved.weights[k]) for k in fresh if k.endswith("weight"))  # trained


def test_one_stream_holds_every_pass_each_in_its_own_shard_order(train_cache, tmp_path):
    parts = sorted(glob.glob(os.path.join(train_cache, "part-*.parquet")))
    order = pass_order(parts, 3, seed=5)
    assert [sorted(order[i : i + len(parts)]) for i in range(0, len(order), len(parts))] == [parts] * 3
    assert pass_order(parts, 3, seed=5) == order  # the run's seed decides it
    config = _config(train_cache, tmp_path / "run")
    data = datasets(parts, config, passes=2)
    streamed = sum(len(batch["view"]) for batch in data["train"].iter_batches(batch_size=None))
    assert streamed == 2 * training_rows(config, parts)  # every pass read in full: a path listed again is read again
    # a student input larger than the cached images: views at the cached size (the worker resizes them)
    larger = _config(train_cache, tmp_path / "run", "student.image_size=80")
    manifest = read_manifest(*filesystem(train_cache))
    assert manifest.image_size == 64 and larger.loss.lar_weight > 0
    data = datasets(parts, larger, passes=1, manifest=manifest)
    train, val = data["train"].take_batch(4), data["val"].take_batch(4)
    assert train["view"].shape == val["view"].shape == (4, 64, 64, 3)
    cells = train["cells"].reshape(4, manifest.local_grid**2, 4)  # for LAR: training views
    assert "cells" not in val
    assert ((cells[..., 2] > cells[..., 0]) & (cells[..., 3] > cells[..., 1])).all()


def _isa_env() -> dict[str, str]:
    """The environment of ``isa`` as a user runs it, joining the tests' Ray instance."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ISA_PROGRESS")}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return env


def _isa(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``isa ARGS`` as a user runs it from ``cwd``, joining the tests' Ray instance."""
    isa = Path(sys.executable).with_name("isa")
    return subprocess.run([str(isa), *args], cwd=cwd, env=_isa_env(), capture_output=True, text=True, timeout=600)


def _step_lines(text: str) -> list[tuple[int, int]]:
    """(worker pid, step) of each step line a run printed: ``(RayTrainWorker pid=N) step S/TOTAL ...``."""
    found = re.findall(r"^\(RayTrainWorker pid=(\d+)\) step (\d+)/\d+ ", text, flags=re.MULTILINE)
    return [(int(pid), int(step)) for pid, step in found]


# words of the warnings every run printed (their causes are fixed, or they are silenced in pipelines.console)
UNACTIONABLE = ("Warning:", "not writable", "ray_remote_args_fn", "exclude_resources", "No pretrained weights")


def _reads_plainly(done: subprocess.CompletedProcess, most_lines: int) -> list[str]:
    """A stage's output to a pipe (no terminal): no progress bars or escape sequences, no warning a user cannot
    act on, at most ``most_lines`` lines; returns the training step lines (without Ray's worker prefix)."""
    text = done.stdout + done.stderr
    assert "\x1b" not in text and "\r" not in text, text  # no colors, no bars redrawn in place
    assert not [line for line in text.splitlines() if any(word in line for word in UNACTIONABLE)], text
    assert len(text.splitlines()) <= most_lines, text
    return re.findall(r"^\(RayTrainWorker pid=\d+\) (step .*)$", done.stdout, flags=re.MULTILINE)


@pytest.mark.slow
def test_train_and_eval_by_hand_record_into_one_store_a_rerun_is_refused_and_a_resume_goes_on(
    train_cache, tmp_path, capsys
):
    """``isa train`` then ``isa eval`` from a working folder, nothing about MLflow set: one ``runs/mlflow.db``, the
    artifacts beside it, both runs FINISHED, the eval run tagged with its training run, no ``mlruns/`` anywhere.
    Then the same command again, a resume with nothing to do and one changing the batch are refused (the folder and
    the finished MLflow run as they were); a resume with more steps, on one worker, goes on where the run stopped.

    The run is a DDP run of two workers whose student input (80 px) is larger than the cache's 64 px images: the
    workers resize them."""
    import mlflow

    from pipelines.cli import main as isa

    work = tmp_path / "work"
    work.mkdir()
    run_dir = work / "runs" / "a"
    ddp = ["train.num_workers=2", "train.worker_cpus=0.5", "student.image_size=80"]
    steps = ["train.max_steps=8", "train.checkpoint_every=4", "train.log_every=1", "train.register_model=isa-by-hand"]
    settings = [*TEACHER, *STUDENT, f"train.cache={train_cache}", "train.global_batch_size=32", "train.lr=1e-3"]
    trained = _isa(work, "train", *settings, "train.val_fraction=0.2", "train.output=runs/a", *steps, *ddp)
    assert trained.returncode == 0, trained.stderr[-3000:]
    # a line per record (train.log_every), printed by rank 0 only: the step, the losses, the throughput and the time
    # left once measured, the held-out recall at a checkpoint
    number = r"\d+\.\d+"
    losses = rf"loss {number} \(gcd {number}, lar {number}\)"
    lines = _reads_plainly(trained, most_lines=30)  # about 20 (a 40-step run printed 1,989 before)
    assert len(lines) == 8, lines
    assert re.fullmatch(rf"step 1/8 · {losses} · samples/s – · ETA –", lines[0]), lines[0]
    last_line = rf"step 8/8 · {losses} · \d+ samples/s · ETA 0:00:00 · val R@1 {number}, R@5 {number} · checkpoint"
    assert re.fullmatch(last_line, lines[-1]), lines[-1]
    assert _steps(run_dir) == [4, 8]
    store = f"sqlite:///{work / 'runs' / 'mlflow.db'}"
    assert tracking.ui_command(store) in trained.stdout
    client = mlflow.MlflowClient(tracking_uri=store)
    (train_run,) = client.search_runs([client.get_experiment_by_name("isa").experiment_id])
    assert train_run.info.status == "FINISHED" and train_run.info.run_name == "a"
    assert torch.isfinite(torch.tensor(train_run.data.metrics["loss"]))
    assert (
        train_run.info.artifact_uri
        == f"{(work / 'runs' / 'mlartifacts' / 'isa').as_uri()}/{train_run.info.run_id}/artifacts"
    )
    model = work / "runs" / "mlartifacts" / "isa" / train_run.info.run_id / "artifacts" / "model"
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "state.json", "student.safetensors"]
    version = client.get_model_version_by_alias("isa-by-hand", "candidate")
    downloaded = load_checkpoint(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "got")))
    final = load_checkpoint(_checkpoints(run_dir)[-1])
    assert downloaded.optimizer is None and final.optimizer is not None and downloaded.config == final.config
    assert all(torch.equal(downloaded.weights[k], final.weights[k]) for k in final.weights)

    flags = ["--benchmark", "images", "--dataset-root", train_cache, "--checkpoint", "runs/a", "--no-baselines"]
    evaluated = _isa(work, "eval", *flags, *TEACHER, "train.val_fraction=0.2", "eval.latency_runs=0", "eval.output=ev")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert not _reads_plainly(evaluated, most_lines=30)
    assert tracking.ui_command(store) in evaluated.stdout
    (eval_run,) = client.search_runs([client.get_experiment_by_name("isa-eval").experiment_id])
    assert eval_run.info.status == "FINISHED" and eval_run.data.tags["isa.training_run_id"] == train_run.info.run_id
    assert any(k.startswith("eval/images/") for k in eval_run.data.metrics)
    assert eval_run.info.artifact_uri.startswith((work / "runs" / "mlartifacts" / "isa-eval").as_uri())
    assert (work / "ev" / "metrics.json").is_file() and not (work / "ev" / "mlflow.db").exists()
    assert sorted(p.name for p in work.iterdir()) == ["ev", "runs"]  # no mlruns/ in the working folder
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["a", "mlartifacts", "mlflow.db"]

    # the finished run: a rerun and resumes that cannot go on are refused, leaving it as it was
    finished = client.get_run(train_run.info.run_id)
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert isa(["train", *_settings(train_cache, run_dir, "train.max_steps=4", *ddp)]) == 2
    assert f"{run_dir} already holds a training run (last checkpoint at step 8 of 8)" in capsys.readouterr().err
    assert isa(["train", "--resume", str(run_dir)]) == 2
    assert "has nothing left to do: its last checkpoint is at step 8" in capsys.readouterr().err
    assert isa(["train", "--resume", str(run_dir), "train.max_steps=12", "train.global_batch_size=16"]) == 2
    assert "train.global_batch_size: 32 in the run, 16 now" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before
    assert client.get_run(finished.info.run_id).info == finished.info  # still FINISHED, never reopened

    # the resume goes on with one worker instead of two: the same global batch on other resources
    assert isa(["train", "--resume", str(run_dir), "train.max_steps=12", "train.num_workers=1"]) == 0
    assert "finished at step 12" in capsys.readouterr().out
    assert _steps(run_dir) == [4, 8, 12]
    last = load_checkpoint(_checkpoints(run_dir)[-1])
    assert last.state["step"] == 12 and last.state["total_steps"] == 12
    recorded = json.loads((run_dir / RUN_CONFIG_FILE).read_text())["train"]  # agrees with it
    assert recorded["max_steps"] == 12 and recorded["num_workers"] == 1 and recorded["global_batch_size"] == 32
    (resumed,) = client.search_runs([client.get_experiment_by_name("isa").experiment_id])  # the same MLflow run
    assert resumed.info.run_id == finished.info.run_id and resumed.info.status == "FINISHED"
    assert {4, 8, 12} <= {m.step for m in client.get_metric_history(resumed.info.run_id, "loss")}


def test_a_training_run_that_fails_ends_failed(train_cache, tmp_path):
    """Images that do not decode fail the workers after their MLflow run opened; the driver ends it FAILED and puts
    back the SIGINT handler it had before Ray Train's."""
    import mlflow

    broken = tmp_path / "broken"
    shutil.copytree(train_cache, broken)
    for part in broken.glob("part-*.parquet"):
        table = pq.read_table(part)
        garbage = pa.array([b"not an image"] * table.num_rows, pa.binary())
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", garbage), part)
    config = _config(str(broken), tmp_path / "runs" / "a", "train.max_steps=2", "train.max_failures=0")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(ray.train.TrainingFailedError, match="UDF failed"):
        run(config)
    assert signal.getsignal(signal.SIGINT) is handler  # Ray Train's handler (holding the controller) is gone
    client = mlflow.MlflowClient(tracking_uri=config.train.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("isa").experiment_id])
    assert found.info.status == "FAILED" and found.data.tags["isa.run_dir"] == str(tmp_path / "runs" / "a")


def _cache_copy(cache: str, folder: Path, **manifest: object) -> Path:
    """A copy of ``cache`` whose manifest says ``manifest`` (train reads a cache's kind from its manifest)."""
    shutil.copytree(cache, folder)
    fs, root = filesystem(str(folder))
    write_manifest(fs, root, dataclasses.replace(read_manifest(fs, root), **manifest))
    return folder


def test_clear_errors_before_training(ray_session, train_cache, tmp_path):
    with pytest.raises(TrainError, match="no _isa_cache.json"):
        run(_config(str(tmp_path / "nothing"), tmp_path / "run"))
    gallery = _cache_copy(train_cache, tmp_path / "gallery", image_size=None, local_grid=0)  # isa embed --no-images
    with pytest.raises(TrainError, match="no image column"):
        run(_config(str(gallery), tmp_path / "run"))
    no_local = _cache_copy(train_cache, tmp_path / "no-local", local_grid=0)  # cache.local_grid=0
    with pytest.raises(TrainError, match="no teacher_local"):
        run(_config(str(no_local), tmp_path / "run"))
    with pytest.raises(TeacherMismatchError, match="isa-tiny-ViT-custom-text .* isa-tiny-ViT "):
        run(_config(train_cache, tmp_path / "run", "teacher.name=isa-tiny-ViT-custom-text"))
    with pytest.raises(TrainError, match="needs 65 CPUs"):
        run(_config(train_cache, tmp_path / "run", "train.num_workers=64"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_isa_cache.json").write_text((Path(train_cache) / "_isa_cache.json").read_text())
    with pytest.raises(TrainError, match="is empty"):
        run(_config(str(empty), tmp_path / "run"))
    reserved = ["train.register_model=isa-student", "train.model_alias=Latest"]
    with pytest.raises(TrainError, match="MLflow reserves that alias"):
        run(_config(train_cache, tmp_path / "run", *reserved))
    assert not (tmp_path / "run").exists()  # every refusal came before the run folder was made


def test_input_wait_counts_the_waits_for_batches_not_the_loop_between_them():
    def slow_batches():
        for index in range(3):
            time.sleep(0.05)  # the input producing a batch
            yield index

    wait = InputWait()
    seen = []
    for batch in wait.timed(slow_batches()):
        seen.append(batch)
        time.sleep(0.2)  # the loop's own step
    assert seen == [0, 1, 2]
    assert 0.15 <= wait.seconds < 0.4  # three waits of 0.05 s, none of the 0.6 s of steps
    assert 0.1 < wait.share() < 0.4  # about 0.15 s of 0.75 s
    time.sleep(0.1)
    assert wait.share() == 0  # a new interval: no batch was waited for in it
