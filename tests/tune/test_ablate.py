"""``isa ablate``: a two-row suite trained, evaluated and tabulated for real; the shipped suites; refused suites."""

from __future__ import annotations

import csv
import io
import math

import pytest
from _tune_helpers import tiny_config, write_yaml
from PIL import Image

from isa.config import Config, from_dict
from isa.storage import filesystem
from isa.students import BACKBONES, SYMMETRIC
from pipelines.cli import main as isa
from tune import ablation, plot
from tune.space import check_students, nested
from tune.suites import available, load_suite

COST = ["params_M", "gflops", "cpu_latency_ms"]
METRICS = ["val_image_R1", "image_R@1", "image_R@5", "image_R@10"]
BUCKET = "isa-ablations"
FAULT_RATE = 0.05  # of the S3 requests while the suite runs
TUNE_FAULT_RATE = 0.3  # of those reading or writing Ray Tune's own files (a few dozen in a run)
# Ray Tune's own files: the experiment's state, and each trial's records
TUNE_FILES = (
    "experiment_state-",
    "tuner.pkl",
    "params.json",
    "params.pkl",
    "result.json",
    "progress.csv",
    "events.out",
)


@pytest.mark.slow
def test_two_row_suite_on_flaky_s3_writes_table_csv_png_and_logs_mlflow(
    ray_session, flaky_s3, tune_cache, tmp_path, monkeypatch
):
    """The suite's storage on the tests' S3 endpoint through the proxy injecting faults (into 5% of the requests, 30%
    of those on Ray Tune's own files): Tune's state, each row's run and the suite's files in the bucket; each row's
    checkpoint copied from it to measure its cost; MLflow in a SQLite store given by its URI, the artifacts beside
    it."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "work"  # the working folder the suite is run from
    work.mkdir()
    monkeypatch.chdir(work)
    fs, _ = filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)

    suite = write_yaml(
        tmp_path / "mini.yaml",
        {
            "name": "mini",
            "description": "sentence length, two rows",
            "swept": "token_learner.num_tokens",
            "rows": [
                {"name": "M=1", "set": {"token_learner.num_tokens": 1}},
                {"name": "M=3", "set": {"token_learner.num_tokens": 3}},
            ],
        },
    )
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tune_cache, f"s3://{BUCKET}/out", store, train={"max_steps": 2, "checkpoint_every": 2})
    config["eval"] = {"latency_runs": 2}
    base = write_yaml(tmp_path / "base.yaml", config)
    with flaky_s3.faults(FAULT_RATE, seed=3, focus=TUNE_FILES, focus_rate=TUNE_FAULT_RATE) as proxy:
        assert isa(["ablate", "--suite", str(suite), "--config", str(base), "train.lr=1e-3"]) == 0
    # faults met Ray Tune's own files (its experiment state, a trial's records) and were got through
    tune_files = [p for _, _, p in proxy.faulted if any(name in p for name in TUNE_FILES)]
    assert tune_files, (dict(proxy.injected), proxy.forwarded, proxy.faulted)
    folder = f"{BUCKET}/out/ablation-mini"
    fs.invalidate_cache()
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{folder}/ablation_mini.csv").decode())))
    assert [r["row"] for r in rows] == ["M=1", "M=3"] and [r["value"] for r in rows] == ["1", "3"]
    for row in rows:
        assert row["status"] == "completed" and row["steps"] == "2.0"
        assert all(math.isfinite(float(row[c])) for c in METRICS + COST), row
        assert 0 <= float(row["image_R@1"]) <= float(row["image_R@5"]) <= float(row["image_R@10"]) <= 100
        assert float(row["params_M"]) > 0 and float(row["gflops"]) > 0 and float(row["cpu_latency_ms"]) > 0
    assert float(rows[1]["params_M"]) > float(rows[0]["params_M"])  # two more learned queries: each row is measured
    table = fs.cat_file(f"{folder}/ablation_mini.md").decode()
    assert "| M=1 |" in table and "| M=3 |" in table and "image_R@1" in table and "Teacher image tower" in table
    with Image.open(io.BytesIO(fs.cat_file(f"{folder}/ablation_mini.png"))) as image:
        assert image.format == "PNG" and image.size == (plot.WIDTH, plot.HEIGHT)
        image.verify()
    # Ray Tune's own state is in the bucket, and each row's run with its checkpoint
    assert fs.exists(f"{folder}/tuner.pkl") and fs.glob(f"{folder}/experiment_state-*.json")
    # MLflow: a parent with the files, each row a nested run (the row's training run) with its results
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("isa-tune-tests")
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "isa-tune-tests").as_uri()
    assert not list(work.iterdir())  # no mlruns/ where the command ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "mini.yaml", "mlartifacts", "mlflow.db", "work"]
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`isa.suite` = 'mini'")
    (parent,) = runs
    assert parent.info.run_name == "ablation-mini" and parent.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation_mini.md", "ablation_mini.csv", "ablation_mini.png"} <= files
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == ["M=1", "M=3"]
    for row in rows:
        child = by_name[row["row"]]
        assert child.info.run_id == row["mlflow_run_id"]
        assert child.data.params["token_learner.num_tokens"] == row["value"]
        assert child.data.metrics["ablation/image_R_at_1"] == pytest.approx(float(row["image_R@1"]))
        assert any(k.startswith("eval/images/") for k in child.data.metrics)  # the eval stage logged into the row
        trial = f"{folder}/{child.data.tags['isa.trial_id']}"
        assert fs.glob(f"{trial}/train/checkpoint_*/isa/student.safetensors")  # the row's run in its trial folder
        assert child.info.status == "FINISHED"
        assert child.info.artifact_uri.startswith(experiment.artifact_location)
        assert {a.path for a in client.list_artifacts(child.info.run_id, "model")} == {
            "model/config.json", "model/state.json", "model/student.safetensors"
        }  # fmt: skip


def test_a_suite_records_into_its_folders_own_store_unless_told_otherwise(tune_cache, tmp_path, monkeypatch, capsys):
    """No tracking URI set: a suite on a local folder records into the folder's ``mlflow.db`` (its artifacts beside
    it, tests/pipelines/test_tracking.py); on object storage, which cannot hold one, it is refused before any row."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = [{"name": "M=1", "set": {"token_learner.num_tokens": 1}}]
    suite = str(write_yaml(tmp_path / "mini.yaml", {"name": "mini", "rows": rows}))
    local = write_yaml(tmp_path / "local.yaml", tiny_config(tune_cache, tmp_path / "out", None))
    plan = ablation.check_start(*ablation.load(suite, str(local), []))
    assert plan.tracking_uri == f"sqlite:///{tmp_path / 'out' / 'ablation-mini' / 'mlflow.db'}"
    on_s3 = write_yaml(tmp_path / "s3.yaml", tiny_config(tune_cache, "s3://isa-nowhere/out", None))
    assert isa(["ablate", "--suite", suite, "--config", str(on_s3)]) == 2
    assert "set train.tracking_uri or MLFLOW_TRACKING_URI" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shipped_suites_cover_the_method_ablations():
    expected = {"tokens": 5, "losses": 4, "lambda": 4, "backbones": 6, "mapping": 2, "asymmetry": 2}
    assert set(expected) <= set(available())
    for name, count in expected.items():
        suite = load_suite(name)
        assert suite.name == name and len(suite.rows) == count
        base = from_dict(suite.base)
        assert base.teacher.name == "ViT-L-14" and base.teacher.pretrained == "openai"
        for row in suite.rows:
            config = from_dict(nested(row.overrides), base=base)  # every row is a valid config
            check_students(config.student.backbone)
    tokens = [from_dict(nested(r.overrides)).token_learner.num_tokens for r in load_suite("tokens").rows]
    assert tokens == [1, 2, 4, 8, 16]
    lambdas = [from_dict(nested(r.overrides)).loss.lar_weight for r in load_suite("lambda").rows]
    assert lambdas == [0, 0.1, 0.3, 1]
    assert {r.overrides["student.backbone"] for r in load_suite("backbones").rows} == set(BACKBONES)
    assert [from_dict(nested(r.overrides)).student.mapper for r in load_suite("mapping").rows] == ["atl", "mlp"]
    assert [r.overrides["student.backbone"] for r in load_suite("asymmetry").rows][-1] == SYMMETRIC
    losses = [from_dict(nested(r.overrides)).loss for r in load_suite("losses").rows]
    assert [(l.lar_weight > 0, l.rel_weight > 0, l.word_weight > 0) for l in losses] == [  # noqa: E741
        (False, False, False),
        (True, False, False),
        (True, True, False),
        (True, True, True),
    ]
    assert Config().student.backbone == "efficientnet_b0"  # the real setting's student is the default


