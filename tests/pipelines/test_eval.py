"""``isa eval`` end to end on the synthetic world in the official layouts, against independent references.

References are computed here without the eval code: open_clip's own ``encode_image(preprocess(img))`` and
``encode_text``, a full stable sort over the gallery, and metrics written out loop by loop.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from _students import TEACHER, TINY, save_student
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Resize

from isa.build import build_student, build_task, build_teacher
from isa.config import Config, from_dict, load_config, parse_overrides
from isa.data.synthetic import generate_world, write_world
from isa.prompt import PromptComposer
from isa.teacher import register_project_configs
from pipelines import embed, tracking
from pipelines import eval as eval_stage
from pipelines.cli import main as isa
from pipelines.eval import outputs as eval_outputs
from pipelines.eval.gallery import EvalError
from pipelines.teacher import TeacherMismatchError


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-world")
    write_world(generate_world(seed=3, num_images=60, num_triplets=40, image_size=48), root)
    return root


def _save_student(folder: Path, *overrides: str) -> Path:
    """A (random-init) student checkpoint in the training stage's format."""
    return save_student(folder, *overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _save_student(tmp_path_factory.mktemp("run") / "checkpoint_000000" / "isa")


@pytest.fixture(scope="module")
def symmetric_checkpoint(tmp_path_factory) -> Path:
    return _save_student(tmp_path_factory.mktemp("symmetric") / "isa", "student.backbone=symmetric")


def _config(world: Path, output: Path, *overrides: str):
    return load_config(
        None,
        [*TINY, "cache.dtype=float32", f"eval.output={output}", "eval.latency_runs=2", *overrides],
    )


def _with(config: Config, *overrides: str) -> Config:
    return from_dict(parse_overrides(overrides), base=config)


OUTAGE_EXPERIMENT = "isa-eval-outage"


@pytest.fixture(scope="module")
def mlflow_outage() -> dict:
    """What ``cirr_val`` said on stderr (``said``) while the session's ``mlflow server`` was down."""
    return {}


@pytest.fixture(scope="module")
def cirr_val(
    ray_session, world, checkpoint, symmetric_checkpoint, mlflow_server_process, mlflow_outage, tmp_path_factory
):
    """CIRR val with two checkpoints, recorded into the session's ``mlflow server``, which is down when the evaluation
    opens its run and is started again (once the stage said so) while it evaluates: the run's records wait for it."""
    server = mlflow_server_process
    output = tmp_path_factory.mktemp("cirr-val")
    config = _config(world, output, "eval.benchmark=cirr", f"eval.dataset_root={world / 'cirr'}", "eval.split=val")
    config = _with(config, f"eval.checkpoints={checkpoint.parent.parent},{symmetric_checkpoint}")
    config = _with(config, f"eval.tracking_uri={server.uri}", f"eval.experiment={OUTAGE_EXPERIMENT}")
    server.stop()
    said = io.StringIO()
    thread = threading.Thread(target=_start_once_missed, args=(server, said), daemon=True)
    thread.start()
    try:  # the kept records are sent again every 0.5-1 s (RETRY_S, 1-10 s by default)
        with contextlib.redirect_stderr(said), pytest.MonkeyPatch.context() as patch:
            patch.setattr(tracking, "RETRY_S", (0.5, 1.0))
            document = eval_stage.run(config)
    finally:
        thread.join(timeout=300)
        if server.process is None:  # the session's server stays up for the other tests
            server.start()
    mlflow_outage["said"] = said.getvalue()
    return config, document


def _start_once_missed(server, said: io.StringIO) -> None:
    """Start ``server`` again once the stage has said that MLflow does not answer (its run's first record missed)."""
    deadline = time.monotonic() + 300
    while "does not answer" not in said.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    server.start()


# ---- independent references ------------------------------------------------------------------------------


def _reference_model():
    register_project_configs()  # the project's small configs, known to this process's open_clip
    torch.manual_seed(0)  # load_teacher's random init uses seed 0 too
    model, _, preprocess = open_clip.create_model_and_transforms("isa-tiny-ViT", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("isa-tiny-ViT")


def _image_emb(model, preprocess, paths: list[Path]) -> torch.Tensor:
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        return F.normalize(model.encode_image(pixels), dim=-1)


def _text_emb(model, tokenizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(texts)), dim=-1)


def _student_view(path: Path, size: int) -> torch.Tensor:
    """The training path written out: the cached JPEG (quality 90) then resize + centre crop: (3, s, s)."""
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=90)  # 48 px: no resize to 64
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    view = Compose([Resize(size, antialias=True), CenterCrop(size)])(image)
    return torch.from_numpy(np.asarray(view).copy()).permute(2, 0, 1).float() / 255


