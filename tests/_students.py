"""Random-init student checkpoints in the training stage's format, for the tests of the stages that read them."""

from __future__ import annotations

from pathlib import Path

import torch

from isa.build import build_student, build_task, build_teacher
from isa.checkpoint import save_checkpoint
from isa.config import load_config, to_dict

TEACHER = ["teacher.name=isa-tiny-ViT", "teacher.pretrained=none"]
TINY_STUDENT = ["student.image_size=64", "token_learner.dim=64", "token_learner.heads=4", "cache.image_size=64"]
TINY = [*TEACHER, "student.backbone=mobilenetv3_large_100", *TINY_STUDENT]


def save_student(folder: Path, *overrides: str, seed: int = 1, step: int = 0) -> Path:
    """A checkpoint at ``folder`` of the student that ``TINY`` and ``overrides`` configure, its weights drawn with
    ``seed``: the config and teacher fingerprint, the trainable weights and ``step``, as ``isa train`` saves them."""
    config = load_config(None, [*TINY, *overrides])
    teacher = build_teacher(config.teacher)
    torch.manual_seed(seed)
    task = build_task(config, teacher, build_student(config, teacher))
    saved = {"config": to_dict(config), "teacher": teacher.fingerprint()}
    return save_checkpoint(folder, config=saved, weights=task.trainable_state_dict(), state={"step": step})
