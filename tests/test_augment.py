"""The student views and the teacher crops (PIL + NumPy) against torchvision's and open_clip's own transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, RandomResizedCrop, Resize

from isa.augment import TrainView, eval_view, random_crop_box, to_unit_range, views
from isa.images import teacher_crop
from isa.teacher import crop_transform


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height", [(64, 64), (97, 61), (61, 97), (640, 480), (30, 45), (501, 499)])
@pytest.mark.parametrize("size", [32, 96])
def test_eval_view_is_torchvision_resize_and_centre_crop(width, height, size):
    image = picture(width, height)
    reference = Compose([Resize(size, antialias=True), CenterCrop(size)])(image)
    ours = eval_view(size)(image)
    assert ours.size == (size, size)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_train_view_is_torchvision_resized_crop_of_its_box_then_flip():
    image = picture(120, 80, seed=1)
    flips = 0
    for seed in range(40):
        top, left, h, w = random_crop_box(120, 80, (0.6, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        ours = TrainView(48, 0.6, hflip=True, rng=rng)(image)
        reference = TF.resized_crop(image, top, left, h, w, [48, 48], InterpolationMode.BILINEAR, antialias=True)
        same = np.array_equal(np.asarray(ours), np.asarray(reference))
        mirrored = np.array_equal(np.asarray(ours), np.asarray(TF.hflip(reference)))
        assert same or mirrored, seed
        flips += mirrored and not same
    assert 10 <= flips <= 30  # about half the views are flipped


def test_no_flip_when_disabled():
    image = picture(100, 100, seed=2)
    top, left, h, w = random_crop_box(100, 100, (0.6, 1.0), (3 / 4, 4 / 3), np.random.default_rng(5))
    ours = TrainView(40, 0.6, hflip=False, rng=np.random.default_rng(5))(image)
    reference = TF.resized_crop(image, top, left, h, w, [40, 40], InterpolationMode.BILINEAR, antialias=True)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_crop_boxes_follow_torchvision_constraints():
    rng = np.random.default_rng(0)
    fractions, aspects = [], []
    for _ in range(2000):
        top, left, h, w = random_crop_box(160, 90, (0.6, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 160
        fractions.append(w * h / (160 * 90))
        aspects.append(w / h)
    assert min(fractions) > 0.55 and max(fractions) <= 1.0
    assert min(aspects) > 0.7 and max(aspects) < 1.4
    # torchvision's sampler on the same image size: the same distribution (means within sampling error)
    torch.manual_seed(0)
    tv = [RandomResizedCrop.get_params(picture(160, 90), (0.6, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    tv_fractions = [w * h / (160 * 90) for _, _, h, w in tv]
    assert abs(np.mean(fractions) - np.mean(tv_fractions)) < 0.01


@pytest.mark.parametrize("width,height", [(1000, 10), (10, 1000)])
def test_fallback_box_is_torchvision_centre_crop(width, height):
    # no random box of >= 90% of the area fits within aspect 3/4..4/3: both fall back to the centre crop
    ours = random_crop_box(width, height, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    reference = RandomResizedCrop.get_params(picture(width, height), (0.9, 1.0), (3 / 4, 4 / 3))
    assert ours == tuple(reference)


def test_views_and_unit_range():
    images = [picture(70, 50, seed=s) for s in range(3)]
    jpegs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    batch = views(jpegs, eval_view(32), 32)
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.uint8
    decoded = Image.open(io.BytesIO(jpegs[1])).convert("RGB")
    np.testing.assert_array_equal(batch[1], np.asarray(eval_view(32)(decoded)))
    unit = to_unit_range(torch.from_numpy(batch))
    assert unit.shape == (3, 3, 32, 32) and unit.dtype == torch.float32
    torch.testing.assert_close(unit[2, 1], torch.from_numpy(batch[2, :, :, 1]).float() / 255)
    # views smaller than the student's input are upsampled as PIL's bilinear resize would (within rounding)
    larger = to_unit_range(torch.from_numpy(batch), 48)
    assert larger.shape == (3, 3, 48, 48)
    reference = np.asarray(Image.fromarray(batch[1]).resize((48, 48), Image.BILINEAR)).astype(np.float32) / 255
    np.testing.assert_allclose(larger[1].permute(1, 2, 0).numpy(), reference, atol=1.5 / 255)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("width,height", [(640, 480), (97, 61), (61, 97), (224, 224), (50, 40)])
def test_teacher_crop_is_open_clips_transform(interpolation, mode, width, height):
    # the decode tasks' PIL crop against open_clip's own torchvision transform, built by isa.teacher
    preprocess = {
        "size": [64, 64],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": interpolation,
        "resize_mode": mode,
    }
    image = picture(width, height, seed=3)
    ours = teacher_crop(preprocess)(image)
    reference = crop_transform(preprocess)(image)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


# ------------------------------------------------------------------- where the teacher's local cells are in a view

PREPROCESS = {
    "size": (64, 64),
    "resize_mode": "shortest",
    "interpolation": "bicubic",
    "mean": (0,) * 3,
    "std": (1,) * 3,
}


@pytest.mark.parametrize("width,height", [(240, 120), (120, 240), (100, 100)])
@pytest.mark.parametrize("mode", ["shortest", "squash"])
def test_the_teacher_frame_is_what_the_teacher_crop_keeps(width, height, mode):
    from isa.images import teacher_frame

    image = Image.fromarray(np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))[..., None].repeat(3, 2))
    preprocess = {**PREPROCESS, "resize_mode": mode}
    x0, y0, x1, y1 = teacher_frame(width, height, preprocess)
    box = (round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height))
    framed = image.crop(box).resize((64, 64), Image.BICUBIC)
    cropped = teacher_crop(preprocess)(image)
    assert np.abs(np.asarray(framed, np.float32) - np.asarray(cropped, np.float32)).mean() < 2.0


def object_image(width: int = 240, height: int = 120) -> tuple[Image.Image, int, tuple[int, int, int, int]]:
    """A dark picture with one bright square filling one cell of the teacher's 4x4 grid: the picture, that
    cell's index and the square (left, top, right, bottom)."""
    from isa.images import teacher_frame

    x0, y0, x1, y1 = teacher_frame(width, height, PREPROCESS)
    row, column = 1, 3
    pixels = np.zeros((height, width, 3), np.uint8)
    cell_w, cell_h = (x1 - x0) * width / 4, (y1 - y0) * height / 4
    left, top = round(x0 * width + column * cell_w), round(y0 * height + row * cell_h)
    right, bottom = left + round(cell_w), top + round(cell_h)
    pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels), row * 4 + column, (left, top, right, bottom)


