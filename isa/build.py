"""Builders: turn config sections into plain constructor arguments (no model class sees a config)."""

from __future__ import annotations

import torch
from torch import nn

from isa.config import Config, LossConfig, TeacherConfig
from isa.losses import Gather
from isa.prompt import PromptComposer
from isa.students import create_student
from isa.task import DistillTask, LossWeights
from isa.teacher import Teacher, load_teacher


def build_teacher(config: TeacherConfig, device: str | torch.device = "cpu") -> Teacher:
    """The frozen teacher named by ``teacher.name`` / ``teacher.pretrained``."""
    return load_teacher(config.name, config.pretrained, cache_dir=config.cache_dir, device=device)


def build_student(config: Config, teacher: Teacher) -> nn.Module:
    """The student of ``student.*`` and ``token_learner.*``, sized to the teacher's word space."""
    symmetric = config.student.backbone == "symmetric"
    return create_student(
        config.student.backbone,
        word_dim=teacher.word_dim,
        embed_scale=teacher.embed_scale,
        mapper=config.student.mapper,
        num_tokens=None if config.student.mapper == "mlp" else config.token_learner.num_tokens,  # MLP: M = 1
        token_dim=config.token_learner.dim,
        depth=config.token_learner.depth,
        heads=config.token_learner.heads,
        dropout=config.token_learner.dropout,
        pretrained=config.student.pretrained,
        image_feature_fn=teacher.patch_feature_map if symmetric else None,
        image_feature_dim=teacher.embed_dim if symmetric else None,
    )


def loss_weights(config: LossConfig) -> LossWeights:
    return LossWeights(
        lar=config.lar_weight,
        rel=config.rel_weight,
        word=config.word_weight,
        init_temperature=config.init_temperature,
        learn_temperature=config.learn_temperature,
        min_temperature=config.min_temperature,
        max_temperature=config.max_temperature,
        lar_temperature=config.lar_temperature,
        lar_tokens_per_image=config.lar_tokens_per_image,
        rel_teacher_temperature=config.rel_teacher_temperature,
    )


def build_task(
    config: Config,
    teacher: Teacher,
    student: nn.Module,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
) -> DistillTask:
    """The distillation task of ``loss.*`` and ``prompt.*`` over a built teacher and student."""
    composer = PromptComposer(teacher, config.prompt.placeholder, config.prompt.short_context)
    return DistillTask(
        student,
        teacher,
        composer,
        weights=loss_weights(config.loss),
        train_template=config.prompt.train_template,
        rank=rank,
        world_size=world_size,
        gather=gather,
    )
