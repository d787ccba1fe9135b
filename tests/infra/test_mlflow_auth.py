"""The MLflow server of ``infra/kuberay/mlflow.yaml`` behind MLflow's basic-auth app, started as the manifest starts
it (its options, its ``basic_auth.ini``, its admin account from the stages' credentials), and the stages signing in
with ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` from the environment."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml
from _cluster import session_processes
from _mlflow_server import MlflowServer, job_runner
from peak_memory import pss_bytes

from pipelines import tracking
from pipelines.cli import main as isa_main

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "infra" / "kuberay" / "mlflow.yaml"
WORKDIR = "/home/ray/isa"  # the image's repository copy (the Dockerfile's WORKDIR)
USER, PASSWORD = "isa-stages", "a-long-test-password"  # what the Secret isa-mlflow would hold


def _server_container() -> dict:
    deployment = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The manifest's server on loopback: its ``--app-name``, its worker count (mlflow's default: the manifest sets
    none), the values of its environment (its auth config file as the repository's copy), the admin account from the
    keys of the Secret the Ray pods sign in with, a CSRF key as the Secret isa-mlflow-server would give it."""
    container = _server_container()
    options = tuple(a for a in container["command"] if a.startswith("--app-name"))
    assert not any(a.startswith("--workers") for a in container["command"])
    env = {name: entry["value"] for name, entry in _env(container).items() if "value" in entry}
    env |= {
        "MLFLOW_AUTH_CONFIG_PATH": str(REPO / Path(env["MLFLOW_AUTH_CONFIG_PATH"]).relative_to(WORKDIR)),
        "MLFLOW_AUTH_ADMIN_USERNAME": USER,
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-csrf-key",
    }
    root = tmp_path_factory.mktemp("mlflow-auth")
    server = MlflowServer(root, options=options, env=env, workers=None).start(timeout_s=300)
    yield server
    server.stop()


def _search(uri: str, credentials: tuple[str, str] | None) -> int:
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
    if credentials:
        request.add_header("Authorization", "Basic " + b64encode(":".join(credentials).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            json.loads(response.read())
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_manifest_runs_the_basic_auth_app_with_the_stages_account_as_admin():
    container = _server_container()
    assert "--app-name=basic-auth" in container["command"]
    env = _env(container)
    for variable, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
                          ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD")):  # fmt: skip
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "isa-mlflow", "key": key}
    assert (REPO / Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"]).relative_to(WORKDIR)).is_file()
    assert {"secretRef": {"name": "isa-mlflow-server"}} in container["envFrom"]  # the CSRF key
    volume = next(m for m in container["volumeMounts"] if m["name"] == "store")
    assert container["workingDir"] == volume["mountPath"]  # basic_auth.ini's relative database lands on the volume
    # the Ray pods' stages read the same Secret, optionally: clusters that track elsewhere need none
    cluster = next(yaml.safe_load_all((REPO / "infra" / "kuberay" / "raycluster.yaml").read_text()))
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        sources = pod["containers"][0]["envFrom"]
        assert {"secretRef": {"name": "isa-mlflow", "optional": True}} in sources


def test_the_server_asks_everyone_to_sign_in_and_keeps_its_users_in_its_working_folder(auth_server):
    assert _search(auth_server.uri, None) == 401
    assert _search(auth_server.uri, (USER, "not-the-password")) == 401
    assert _search(auth_server.uri, (USER, PASSWORD)) == 200
    assert (auth_server.root / "basic_auth.db").is_file()


def test_the_server_fits_the_pods_memory_limit(auth_server):
    """Every process of the server (the ``mlflow server`` command, uvicorn and its workers, and MLflow's job runner
    and its consumers if it ran one) within three quarters of the container's memory limit once it has served a
    request: the rest is headroom for requests. Memory is PSS (shared pages counted once, as the cgroup counts
    them)."""
    resources = _server_container()["resources"]
    limit = resources["limits"]["memory"]
    assert limit.endswith("Gi") and resources["requests"]["memory"] == limit
    assert _search(auth_server.uri, (USER, PASSWORD)) == 200
    processes = session_processes(auth_server.process.pid)
    assert len(processes) >= 3  # the command, uvicorn, its workers
    assert not job_runner(processes)
    used = sum(pss_bytes(p) for p in processes)
    assert used <= 0.75 * float(limit[:-2]) * 2**30, f"{used / 2**20:.0f} MiB for a {limit} limit"


def test_a_stage_without_the_account_is_refused_before_it_starts(auth_server, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    run = tmp_path / "runs" / "a"
    argv = ["train", f"train.cache={tmp_path / 'cache'}", f"train.output={run}"]
    argv.append(f"train.tracking_uri={auth_server.uri}")
    assert isa_main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        f"isa train: error: MLflow server {auth_server.uri} asks for credentials and none were given (401): set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of that server"
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    assert isa_main(argv) == 2
    assert "refused the credentials given (401)" in capsys.readouterr().err
    assert not run.exists()  # refused before anything was written


def test_the_stages_sign_in_from_the_environment(auth_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    tracking.check_access(auth_server.uri)
    mlflow = tracking.client(auth_server.uri)
    run_id = tracking.start_run(mlflow, "isa", "signed-in")
    tracking.log_params(mlflow, run_id, {"train.lr": 0.001})
    mlflow.log_metric(run_id, "loss", 0.5, step=1)
    assert mlflow.get_run(run_id).data.params == {"train.lr": "0.001"}
    assert [m.value for m in mlflow.get_metric_history(run_id, "loss")] == [0.5]
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(tracking.TrackingAccessError):
        tracking.check_access(auth_server.uri)
