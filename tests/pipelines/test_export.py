"""``isa export`` against independent references: the eager torch student, ``isa.query``'s preprocessing and
``QueryEncoder.sentences`` on the same image bytes, onnxruntime sessions opened here."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _students import TEACHER, save_student
from PIL import Image

from isa.augment import to_unit_range
from isa.build import build_teacher
from isa.config import load_config
from isa.data.synthetic import generate_world, render_scene
from isa.query import QueryEncoder, student_views
from isa.students import BACKBONES, SYMMETRIC, create_student, list_students
from pipelines import export
from pipelines.artifact import ArtifactError
from pipelines.cli import main as isa
from pipelines.export import convert
from pipelines.export.client import ExportedEncoder

TOLERANCE = 1e-4
INT8_COSINE = 0.99  # measured: >= 0.9998 for these tiny random-init students on synthetic scenes


def _save_student(folder: Path, step: int, *overrides: str) -> Path:
    """A (random-init) student checkpoint in the training stage's format; its cache JPEGs larger than its input."""
    return save_student(folder, "cache.image_size=72", *overrides, seed=step + 1, step=step)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A training run with two checkpoints of an efficientnet_b0 + ATL student; the latest is step 5."""
    run = tmp_path_factory.mktemp("run")
    for step in (0, 5):
        _save_student(run / f"checkpoint_{step:06d}" / "isa", step, "student.backbone=efficientnet_b0")
    return run


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mlp") / "isa"
    return _save_student(folder, 3, "student.backbone=mobilenetv3_large_100", "student.mapper=mlp")


@pytest.fixture(scope="module")
def atl_export(run_folder, tmp_path_factory) -> Path:
    """The run folder exported through the command, with --int8."""
    out = tmp_path_factory.mktemp("exports") / "atl"
    assert isa(["export", str(run_folder), str(out), "--int8"]) == 0
    return out


@pytest.fixture(scope="module")
def mlp_export(mlp_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "mlp"
    export.run(export.ExportOptions(str(mlp_checkpoint), str(out)))
    return out


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_bytes() -> list[bytes]:
    """Synthetic-world scenes and noise as PNG and JPEG files of several sizes and shapes (one RGBA)."""
    world = generate_world(seed=4, num_images=30, num_triplets=0, image_size=64)
    scenes = list(world.images.values())
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8))
    return [
        _png(render_scene(scenes[0], 64)),
        _jpeg(render_scene(scenes[1], 200)),
        _png(render_scene(scenes[2], 150).resize((150, 97))),
        _jpeg(render_scene(scenes[3], 120).resize((60, 120))),
        _png(render_scene(scenes[4], 80).convert("RGBA")),
        _jpeg(noise),
    ]


def _torch_encoder(checkpoint: Path) -> QueryEncoder:
    config = load_config(None, TEACHER)
    return QueryEncoder.from_checkpoint(str(checkpoint), build_teacher(config.teacher))


def _latest(run_folder: Path) -> Path:
    return run_folder / "checkpoint_000005" / "isa"


# ---- the command and its files ------------------------------------------------------------------------------


def test_a_run_folder_exports_its_latest_checkpoint(atl_export, run_folder):
    assert sorted(p.name for p in atl_export.iterdir()) == [export.INT8_MODEL, export.MANIFEST, export.MODEL]
    manifest = json.loads((atl_export / export.MANIFEST).read_text())
    assert manifest["format"] == "isa-query-encoder" and manifest["format_version"] == 1
    assert manifest["checkpoint"] == {"uri": str(_latest(run_folder).resolve()), "step": 5}
    assert manifest["student"] == {"backbone": "efficientnet_b0", "mapper": "atl"}
    assert manifest["input"]["size"] == 64 and manifest["input"]["layout"] == "NCHW"
    assert manifest["preprocess"]["resize_short_side"] == 72 and manifest["preprocess"]["jpeg_quality"] == 90
    assert manifest["outputs"] == {"pseudo_words": [4, manifest["word_dim"]], "attention": [4, 2, 2]}
    assert manifest["parity"]["max_abs_diff"] <= TOLERANCE
    assert manifest["prompt"]["query_template"] == "a photo of {S} that {c}"
    assert manifest["teacher"] == json.loads((_latest(run_folder) / "config.json").read_text())["teacher"]


@pytest.mark.parametrize("kind", ["atl", "mlp"])
def test_onnxruntime_matches_the_torch_student(kind, atl_export, mlp_export, run_folder, mlp_checkpoint):
    folder, checkpoint = (atl_export, _latest(run_folder)) if kind == "atl" else (mlp_export, mlp_checkpoint)
    student = _torch_encoder(checkpoint).student
    world = generate_world(seed=9, num_images=30, num_triplets=0, image_size=64)
    synthetic = np.stack([np.asarray(render_scene(s, 64)) for s in list(world.images.values())[:3]])  # (3, S, S, 3)
    images = torch.cat([torch.rand(3, 3, 64, 64), to_unit_range(torch.from_numpy(synthetic))])
    with torch.no_grad():
        expected = student(images)
    words, attention = ExportedEncoder.load(str(folder)).run(images.numpy())
    assert np.abs(words - expected.sentence.numpy()).max() <= TOLERANCE
    if kind == "atl":
        assert attention.shape == expected.attention.shape
        assert np.abs(attention - expected.attention.numpy()).max() <= TOLERANCE
    else:
        assert attention is None and expected.attention is None and words.shape[1] == 1


def test_preprocess_and_pseudo_words_match_the_query_path(atl_export, run_folder, image_bytes):
    encoder = _torch_encoder(_latest(run_folder))
    views = student_views(image_bytes, encoder.config)  # (B, S, S, 3) uint8
    exported = ExportedEncoder.load(str(atl_export))
    np.testing.assert_array_equal(exported.preprocess(image_bytes), to_unit_range(torch.from_numpy(views)).numpy())
    expected = encoder.sentences(views).sentence.numpy()
    assert np.abs(exported.pseudo_words(image_bytes) - expected).max() <= TOLERANCE


def test_int8_model_stays_close_to_float32(atl_export, image_bytes):
    manifest = json.loads((atl_export / export.MANIFEST).read_text())
    assert manifest["int8_model"] == export.INT8_MODEL
    assert manifest["int8_parity"]["pseudo_words_cosine_min"] >= INT8_COSINE
    float32 = ExportedEncoder.load(str(atl_export)).pseudo_words(image_bytes)
    int8 = ExportedEncoder.load(str(atl_export), int8=True).pseudo_words(image_bytes)
    cosine = (int8 * float32).sum(-1) / np.linalg.norm(int8, axis=-1) / np.linalg.norm(float32, axis=-1)
    assert cosine.min() >= INT8_COSINE
    assert (atl_export / export.INT8_MODEL).stat().st_size < (atl_export / export.MODEL).stat().st_size / 2
    # int8 weights in 7 bits: a CPU without VNNI (AVX2's u8 x s8 multiply-add) sums pairs of products into int16
    # with saturation, which full-range weights reach (there the pseudo-words' cosine fell to 0.957)
    import onnx
    from onnx import numpy_helper

    weights = [
        numpy_helper.to_array(tensor)
        for tensor in onnx.load(str(atl_export / export.INT8_MODEL)).graph.initializer
        if tensor.data_type == onnx.TensorProto.INT8 and tensor.dims and np.prod(tensor.dims) > 1
    ]
    assert weights and all(-64 <= w.min() and w.max() <= 64 for w in weights)


# ---- refusals ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def symmetric_checkpoint(tmp_path_factory) -> Path:
    return _save_student(tmp_path_factory.mktemp("symmetric") / "isa", 0, "student.backbone=symmetric")


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no complete checkpoint at"),
        ("not a checkpoint", "no complete checkpoint at"),
        ("symmetric", "runs the teacher's own image tower"),
        ("foreign files in OUT", "is not empty and holds no query-encoder export (it holds keep.txt)"),
        ("previous export", "already holds a query-encoder export: --overwrite replaces it"),
        ("opset", "--opset 11 is not supported"),
        ("calibration without --int8", "add --int8"),
    ],
)
def test_refusals_leave_no_export(case, message, tmp_path, capsys, mlp_checkpoint, mlp_export, symmetric_checkpoint):
    out, args = tmp_path / "out", []
    checkpoint = mlp_checkpoint
    if case == "missing":
        checkpoint = tmp_path / "nowhere"
    elif case == "not a checkpoint":
        checkpoint = tmp_path / "folder"
        checkpoint.mkdir()
        (checkpoint / "notes.txt").write_text("no")
    elif case == "symmetric":
        checkpoint = symmetric_checkpoint
    elif case == "foreign files in OUT":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "previous export":
        shutil.copytree(mlp_export, out)
    elif case == "opset":
        args = ["--opset", "11"]
    else:
        args = ["--calibration", str(tmp_path)]
    before = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert isa(["export", str(checkpoint), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("isa export: error: ") and message in err
    after = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert after == before  # nothing written (a previous export left as it was)
    if case != "previous export":
        assert not (out / export.MANIFEST).exists()


def test_a_copy_cut_short_or_altered_is_refused(atl_export, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(atl_export, cut)
    data = (cut / export.MODEL).read_bytes()
    (cut / export.MODEL).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="incomplete"):
        ExportedEncoder.load(str(cut))
    altered = tmp_path / "altered"
    shutil.copytree(atl_export, altered)
    (altered / export.MODEL).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="digest"):
        ExportedEncoder.load(str(altered))
    (altered / export.MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="is not a query-encoder export: it has no query_encoder.json"):
        ExportedEncoder.load(str(altered))


def test_an_export_from_s3_onto_a_previous_one_on_s3_replaces_it_and_loads_back(
    s3_endpoint, mlp_checkpoint, mlp_export, atl_export, image_bytes
):
    """A run folder on S3 exported with --overwrite and another opset onto a previous export (with an int8 model)
    on S3: the new export loads back with the local export's pseudo-words, and the int8 model does not linger."""
    import s3fs

    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    s3.makedirs("export-test", exist_ok=True)
    s3.put(str(mlp_checkpoint) + "/", "export-test/run/checkpoint_000003/isa/", recursive=True)
    s3.put(str(atl_export) + "/", "export-test/encoder/", recursive=True)
    assert isa(["export", "s3://export-test/run", "s3://export-test/encoder"]) == 2  # refused: --overwrite
    assert ExportedEncoder.load("s3://export-test/encoder").manifest["student"]["mapper"] == "atl"  # left as it was
    assert isa(["export", "s3://export-test/run", "s3://export-test/encoder", "--overwrite", "--opset", "20"]) == 0
    remote = ExportedEncoder.load("s3://export-test/encoder")
    manifest = remote.manifest
    assert manifest["checkpoint"] == {"uri": "s3://export-test/run/checkpoint_000003/isa", "step": 3}
    assert manifest["student"]["mapper"] == "mlp" and manifest["opset"] == 20 and manifest["int8_model"] is None
    s3.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in s3.ls("export-test/encoder")) == sorted([export.MODEL, export.MANIFEST])
    local = ExportedEncoder.load(str(mlp_export))
    np.testing.assert_allclose(remote.pseudo_words(image_bytes), local.pseudo_words(image_bytes), atol=1e-5)