def _ranking(query: torch.Tensor, gallery: torch.Tensor, names: list[str], drop: str | None) -> list[str]:
    order = torch.sort(-(gallery @ query), stable=True).indices.tolist()
    return [names[i] for i in order if names[i] != drop]


def _recall(rankings: list[list[str]], targets: list[str], k: int) -> float:
    hits = 0
    for ranking, target in zip(rankings, targets):
        hits += target in ranking[:k]
    return 100 * hits / len(targets)


def _cirr_reference(world: Path, queries: torch.Tensor, entries: list[dict], split: dict) -> dict[str, float]:
    model, preprocess, _ = _reference_model()
    names = list(split)
    gallery = _image_emb(model, preprocess, [world / "cirr" / split[n] for n in names])
    full = [_ranking(q, gallery, names, e["reference"]) for q, e in zip(queries, entries)]
    subsets = [[n for n in r if n in e["img_set"]["members"]] for r, e in zip(full, entries)]
    targets = [e["target_hard"] for e in entries]
    out = {f"R@{k}": _recall(full, targets, k) for k in (1, 5, 10, 50)}
    out.update({f"Rs@{k}": _recall(subsets, targets, k) for k in (1, 2, 3)})
    out["(R@5+Rs@1)/2"] = (out["R@5"] + out["Rs@1"]) / 2
    return out


