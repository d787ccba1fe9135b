"""The pipeline on flaky object storage: ``isa embed`` S3 to S3, ``isa train`` from an S3 cache with Ray Train's
storage on ``s3://``, ``isa eval`` writing to S3, all through the fault-injecting proxy in front of moto (503
SlowDown, connections reset before and after the request is done). Each finishes, exactly once; a tracking URI
holding a password never shows it, in the stages' output or in what Ray's processes print."""

from __future__ import annotations

import json

import mlflow
import pyarrow.parquet as pq
import pytest
from _flaky_s3 import FAULTS
from _students import TEACHER

from isa.cache import MANIFEST_FILE
from isa.checkpoint_files import complete_checkpoints
from isa.data.synthetic import generate_world, write_world
from isa.images import content_id
from isa.storage import filesystem
from pipelines.cli import main

SECRET = "s3cret-Pa55"
BUCKET = "isa-flaky"
IMAGES = 24  # of a world of 30
STUDENT = [
    "student.backbone=mobilenetv3_large_100",
    "student.image_size=64",
    "token_learner.dim=64",
    "token_learner.heads=4",
]


@pytest.mark.slow
def test_embed_train_and_eval_on_flaky_s3_finish_exactly_once_and_never_show_a_password(
    ray_session, ray_session_dir, flaky_s3, mlflow_server, mlflow_server_process, tmp_path, capfd
):
    write_world(generate_world(seed=3, num_images=30, num_triplets=4, image_size=64), tmp_path / "world")
    fs, _ = filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    images = sorted((tmp_path / "world" / "images").rglob("*.png"))[:IMAGES]
    for path in images:
        fs.pipe_file(f"{BUCKET}/images/{path.name}", path.read_bytes())
    tracking = mlflow_server.replace("http://", f"http://isa:{SECRET}@")
    cache, runs, evaluation = f"s3://{BUCKET}/cache", f"s3://{BUCKET}/runs", f"s3://{BUCKET}/eval"
    embed = ["embed", f"s3://{BUCKET}/images", cache, *TEACHER, "cache.local_grid=2", "cache.image_size=64"]
    train = [
        "train",
        *TEACHER,
        *STUDENT,
        f"train.cache={cache}",
        f"train.output={runs}/run",
        "train.global_batch_size=8",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.log_every=2",
        "train.val_fraction=0.2",
        f"train.tracking_uri={tracking}",
        "train.experiment=isa-flaky",
    ]
    evaluate = ["eval", "--benchmark", "images", "--dataset-root", cache, "--checkpoint", f"{runs}/run"]
    evaluate += ["--output", evaluation, "train.val_fraction=0.2", "eval.latency_runs=0"]
    with flaky_s3.faults(0.05, seed=11) as proxy:
        assert main(embed + ["cache.decode_batch_size=8"]) == 0
        assert main(train) == 0
        # the checkpoints keep the store without its password: evaluating them asks for it, before any work
        assert main(evaluate) == 2
        refused = capfd.readouterr()
        assert refused.err.endswith("saved without its password: set eval.tracking_uri or MLFLOW_TRACKING_URI\n")
        assert main([*evaluate, f"eval.tracking_uri={tracking}", "eval.experiment=isa-flaky-eval"]) == 0
    with capfd.disabled():
        print(f"\nfaults injected: {dict(proxy.injected)}, {proxy.forwarded} requests forwarded")
    assert set(proxy.injected) == set(FAULTS), proxy.injected  # every kind of fault met, and got through
    printed = capfd.readouterr()
    shown = printed.out + printed.err + refused.out + refused.err
    assert f"isa:***@{mlflow_server.removeprefix('http://')}" in shown and SECRET not in shown

    fs.invalidate_cache()  # listings this process made while the stages ran
    # embed: every input once, nothing staged left
    parts = [p for p in fs.find(f"{BUCKET}/cache") if p.rsplit("/", 1)[-1].startswith("part-")]
    ids = [i for p in parts for i in pq.read_table(fs.open(p, "rb"), columns=["id"])["id"].to_pylist()]
    expected = {content_id(p.read_bytes()) for p in images}
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected  # each image once, none twice
    assert fs.exists(f"{BUCKET}/cache/{MANIFEST_FILE}") and not [p for p in fs.find(BUCKET) if ".tmp-" in p]
    # train: its two checkpoints on S3, complete; one MLflow run with one record per step
    steps = complete_checkpoints(fs, f"{BUCKET}/runs/run")
    assert sorted(steps.values()) == [2, 4], steps
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    (trained,) = client.search_runs([client.get_experiment_by_name("isa-flaky").experiment_id])
    assert trained.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(trained.info.run_id, "loss")] == [2, 4]
    # eval: its outputs on S3 and one MLflow run
    document = json.loads(fs.cat_file(f"{BUCKET}/eval/metrics.json"))
    assert document["benchmark"] == "images" and len(document["rows"]) >= 1
    (evaluated,) = client.search_runs([client.get_experiment_by_name("isa-flaky-eval").experiment_id])
    assert evaluated.info.status == "FINISHED"
    # the password is in no file written (configs, checkpoints, outputs) and in no MLflow parameter or tag
    assert not [p for p in fs.find(BUCKET) if SECRET.encode() in fs.cat_file(p)]
    for run in (trained, evaluated):
        assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
    # nor in what the MLflow server keeps: its store and the artifacts it was sent (the model, the outputs)
    kept = [p for p in mlflow_server_process.root.rglob("*") if p.is_file()]
    assert any(p.name == "student.safetensors" for p in kept)  # the run's model artifact is among them
    assert not [p for p in kept if SECRET.encode() in p.read_bytes()]
    # nor in what Ray's processes printed or wrote: the training workers, the data tasks, Ray's own logs
    written = [p for p in ray_session_dir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("worker-") for p in written)  # the workers' output is there
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
    assert trained.data.params["train.tracking_uri"] == tracking.replace(SECRET, "***")
    assert evaluated.data.params["eval.tracking_uri"] == tracking.replace(SECRET, "***")
