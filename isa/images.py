"""Image decoding and validation: bytes in, an oriented RGB image out, or a reason for rejecting it.

Used by every stage that reads images (the embed stage's CPU tasks, the trainer's augmentation, the
evaluation's queries), so all of them treat bad input the same way.
"""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # greyscale of more than 8 bits a pixel (16-bit PNG, TIFF)


class ImageRejected(ValueError):
    """An input that is not a usable image; ``str(error)`` is the reason recorded in ``_errors/``."""


def content_id(data: bytes) -> str:
    """The cache id of an image: sha256 hex of the source file's bytes."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_pixels: int, draft_short_side: int | None = None) -> Image.Image:
    """Decode and validate image bytes.

    EXIF orientation is applied (Pillow skips EXIF data that does not parse) and any mode is converted to RGB as
    open_clip's preprocessing does (CMYK and YCCK JPEGs, palettes with transparency, LA; the first frame of an
    animation), except 16-bit and 32-bit integer greyscale, reduced to its 8 high bits first (Pillow's own conversion
    clips it, which turns most such images white).

    Args:
        data: the file's bytes.
        max_pixels: larger images are rejected before their pixels are decoded (decompression bombs).
        draft_short_side: if given, JPEGs are decoded at a reduced DCT scale whose short side is still at
            least this many pixels (much cheaper; pixels differ slightly from a full decode).

    Raises:
        ImageRejected: empty, not an image, too large, truncated or otherwise undecodable.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # corrupt EXIF, palette alpha
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(f"decompression bomb: {width}x{height} pixels exceeds the limit of {max_pixels}")
            if draft_short_side and image.format == "JPEG":
                scale = draft_short_side / min(width, height)
                image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in WIDE_GREY:
                high = np.asarray(image, dtype=np.int64) >> 8
                image = Image.fromarray(high.clip(0, 255).astype(np.uint8), "L")
            return image.convert("RGB")
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image (no decoder recognises the bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(f"decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageRejected(f"undecodable image: {error}") from None


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Resize so that the short side is ``short_side`` (bicubic, antialiased); never enlarges."""
    width, height = image.size
    if min(width, height) <= short_side:
        return image
    scale = short_side / min(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)


def centre_square(image: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision's ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image: the short side scaled to
    ``size`` (the long side truncated as torchvision does), then the centre ``size`` square."""
    width, height = image.size
    if width <= height:
        width, height = size, int(size * height / width)
    else:
        width, height = int(size * width / height), size
    image = image.resize((width, height), resample)
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def teacher_crop(preprocess: dict[str, Any]) -> Callable[[Image.Image], Image.Image]:
    """open_clip's inference transform up to ToTensor, from a fingerprint's ``preprocess`` section.

    Square ``shortest`` (every OpenAI and most open_clip models) and ``squash`` resizing are done here with
    PIL alone, pixel for pixel what open_clip's torchvision transforms give (``tests/test_augment.py``), so
    the decode tasks never import torch; other modes use open_clip's own transforms.
    """
    width, height = preprocess["size"]
    resample = Image.BILINEAR if preprocess["interpolation"] == "bilinear" else Image.BICUBIC
    mode = preprocess["resize_mode"]
    if mode == "shortest" and width == height:
        return functools.partial(centre_square, size=width, resample=resample)
    if mode == "squash":
        return lambda image: image.resize((width, height), resample)
    from isa.teacher import crop_transform

    return crop_transform(preprocess)


def teacher_frame(width: int, height: int, preprocess: dict[str, Any]) -> tuple[float, float, float, float]:
    """What :func:`teacher_crop` sees of a ``width`` x ``height`` image: ``(x0, y0, x1, y1)`` as fractions of
    the image's width and height (beyond [0, 1] where the teacher pads).

    The teacher's local grid (``teacher_local``, g x g cells, row-major) tiles this frame; a student view of
    the same image at any size and aspect (the cached JPEG keeps the original's) locates the cells with it.
    """
    target_width, target_height = preprocess["size"]
    mode = preprocess["resize_mode"]
    if mode == "squash":
        return 0.0, 0.0, 1.0, 1.0
    # shortest: scaled to cover the target, centre-cropped; longest: scaled to fit inside it, padded
    scale = (max if mode == "shortest" else min)(target_width / width, target_height / height)
    frame_width, frame_height = target_width / scale / width, target_height / scale / height
    return (1 - frame_width) / 2, (1 - frame_height) / 2, (1 + frame_width) / 2, (1 + frame_height) / 2


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
