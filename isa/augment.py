"""Student views of cached images: the mild training augmentation and the evaluation view (METHOD.md §4)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, RandomHorizontalFlip, RandomResizedCrop, Resize


def train_view(size: int, scale_min: float, hflip: bool) -> Compose:
    """Random resized crop (scale ``scale_min``..1) and, optionally, a horizontal flip."""
    steps = [RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True)]
    return Compose(steps + ([RandomHorizontalFlip()] if hflip else []))


def eval_view(size: int) -> Compose:
    """Resize the short side to ``size`` and take the centre square (the view the teacher embedded)."""
    return Compose([Resize(size, antialias=True), CenterCrop(size)])


def views(images: list[bytes], transform: Compose, size: int) -> np.ndarray:
    """Decode cached JPEGs and apply ``transform`` (which makes ``size`` squares): (B, S, S, 3) uint8."""
    out = np.zeros((len(images), size, size, 3), dtype=np.uint8)
    for index, data in enumerate(images):
        out[index] = np.asarray(transform(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def to_unit_range(views: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1], the students' input."""
    return views.permute(0, 3, 1, 2).float().div(255)
