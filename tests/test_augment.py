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
