"""Shared fixtures: tiny random-init open_clip teachers (no network)."""

from __future__ import annotations

import pytest
import torch

from isa.teacher import Teacher, load_teacher

TINY_TEACHERS = ("isa-tiny-ViT", "isa-tiny-ViT-custom-text")  # open_clip CLIP and CustomTextCLIP classes


@pytest.fixture(scope="session", params=TINY_TEACHERS)
def teacher(request) -> Teacher:
    torch.set_num_threads(2)
    return load_teacher(request.param, "none", seed=0)


@pytest.fixture(scope="session")
def clip_teacher() -> Teacher:
    return load_teacher("isa-tiny-ViT", "none", seed=0)
