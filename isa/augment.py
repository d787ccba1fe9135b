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
        return self.sample(image)[0]

    def sample(self, image: Image.Image) -> tuple[Image.Image, Box, bool]:
        """A view with where it came from: the crop box in the image's pixels and whether it was flipped."""
        top, left, h, w = random_crop_box(*image.size, self.scale, (3 / 4, 4 / 3), self.rng)
        view = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
        flipped = self.hflip and self.rng.random() < 0.5
        if flipped:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        return view, (top, left, h, w), flipped


def teacher_cells_in_view(
    image_size: tuple[int, int], box: Box, flipped: bool, frame: tuple[float, float, float, float], grid: int
) -> np.ndarray:
    """Where each cell of the teacher's ``grid`` x ``grid`` local grid lies in a view: (G, 4) float32 rows
    ``(u0, v0, u1, v1)``, the cell's left, top, right and bottom edges as fractions of the view's width and
    height (outside [0, 1] where the view does not show it), row-major like ``teacher_local``.

    Args:
        image_size: (width, height) of the image the view was cut from.
        box: the view's crop box in that image, (top, left, height, width) pixels.
        flipped: whether the view was flipped left to right after the crop.
        frame: the teacher's frame in the image, :func:`isa.images.teacher_frame`.
    """
    width, height = image_size
    top, left, box_height, box_width = box
    x0, y0, x1, y1 = frame
    edges = np.arange(grid + 1) / grid  # (g+1,)
    xs = ((x0 + edges * (x1 - x0)) * width - left) / box_width  # cell column edges in the view, (g+1,)
    ys = ((y0 + edges * (y1 - y0)) * height - top) / box_height  # cell row edges, (g+1,)
    if flipped:
        xs = 1 - xs  # the edges now run right to left: each cell's left edge is its old right one
    left_edges, right_edges = np.minimum(xs[:-1], xs[1:]), np.maximum(xs[:-1], xs[1:])
    cells = np.empty((grid, grid, 4), np.float32)
    cells[..., 0], cells[..., 2] = left_edges[None, :], right_edges[None, :]
    cells[..., 1], cells[..., 3] = ys[:-1, None], ys[1:, None]
    return cells.reshape(grid * grid, 4)


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


def views_and_cells(
    images: list[bytes], transform: TrainView, preprocess: dict, grid: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training views of cached JPEGs and where the teacher's local cells lie in each: (B, S, S, 3) uint8 and
    (B, G, 4) float32 (:func:`teacher_cells_in_view`)."""
    from isa.images import teacher_frame

    size = transform.size
    out = np.zeros((len(images), size, size, 3), dtype=np.uint8)
    cells = np.zeros((len(images), grid * grid, 4), dtype=np.float32)
    for index, data in enumerate(images):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        view, box, flipped = transform.sample(image)
        out[index] = np.asarray(view)
        frame = teacher_frame(*image.size, preprocess)
        cells[index] = teacher_cells_in_view(image.size, box, flipped, frame, grid)
    return out, cells


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
