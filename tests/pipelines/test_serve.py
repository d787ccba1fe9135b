"""``isa serve`` as a user meets it: one real Serve application over a real index on the session's Ray, asked over
real HTTP and through its page in a real (headless) browser, checked against the eval path computed here in one
process (QueryEncoder + a full ranking of the cache's embeddings); bad requests refused and survived; refusals
before Ray."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from _ports import free_port
from _students import TEACHER, save_student
from PIL import Image

from isa.build import build_teacher
from isa.cache import MANIFEST_FILE, list_parts
from isa.checkpoint import find_checkpoint
from isa.config import load_config
from isa.data.synthetic import generate_world, write_world
from isa.query import QueryEncoder, student_views
from isa.retrieval import rank
from isa.storage import filesystem, read_column_values
from isa.teacher import load_teacher
from pipelines import embed
from pipelines import serve as serve_stage
from pipelines.cli import main as isa
from pipelines.serve import ServeError, ServeSettings

MAX_K = 50
MAX_UPLOAD_MB = 0.5
TEXTS = ["is red", "has two of them and is larger", ""]  # "" : image-only retrieval


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-world")
    write_world(generate_world(seed=7, num_images=30, num_triplets=4, image_size=48), root)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run folder holding one random-init checkpoint in the training stage's format."""
    run = tmp_path_factory.mktemp("serve-run")
    save_student(run / "checkpoint_000002" / "isa", seed=3, step=2)
    return run


@pytest.fixture(scope="module")
def gallery(ray_session, world, tmp_path_factory) -> dict:
    """The world's images embedded by ``isa embed --no-images`` and indexed by ``isa index`` (two shards)."""
    root = tmp_path_factory.mktemp("serve-gallery")
    cache, index = root / "cache", root / "index"
    config = load_config(
        None,
        [*TEACHER, "cache.store_images=false", "cache.local_grid=0", "cache.dtype=float32", "cache.rows_per_shard=16"],
    )
    embed.run(str(world / "images"), str(cache), config)
    assert isa(["index", str(cache), str(index), "--shards", "2"]) == 0
    fs, path = filesystem(str(cache))
    table = read_column_values(fs, list_parts(fs, path), ["id", "uri", "teacher_emb"])
    emb = np.asarray(table["teacher_emb"].to_pylist(), dtype=np.float32)  # (N, D)
    return {"index": str(index), "cache": str(cache), "ids": table["id"].to_pylist(), "emb": emb}


@pytest.fixture(scope="module")
def app(gallery, run_dir):
    """One Serve application for the module, on a free port; deleted (and Serve shut down) at the end."""
    from ray import serve

    settings = ServeSettings(
        checkpoint=str(run_dir),
        index=gallery["index"],
        port=free_port(),
        num_cpus=0.25,
        max_k=MAX_K,
        max_upload_mb=MAX_UPLOAD_MB,
        max_batch=8,
    )
    url = serve_stage.run(settings)
    yield url
    serve.delete(settings.name)
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(run_dir) -> QueryEncoder:
    """The eval path's encoder, in this process."""
    teacher = build_teacher(load_config(None, TEACHER).teacher)
    return QueryEncoder.from_checkpoint(str(find_checkpoint(run_dir)), teacher)


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _expected(reference: QueryEncoder, gallery: dict, data: bytes, text: str, k: int) -> tuple[list[str], np.ndarray]:
    """The eval path: student_views -> sentences -> compose (or image_only) -> a full ranking over the cache."""
    sentence = reference.sentences(student_views([data], reference.config)).sentence  # (1, M, w)
    query = reference.compose(sentence, [(text,)]) if text else reference.image_only(sentence)  # (1, D)
    emb = torch.from_numpy(gallery["emb"])
    top = rank(query, emb, k)[0].tolist()
    return [gallery["ids"][i] for i in top], (emb[top] @ query[0]).numpy()


def _post_image(url: str, data: bytes, text: str, k: int, **extra) -> requests.Response:
    return requests.post(
        f"{url}search", files={"image": ("query.png", data, "image/png")}, data={"text": text, "k": str(k)}, **extra
    )


