"""The exported query encoder in Python: image bytes -> pseudo-words, with onnxruntime on the CPU.

What ``isa search`` and the serving tests use, and the reference a phone or browser client follows
(docs/export.md): the preprocessing is the training stage's own (:func:`isa.query.student_views`), set up from
the manifest alone, so the pseudo-words match the torch student's for the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from isa.augment import to_unit_range
from isa.config import Config, from_dict
from isa.query import student_views
from pipelines.artifact import ArtifactError, read_artifact, read_file
from pipelines.export import FORMAT, FORMAT_VERSION, KIND, MANIFEST


class ExportedEncoder:
    """An ``isa export`` folder loaded into an onnxruntime CPU session.

    Args:
        manifest: the folder's ``query_encoder.json``.
        session: the onnxruntime session of its float32 or int8 model.
    """

    def __init__(self, manifest: dict[str, Any], session: ort.InferenceSession) -> None:
        self.manifest = manifest
        self.session = session
        pre = manifest["preprocess"]
        self._config: Config = from_dict(
            {
                "cache": {
                    "image_size": pre["resize_short_side"],
                    "jpeg_quality": pre["jpeg_quality"],
                    "max_image_pixels": pre["max_image_pixels"],
                },
                "student": {"image_size": pre["size"]},
            }
        )

    @classmethod
    def load(cls, uri: str, int8: bool = False, threads: int = 0) -> ExportedEncoder:
        """Load the export folder ``uri`` (any fsspec URI).

        Args:
            int8: run the int8 model (the folder must have been exported with ``--int8``).
            threads: onnxruntime intra-op threads; 0: onnxruntime's default (one per core).

        Raises:
            ArtifactError: no complete export there (no manifest, a file cut short or altered), another format,
                or ``int8`` asked of an export without an int8 model.
        """
        manifest = read_artifact(uri, MANIFEST, KIND)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{uri}: {MANIFEST} describes {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
                f"not {FORMAT!r} version {FORMAT_VERSION}"
            )
        name = manifest["int8_model"] if int8 else manifest["model"]
        if name is None:
            raise ArtifactError(f"{uri} was exported without --int8: it has no int8 model")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(read_file(uri, name, manifest), options, providers=["CPUExecutionProvider"])
        return cls(manifest, session)

    @property
    def size(self) -> int:
        """S, the side of the model's square input."""
        return int(self.manifest["input"]["size"])

    def preprocess(self, datas: Sequence[bytes]) -> np.ndarray:
        """Image file bytes as the student saw them in training: (B, 3, S, S) float32 in [0, 1].

        Decode (EXIF orientation, RGB), resize the short side to ``resize_short_side``, JPEG at ``jpeg_quality``,
        centre S x S view, scale to [0, 1], NCHW.

        Raises:
            ImageRejected: an image cannot be decoded.
        """
        views = student_views(datas, self._config)  # (B, S, S, 3) uint8
        return to_unit_range(torch.from_numpy(views)).numpy()  # (B, 3, S, S)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """pseudo_words (B, M, w) and attention (B, M, h, w) (None without the ATL mapper) of preprocessed images.

        Raises:
            ValueError: images not of shape (B, 3, S, S).
        """
        if images.ndim != 4 or images.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"images must be (B, 3, {self.size}, {self.size}); got {tuple(images.shape)}")
        outputs = self.session.run(None, {self.manifest["input"]["name"]: np.ascontiguousarray(images, np.float32)})
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    def pseudo_words(self, datas: Sequence[bytes]) -> np.ndarray:
        """Image bytes -> pseudo-words (B, M, w) float32: :meth:`preprocess` then :meth:`run`."""
        return self.run(self.preprocess(datas))[0]