# ---- every registered student ----------------------------------------------------------------------------


def _in_place(module: torch.nn.Module) -> list[str]:
    """The names of ``module``'s submodules that work in place."""
    return [name for name, sub in module.named_modules() if getattr(sub, "inplace", None) is True]


def test_the_export_traces_a_copy_with_its_activations_out_of_place():
    torch.manual_seed(0)
    student = create_student("mobilenetv2_100", word_dim=32, embed_scale=0.5, num_tokens=4).eval()
    path = convert.QueryPath(student, attention=True).eval()
    in_place = _in_place(student)
    assert len(in_place) > 30  # timm's ReLU6 activations of MobileNetV2's blocks
    copied = convert.out_of_place(path)
    assert _in_place(copied) == [] and _in_place(student) == in_place
    assert all(a is not b for a, b in zip(copied.parameters(), path.parameters()))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        found, expected = copied(images), path(images)
    assert all(torch.equal(f, e) for f, e in zip(found, expected))


# backbones the module's fixtures export through the command, with their parity to torch checked by
# test_onnxruntime_matches_the_torch_student: each export costs tens of CPU seconds
EXPORTED_BY_FIXTURES = {"efficientnet_b0": "atl_export", "mobilenetv3_large_100": "mlp_export"}


@pytest.mark.parametrize("name", list_students())
def test_every_registered_student_exports_or_is_refused(name, symmetric_checkpoint, tmp_path, request):
    if name == SYMMETRIC:
        options = export.ExportOptions(str(symmetric_checkpoint), str(tmp_path / "out"))
        with pytest.raises(export.ExportError, match="symmetric.*teacher's own image tower"):
            export.check(options)
        return
    assert name in BACKBONES
    if name in EXPORTED_BY_FIXTURES:
        exported = ExportedEncoder.load(str(request.getfixturevalue(EXPORTED_BY_FIXTURES[name])))
        assert exported.manifest["student"]["backbone"] == name
        assert exported.manifest["parity"]["max_abs_diff"] <= TOLERANCE
        return
    torch.manual_seed(0)
    student = create_student(name, word_dim=32, embed_scale=0.5, num_tokens=4, token_dim=64, heads=4)
    path = convert.QueryPath(student.eval(), attention=True)
    in_place = _in_place(student)
    session = ort.InferenceSession(convert.to_onnx(path, 64, export.DEFAULT_OPSET), providers=["CPUExecutionProvider"])
    assert _in_place(student) == in_place  # the export traced a copy
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = student(images)
    words, attention = session.run(None, {"images": images.numpy()})
    assert np.abs(words - expected.sentence.numpy()).max() <= TOLERANCE
    assert np.abs(attention - expected.attention.numpy()).max() <= TOLERANCE