def _assert_same_ranking(got: list[dict], ids: list[str], scores: np.ndarray) -> None:
    """Same ids in the same order; rows whose scores tie (float rounding apart) may come in either order."""
    assert len(got) == len(ids)
    np.testing.assert_allclose([r["score"] for r in got], scores, atol=2e-5)
    got_ids = [r["id"] for r in got]
    for position, (mine, theirs) in enumerate(zip(got_ids, ids)):
        if mine != theirs:  # allowed only inside a group of equal scores
            tied = {ids[i] for i in range(len(ids)) if abs(scores[i] - scores[position]) < 2e-5}
            assert mine in tied and theirs in tied, (position, got_ids, ids)


def _images(world: Path) -> list[Path]:
    return sorted((world / "images").iterdir())


# ------------------------------------------------------------------------------------------------ the API


def test_search_over_http_ranks_as_the_eval_path(app, world, gallery, reference):
    for n, path in enumerate(_images(world)[:3]):
        for text in TEXTS:
            response = _post_image(app, _png(path), text, 10 + n)
            assert response.status_code == 200, response.text
            body = response.json()
            ids, scores = _expected(reference, gallery, _png(path), text, 10 + n)
            _assert_same_ranking(body["results"], ids, scores)
            maps = np.asarray(body["attention"])  # (M, h, w): the token learner's attention over the upload
            assert maps.ndim == 3 and maps.shape[0] == reference.config.token_learner.num_tokens
            assert np.isfinite(maps).all() and (maps >= 0).all()
    uris = {r["uri"] for r in body["results"]}
    assert uris <= {str(p) for p in _images(world)}


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(app, world, gallery, reference):
    from concurrent.futures import ThreadPoolExecutor

    paths = _images(world)[3:9]
    with ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(lambda p: _post_image(app, _png(p), "is blue", 5), paths))
    for path, response in zip(paths, answers):
        assert response.status_code == 200, response.text
        _assert_same_ranking(response.json()["results"], *_expected(reference, gallery, _png(path), "is blue", 5))


def _same_as_upload(app: str, path: Path, words: np.ndarray) -> None:
    """Pseudo-words (M, w) sent as JSON find what the upload of the image finds, with and without text."""
    for text in ("is green", ""):
        sent = requests.post(f"{app}search", json={"pseudo_words": words.tolist(), "text": text, "k": 8})
        assert sent.status_code == 200, sent.text
        uploaded = _post_image(app, _png(path), text, 8).json()
        assert [r["id"] for r in sent.json()["results"]] == [r["id"] for r in uploaded["results"]]
        np.testing.assert_allclose(
            [r["score"] for r in sent.json()["results"]], [r["score"] for r in uploaded["results"]], atol=1e-4
        )
        assert "attention" not in sent.json()


def test_pseudo_words_over_json_give_the_results_of_the_upload(app, world, reference):
    path = _images(world)[1]
    words = reference.sentences(student_views([_png(path)], reference.config)).sentence[0].numpy()  # (M, w)
    _same_as_upload(app, path, words)


def test_edge_flow_exported_encoder_on_the_client(app, world, run_dir, tmp_path):
    """The exported encoder on the client, its pseudo-words over JSON: the same answer as an upload."""
    from pipelines.export.client import ExportedEncoder

    assert isa(["export", str(run_dir), str(tmp_path / "export")]) == 0
    encoder = ExportedEncoder.load(str(tmp_path / "export"))
    for path in _images(world)[:2]:
        _same_as_upload(app, path, encoder.pseudo_words([_png(path)])[0])


def test_gallery_thumbnails_and_health(app, gallery):
    health = requests.get(f"{app}healthz").json()
    assert health["status"] == "ok" and health["index"]["count"] == len(gallery["ids"])
    assert health["index"]["shards"] == 2
    image_id = gallery["ids"][0]
    response = requests.get(f"{app}images/{image_id}", params={"size": 32})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(response.content))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) == 32
    missing = requests.get(f"{app}images/{'0' * 64}")
    assert missing.status_code == 404 and "no gallery image" in missing.json()["detail"]
    assert set(requests.get(f"{app}gallery", params={"n": 4}).json()["ids"]) <= set(gallery["ids"])


