"""``isa search`` as a user runs it: a query file through Ray Data against a real index, checked against the
query encoder and a brute-force ranking computed here in one process; bad rows reported, refusals before work."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _students import TINY, save_student

from isa.build import build_teacher
from isa.cache import Manifest, shard_table, write_manifest
from isa.config import load_config
from isa.data.synthetic import generate_world, write_world
from isa.query import QueryEncoder, student_views
from isa.storage import filesystem, write_table
from pipelines.cli import main as isa

GALLERY = 60


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search-world")
    write_world(generate_world(seed=5, num_images=30, num_triplets=4, image_size=48), root)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("search-run")
    save_student(run / "checkpoint_000004" / "isa", seed=2, step=4)
    return run


def _gallery_cache(folder: Path, fingerprint: dict, dim: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(GALLERY, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    manifest = Manifest(teacher=fingerprint, embed_dim=dim, local_grid=0, dtype="float32", image_size=None)
    fs, root = filesystem(str(folder))
    uris = [f"s3://gallery/{i}.jpg" for i in range(GALLERY)]
    for part in range(2):
        rows = slice(part * GALLERY // 2, (part + 1) * GALLERY // 2)
        ids = [f"{i:064x}" for i in range(GALLERY)][rows]
        table = shard_table(manifest, ids, uris[rows], np.full((GALLERY // 2, 2), 64), emb[rows])
        write_table(fs, f"{root}/part-{part}.parquet", table)
    write_manifest(fs, root, manifest)
    return emb, uris


@pytest.fixture(scope="module")
def index(ray_session, tmp_path_factory) -> tuple[str, np.ndarray, list[str]]:
    teacher = build_teacher(load_config(None, TINY).teacher)
    root = tmp_path_factory.mktemp("search-index")
    emb, uris = _gallery_cache(root / "cache", teacher.fingerprint(), teacher.embed_dim)
    assert isa(["index", str(root / "cache"), str(root / "index")]) == 0
    return str(root / "index"), emb, uris


def _expected(run_dir: Path, images: list[Path], texts: list[str], emb: np.ndarray, uris: list[str], k: int):
    """In one process: the encoder's composed (or image-only) queries, ranked by a full sort over the gallery."""
    teacher = build_teacher(load_config(None, TINY).teacher)
    encoder = QueryEncoder.from_checkpoint(str(run_dir / "checkpoint_000004" / "isa"), teacher)
    sentence = encoder.sentences(student_views([p.read_bytes() for p in images], encoder.config)).sentence
    rows = []
    for i, text in enumerate(texts):
        query = encoder.compose(sentence[i : i + 1], [(text,)]) if text else encoder.image_only(sentence[i : i + 1])
        scores = emb @ query[0].numpy()
        order = np.argsort(-scores, kind="stable")[:k]
        rows.append(([uris[j] for j in order], scores[order]))
    return rows


def test_every_query_gets_the_in_process_ranking_and_bad_rows_say_why(world, run_dir, index, tmp_path):
    index_uri, emb, uris = index
    images = sorted((world / "images").glob("*.png"))[:5]
    texts = ["is red", "", "has stripes", "is smaller", "a photo of it, but blue"]
    (tmp_path / "not-an-image.png").write_text("hello")
    rows = [{"image": str(p), "text": t, "query": i} for i, (p, t) in enumerate(zip(images, texts))]
    rows += [{"image": str(tmp_path / "not-an-image.png"), "text": "x", "query": 5}]
    rows += [{"image": str(tmp_path / "missing.png"), "text": "x", "query": 6}]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "results"
    argv = ["search", "--checkpoint", str(run_dir), "--index", index_uri, str(tmp_path / "queries.jsonl"), str(out)]
    assert isa([*argv, "--k", "7", "--batch-size", "3"]) == 0

    table = pq.read_table(sorted(out.rglob("*.parquet"))).to_pylist()
    by_query = {row["query"]: row for row in table}
    assert sorted(by_query) == list(range(7))  # every row once
    for i, (expected_uris, expected_scores) in enumerate(_expected(run_dir, images, texts, emb, uris, 7)):
        row = by_query[i]
        assert row["error"] is None and row["text"] == texts[i]
        assert [hit["uri"] for hit in row["results"]] == expected_uris
        np.testing.assert_allclose([hit["score"] for hit in row["results"]], expected_scores, atol=1e-5)
    assert by_query[5]["results"] == [] and by_query[6]["results"] == []
    assert by_query[5]["error"].startswith("ImageRejected") and by_query[6]["error"].startswith("FileNotFoundError")
    manifest = json.loads((out / "_isa_search.json").read_text())
    assert (manifest["searched"], manifest["failed"], manifest["k"]) == (7, 2, 7)

    # a rerun into the same folder is refused unless asked to replace it; nothing is touched
    assert isa(argv) == 2
    assert sorted(out.rglob("*.parquet")) and (out / "_isa_search.json").exists()


