"""Every stage's refusals as a user meets them: one line ``isa STAGE: error: ...``, exit status 2, before Ray starts,
and nothing written; the one rule for output folders (new, empty, or the stage's own)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from _students import TEACHER, save_student
from PIL import Image

from isa.cache import MANIFEST_FILE
from isa.data.synthetic import generate_world, write_world
from pipelines.cli import STAGES, main, stage_module

FOREIGN = ["notes.md", "a.txt", "b.txt", "c.txt", "d.txt"]  # a folder of someone's own things


def snapshot(root: Path) -> dict[str, str] | None:
    """Every file under ``root`` with its digest (None: ``root`` does not exist)."""
    if not root.exists():
        return None
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def fake_manifest(root: Path, model: str = "isa-tiny-ViT", **settings: object) -> Path:
    """A cache folder's ``_isa_cache.json`` as ``isa embed`` writes it (the fingerprint cut to what is read)."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "teacher": {"model": model, "pretrained": "none", "weights_sha256": "0" * 64},
        "embed_dim": 64,
        "local_grid": 4,
        "dtype": "float16",
        "image_size": 256,  # cache.image_size's default
        "tower_dtype": "float32",
        **settings,
    }
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Inputs good and bad: images, an empty folder, a foreign folder, a file of no known kind, a Parquet file without
    image bytes, caches (another dtype; gallery-only with a shard), a small world, a checkpoint, a world."""
    root = tmp_path_factory.mktemp("inputs")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(images / f"{i}.png")
    (root / "empty").mkdir()
    (root / "foreign").mkdir()
    for name in FOREIGN:
        (root / "foreign" / name).write_text("mine")
    (root / "blob.bin").write_bytes(b"\0")
    (root / "table").mkdir()
    pq.write_table(pa.table({"name": ["a"]}), root / "table" / "rows.parquet")
    fake_manifest(root / "cache-f16")
    gallery = fake_manifest(root / "gallery-only", image_size=None, local_grid=0)
    pq.write_table(pa.table({"id": ["a"]}), gallery / "part-00000000000000000000.parquet")
    write_world(generate_world(0, 30, 8, 32), root / "world")
    save_student(root / "checkpoint", "student.backbone=mobilenetv2_100")
    return root


@pytest.fixture
def no_ray(monkeypatch):
    """Fail any start of Ray: the stage's own ``init_ray`` and ``ray.init`` itself."""
    started = ray.is_initialized()

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started before the refusal")

    monkeypatch.setattr(ray, "init", tripwire)
    for name in STAGES:
        stage = stage_module(name)
        if hasattr(stage, "init_ray"):
            monkeypatch.setattr(stage, "init_ray", tripwire)
    yield
    assert ray.is_initialized() == started


TINY = [*TEACHER, "student.image_size=64", "token_learner.dim=64", "token_learner.heads=4"]
SWEEP = {"space": {"train.lr": {"grid": [0.001, 0.002]}}}