def _cirr_files(world: Path, split: str) -> tuple[list[dict], dict]:
    entries = json.loads((world / "cirr" / "cirr" / "captions" / f"cap.rc2.{split}.json").read_text())
    paths = json.loads((world / "cirr" / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
    return entries, paths


def _assert_close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


# ---- tests ------------------------------------------------------------------------------------------------


def test_cirr_baselines_equal_open_clip_brute_force(cirr_val, world):
    _, document = cirr_val
    entries, split = _cirr_files(world, "val")
    model, preprocess, tokenizer = _reference_model()
    text = _text_emb(model, tokenizer, [f"a photo of {e['caption']}" for e in entries])
    image = _image_emb(model, preprocess, [world / "cirr" / split[e["reference"]] for e in entries])
    rows = document["rows"]
    _assert_close(rows["text only (teacher)"], _cirr_reference(world, text, entries, split))
    _assert_close(rows["image only (teacher)"], _cirr_reference(world, image, entries, split))
    _assert_close(rows["image + text (teacher)"], _cirr_reference(world, F.normalize(image + text), entries, split))
    # the reference is removed: the image-only baseline would otherwise find it first every time
    assert document["gallery_size"] == len(split) and document["queries"] == len(entries)


def test_cirr_checkpoint_row_equals_the_student_computed_by_hand(cirr_val, world, checkpoint):
    config, document = cirr_val
    entries, split = _cirr_files(world, "val")
    teacher = build_teacher(config.teacher)
    torch.manual_seed(1)
    task = build_task(config, teacher, build_student(config, teacher)).eval()  # the checkpoint's weights
    composer = PromptComposer(teacher, "*")
    views = torch.stack([_student_view(world / "cirr" / split[e["reference"]], 64) for e in entries])
    with torch.no_grad():
        sentence = task.student(views).sentence
        queries = composer.compose(sentence, "a photo of {S} that {c}", [{"c": e["caption"]} for e in entries])
    row = document["rows"]["mobilenetv3_large_100 + atl"]
    _assert_close(row, _cirr_reference(world, queries, entries, split))


def test_cost_table_report_and_files(cirr_val):
    config, document = cirr_val
    teacher_cost, student_cost, symmetric_cost = document["cost"]
    teacher = build_teacher(config.teacher)
    tower = sum(p.numel() for p in teacher.model.visual.parameters())
    assert teacher_cost["params"] == tower
    student = build_student(config, teacher)
    assert student_cost["params"] == sum(p.numel() for p in student.parameters())
    assert student_cost["gflops"] > 0 and student_cost["latency_ms"] > 0
    symmetric = build_student(_with(config, "student.backbone=symmetric"), teacher)
    assert symmetric_cost["params"] == tower + sum(p.numel() for p in symmetric.parameters())
    assert symmetric_cost["gflops"] > teacher_cost["gflops"]  # the teacher tower runs inside it
    for cost in (teacher_cost, student_cost, symmetric_cost):  # timed interleaved, on a fixed thread count
        assert 0 < cost["latency_min_ms"] <= cost["latency_ms"] and cost["threads"] == config.eval.latency_threads
        assert cost["gpu_batch_ms"] is None  # no GPU here: no GPU row
    assert set(document["rows"]) >= {"mobilenetv3_large_100 + atl", "symmetric"}
    output = Path(config.eval.output)
    assert json.loads((output / "metrics.json").read_text())["rows"] == document["rows"]
    table = (output / "table.md").read_text()
    assert all(name in table for name in document["rows"]) and "R@50" in table
    assert f"CPU batch 1, {config.eval.latency_threads} threads: median ms | fastest ms | vs teacher" in table
    cost_rows = [line for line in table.splitlines() if line.startswith("| ") and "ms" not in line][-3:]
    versus = [row.strip("| ").split(" | ")[5] for row in cost_rows]
    assert versus[0] == "–"  # the teacher row: the path the others are compared with
    assert all(re.fullmatch(r"\d+\.\d× (faster|slower)|same", v) for v in versus[1:]), versus
    assert not re.search(r"(?<![\d.])0\.0×", table)  # no ratio shown as 0.0× (20.0× is one)
    report = (output / "report.html").read_text()
    assert report.count("data:image/jpeg;base64,") > 8 * 7  # reference, target, attention maps, top-5 per method
    assert "token 4" in report  # M = 4 attention maps of the checkpoint
    _check_report_targets(report, document, config.eval.report_queries)


def _check_report_targets(report: str, document: dict, count: int) -> None:
    """Each shown query has its target beside its reference; where a method found it, it is marked there."""
    blocks = report.split('<div class="query">')[1:]
    assert len(blocks) == count
    methods = set(document["rows"])
    for block in blocks:
        targets = re.findall(
            r'<figure class="target"><img src="data:image/jpeg;base64,[^"]+"><figcaption>target: ([^<]+)<', block
        )
        assert len(targets) == 1, block[:300]
        target = html.unescape(targets[0])
        rows = dict(
            re.findall(r'<div class="row"><div class="label">([^<]+)(?:<br>[^/]*</span>)?</div>(.*?)</div>', block)
        )
        assert set(rows) >= methods
        for method in methods:
            shown = [html.unescape(c) for c in re.findall(r"<figcaption>([^<]+)</figcaption>", rows[method])]
            assert len(shown) == 5
            if f"{target} (target)" in shown:  # found: marked as the target, with the hit frame
                assert '<figure class="hit"><img src="data:image/jpeg;base64,' in rows[method]
            else:
                assert target not in shown and "target not in the top 5" in block


def test_cost_comparison_says_faster_or_slower_instead_of_rounding_to_zero():
    from pipelines.eval.outputs import versus

    assert versus(10.0, 0.04) == "250.0× slower"  # a student slower than a tiny teacher tower: never "0.0×"
    assert versus(31.0, 884.0) == "28.5× faster" and versus(1.0, 1.02) == "same" and versus(0.0, 1.0) == "–"


def test_gallery_cache_is_reused_and_another_teacher_is_refused(cirr_val, tmp_path):
    config, first = cirr_val
    cache = Path(first["gallery_cache"])
    parts = sorted(p.name for p in cache.glob("part-*.parquet"))
    again = eval_stage.run(
        _with(config, f"eval.output={tmp_path}", f"eval.gallery_cache={cache}", "eval.latency_runs=0")
    )
    assert again["rows"] == first["rows"]
    assert sorted(p.name for p in cache.glob("part-*.parquet")) == parts  # nothing embedded twice
    other = _with(config, "teacher.name=isa-tiny-ViT-custom-text", "eval.checkpoints=", f"eval.gallery_cache={cache}")
    with pytest.raises(TeacherMismatchError, match=f"isa-tiny-ViT-custom-text .* gallery cache {cache}, isa-tiny-ViT "):
        eval_stage.run(_with(other, f"eval.output={tmp_path / 'other'}"))
    assert not (tmp_path / "other").exists()


def test_cirr_test_split_writes_the_server_files(
    ray_session, world, checkpoint, mlflow_server, tmp_path, tmp_path_factory
):
    """``--split test`` reads CIRR's test1 files; every output is named test1 (the split as the files name it). The
    dataset's first caption holds markup: the report shows it as text."""
    import mlflow

    root = tmp_path_factory.mktemp("cirr-markup") / "cirr"
    shutil.copytree(world / "cirr", root)
    captions = root / "cirr" / "captions" / "cap.rc2.test1.json"
    edited = json.loads(captions.read_text())
    edited[0]["caption"] = f"<script>alert(1)</script> {edited[0]['caption']}"
    captions.write_text(json.dumps(edited))
    config = _config(world, tmp_path, "eval.benchmark=cirr", f"eval.dataset_root={root}")
    config = _with(config, "eval.split=test", f"eval.checkpoints={checkpoint}", "eval.latency_runs=0")
    document = eval_stage.run(_with(config, f"eval.tracking_uri={mlflow_server}"))
    entries, split = _cirr_files(world, "test1")
    assert document["rows"] == {} and len(document["submissions"]) == 4
    assert document["split"] == "test1" and document["gallery_cache"] == str(tmp_path / "gallery-cirr-test1")
    names = [p.name for p in tmp_path.iterdir()]
    assert "gallery-cirr-test1" in names and "images-cirr-test1.txt" in names
    assert not [n for n in names if re.search(r"test(?!1)", n)], names
    page = (tmp_path / "report.html").read_text()
    assert "isa eval · cirr test1" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert (tmp_path / "table.md").read_text().startswith("## cirr test1 ")
    run = mlflow.MlflowClient(tracking_uri=mlflow_server).get_run(document["mlflow_run_id"])
    assert run.info.run_name == "eval-cirr-test1"
    assert [a.path for a in mlflow.MlflowClient(tracking_uri=mlflow_server).list_artifacts(run.info.run_id)] == [
        "eval-cirr-test1"
    ]
    for files in document["submissions"].values():
        recall = json.loads(Path(files[0]).read_text())
        subset = json.loads(Path(files[1]).read_text())
        assert recall.pop("version") == subset.pop("version") == "rc2"
        assert (recall.pop("metric"), subset.pop("metric")) == ("recall", "recall_subset")
        assert set(recall) == set(subset) == {str(e["pairid"]) for e in entries}
        for entry in entries:
            top, top3 = recall[str(entry["pairid"])], subset[str(entry["pairid"])]
            assert len(top) == len(set(top)) == min(50, len(split) - 1) and set(top) <= set(split)
            assert entry["reference"] not in top and entry["reference"] not in top3
            assert len(top3) == 3 and set(top3) <= set(entry["img_set"]["members"])


def test_fashioniq_per_category_and_mean_with_a_checkpoint_on_s3(ray_session, s3_endpoint, world, checkpoint, tmp_path):
    import s3fs

    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    s3.mkdir("isa-runs")
    s3.put(str(checkpoint.parent.parent) + "/", "isa-runs/run/", recursive=True)  # run/checkpoint_000000/isa
    config = _config(world, tmp_path, "eval.benchmark=fashioniq", f"eval.dataset_root={world / 'fashioniq'}")
    document = eval_stage.run(_with(config, "eval.checkpoints=s3://isa-runs/run", "eval.latency_runs=0"))
    assert not (tmp_path / "checkpoints").exists()  # the tasks copy it where they run; nothing measured here
    model, preprocess, _ = _reference_model()
    root = world / "fashioniq"
    expected = {}
    for category in ("dress", "shirt", "toptee"):
        names = json.loads((root / "image_splits" / f"split.{category}.val.json").read_text())
        entries = json.loads((root / "captions" / f"cap.{category}.val.json").read_text())
        gallery = _image_emb(model, preprocess, [root / "images" / f"{n}.png" for n in names])
        queries = _image_emb(model, preprocess, [root / "images" / f"{e['candidate']}.png" for e in entries])
        rankings = [_ranking(q, gallery, names, drop=None) for q in queries]  # the reference stays
        for k in (10, 50):
            expected[f"{category}/R@{k}"] = _recall(rankings, [e["target"] for e in entries], k)
    for k in (10, 50):
        expected[f"mean/R@{k}"] = sum(expected[f"{c}/R@{k}"] for c in ("dress", "shirt", "toptee")) / 3
    _assert_close(document["rows"]["image only (teacher)"], expected)
    assert set(document["rows"]["mobilenetv3_large_100 + atl"]) == set(expected)


def _average_precision(ranking: list[int], truths: set[int], k: int) -> float:
    hits, total = 0, 0.0
    for position, image_id in enumerate(ranking[:k], start=1):
        if image_id in truths:
            hits += 1
            total += hits / position
    return total / min(len(truths), k)


def test_circo_val_map_and_test_submission(ray_session, world, tmp_path):
    root = world / "circo"
    config = _config(world, tmp_path, "eval.benchmark=circo", f"eval.dataset_root={root}", "eval.latency_runs=0")
    document = eval_stage.run(config)
    entries = json.loads((root / "annotations" / "val.json").read_text())
    info = json.loads((root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").read_text())
    ids = [image["id"] for image in info["images"]]
    model, preprocess, tokenizer = _reference_model()
    folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    gallery = _image_emb(model, preprocess, [folder / image["file_name"] for image in info["images"]])
    queries = _text_emb(model, tokenizer, [f"a photo of {e['relative_caption']}" for e in entries])
    rankings = [_ranking(q, gallery, ids, drop=None) for q in queries]
    row = document["rows"]["text only (teacher)"]
    for k in (5, 10, 25, 50):
        expected = [_average_precision(r, set(e["gt_img_ids"]), k) for r, e in zip(rankings, entries)]
        assert row[f"mAP@{k}"] == pytest.approx(100 * np.mean(expected), abs=1e-6)
        assert row[f"R@{k}"] == pytest.approx(_recall(rankings, [e["target_img_id"] for e in entries], k), abs=1e-6)
    aspects = {a for e in entries for a in e["semantic_aspects"]}
    assert {f"mAP@10/{a}" for a in aspects} <= set(row)

    test = eval_stage.run(_with(config, "eval.split=test", f"eval.output={tmp_path / 'test'}"))
    test_entries = json.loads((root / "annotations" / "test.json").read_text())
    for files in test["submissions"].values():
        submission = json.loads(Path(files[0]).read_text())
        assert set(submission) == {str(e["id"]) for e in test_entries}
        for top in submission.values():
            assert len(top) == len(set(top)) == min(50, len(ids)) and set(top) <= set(ids)
            assert all(isinstance(image_id, int) for image_id in top)


def test_distractors_only_lower_recall(ray_session, world, checkpoint, tmp_path):
    other = tmp_path / "other"
    write_world(generate_world(seed=9, num_images=40, num_triplets=10, image_size=48), other)
    distractors = tmp_path / "distractors"
    embed.run(str(other / "images"), str(distractors), _config(world, tmp_path, "cache.store_images=false"))
    config = _config(world, tmp_path / "eval", "eval.benchmark=cirr", f"eval.dataset_root={world / 'cirr'}")
    config = _with(config, f"eval.distractors={distractors}", "eval.distractor_counts=5,30")
    document = eval_stage.run(config)
    assert set(document["scaling"]) == {"5", "30"}
    for method, base in document["rows"].items():
        for k in (1, 5, 10, 50):
            assert document["scaling"]["30"][method][f"R@{k}"] <= document["scaling"]["5"][method][f"R@{k}"]
            assert document["scaling"]["5"][method][f"R@{k}"] <= base[f"R@{k}"]
        assert document["scaling"]["30"][method]["Rs@1"] == base["Rs@1"]  # the subset ignores the gallery
    too_many = _with(config, "eval.distractor_counts=10000", f"eval.output={tmp_path / 'x'}")
    with pytest.raises(EvalError, match="fewer than 10000"):
        eval_stage.run(too_many)


def test_image_only_retrieval_on_a_cache_without_a_teacher_setting(ray_session, world, checkpoint, tmp_path):
    """From the command line with no teacher named: the checkpoint's and the cache's (the default ViT-L-14 is never
    looked for, so this runs offline)."""
    cache = tmp_path / "cache"
    config = _config(world, tmp_path, "eval.benchmark=images", f"eval.dataset_root={cache}", "train.val_fraction=0.5")
    embed.run(str(world / "images"), str(cache), config)
    output = tmp_path / "out"
    flags = ["--benchmark", "images", "--dataset-root", str(cache), "--checkpoint", str(checkpoint)]
    assert isa(["eval", *flags, "train.val_fraction=0.5", "eval.latency_runs=2", f"eval.output={output}"]) == 0
    document = json.loads((output / "metrics.json").read_text())
    row = document["rows"]["mobilenetv3_large_100 + atl"]
    assert set(row) == {"R@1", "R@5", "R@10"} and 0 < document["queries"] <= 1000
    assert 0 <= row["R@1"] <= row["R@5"] <= row["R@10"] <= 100


def test_mlflow_records_the_metrics_and_files_made_while_the_server_was_down(cirr_val, mlflow_server, mlflow_outage):
    """The server down when the evaluation opened its run and started again while it ran: the stage finished with
    its outputs, said so once each way, and every record arrived once (none kept in ``mlflow-unsent``)."""
    import mlflow

    config, document = cirr_val
    said = mlflow_outage["said"]
    assert said.count("does not answer") == 1 and said.count("answers again") == 1, said
    assert "isa eval goes on, its records are kept and sent when MLflow answers" in said
    assert tracking.UNSENT_FOLDER not in said and not (Path(config.eval.output) / tracking.UNSENT_FOLDER).exists()
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(document["mlflow_run_id"])
    runs = client.search_runs([client.get_experiment_by_name(OUTAGE_EXPERIMENT).experiment_id])
    mine = [r.info.run_id for r in runs if r.data.params.get("eval.output") == config.eval.output]
    assert mine == [run.info.run_id]  # one run, though its records were sent again
    assert run.info.status == "FINISHED" and document["mlflow_tracking_uri"] == mlflow_server
    for row, slug in [("text only (teacher)", "text-only-teacher"), ("symmetric", "symmetric")]:
        for name, key in [("R@1", "R_at_1"), ("(R@5+Rs@1)/2", "R_at_5_plus_Rs_at_1/2")]:
            assert run.data.metrics[f"eval/cirr/{slug}/{key}"] == pytest.approx(document["rows"][row][name])
    rows = document["rows"]
    expected = {eval_outputs.metric_key(f"eval/cirr/{eval_outputs.slug(r)}/{m}") for r in rows for m in rows[r]}
    assert set(run.data.metrics) == expected
    for key in expected:  # each metric once
        assert len(client.get_metric_history(run.info.run_id, key)) == 1
    assert run.data.params["eval.benchmark"] == "cirr"
    files = {f.path.split("/")[-1] for f in client.list_artifacts(run.info.run_id, "eval-cirr-val")}
    assert files == {"metrics.json", "table.md", "report.html"}


def test_command_line_errors(ray_session, world, tmp_path, capsys, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert isa(["eval", "--benchmark", "cirr", f"eval.output={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("isa eval: error: set eval.dataset_root")
    output = tmp_path / "out"
    broken = tmp_path / "broken"
    shutil.copytree(world / "cirr", broken)
    (broken / "cirr" / "captions" / "cap.rc2.val.json").write_text('[{"pairid": 1}]')
    code = isa(["eval", "--benchmark", "cirr", "--dataset-root", str(broken), *TEACHER, f"eval.output={output}"])
    assert code == 2 and "cap.rc2.val.json" in capsys.readouterr().err
    assert not output.exists()  # the benchmark's files are read before any record is opened or file written
    # an image the gallery cannot embed shows once the run is open (tracked by default, no checkpoint: the
    # output's own store): the run ends FAILED
    gone = tmp_path / "unreadable"
    shutil.copytree(world / "cirr", gone)
    next((gone / "dev").glob("*.png")).write_bytes(b"not an image")
    code = isa(["eval", "--benchmark", "cirr", "--dataset-root", str(gone), *TEACHER, f"eval.output={output}"])
    assert code == 2 and "have no embedding" in capsys.readouterr().err
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("isa-eval")
    (failed,) = client.search_runs([experiment.experiment_id])
    assert failed.info.status == "FAILED" and failed.info.run_name == "eval-cirr-val"
    assert experiment.artifact_location == (output / "mlartifacts" / "isa-eval").as_uri()
    missing = ["--benchmark", "cirr", "--dataset-root", str(world / "cirr"), "--checkpoint", str(tmp_path / "none")]
    assert isa(["eval", *missing, *TEACHER, f"eval.output={output}"]) == 2
    assert "no complete checkpoint at" in capsys.readouterr().err
    assert len(client.search_runs([experiment.experiment_id])) == 1  # refused before a run was opened
    assert isa(["eval", "--benchmark", "cirr", "--dataset-root", str(world / "cirr"), f"eval.output={tmp_path}"]) == 2
    assert "holds no isa eval output (it holds broken, out, unreadable)" in capsys.readouterr().err


def test_report_escapes_the_html_in_captions_names_and_methods(tmp_path):
    """Captions and file names come from the dataset: markup in them is shown as text, never run."""
    from isa.data.benchmarks import Query
    from pipelines.eval.report import Sample, render

    names = ['<img src=x onerror="alert(1)">.png', "b&c.png", "plain.png"]
    images = {}
    for i, name in enumerate(names):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), (60 * i, 90, 120)).save(path)
        images[name] = str(path)
    query = Query("<b>7</b>", names[0], ("make it <script>alert(2)</script> red",), names[1])
    sample = Sample(query, {"<i>method</i>": [names[1], names[2]]}, {"<i>method</i>": np.ones((2, 3, 3))})
    page = render("title <u>x</u>", "| <th> |", [sample], images)
    for raw in ("<script>", "<img src=x", "<b>7</b>", "<i>method</i>", "<u>x</u>", "| <th> |"):
        assert raw not in page, raw
    for shown in (
        "&lt;script&gt;alert(2)&lt;/script&gt;",
        "&lt;b&gt;7&lt;/b&gt;",
        "&lt;i&gt;method&lt;/i&gt;",
        "b&amp;c.png",
    ):
        assert shown in page, shown
    assert html.unescape(page).count("<img src=x onerror") == 1  # the one name, escaped, as a caption
    assert page.count('<img src="data:image/jpeg;base64,') == 6  # reference, target, 2 attention maps, 2 results


def test_a_scratch_folder_for_checkpoint_copies_goes_when_its_process_exits():
    """Where a remote checkpoint is copied for a process that uses it to its end (``isa eval`` writing to object
    storage, ``isa export``): nothing is left in the temporary folder of the machine."""
    code = (
        "import pathlib; from pipelines.eval import scratch_folder; folder = scratch_folder('isa-eval-'); "
        "pathlib.Path(folder, 'weights.safetensors').write_bytes(b'0' * 1024); print(folder)"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    folder = Path(child.stdout.split()[-1])
    assert folder.name.startswith("isa-eval-") and not folder.exists()
