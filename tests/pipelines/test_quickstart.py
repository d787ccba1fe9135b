"""``isa quickstart`` in a reduced size, submitted with ``ray job submit`` to a real head node with token auth."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _cluster import stop_ray_processes
from _ports import free_port

from pipelines import quickstart

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REDUCED = [
    "--images", "40", "--triplets", "12", "--teacher-steps", "4", "--train-steps", "2",
    "student.image_size=64", "token_learner.dim=64", "token_learner.heads=4", "train.global_batch_size=16",
    "train.val_fraction=0.2", "eval.latency_runs=2",
]  # fmt: skip
ROWS = {quickstart.ISA_ROW, quickstart.SYMMETRIC_ROW, "text only (teacher)", "image only (teacher)"}
ROWS |= {"image + text (teacher)"}


def _check_outputs(output: Path) -> None:
    document = json.loads((output / "quickstart.json").read_text())
    rows = document["rows"]
    assert set(rows) == ROWS
    for values in rows.values():
        assert {f"CIR R@{k}" for k in (1, 5, 10, 50)} <= set(values)
        assert all(0 <= values[f"CIR R@{k}"] <= 100 for k in (1, 5, 10, 50))
        assert values["CIR R@1"] <= values["CIR R@5"] <= values["CIR R@10"] <= values["CIR R@50"]
    for name in (quickstart.ISA_ROW, quickstart.SYMMETRIC_ROW):  # the students have every column
        assert all(math.isfinite(v) for v in rows[name].values())
    assert math.isfinite(document["teacher_image_tower_ms"]) and document["teacher_image_tower_ms"] > 0
    table = (output / "quickstart.md").read_text()
    assert all(name in table for name in ROWS)
    assert (output / "eval" / "cirr" / "report.html").is_file() and (output / "mlflow.db").is_file()
    assert all(Path(p, "student.safetensors").is_file() for p in document["checkpoints"].values())
    _check_mlflow(output)
    _check_deployment(output, document)


def _check_mlflow(output: Path) -> None:
    """One store for every stage, OUTPUT/mlflow.db: every run FINISHED, every artifact under OUTPUT (the job runs
    in Ray's session folder, which must hold none), each eval run tagged with the ISA student's training run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output.resolve() / 'mlflow.db'}")
    experiments = {e.experiment_id: e for e in client.search_experiments()}
    runs = client.search_runs(list(experiments), max_results=100)
    by_experiment = {experiments[r.info.experiment_id].name: [] for r in runs}
    for run in runs:
        by_experiment[experiments[run.info.experiment_id].name].append(run)
    assert {k: len(v) for k, v in by_experiment.items()} == {"isa": 2, "isa-eval": 2}  # two students, two evals
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert all(r.info.artifact_uri.startswith((output.resolve() / "mlartifacts").as_uri()) for r in runs)
    (isa_run,) = [r for r in by_experiment["isa"] if r.info.run_name == "isa"]
    assert {r.data.tags["isa.training_run_id"] for r in by_experiment["isa-eval"]} == {isa_run.info.run_id}
    assert {a.path for a in client.list_artifacts(isa_run.info.run_id, "model")} == {
        "model/config.json", "model/state.json", "model/student.safetensors"
    }  # fmt: skip


