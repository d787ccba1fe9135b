"""The stages on a Ray cluster of several nodes (tests/_cluster.py: a head with no CPUs, as the shipped manifests
start it, and two worker nodes, all on this machine), run as a user runs them: ``isa ...`` with ``RAY_ADDRESS``.

A worker node is lost mid-``isa embed`` and mid-``isa train`` (its raylet killed, then the rest of it); after the
first loss a replacement joins while the embed run goes on, as an autoscaler would start one. Each run finishes
with nothing lost and nothing twice.
``isa eval`` reads a checkpoint on S3 while its tasks run on a node other than the driver's.

The run folders are local folders of this machine, which every node sees: shared storage, as a cluster's nodes
share a network file system or a bucket.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _cluster import LocalCluster, Node, local_cluster, processes_titled
from _students import TEACHER, save_student

from isa.checkpoint import is_checkpoint
from isa.data.synthetic import generate_world, write_world
from isa.images import content_id

pytestmark = pytest.mark.slow  # a two-node cluster for the module; each test a stage run through a lost node

WORKER_CPUS = 2  # each worker node: a training worker and its data tasks, or a teacher actor and a decode task


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory) -> Iterator[LocalCluster]:
    """A head with no CPUs and two worker nodes; the nodes have the S3 settings (moto on loopback)."""
    yield from local_cluster(tmp_path_factory.mktemp("cluster"), dict(os.environ), [WORKER_CPUS, WORKER_CPUS])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-world")
    write_world(generate_world(seed=5, num_images=100, num_triplets=12, image_size=64), root)
    return root


def _isa(cluster: LocalCluster, log: Path, *args: str, **env: str) -> subprocess.Popen:
    """``isa ARGS`` as a user runs it against the cluster, its output in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *args], env=cluster.env(**env), stdout=out, stderr=subprocess.STDOUT
        )


def _finish(process: subprocess.Popen, log: Path, timeout: float = 1200) -> str:
    process.wait(timeout=timeout)
    text = log.read_text()
    assert process.returncode == 0, text[-4000:]
    return text


def _lose_a_node(
    cluster: LocalCluster, process: subprocess.Popen, ready: Callable[[], bool], title: str
) -> tuple[Node, list[int]]:
    """Once ``ready()`` (the run is midway), the worker node running a ``title`` process is lost. Returns it and
    its ``title`` processes' pids."""
    deadline = time.monotonic() + 900  # a busy machine (shared cores) is slow
    while not ready():
        assert process.poll() is None, "the run ended before a node could be lost"
        assert time.monotonic() < deadline, "the run did not get midway"
        time.sleep(0.1)
    busy = [(node, pid) for pid in processes_titled(title) if (node := cluster.node_of(pid))]
    assert busy, f"no {title} process on a worker node"
    lost = busy[0][0]
    cluster.kill(lost)
    assert process.poll() is None, "the run ended before the node was lost"
    return lost, [pid for node, pid in busy if node == lost]


def _parts(folder: Path) -> list[str]:
    return sorted(glob.glob(str(folder / "part-*.parquet")))


def _rows(folder: Path, column: str) -> list:
    parts = _parts(folder)
    return pq.read_table(parts, columns=[column])[column].to_pylist() if parts else []


