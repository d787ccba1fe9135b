"""Student views of cached images: the mild training augmentation and the evaluation view (docs/method.md §4).

PIL and NumPy only, the same operations as torchvision's ``RandomResizedCrop``/``RandomHorizontalFlip`` and
``Resize``/``CenterCrop`` on PIL images (``tests/test_augment.py`` checks them against torchvision): the data
tasks that make the views never import torch, which keeps each of those processes a few hundred MB smaller.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from isa.images import centre_square

if TYPE_CHECKING:
    import torch

View = Callable[[Image.Image], Image.Image]
Box = tuple[int, int, int, int]  # top, left, height, width


def random_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> Box:
    """torchvision's ``RandomResizedCrop.get_params``: a box of random area fraction and aspect ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height  # fallback: the centre crop of the whole image, aspect clamped to ``ratio``
    if aspect < min(ratio):
        w, h = width, round(width / min(ratio))
    elif aspect > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainView:
    """Random resized crop (area fraction ``scale_min``..1, aspect 3/4..4/3, bilinear) to ``size`` squares
    and, optionally, a horizontal flip with probability 1/2."""

    def __init__(self, size: int, scale_min: float, hflip: bool, rng: np.random.Generator | None = None):
        self.size, self.scale, self.hflip = size, (scale_min, 1.0), hflip
        self.rng = rng if rng is not None else np.random.default_rng()

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, h, w = random_crop_box(*image.size, self.scale, (3 / 4, 4 / 3), self.rng)
        view = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
        if self.hflip and self.rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        return view


def train_view(size: int, scale_min: float, hflip: bool, rng: np.random.Generator | None = None) -> TrainView:
    """The training augmentation; ``rng`` None: seeded from the OS (each data task draws its own crops)."""
    return TrainView(size, scale_min, hflip, rng)


def eval_view(size: int) -> View:
    """Resize the short side to ``size`` (bilinear) and take the centre square (the view the teacher embedded)."""
    return functools.partial(centre_square, size=size, resample=Image.BILINEAR)


def views(images: list[bytes], transform: View, size: int) -> np.ndarray:
    """Decode cached JPEGs and apply ``transform`` (which makes ``size`` squares): (B, S, S, 3) uint8."""
    out = np.zeros((len(images), size, size, 3), dtype=np.uint8)
    for index, data in enumerate(images):
        out[index] = np.asarray(transform(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def to_unit_range(views: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, size, size) in [0, 1], the students' input.

    ``size`` other than S: bilinear resize on the views' device (the training views come no larger than the
    cached images, so upsampled pixels never cross the object store).
    """
    images = views.permute(0, 3, 1, 2).float().div(255)
    if size is not None and images.shape[-1] != size:
        from torch.nn.functional import interpolate  # here: the view tasks import this module without torch

        images = interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images