def _check_deployment(output: Path, document: dict) -> None:
    """The index holds the evaluated gallery; the export is the ISA student's; the printed command parses."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.cli import stage_module
    from pipelines.export.client import ExportedEncoder
    from pipelines.index.store import GalleryIndex

    index = GalleryIndex.load(document["index"])
    gallery = pq.read_table(output / "eval" / "cirr" / "gallery-cirr-val", columns=["id"])
    assert index.manifest["count"] == gallery.num_rows and index.manifest["kind"] == "exact"
    encoder = ExportedEncoder.load(document["export"], int8=True)
    assert encoder.manifest["checkpoint"]["uri"] == str(Path(document["checkpoints"][quickstart.ISA_ROW]).resolve())
    image = next((output / "world" / "images").glob("*.png")).read_bytes()
    assert np.isfinite(encoder.pseudo_words([image])).all()
    words, *serve = document["serve"].split()
    assert words == "isa" and serve[0] == "serve"
    stage_module("serve").parser().parse_args(serve[1:])


def _processes_of(temp_dir: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and temp_dir.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@pytest.fixture
def head_node(tmp_path):
    """``ray start --head`` on loopback with token authentication, isolated in its own HOME and temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="isa-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    dashboard = free_port()
    command = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp_dir}",
        # every agent port of its own: the defaults may be taken by another Ray instance on this machine
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
    ]  # fmt: skip
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        # only the processes of this head (``ray stop`` would stop every Ray here)
        stop_ray_processes(lambda: _processes_of(temp_dir))


def _submit(address: str, env: dict, *entrypoint: str, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO)]
    command += ["--runtime-env", str(REPO / "infra" / "runtime_env.yaml"), "--", *entrypoint]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in done.stderr or time.monotonic() > deadline:  # the agent is still starting
            return done
        time.sleep(3)


def _jobs_api(address: str, token: str | None) -> tuple[int, list | None]:
    """The Job API's job list: its HTTP status and, when it answered 200, the jobs."""
    request = urllib.request.Request(f"{address}/api/jobs/")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None


@pytest.mark.slow
def test_quickstart_as_a_ray_job_on_a_head_node_with_token_auth(head_node, tmp_path):
    address, env = head_node
    stranger = {**env, "HOME": str(tmp_path / "stranger")}  # no token file, no RAY_AUTH_TOKEN
    refused = _submit(address, stranger, "echo", "hello", timeout=120)
    assert refused.returncode != 0
    wrong = _submit(address, {**stranger, "RAY_AUTH_TOKEN": "0" * 64}, "echo", "hello", timeout=120)
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stderr  # the head's own answer
    # the job API itself: no token, a wrong one, the head's own; neither refused submission left a job behind
    token = (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    assert _jobs_api(address, None)[0] == 401
    assert _jobs_api(address, "0" * 64)[0] == 403
    assert _jobs_api(address, token) == (200, [])

    output = tmp_path / "qs"
    job = _submit(address, env, "isa", "quickstart", str(output), *REDUCED)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    _check_outputs(output)


def test_settings_come_from_the_shipped_file_and_a_copy_of_it_changes_them(tmp_path):
    import yaml

    from isa.config import ConfigError

    args, overrides = quickstart.parse_args([str(tmp_path / "out"), "train.seed=7"])
    config = quickstart.check(tmp_path / "out", args, overrides)
    shipped = yaml.safe_load(quickstart.SETTINGS.read_text())
    assert config.student.backbone == shipped["student"]["backbone"] == "mobilenetv3_large_100"
    assert config.cache.local_grid == shipped["cache"]["local_grid"] and config.train.seed == 7
    assert config.teacher.pretrained == str(quickstart.teacher_file(tmp_path / "out"))
    assert config.train.max_steps == config.train.checkpoint_every == 300  # --train-steps' default
    assert (
        config.train.tracking_uri == config.eval.tracking_uri == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    )

    edited = {**shipped, "train": {**shipped["train"], "lr": 5e-4}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(edited))
    args, overrides = quickstart.parse_args([str(tmp_path / "out"), "--config", str(tmp_path / "mine.yaml")])
    assert quickstart.check(tmp_path / "out", args, overrides).train.lr == 5e-4
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**shipped, "teacher": {"name": "ViT-B-32"}}))
    args, overrides = quickstart.parse_args([str(tmp_path / "out"), "--config", str(tmp_path / "other.yaml")])
    with pytest.raises(ConfigError, match="trains its own teacher"):
        quickstart.check(tmp_path / "out", args, overrides)
    assert not (tmp_path / "out").exists()  # refused before any work