def test_bad_requests_are_refused_and_the_app_keeps_serving(app, world, reference):
    image = _png(_images(world)[0])
    words = np.zeros((reference.config.token_learner.num_tokens, reference.teacher.word_dim)).tolist()
    big = b"\x89PNG" + bytes(int(MAX_UPLOAD_MB * 2**20))
    cases = {
        "not an image": (_post_image(app, b"this is text, not pixels", "x", 5), 400, "not a usable image"),
        "an empty upload": (_post_image(app, b"", "x", 5), 400, "no query image"),
        "an upload over the limit": (_post_image(app, big, "x", 5), 413, "exceeds the upload limit"),
        "k of 0": (_post_image(app, image, "x", 0), 400, f"between 1 and {MAX_K}"),
        "k over max-k": (_post_image(app, image, "x", MAX_K + 1), 400, f"between 1 and {MAX_K}"),
        "k not a number": (_post_image(app, image, "x", "ten"), 400, "k must be an integer"),  # type: ignore[arg-type]
        "no image at all": (
            requests.post(f"{app}search", data={"text": "x", "k": "3"}, files={"a": b""}),
            400,
            "no query image",
        ),  # fmt: skip
        "JSON without pseudo_words": (requests.post(f"{app}search", json={"text": "x"}), 400, "no query image"),
        "pseudo_words of the wrong shape": (
            requests.post(f"{app}search", json={"pseudo_words": [row[:-1] for row in words], "k": 3}),
            400,
            "must have shape",
        ),
        "pseudo_words not finite": (
            requests.post(
                f"{app}search",
                data=json.dumps({"pseudo_words": [[float("nan")] * len(words[0])] * len(words)}),
                headers={"content-type": "application/json"},
            ),
            400,
            "finite",
        ),  # fmt: skip
        "pseudo_words not numbers": (requests.post(f"{app}search", json={"pseudo_words": "abc"}), 400, "shape"),
        "a body that is not JSON": (
            requests.post(f"{app}search", data=b"{", headers={"content-type": "application/json"}),
            400,
            "not valid JSON",
        ),
        "another content type": (requests.post(f"{app}search", data=b"x"), 415, "multipart/form-data"),
    }
    for case, (response, status, message) in cases.items():
        assert response.status_code == status, (case, response.status_code, response.text)
        assert message in response.json()["detail"], (case, response.json())
    assert requests.get(f"{app}healthz").json()["status"] == "ok"
    good = _post_image(app, image, "is red", 3)
    assert good.status_code == 200 and len(good.json()["results"]) == 3


# --------------------------------------------------------------------------------------------------- the page


