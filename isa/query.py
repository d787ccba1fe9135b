"""The query side at inference: a trained student and the teacher's text tower (docs/method.md §3, §5).

A :class:`QueryEncoder` turns reference images and modifier texts into composed query embeddings in the
teacher's joint space, ready to rank a gallery the teacher's image tower embedded. It is rebuilt from a
checkpoint directory (docs/checkpoints.md) and checked against the teacher it is given. Query images go through
the same path as training images: decoded, resized to the cache's short side, stored as JPEG, centre view.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from isa.augment import eval_view, to_unit_range, views
from isa.build import build_student
from isa.cache import fingerprint_mismatch
from isa.checkpoint import CheckpointError, load_checkpoint
from isa.config import Config, from_dict
from isa.images import decode_image, encode_jpeg, resize_short_side
from isa.prompt import PromptComposer
from isa.students import StudentOutput
from isa.teacher import Teacher


def student_views(datas: Sequence[bytes], config: Config) -> np.ndarray:
    """Image bytes as the student saw them in training (cache JPEG, centre view): (B, S, S, 3) uint8.

    Raises:
        ImageRejected: an image cannot be decoded.
    """
    jpegs = [
        encode_jpeg(
            resize_short_side(decode_image(data, config.cache.max_image_pixels), config.cache.image_size),
            config.cache.jpeg_quality,
        )
        for data in datas
    ]
    size = config.student.image_size
    return views(jpegs, eval_view(size), size)


class QueryEncoder:
    """Composed queries from a student and the frozen teacher's text tower.

    Args:
        student: maps ``[0, 1]`` images (B, 3, S, S) to a StudentOutput.
        teacher: the frozen teacher whose text tower encodes the prompts.
        config: the resolved config the student was trained with (prompt templates, image sizes).
        name: a label for tables, e.g. the checkpoint's backbone and mapper.
    """

    def __init__(self, student: nn.Module, teacher: Teacher, config: Config, name: str):
        self.student = student.eval()
        self.teacher = teacher
        self.config = config
        self.name = name
        self.composer = PromptComposer(teacher, config.prompt.placeholder, config.prompt.short_context)

    @classmethod
    def from_checkpoint(cls, path: str, teacher: Teacher, device: str | torch.device = "cpu") -> QueryEncoder:
        """Rebuild the student of a checkpoint directory over ``teacher``.

        Raises:
            CheckpointError: unreadable checkpoint, or it was trained against another teacher.
        """
        checkpoint = load_checkpoint(path)
        config = from_dict(checkpoint.config["config"])
        mismatch = fingerprint_mismatch(checkpoint.config["teacher"], teacher.fingerprint())
        if mismatch:
            raise CheckpointError(f"checkpoint {path} was trained against another teacher: {mismatch}")
        student = build_student(config, teacher)
        prefix = "student."
        student.load_state_dict({k[len(prefix) :]: v for k, v in checkpoint.weights.items() if k.startswith(prefix)})
        mapper = "" if config.student.backbone == "symmetric" else f" + {config.student.mapper}"
        name = f"{config.student.backbone}{mapper}"
        return cls(student.to(device), teacher, config, name)

    @property
    def device(self) -> torch.device:
        return self.teacher.token_embeddings.device

    @torch.no_grad()
    def sentences(self, views_uint8: np.ndarray) -> StudentOutput:
        """Student output for (B, S, S, 3) uint8 views: sentence (B, M, w), attention (B, M, h, w) or None."""
        images = to_unit_range(torch.from_numpy(views_uint8).to(self.device))
        return self.student(images)

    @torch.no_grad()
    def compose(self, sentence: torch.Tensor, modifiers: Sequence[tuple[str, ...]]) -> torch.Tensor:
        """Composed queries: (B, D), L2-normalized.

        One modifier per query uses ``prompt.query_template``; two (FashionIQ) use
        ``prompt.fashioniq_template`` with both caption orders averaged.
        """
        prompt = self.config.prompt
        if all(len(m) == 2 for m in modifiers):
            return self.composer.fashioniq_query(sentence, prompt.fashioniq_template, [(a, b) for a, b in modifiers])
        if all(len(m) == 1 for m in modifiers):
            return self.composer.compose(sentence, prompt.query_template, [{"c": m[0]} for m in modifiers])
        raise ValueError("every query needs one modifier text, or two (FashionIQ), the same count for the batch")

    @torch.no_grad()
    def image_only(self, sentence: torch.Tensor) -> torch.Tensor:
        """``a photo of {S}`` (the training prompt) for image-only retrieval: (B, D), L2-normalized."""
        return self.composer.compose(sentence, self.config.prompt.train_template)


def text_queries(teacher: Teacher, modifiers: Sequence[tuple[str, ...]]) -> torch.Tensor:
    """The text-only baseline, ``a photo of {c}`` (FashionIQ: both caption orders averaged): (B, D)."""

    def encode(texts: list[str]) -> torch.Tensor:
        return teacher.encode_text(teacher.tokenize(texts).to(teacher.token_embeddings.device))

    with torch.no_grad():
        if all(len(m) == 2 for m in modifiers):
            forward = encode([f"a photo of {a} and {b}" for a, b in modifiers])
            backward = encode([f"a photo of {b} and {a}" for a, b in modifiers])
            return torch.nn.functional.normalize(forward + backward, dim=-1)
        return encode([f"a photo of {m[0]}" for m in modifiers])