def test_embed_and_train_finish_once_when_a_node_is_lost(cluster, world, tmp_path):
    import mlflow

    images, cache, run_dir = world / "images", tmp_path / "cache", tmp_path / "run"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # the one bad input
    small = ["cache.decode_batch_size=8", "cache.batch_size=8", "cache.rows_per_shard=8"]
    settings = [*TEACHER, *small, "cache.local_grid=2", "cache.image_size=64"]

    embedding = _isa(cluster, tmp_path / "embed.log", "embed", str(images), str(cache), *settings)
    lost, _ = _lose_a_node(cluster, embedding, lambda: len(_parts(cache)) >= 2, "MapWorker")
    # a replacement, as an autoscaler starts one once a node is lost: two worker nodes again, the embed run going on
    cluster.add_worker(WORKER_CPUS)
    _finish(embedding, tmp_path / "embed.log")
    good = sorted(p for p in images.glob("*.png") if p.name != "broken.png")
    ids = _rows(cache, "id")
    assert len(ids) == len(set(ids)) == len({content_id(p.read_bytes()) for p in good})  # each image once
    assert set(ids) == {content_id(p.read_bytes()) for p in good}
    assert [Path(u).name for u in _rows(cache / "_errors", "uri")] == ["broken.png"]  # only the bad input
    assert _rows(cache / "_duplicates", "uri") == []
    assert json.loads((cache / "_isa_cache.json").read_text())["counts"] == {
        "cached": len(good), "rejected": 1, "duplicates": 0
    }  # fmt: skip
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]
    assert lost not in cluster.workers and len(cluster.workers) == 2

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    training = [
        "train", *TEACHER, "student.backbone=mobilenetv3_large_100", "student.image_size=64", "token_learner.dim=64",
        "token_learner.heads=4", f"train.cache={cache}", f"train.output={run_dir}", "train.global_batch_size=16",
        "train.val_fraction=0.2", "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2",
        "train.max_failures=2", "train.num_to_keep=10", f"train.tracking_uri={tracking}",
    ]  # fmt: skip
    train = _isa(cluster, tmp_path / "train.log", *training)
    checkpoints = lambda: sorted(p for p in glob.glob(str(run_dir / "checkpoint_*" / "isa")) if is_checkpoint(p))  # noqa: E731
    lost, lost_workers = _lose_a_node(cluster, train, lambda: bool(checkpoints()), "RayTrainWorker")
    output = _finish(train, tmp_path / "train.log")  # on the node left
    assert "isa train: finished at step 4" in output
    steps = [json.loads(Path(c, "state.json").read_text())["step"] for c in checkpoints()]
    assert steps == [2, 4]  # resumed from its last checkpoint: no step saved twice, none from a restart at 0
    # step 4 logged once, by a training worker on the node left: the node was lost mid-run (step 2's line, from
    # the lost node, reaches the driver only when its log was forwarded before the node went)
    logged = re.findall(r"\(RayTrainWorker pid=(\d+)[^)]*\) step (\d)/4 ", output)
    last = [int(pid) for pid, step in logged if step == "4"]
    assert len(last) == 1 and last[0] not in lost_workers and [s for _, s in logged].count("2") <= 1, logged
    client = mlflow.MlflowClient(tracking_uri=tracking)
    (found,) = client.search_runs([client.get_experiment_by_name("isa").experiment_id])
    assert found.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "loss")) == [2, 4]  # once each
    assert lost not in cluster.workers and len(cluster.workers) == 1


def test_eval_reads_a_checkpoint_on_s3_on_another_node_than_the_drivers(cluster, world, tmp_path):
    import s3fs

    checkpoint = save_student(tmp_path / "run" / "checkpoint_000000" / "isa")
    s3 = s3fs.S3FileSystem()
    s3.mkdir("isa-cluster")
    s3.put(str(tmp_path / "run") + "/", "isa-cluster/run/", recursive=True)
    assert checkpoint.is_dir()
    # the driver's temporary files on the head's own disk, which the worker nodes (the only ones with CPUs,
    # where the encoding tasks run) do not see
    driver_tmp = cluster.head_only / "tmp"
    driver_tmp.mkdir(exist_ok=True)
    settings = [
        *TEACHER, "student.backbone=mobilenetv3_large_100", "student.image_size=64", "token_learner.dim=64",
        "token_learner.heads=4", "cache.image_size=64", "cache.dtype=float32", "eval.benchmark=cirr",
        f"eval.dataset_root={world / 'cirr'}", "eval.split=val", "eval.output=s3://isa-cluster/eval",
        "eval.checkpoints=s3://isa-cluster/run", "eval.latency_runs=0", "eval.baselines=false",
    ]  # fmt: skip
    log = tmp_path / "eval.log"
    evaluation = _isa(cluster, log, "eval", *settings, TMPDIR=str(driver_tmp))
    nodes = [cluster.head, *cluster.workers]
    encoders = set()  # the cluster's processes that encoded the student's queries, with their nodes' names
    while evaluation.poll() is None:
        for pid in processes_titled("encode_student"):  # also another test's, on no node of this cluster
            encoders |= {(pid, node.name) for node in nodes if pid in cluster.processes(node)}
        time.sleep(0.1)
    output = _finish(evaluation, log)
    # the student was loaded from S3 and run on a worker node, not on the head with the driver
    assert encoders and {name for _, name in encoders} <= {w.name for w in cluster.workers}, encoders
    document = json.loads(s3.cat_file("isa-cluster/eval/metrics.json"))
    assert list(document["rows"]) == ["mobilenetv3_large_100 + atl"], output[-3000:]
    assert set(document["rows"]["mobilenetv3_large_100 + atl"]) >= {"R@1", "R@5", "Rs@1"}
    assert not list(driver_tmp.iterdir()) or all("checkpoint" not in p.name for p in driver_tmp.rglob("*"))