def test_a_csv_of_queries_gives_jsonl_results(world, run_dir, index, tmp_path):
    index_uri, emb, uris = index
    images = sorted((world / "images").glob("*.png"))[5:7]
    with open(tmp_path / "queries.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text"])
        writer.writerows([[str(images[0]), "is green"], [str(images[1]), "2"]])  # a text that reads as a number
    out = tmp_path / "out"
    argv = ["search", "--checkpoint", str(run_dir), "--index", index_uri, str(tmp_path / "queries.csv"), str(out)]
    assert isa([*argv, "--k", "3", "--format", "jsonl"]) == 0
    rows = [json.loads(line) for path in sorted(out.rglob("*.json*")) if path.name != "_isa_search.json"
            for line in path.read_text().splitlines()]  # fmt: skip
    expected = _expected(run_dir, images, ["is green", "2"], emb, uris, 3)
    assert {row["image"]: [hit["uri"] for hit in row["results"]] for row in rows} == {
        str(images[0]): expected[0][0],
        str(images[1]): expected[1][0],
    }


def test_refusals_come_before_any_work(run_dir, index, tmp_path, capsys):
    index_uri, _, _ = index
    (tmp_path / "q.jsonl").write_text(json.dumps({"picture": "a.png"}) + "\n")
    (tmp_path / "q.txt").write_text("a.png\n")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    (tmp_path / "good.jsonl").write_text(json.dumps({"image": "a.png", "text": "x"}) + "\n")
    cases = {
        "has no 'image' column (found picture)": [str(tmp_path / "q.jsonl"), str(tmp_path / "o1")],
        "expected .jsonl, .json": [str(tmp_path / "q.txt"), str(tmp_path / "o2")],
        "not empty and holds no search result": [str(tmp_path / "good.jsonl"), str(tmp_path / "busy")],
    }
    for message, args in cases.items():
        assert isa(["search", "--checkpoint", str(run_dir), "--index", index_uri, *args]) == 2
        assert message in capsys.readouterr().err
    argv = ["--index", index_uri, str(tmp_path / "good.jsonl"), str(tmp_path / "o2")]
    assert isa(["search", "--checkpoint", str(tmp_path), *argv]) == 2
    assert "no complete checkpoint at" in capsys.readouterr().err
    # an index over another teacher's gallery
    other = load_config(None, [*TINY, "teacher.name=isa-tiny-ViT-custom-text"]).teacher
    teacher = build_teacher(other)
    _gallery_cache(tmp_path / "other-cache", teacher.fingerprint(), teacher.embed_dim)
    assert isa(["index", str(tmp_path / "other-cache"), str(tmp_path / "other-index")]) == 0
    argv = ["--index", str(tmp_path / "other-index"), str(tmp_path / "good.jsonl"), str(tmp_path / "o3")]
    assert isa(["search", "--checkpoint", str(run_dir), *argv]) == 2
    assert "made by different teachers" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.md"]