# (stage arguments from the inputs folder and a fresh OUT path, a fragment of the message, the folder to watch)
Case = tuple[Callable[[Path, Path], list[str]], str, Callable[[Path, Path], Path]]
CASES: dict[str, Case] = {
    "config: an unknown student": (
        lambda i, o: ["config", "student.backbone=resnet50"],
        "config key 'student.backbone': 'resnet50' is not a registered student; choose one of: efficientnet_b0",
        lambda i, o: o,
    ),
    "config: an unknown teacher": (
        lambda i, o: ["config", "teacher.name=ViT-L-15"],
        "'ViT-L-15' is not an open_clip model or a project model config (did you mean",
        lambda i, o: o,
    ),
    "config: a Hugging Face text tower": (
        lambda i, o: ["config", "teacher.name=roberta-ViT-B-32"],
        "has a Hugging Face text tower (roberta-base)",
        lambda i, o: o,
    ),
    "config: a pretrained tag on a project config": (
        lambda i, o: ["config", "teacher.name=isa-tiny-ViT", "teacher.pretrained=openai"],
        "isa-tiny-ViT is a project model config without pretrained tags",
        lambda i, o: o,
    ),
    "config: the symmetric student with the MLP mapper": (
        lambda i, o: ["config", "student.backbone=symmetric", "student.mapper=mlp"],
        "'student.mapper' must be 'atl' with student.backbone=symmetric",
        lambda i, o: o,
    ),
    "embed: a missing input": (
        lambda i, o: ["embed", str(i / "missing"), str(o), *TEACHER],
        "input not found:",
        lambda i, o: o,
    ),
    "embed: an empty input folder": (
        lambda i, o: ["embed", str(i / "empty"), str(o), *TEACHER],
        "no input files found under",
        lambda i, o: o,
    ),
    "embed: an input of no known kind": (
        lambda i, o: ["embed", str(i / "blob.bin"), str(o), *TEACHER],
        "cannot tell what kind of input",
        lambda i, o: o,
    ),
    "embed: Parquet without image bytes": (
        lambda i, o: ["embed", str(i / "table"), str(o), *TEACHER],
        "has no column 'image' with the image bytes (columns: ['name'])",
        lambda i, o: o,
    ),
    "embed: an unknown student": (
        lambda i, o: ["embed", str(i / "images"), str(o), *TEACHER, "student.backbone=resnet50"],
        "'resnet50' is not a registered student",
        lambda i, o: o,
    ),
    "embed: into a folder of other things": (
        lambda i, o: ["embed", str(i / "images"), str(i / "foreign"), *TEACHER],
        "holds no teacher cache (it holds a.txt, b.txt, c.txt, ... (5 entries)): name a new or empty folder",
        lambda i, o: i / "foreign",
    ),
    "embed: into a cache with other settings": (
        lambda i, o: ["embed", str(i / "images"), str(i / "cache-f16"), *TEACHER, "--dtype", "float32"],
        "was written with other settings (dtype): it holds teacher isa-tiny-ViT (none, weights sha256 000000000000…), "
        "dtype float16",
        lambda i, o: i / "cache-f16",
    ),
    "embed: into a cache of another teacher": (
        lambda i, o: [
            "embed",
            str(i / "images"),
            str(i / "cache-f16"),
            "--teacher",
            "isa-tiny-ViT-custom-text",
            "--pretrained",
            "none",
        ],
        "the teacher given, isa-tiny-ViT-custom-text (pretrained none), is another model than the one of teacher cache",
        lambda i, o: i / "cache-f16",
    ),
    "train: an unknown student": (
        lambda i, o: ["train", *TINY, "student.backbone=resnet50", f"train.output={o}"],
        "'resnet50' is not a registered student",
        lambda i, o: o,
    ),
    "train: a missing cache": (
        lambda i, o: ["train", *TINY, f"train.cache={i / 'missing'}", f"train.output={o}"],
        "no teacher cache at",
        lambda i, o: o,
    ),
    "train: a gallery-only cache": (
        lambda i, o: ["train", *TINY, f"train.cache={i / 'gallery-only'}", f"train.output={o}"],
        "has no image column (a gallery-only cache)",
        lambda i, o: o,
    ),
    "train: into a folder of other things": (
        lambda i, o: ["train", *TINY, f"train.cache={i / 'cache-f16'}", f"train.output={i / 'foreign'}"],
        "holds no training run (it holds a.txt, b.txt, c.txt, ...",
        lambda i, o: i / "foreign",
    ),
    "eval: no dataset root": (
        lambda i, o: ["eval", *TEACHER, "--output", str(o)],
        "set eval.dataset_root (--dataset-root)",
        lambda i, o: o,
    ),
    "eval: a missing dataset root": (
        lambda i, o: ["eval", *TEACHER, "--dataset-root", str(i / "missing"), "--output", str(o)],
        "is not a folder: name the benchmark's dataset root",
        lambda i, o: o,
    ),
    "eval: a dataset root without the benchmark": (
        lambda i, o: ["eval", *TEACHER, "--dataset-root", str(i / "empty"), "--output", str(o)],
        "split.rc2.val.json: file not found",
        lambda i, o: o,
    ),
    "eval: a folder that is no checkpoint": (
        lambda i, o: [
            "eval",
            *TEACHER,
            "--dataset-root",
            str(i / "world" / "cirr"),
            "--checkpoint",
            str(i / "empty"),
            "--output",
            str(o),
        ],
        "no complete checkpoint at",
        lambda i, o: o,
    ),
    "eval: image-only retrieval without a cache with images": (
        lambda i, o: [
            "eval",
            *TEACHER,
            "--benchmark",
            "images",
            "--dataset-root",
            str(i / "gallery-only"),
            "--checkpoint",
            str(i / "checkpoint"),
            "--output",
            str(o),
        ],
        "image-only retrieval needs a cache with images at",
        lambda i, o: o,
    ),
    "eval: into a folder of other things": (
        lambda i, o: ["eval", *TEACHER, "--dataset-root", str(i / "world" / "cirr"), "--output", str(i / "foreign")],
        "holds no isa eval output (it holds a.txt",
        lambda i, o: i / "foreign",
    ),
    "eval: a gallery cache that is a folder of other things": (
        lambda i, o: [
            "eval",
            *TEACHER,
            "--dataset-root",
            str(i / "world" / "cirr"),
            "--output",
            str(o),
            "--gallery-cache",
            str(i / "foreign"),
        ],
        "holds no teacher cache",
        lambda i, o: o,
    ),
    "world: into a folder of other things": (
        lambda i, o: ["world", str(i / "foreign"), "--overwrite"],
        "holds no synthetic world (it holds a.txt",
        lambda i, o: i / "foreign",
    ),
    "world: over a world": (
        lambda i, o: ["world", str(i / "world")],
        "already holds a synthetic world: --overwrite replaces it",
        lambda i, o: i / "world",
    ),
    "world: too few images": (
        lambda i, o: ["world", str(o), "--num-images", "20"],
        "num_images (--num-images) must be at least 30, got 20",
        lambda i, o: o,
    ),
    "tune: into a folder of other things": (
        lambda i, o: [
            "tune",
            "--config",
            str(sweep_file(o.parent)),
            *TINY,
            f"train.cache={i / 'cache-f16'}",
            f"tune.storage={i}",
            "tune.name=foreign",
        ],
        "holds no sweep (it holds a.txt",
        lambda i, o: i / "foreign",
    ),
    "tune: a missing cache": (
        lambda i, o: [
            "tune",
            "--config",
            str(sweep_file(o.parent)),
            *TINY,
            f"train.cache={i / 'missing'}",
            f"tune.storage={o}",
        ],
        "no teacher cache at",
        lambda i, o: o,
    ),
    "tune: --resume of a folder that holds no sweep": (
        lambda i, o: ["tune", "--resume", str(i / "foreign")],
        "is not a sweep folder (no isa_sweep.json): nothing to resume",
        lambda i, o: i / "foreign",
    ),
    "ablate: into a folder of other things": (
        lambda i, o: [
            "ablate",
            "--suite",
            "tokens",
            *TINY,
            f"train.cache={i / 'cache-f16'}",
            f"tune.storage={i}",
            "tune.name=foreign",
        ],
        "holds no ablation suite (it holds a.txt",
        lambda i, o: i / "foreign",
    ),
    "export: into a folder of other things": (
        lambda i, o: ["export", str(i / "checkpoint"), str(i / "foreign")],
        "holds no query-encoder export (it holds a.txt",
        lambda i, o: i / "foreign",
    ),
    "export: a folder that is no checkpoint": (
        lambda i, o: ["export", str(i / "images"), str(o)],
        "no complete checkpoint at",
        lambda i, o: o,
    ),
}