@pytest.mark.parametrize(
    ("suite", "words"),
    [
        ("no-such-suite", ["'no-such-suite'", "tokens", "asymmetry"]),
        ({"rows": []}, ["has no rows"]),
        ({"rows": [{"name": "a", "set": {"token_learner.num_tokenz": 2}}]}, ["'token_learner.num_tokenz'"]),
        ({"rows": [{"name": "a", "set": {"student.backbone": "resnet_9000"}}]}, ["resnet_9000", "efficientnet_b0"]),
        ({"rows": [{"name": "a", "set": {}}, {"name": "a", "set": {}}]}, ["'a' is used twice"]),
        ({"rows": [{"name": "a", "sett": {}}]}, ["unknown keys ['sett']"]),
        ({"metric": "image_R@50", "rows": [{"name": "a", "set": {}}]}, ["'image_R@50'", "image_R@10"]),
        ({"rows": [{"name": "a", "set": {"lr": 1}}]}, ["'lr'", "dotted key"]),
    ],
)
def test_bad_suites_fail_before_any_row_trains(ray_session, tune_cache, tmp_path, capsys, suite, words):
    if isinstance(suite, dict):
        suite = str(write_yaml(tmp_path / "suite.yaml", suite))
    base = write_yaml(tmp_path / "base.yaml", tiny_config(tune_cache, tmp_path / "out", "sqlite:///x.db"))
    assert isa(["ablate", "--suite", suite, "--config", str(base)]) == 2
    error = capsys.readouterr().err
    assert all(word in error for word in words), error
    assert not (tmp_path / "out").exists()


def test_pillow_plot_is_a_valid_png_with_missing_values():
    data = plot._pillow(["a", "b", "c"], [12.5, math.nan, 40.0], "title", "x", "R@1")
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (plot.WIDTH, plot.HEIGHT)
        rgb = image.convert("RGB")
    third, bar = plot.WIDTH // 3, (0x48, 0x78, 0xA8)
    columns = [range(i * third, (i + 1) * third) for i in range(3)]  # one bar slot per label
    bars = [sum(rgb.getpixel((x, y)) == bar for x in xs for y in range(0, plot.HEIGHT, 2)) for xs in columns]
    assert bars[1] == 0 and bars[2] > 2.5 * bars[0] > 0  # 40 against 12.5
