"""``isa export``: the query encoder (student + token learner) as ONNX that onnxruntime runs on a CPU (docs/export.md).

CHECKPOINT (a checkpoint folder or a training run folder, any fsspec URI) -> rebuild the student over its
teacher -> ONNX (input ``images`` (B, 3, S, S) in [0, 1], outputs ``pseudo_words`` (B, M, w) and, for the ATL
mapper, ``attention`` (B, M, h, w)) -> parity against the torch student, refused beyond
:data:`PARITY_TOLERANCE` -> optional int8 model -> OUT/query_encoder.onnx (+ .int8.onnx), and the manifest
OUT/query_encoder.json written last through :mod:`pipelines.artifact`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from isa.checkpoint_files import saved_checkpoint
from isa.errors import IsaError
from isa.names import SYMMETRIC
from isa.storage import filesystem
from pipelines.artifact import check_output, write_artifact
from pipelines.stage import HelpFormatter

MANIFEST = "query_encoder.json"
MODEL = "query_encoder.onnx"
INT8_MODEL = "query_encoder.int8.onnx"
FORMAT = "isa-query-encoder"
FORMAT_VERSION = 1
KIND = "query-encoder export"  # what pipelines.artifact's messages call the folder
PARITY_TOLERANCE = 1e-4  # float32: largest |onnxruntime - torch| accepted on any output
OPSETS = range(18, 26)  # what torch's ONNX exporter writes (18 and above) and onnxruntime runs
DEFAULT_OPSET = 18  # the oldest of them: the widest choice of runtimes (onnxruntime-web, mobile builds)
DECODE = "any format PIL reads; EXIF orientation applied; converted to RGB"
RESIZE_FILTER = "bicubic, antialiased; never enlarges"
CROP_FILTER = "bilinear: short side to size, then the centre size x size square"


class ExportError(IsaError):
    """An export refused: its input, its output folder, or a model whose parity check failed."""


@dataclass(frozen=True)
class ExportOptions:
    """What ``isa export`` was asked for."""

    checkpoint: str  # a checkpoint folder or a training run folder (its latest complete checkpoint), any URI
    output: str  # the export folder, any fsspec URI
    int8: bool = False  # also write the int8 model
    opset: int = DEFAULT_OPSET
    parity_images: int = 4  # random images, and as many synthetic-world images, in the parity check
    calibration: str | None = None  # an isa embed cache with images to calibrate int8 on (None: synthetic world)
    calibration_images: int = 32
    overwrite: bool = False  # replace a previous export in OUTPUT


def parser() -> argparse.ArgumentParser:
    """``isa export``'s arguments."""
    parser = argparse.ArgumentParser(
        prog="isa export",
        description="Export the query encoder (student + token learner) as ONNX for onnxruntime, optionally int8.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder or training run folder (any URI)")
    parser.add_argument("output", metavar="OUT", help="export folder to create (any fsspec URI)")
    parser.add_argument("--int8", action="store_true", help=f"also write {INT8_MODEL} (static int8 quantization)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {OPSETS[0]}-{OPSETS[-1]}")
    parser.add_argument(
        "--parity-images", type=int, default=4, help="random images, and as many synthetic ones, to check parity on"
    )
    parser.add_argument("--calibration", help="embed cache with images to calibrate --int8 on; none: synthetic scenes")
    parser.add_argument("--calibration-images", type=int, default=32, help="images to calibrate --int8 on")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous export in OUT")
    return parser


def parse_args(argv: Sequence[str] | None) -> ExportOptions:
    args = parser().parse_args(argv)
    return ExportOptions(
        checkpoint=args.checkpoint,
        output=args.output,
        int8=args.int8,
        opset=args.opset,
        parity_images=args.parity_images,
        calibration=args.calibration,
        calibration_images=args.calibration_images,
        overwrite=args.overwrite,
    )


# ---- refusals ----------------------------------------------------------------------------------------------


