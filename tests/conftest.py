"""Shared fixtures: tiny random-init teachers, a real S3 endpoint on loopback, a real local Ray instance."""

from __future__ import annotations

import os
from pathlib import Path

# The suite's two pytest-xdist workers share 2 cores with everything they start (Ray's processes, training workers,
# stages in subprocesses): OpenMP threads that spin while they wait for work take those cores from the others.
# Waiting threads sleep instead. libgomp reads this once, when torch loads it: before the import below, and in every
# process the tests start, which inherit it. About 12 % less CPU time for the torch-heavy files (benchmarks/RESULTS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from _flaky_s3 import FlakyS3, start_moto
from _mlflow_server import MlflowServer

from isa.teacher import Teacher, load_teacher

TINY_TEACHERS = ("isa-tiny-ViT", "isa-tiny-ViT-custom-text")  # open_clip CLIP and CustomTextCLIP classes
S3_ENV = {"AWS_ACCESS_KEY_ID": "isa-test", "AWS_SECRET_ACCESS_KEY": "isa-test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session", params=TINY_TEACHERS)
def teacher(request) -> Teacher:
    torch.set_num_threads(2)
    return load_teacher(request.param, "none", seed=0)


@pytest.fixture(scope="session")
def clip_teacher() -> Teacher:
    return load_teacher("isa-tiny-ViT", "none", seed=0)


@pytest.fixture(scope="session")
def flaky_s3():
    """moto's standalone S3 server on a free loopback port, behind a fault-injecting proxy (tests/_flaky_s3.py,
    off until a test turns it on); every S3 client (s3fs, pyarrow, Ray's workers) reaches the proxy through
    AWS_ENDPOINT_URL."""
    process, endpoint = start_moto()
    proxy = FlakyS3(endpoint).start()
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": proxy.endpoint})
    yield proxy
    proxy.stop()
    process.terminate()
    process.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(flaky_s3) -> str:
    """The S3 endpoint every client reaches (AWS_ENDPOINT_URL): the proxy in front of moto."""
    return flaky_s3.endpoint


@pytest.fixture(scope="session")
def ray_instance(s3_endpoint):
    """One real local Ray instance for the test run (started after the S3 settings, so workers see them): the
    context ``ray.init`` returns."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_instance) -> str:
    """The GCS address of the tests' Ray instance."""
    return ray_instance.address_info["gcs_address"]


@pytest.fixture(scope="session")
def ray_session_dir(ray_instance) -> Path:
    """The session folder of the tests' Ray instance: its processes' logs (what its workers print: the instance
    does not send it to the driver) and its other files."""
    return Path(ray_instance.address_info["session_dir"])


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory) -> MlflowServer:
    """A real ``mlflow server`` (SQLite backend, served artifacts) on a free loopback port; a test may stop it and
    start it again (the same port, store and artifacts), and leaves it running."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process) -> str:
    """The URI of the tests' ``mlflow server``."""
    return mlflow_server_process.uri


@pytest.fixture(scope="session")
def world_images(tmp_path_factory) -> Path:
    """The images of a 200-image synthetic world (64 px)."""
    from isa.data.synthetic import generate_world, write_world

    root = tmp_path_factory.mktemp("world")
    write_world(generate_world(seed=0, num_images=200, num_triplets=30, image_size=64), root)
    return root / "images"


@pytest.fixture(scope="session")
def train_cache(ray_session, world_images, tmp_path_factory) -> str:
    """``world_images`` through ``isa embed`` (tiny teacher, 2x2 LAR grid, 64 px): the training cache of the
    train, tune and ablation tests."""
    from isa.config import load_config
    from pipelines import embed

    out = tmp_path_factory.mktemp("cache") / "cache"
    settings = ["teacher.name=isa-tiny-ViT", "teacher.pretrained=none", "cache.local_grid=2", "cache.image_size=64"]
    embed.run(str(world_images), str(out), load_config(None, [*settings, "cache.decode_batch_size=32"]))
    return str(out)


# The test files that take longest, longest first: pytest-xdist (pyproject.toml: -n 2 --dist loadfile
# --no-loadscope-reorder) hands the files to its workers in collection order, a whole file to one worker, so the
# long ones start first and short ones fill the end of both workers' runs. A worker with two tests or fewer left
# is handed the next file at once, behind them: test_quickstart.py (two tests, one long) comes after the other
# long files, so none of them waits behind it.
LONGEST_FIRST = (
    "pipelines/test_train.py",
    "infra/test_lost_node.py",
    "pipelines/test_quickstart.py",
    "tune/test_sweep.py",
    "pipelines/test_embed.py",
    "tune/test_ablate.py",
    "pipelines/test_eval.py",
    "pipelines/test_serve.py",
    "pipelines/test_export.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent

    def rank(item: pytest.Item) -> int:
        path = item.path.relative_to(tests).as_posix() if item.path.is_relative_to(tests) else ""
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of every other file, stays


# Ray Train's controller polls its workers every 2 s: a run's end and each report after the first wait for a poll.
# The tests' runs last seconds: they poll every 0.5 s (read by Ray Train when a run starts, in every Ray process).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Every Ray instance of the tests is on this one machine, where no node is ever drained: no run starts Ray Train's
# preemption watcher (a process per run, waiting for drains), as ``init_ray`` sets for a local instance.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray's log monitor looks for new log files every 0.1 s until there are 1,000, then every 0.5 s: the tests' instances
# start hundreds of worker processes, each with its log files; looking every 0.5 s halves the monitor's CPU time
# (new files' lines still reach the drivers, from the start of the file).
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# Ray's usage statistics are off in the tests (as `ray disable-usage-stats` sets): no instance starts Ray Data's
# usage collection actor (a process per instance) or tries to report to Ray's usage server from this machine.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