def test_search_page_in_a_browser_shows_the_api_results_and_attention(app, world, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the search page's test needs Debian's chromium: apt-get install chromium (.ci/run does)"
    query = tmp_path / "query.png"
    query.write_bytes(_png(_images(world)[5]))
    expected = _post_image(app, query.read_bytes(), "has two of them", 12).json()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(app)
            page.wait_for_selector("#examples img.example")  # gallery thumbnails to click, from GET /gallery
            page.set_input_files("#image", str(query))
            page.fill("#text", "has two of them")
            page.fill("#k", "12")
            page.click("#submit")
            page.wait_for_selector("body[data-state=done]")
            shown = page.eval_on_selector_all(
                "#results .result[data-id]", "els => els.map(e => [e.dataset.id, Number(e.dataset.score)])"
            )
            assert [i for i, _ in shown] == [r["id"] for r in expected["results"]]
            np.testing.assert_allclose([s for _, s in shown], [r["score"] for r in expected["results"]], atol=1e-6)
            page.wait_for_function(
                "[...document.querySelectorAll('#results .result img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            canvases = page.eval_on_selector_all(
                "#attention canvas",
                """els => els.map(c => {
                    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let lit = 0, red = 0;
                    for (let i = 0; i < data.length; i += 4) {
                        if (data[i + 3] > 0 && data[i] + data[i + 1] + data[i + 2] > 0) lit++;
                        if (data[i] > data[i + 1] + 40) red++;
                    }
                    return {w: c.width, h: c.height, lit, red};
                })""",
            )
            assert len(canvases) == len(expected["attention"])  # one per pseudo-word
            for canvas in canvases:
                assert canvas["w"] > 0 and canvas["h"] > 0
                assert canvas["lit"] > canvas["w"] * canvas["h"] // 2  # the query image is drawn
                assert canvas["red"] > 0  # and the heatmap over it
            page.click("#examples img.example >> nth=0")  # a gallery image as the query
            page.wait_for_function("!document.querySelector('#submit').disabled")
            page.fill("#text", "")
            page.click("#submit")
            page.wait_for_selector("body[data-state=done]")
            assert page.locator("#results .result[data-id]").count() == 12
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------------ refusals


def _mismatched_index(index: str, folder: Path) -> str:
    """A copy of the index whose manifest names another teacher."""
    shutil.copytree(index, folder)
    manifest = json.loads((folder / "_isa_index.json").read_text())
    manifest["teacher"] = load_teacher("isa-tiny-ViT-custom-text", "none", seed=0).fingerprint()
    (folder / "_isa_index.json").write_text(json.dumps(manifest))
    return str(folder)


def test_refusals_come_before_ray(gallery, run_dir, tmp_path, capsys, monkeypatch):
    def no_ray():
        raise AssertionError("isa serve started Ray before refusing")

    monkeypatch.setattr(serve_stage, "init_ray", no_ray)
    other = _mismatched_index(gallery["index"], tmp_path / "other-index")
    argv = ["serve", "--checkpoint", str(run_dir), "--index", other, "--port", "1"]
    assert isa(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("isa serve: error: ") and "another teacher" in error
    assert "isa-tiny-ViT-custom-text" in error and "isa-tiny-ViT (none" in error  # both teachers named
    for extra, message in [
        (["--port", "70000"], "between 1 and 65535"),
        (["--max-k", "0"], "--max-k"),
        (["--num-cpus", "0"], "--num-cpus"),
        (["--default-k", "500"], "--default-k"),
    ]:
        assert isa(["serve", "--checkpoint", str(run_dir), "--index", gallery["index"], *extra]) == 2
        assert message in capsys.readouterr().err
    assert isa(["serve", "--checkpoint", str(tmp_path), "--index", gallery["index"]]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert isa(["serve", "--checkpoint", str(run_dir), "--index", gallery["cache"]]) == 2
    assert "not a gallery index" in capsys.readouterr().err
    assert (Path(gallery["cache"]) / MANIFEST_FILE).is_file()


def test_a_port_in_use_is_refused(gallery, run_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_stage.check(ServeSettings(checkpoint=str(run_dir), index=gallery["index"], port=port))


def test_an_application_larger_than_the_machine_is_refused(gallery, run_dir):
    defaults = ServeSettings(checkpoint=str(run_dir), index=gallery["index"])
    prepared = serve_stage.check(defaults, check_port_free=False)
    assert len(prepared.index_manifest["shards"]) == 2
    serve_stage.check_fits(defaults, prepared, 2)  # the defaults fit a 2-core laptop: 1 + 3 × 0.25
    larger = ServeSettings(checkpoint=str(run_dir), index=gallery["index"], encoder_replicas=2)
    with pytest.raises(ServeError, match=r"needs 2.75 CPUs .* has 2: lower them"):
        serve_stage.check_fits(larger, prepared, 2)


@pytest.mark.slow
def test_isa_serve_from_the_command_line_serves_until_stopped(gallery, run_dir, tmp_path):
    """The command a user types: its own local Ray instance (Serve's throughput mode: HAProxy, direct gRPC),
    the page and the API up, then Ctrl-C (or a container's SIGTERM) stops it and its Ray."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_SERVE_"))}
    command = [str(Path(sys.executable).with_name("isa")), "serve", "--checkpoint", str(run_dir)]
    command += ["--index", gallery["index"], "--port", str(port)]
    server = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if "search page and API at" in line:
                break
        assert f"http://127.0.0.1:{port}/" in lines[-1], "".join(lines[-20:])
        assert "Throughput optimized Ray Serve enabled" in "".join(lines)
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert health["status"] == "ok" and health["index"]["shards"] == 2
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
        server.send_signal(signal.SIGINT)
        rest = server.communicate(timeout=60)[0]
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0 and "isa serve: stopping" in rest
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