def check(options: ExportOptions) -> tuple[str, dict[str, Any]]:
    """Every refusal that needs no model: the checkpoint, its student, the output folder, the options.

    Returns:
        The checkpoint folder's URI and its config.json (the resolved config and the teacher fingerprint).

    Raises:
        CheckpointError: no complete checkpoint at CHECKPOINT.
        ExportError: naming the problem and the way on.
    """
    if options.opset not in OPSETS:
        raise ExportError(f"--opset {options.opset} is not supported: choose {OPSETS[0]} to {OPSETS[-1]}")
    if options.parity_images < 1:
        raise ExportError(f"--parity-images must be at least 1, got {options.parity_images}")
    if options.calibration and not options.int8:
        raise ExportError("--calibration calibrates the int8 model: add --int8, or leave --calibration out")
    if options.calibration_images < 1:
        raise ExportError(f"--calibration-images must be at least 1, got {options.calibration_images}")
    folder, config = saved_checkpoint(options.checkpoint)
    student = config["config"].get("student", {})
    if student.get("backbone") == SYMMETRIC:
        raise ExportError(
            f"checkpoint {folder} holds the 'symmetric' student, which runs the teacher's own image tower on the "
            "query side (it is the heavy baseline the light students are measured against, not a light query "
            "encoder): export a checkpoint of an asymmetric student (student.backbone one of the light backbones)"
        )
    check_output(options.output, MANIFEST, KIND, {MODEL, INT8_MODEL}.__contains__, options.overwrite)
    if options.calibration:
        _check_calibration(options.calibration)
    return folder, config


def _check_calibration(uri: str) -> None:
    from isa.cache import list_parts, read_manifest

    fs, root = filesystem(uri)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise ExportError(f"--calibration {uri} is not an isa embed cache (no _isa_cache.json)")
    if manifest.image_size is None:
        raise ExportError(f"--calibration {uri} is a gallery-only cache without images: give a cache made with images")
    if not list_parts(fs, root):
        raise ExportError(f"--calibration {uri} is an empty cache")


# ---- the work ----------------------------------------------------------------------------------------------


def run(options: ExportOptions) -> dict[str, Any]:
    """Export; returns the manifest written to ``OUT/query_encoder.json``.

    Raises:
        CheckpointError: the checkpoint is unreadable, or its teacher's weights differ from the ones it recorded.
        ExportError: the refusals of :func:`check`; onnxruntime's outputs further than PARITY_TOLERANCE from torch.
    """
    import onnx
    import onnxruntime
    import torch

    from isa.build import build_teacher
    from isa.config import from_dict
    from isa.query import QueryEncoder
    from pipelines.export import convert

    folder, saved = check(options)
    local = local_checkpoint(folder)
    config = from_dict(saved["config"])
    teacher = build_teacher(config.teacher)
    encoder = QueryEncoder.from_checkpoint(local, teacher)  # checks the teacher's fingerprint
    path = convert.QueryPath(encoder.student.eval(), attention=config.student.mapper == "atl")
    size = config.student.image_size
    model = convert.to_onnx(path, size, options.opset)

    count = options.parity_images
    images = convert.stack([_random_images(count, size, seed=1), _synthetic(count, config, seed=1)])  # (2N, 3, S, S)
    parity = convert.float_parity(model, path, images)
    if parity.max_abs_diff > PARITY_TOLERANCE:
        raise ExportError(
            f"onnxruntime's outputs differ from the torch student's by {parity.max_abs_diff:.3g} (more than "
            f"{PARITY_TOLERANCE:g}) on {parity.images} images; nothing written. Try another --opset"
        )
    files = {MODEL: model}
    int8_parity = calibration = None
    if options.int8:
        calibration_images, calibration = _calibration(options, config)
        files[INT8_MODEL] = convert.quantize_int8(model, calibration_images)
        int8_parity = convert.int8_parity(files[INT8_MODEL], model, images)

    pseudo_words, attention = convert.run_session(convert.session(model), images[:1])
    step = _checkpoint_step(local)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": MODEL,
        "int8_model": INT8_MODEL if options.int8 else None,
        "input": {
            "name": convert.INPUT,
            "layout": "NCHW",
            "dtype": "float32",
            "size": size,
            "channels": "RGB",
            "value_range": [0, 1],
            "normalization": {
                "mean": encoder.student.backbone.mean.flatten().tolist(),
                "std": encoder.student.backbone.std.flatten().tolist(),
                "applied": "inside the model",
            },
        },
        "preprocess": {
            "decode": DECODE,
            "max_image_pixels": config.cache.max_image_pixels,
            "resize_short_side": config.cache.image_size,
            "resize_filter": RESIZE_FILTER,
            "jpeg_quality": config.cache.jpeg_quality,
            "crop": "centre",
            "crop_filter": CROP_FILTER,
            "size": size,
        },
        "outputs": {
            convert.PSEUDO_WORDS: list(pseudo_words.shape[1:]),
            convert.ATTENTION: None if attention is None else list(attention.shape[1:]),
        },
        "num_tokens": int(pseudo_words.shape[1]),
        "word_dim": int(pseudo_words.shape[2]),
        "embed_scale": float(encoder.student.head.embed_scale),
        "prompt": {
            key: getattr(config.prompt, key)
            for key in ("placeholder", "query_template", "train_template", "fashioniq_template")
        },
        "teacher": saved["teacher"],
        "teacher_config": {"name": config.teacher.name, "pretrained": config.teacher.pretrained},
        "checkpoint": {"uri": folder, "step": step},
        "student": {"backbone": config.student.backbone, "mapper": config.student.mapper},
        "parity": {**dataclasses.asdict(parity), "tolerance": PARITY_TOLERANCE, "reference": "torch eager, float32"},
        "int8_parity": None if int8_parity is None else {**dataclasses.asdict(int8_parity), "reference": MODEL},
        "int8_quantization": None if not options.int8 else {**convert.QUANTIZATION, "calibration": calibration},
        "opset": options.opset,
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    if not options.int8:
        _remove_stale(options.output, INT8_MODEL)
    write_artifact(options.output, MANIFEST, files, manifest)
    return manifest