def matched_cell(view: Image.Image, cells: torch.Tensor | None, student_grid: int = 12) -> int:
    """The teacher cell an attention map that follows the view's brightness lands on most."""
    from isa.losses import attended_local_features

    brightness = torch.from_numpy(np.asarray(view, np.float32).mean(axis=2))[None, None]  # (1, 1, S, S)
    attention = torch.nn.functional.adaptive_avg_pool2d(brightness, student_grid)  # (1, 1, 12, 12)
    attention = attention / attention.sum()
    one_hot = torch.eye(16)[None]  # (1, G, D=G): each cell's feature is its own axis
    features, share = attended_local_features(attention, one_hot, None if cells is None else cells[None])
    assert float(share) > 0
    return int(features[0, 0].argmax())


def test_after_a_flip_or_an_off_centre_crop_the_matched_cell_is_the_one_holding_the_object():
    from isa.augment import teacher_cells_in_view
    from isa.images import teacher_frame

    image, cell, (left, top, right, bottom) = object_image()
    frame = teacher_frame(*image.size, PREPROCESS)
    seen = {"flipped": 0, "off centre": 0}
    for seed in range(80):
        view, box, flipped = TrainView(48, 0.3, hflip=True, rng=np.random.default_rng(seed)).sample(image)
        shown_w = min(right, box[1] + box[3]) - max(left, box[1])
        shown_h = min(bottom, box[0] + box[2]) - max(top, box[0])
        if shown_w <= 0 or shown_h <= 0 or shown_w * shown_h < 0.6 * (right - left) * (bottom - top):
            continue  # this crop shows too little of the object to say where the attention is
        cells = torch.from_numpy(teacher_cells_in_view(image.size, box, flipped, frame, 4))
        assert matched_cell(view, cells) == cell, (seed, box, flipped)
        seen["flipped"] += flipped
        seen["off centre"] += abs(box[1] + box[3] / 2 - image.size[0] / 2) > 20
    assert seen["flipped"] >= 5 and seen["off centre"] >= 5
    # without the geometry the view is taken for the teacher's frame: a flipped centre view matches the mirror
    mirrored = Image.fromarray(np.asarray(eval_view(48)(image))[:, ::-1])
    assert matched_cell(mirrored, None) == 1 * 4 + 0


def test_cells_a_view_does_not_show_get_no_attention():
    from isa.augment import teacher_cells_in_view
    from isa.losses import attended_local_features

    box = (0, 0, 120, 60)  # the left quarter of a 240x120 image: left of the teacher's centre square
    cells = torch.from_numpy(teacher_cells_in_view((240, 120), box, False, (0.25, 0.0, 0.75, 1.0), 4))
    attention = torch.full((1, 1, 4, 4), 1 / 16)
    _, share = attended_local_features(attention, torch.eye(16)[None], cells[None])
    assert float(share) == 0.0  # no teacher cell in view: LAR leaves this view out
    half = torch.from_numpy(teacher_cells_in_view((240, 120), (0, 0, 120, 120), False, (0.25, 0.0, 0.75, 1.0), 4))
    _, share = attended_local_features(attention, torch.eye(16)[None], half[None])
    assert float(share) == pytest.approx(0.5)  # the view's right half shows the frame's left half
