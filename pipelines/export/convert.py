"""The query path as ONNX: torch -> ONNX bytes, parity against the torch student, int8 quantization.

Everything here works on bytes and arrays, so the stage writes an artifact only once every check has passed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

INPUT = "images"
PSEUDO_WORDS = "pseudo_words"
ATTENTION = "attention"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Warnings and log records below ERROR left out: the exporter's and the quantizer's chatter (constant folding
    skipped, per-channel axes falling back to per-tensor for 1-D weights); parity is checked on the result."""
    loggers = [logging.getLogger(), logging.getLogger("onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


class QueryPath(nn.Module):
    """A student as the exported graph sees it: plain tensors out instead of a ``StudentOutput``.

    Args:
        student: maps images (B, 3, S, S) in [0, 1] to a StudentOutput (the backbone normalizes them itself).
        attention: whether the student returns spatial attention (the ATL mapper) to export as an output.
    """

    def __init__(self, student: nn.Module, attention: bool) -> None:
        super().__init__()
        self.student = student
        self.attention = attention

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """images (B, 3, S, S) -> (pseudo_words (B, M, w),) or (pseudo_words, attention (B, M, h, w))."""
        out = self.student(images)
        return (out.sentence, out.attention) if self.attention else (out.sentence,)

    @property
    def output_names(self) -> list[str]:
        return [PSEUDO_WORDS, ATTENTION] if self.attention else [PSEUDO_WORDS]


def out_of_place(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose submodules with an ``inplace`` switch (activations such as timm's ReLU6 and
    Hardswish, dropout) have it off; ``module`` itself is left as it was."""
    module = copy.deepcopy(module)
    for sub in module.modules():
        if getattr(sub, "inplace", None) is True:
            sub.inplace = False
    return module


def to_onnx(path: QueryPath, size: int, opset: int) -> bytes:
    """The serialized ONNX model of ``path`` for (B, 3, size, size) inputs, B dynamic.

    The exporter is torch.export's (``dynamo=True``, the maintained one; the TorchScript exporter is deprecated
    and slated for removal). It gives every registered backbone within float32 rounding of eager torch with a
    dynamic batch axis. Its example batch is 2: torch.export specializes a dimension of size 1 to a constant,
    which would fix the batch at 1. It traces a copy whose activations work out of place (the same values):
    the exporter's decompositions of in-place ones cost it up to a third more CPU time (the MobileNets' ReLU6 and
    Hardswish; benchmarks/export_time.py).
    """
    path = out_of_place(path).eval()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        path(example)  # fills eval-time caches (EfficientViT-M's attention biases) before tracing
    with _quiet():
        program = torch.onnx.export(
            path,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT],
            output_names=path.output_names,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            optimize=True,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


def session(model: bytes, threads: int = 0, spin: bool = True) -> ort.InferenceSession:
    """A CPU onnxruntime session of a serialized model; ``threads`` 0: onnxruntime's default.

    ``spin`` False: idle intra-op threads sleep instead of busy-waiting for the next run (for timing it beside
    other work on the same cores).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_session(sess: ort.InferenceSession, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """pseudo_words (B, M, w) and attention (B, M, h, w) or None for float32 images (B, 3, S, S)."""
    outputs = sess.run(None, {INPUT: np.ascontiguousarray(images, dtype=np.float32)})
    return outputs[0], (outputs[1] if len(outputs) > 1 else None)


@dataclass(frozen=True)
class Parity:
    """How far onnxruntime's outputs are from a reference on the same images."""

    max_abs_diff: float  # over every output
    pseudo_words_max_abs_diff: float
    attention_max_abs_diff: float | None
    images: int
    pseudo_words_cosine_min: float | None = None  # int8: per pseudo-word cosine to the float32 model's
    pseudo_words_cosine_mean: float | None = None


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each pseudo-word of a (B, M, w) with the same one of b: (B, M)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def compare(
    found: tuple[np.ndarray, np.ndarray | None], expected: tuple[np.ndarray, np.ndarray | None], cosine: bool = False
) -> Parity:
    """Differences of (pseudo_words, attention) ``found`` against ``expected``."""
    words = float(np.abs(found[0] - expected[0]).max())
    attention = None
    if expected[1] is not None:
        attention = float(np.abs(found[1] - expected[1]).max())
    cosines = _cosines(found[0], expected[0]) if cosine else None
    return Parity(
        max_abs_diff=max(words, attention or 0.0),
        pseudo_words_max_abs_diff=words,
        attention_max_abs_diff=attention,
        images=len(found[0]),
        pseudo_words_cosine_min=None if cosines is None else float(cosines.min()),
        pseudo_words_cosine_mean=None if cosines is None else float(cosines.mean()),
    )


@torch.no_grad()
def torch_outputs(path: QueryPath, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The eager torch student's (pseudo_words, attention) for float32 images (B, 3, S, S)."""
    outputs = path.eval()(torch.from_numpy(images))
    return outputs[0].numpy(), (outputs[1].numpy() if len(outputs) > 1 else None)


def float_parity(model: bytes, path: QueryPath, images: np.ndarray) -> Parity:
    """onnxruntime against eager torch on ``images`` (B, 3, S, S): the whole batch at once and the first image
    alone (the batch axis is dynamic), the larger difference of the two."""
    sess = session(model)
    expected = torch_outputs(path, images)
    batch = compare(run_session(sess, images), expected)
    one = compare(run_session(sess, images[:1]), (expected[0][:1], None if expected[1] is None else expected[1][:1]))
    return dataclasses.replace(max(batch, one, key=lambda p: p.max_abs_diff), images=len(images))


class _Images(CalibrationDataReader):
    """Calibration images fed one at a time (batch 1, as queries arrive)."""

    def __init__(self, images: np.ndarray) -> None:
        self._images = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._images, None)
        return None if image is None else {INPUT: image[None].astype(np.float32)}


QUANTIZATION = {
    "method": "onnxruntime static quantization, QDQ format",
    "activations": "uint8 (per tensor, MinMax calibration)",
    "weights": "int8 (per channel)",
}


def quantize_int8(model: bytes, calibration: np.ndarray) -> bytes:
    """Static QDQ int8 model of a float32 model, calibrated on ``calibration`` (N, 3, S, S) float32 images.

    Static QDQ (activation ranges fixed from the calibration images) rather than dynamic quantization: onnxruntime
    fuses the QDQ pairs into integer convolutions, while dynamic quantization leaves convolutions in float32 (or
    ConvInteger plus per-call range computation), which is slower than float32 for these convnets on the CPU.
    Weights take 7 bits (``reduce_range``): on an x86 CPU without VNNI, onnxruntime's uint8 x int8 kernels add
    pairs of products into int16 with saturation, which full-range weights reach; the exported model runs on
    whatever CPU its users have.
    """
    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / name for name in ("f.onnx", "p.onnx", "q.onnx"))
        source.write_bytes(model)
        with _quiet():
            # onnxruntime's symbolic shape inference fails on the exported ATL's Expand; ONNX's own suffices
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(target),
                _Images(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=True,
            )
        return target.read_bytes()


def int8_parity(int8_model: bytes, float_model: bytes, images: np.ndarray) -> Parity:
    """The int8 model against the float32 one (both in onnxruntime): differences and pseudo-word cosines."""
    return compare(run_session(session(int8_model), images), run_session(session(float_model), images), cosine=True)


def stack(batches: Sequence[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(list(batches)), dtype=np.float32)