def local_checkpoint(folder: str) -> str:
    """A local copy of a remote checkpoint folder (as ``isa eval`` makes it); a local one as it is."""
    fs, _ = filesystem(folder)
    if isinstance(fs, LocalFileSystem):
        return folder
    from pipelines.eval import local_copy, scratch_folder  # imports Ray: only for remote checkpoints

    return local_copy(folder, scratch_folder("isa-export-"))


def _checkpoint_step(folder: str) -> int:
    from isa.checkpoint import load_checkpoint

    return int(load_checkpoint(folder).state.get("step", 0))


def _remove_stale(uri: str, name: str) -> None:
    """A previous export's int8 model that this export does not replace: its manifest first, then the file."""
    fs, root = filesystem(uri)
    if fs.exists(posixpath.join(root, name)):
        if fs.exists(posixpath.join(root, MANIFEST)):
            fs.rm(posixpath.join(root, MANIFEST))
        fs.rm(posixpath.join(root, name))


def _random_images(count: int, size: int, seed: int):
    """Uniform noise images: (count, 3, size, size) float32 in [0, 1]."""
    import numpy as np

    return np.random.default_rng(seed).random((count, 3, size, size), dtype=np.float32)


def _synthetic(count: int, config, seed: int):
    """Synthetic-world scenes as PNGs of several sizes, through the query path's preprocessing (decode, resize,
    JPEG, centre view, [0, 1]): (count, 3, S, S) float32."""
    from isa.augment import to_unit_range
    from isa.data.synthetic import generate_world, render_scene
    from isa.query import student_views

    world = generate_world(seed=seed, num_images=max(30, count), num_triplets=0, image_size=64)
    datas = []
    for index, scene in enumerate(list(world.images.values())[:count]):
        buffer = io.BytesIO()
        render_scene(scene, 64 + 48 * (index % 4)).save(buffer, format="PNG")
        datas.append(buffer.getvalue())
    import torch

    return to_unit_range(torch.from_numpy(student_views(datas, config))).numpy()


def _calibration(options: ExportOptions, config) -> tuple[Any, dict[str, Any]]:
    """int8 calibration images (N, 3, S, S) and what they were: a cache's images, else synthetic-world scenes."""
    if not options.calibration:
        images = _synthetic(options.calibration_images, config, seed=2)
        return images, {"source": "synthetic world (seed 2)", "images": len(images)}
    import torch

    from isa.augment import eval_view, to_unit_range, views
    from isa.cache import list_parts
    from isa.storage import read_column_values

    fs, root = filesystem(options.calibration)
    datas: list[bytes] = []
    for part in list_parts(fs, root):
        datas += [d for d in read_column_values(fs, [part], ["image"]).column("image").to_pylist() if d]
        if len(datas) >= options.calibration_images:
            break
    datas = datas[: options.calibration_images]
    if not datas:
        raise ExportError(f"--calibration {options.calibration} holds no images")
    size = config.student.image_size
    images = to_unit_range(torch.from_numpy(views(datas, eval_view(size), size))).numpy()
    return images, {"source": options.calibration, "images": len(images)}


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    check(options)
    manifest = run(options)
    parity = manifest["parity"]["max_abs_diff"]
    line = f"isa export: wrote {options.output}: {MODEL} (parity max |onnxruntime - torch| {parity:.2g})"
    if manifest["int8_parity"]:
        cosine = manifest["int8_parity"]["pseudo_words_cosine_min"]
        line += f", {INT8_MODEL} (pseudo-word cosine to float32 >= {cosine:.4f})"
    print(line, flush=True)
    return 0