def sweep_file(folder: Path) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(json.dumps(SWEEP))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_a_refusal_is_one_line_before_ray_and_writes_nothing(case, inputs, tmp_path, no_ray, capsys):
    arguments, fragment, watched = CASES[case]
    out = tmp_path / "out"
    argv = arguments(inputs, out)
    folder = watched(inputs, out)
    before = snapshot(folder)
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured
    assert lines and lines[-1].startswith(f"isa {argv[0]}: error: ") and fragment in lines[-1], lines
    assert "Traceback" not in captured.err
    assert snapshot(folder) == before  # nothing written: not created where it did not exist, else unchanged
    assert not out.exists()


def test_train_with_an_unknown_student_is_one_line_without_ray(tmp_path):
    """As a user runs it: the isa command, a new process; one line on stderr, no Ray started, no run folder."""
    output = tmp_path / "runs" / "a"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("isa")), "train", "student.backbone=resnet50", f"train.output={output}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "isa train: error: config key 'student.backbone': 'resnet50' is not a registered student; choose one of: "
        "efficientnet_b0, efficientnet_b2, efficientvit_b1, efficientvit_m2, mobilenetv2_100, mobilenetv3_large_100, "
        "symmetric"
    ]
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no MLflow store, nothing


def test_world_over_a_world_needs_overwrite_which_leaves_no_stale_image(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["world", str(out), "--num-images", "60", "--num-triplets", "8", "--image-size", "32"]) == 0
    first = sorted(p.name for p in (out / "images").iterdir())
    assert main(["world", str(out), "--num-images", "30", "--num-triplets", "8", "--image-size", "32"]) == 2
    assert "already holds a synthetic world: --overwrite replaces it" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "images").iterdir()) == first
    assert main(["world", str(out), "--num-images", "30", "--num-triplets", "8", "--overwrite"]) == 0
    manifest = json.loads((out / "world.json").read_text())
    images = sorted(p.name for p in (out / "images").iterdir())
    assert len(images) < len(first) and len(images) == len(manifest["images"])  # the old world's extra images gone
    expected = tmp_path / "fresh"
    write_world(generate_world(0, 30, 8, 64), expected)
    assert snapshot(out) == snapshot(expected)  # exactly a world written into an empty folder


def test_errors_raised_in_a_ray_task_are_one_line(ray_session, capsys):
    """An IsaError raised in a task comes back through Ray as one line, not Ray's traceback."""
    from isa.config import ConfigError
    from pipelines.cli import refusal

    @ray.remote
    def refuse() -> None:
        raise ConfigError("config key 'x': refused in a task")

    with pytest.raises(ConfigError) as raised:
        ray.get(refuse.remote())
    assert refusal(raised.value) == "config key 'x': refused in a task"
    assert refusal(KeyError("a bug")) is None
    assert refusal(FileNotFoundError(2, "No such file or directory", "x")) == (
        "FileNotFoundError: [Errno 2] No such file or directory: 'x'"
    )
