from __future__ import annotations

import logging

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from isa.cache import fingerprint_mismatch
from isa.teacher import RANDOM_INIT_NOTICE, TeacherNotSupportedError, expected_preprocess, load_teacher


def test_frozen_and_in_eval_mode(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())


def test_global_embedding_is_open_clips_own(teacher):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    pixels = teacher.preprocess_images([image])
    reference, _, preprocess = open_clip.create_model_and_transforms(teacher.name, pretrained=None)
    reference.load_state_dict(teacher.model.state_dict())
    reference.eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_image(preprocess(image)[None]), dim=-1)
        got = teacher.encode_image(pixels)
        g, tokens = teacher.encode_image_with_tokens(pixels)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-6)
    assert tokens.shape == (1, teacher.embed_dim, 4, 4)  # 32 px / patch 8


def test_local_grid_is_pooled_projected_patch_tokens(teacher):
    pixels = teacher.prepare(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        g, local = teacher.encode_image_local(pixels, grid=2)
        visual = teacher.model.visual
        x = visual.transformer(visual._embeds(pixels))
        patches = visual.ln_post(x)[:, 1:] @ visual.proj  # (B, 16, D) row-major 4x4
    grid = patches.view(2, 4, 4, -1)
    cells = torch.stack(
        [grid[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(dim=(1, 2)) for r in range(2) for c in range(2)], 1
    )
    torch.testing.assert_close(local, torch.nn.functional.normalize(cells, dim=-1), rtol=0, atol=1e-6)
    assert local.shape == (2, 4, teacher.embed_dim)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(2))


def test_fingerprint_identifies_weights_and_preprocessing(teacher):
    again = load_teacher(teacher.name, "none", seed=0)
    other = load_teacher(teacher.name, "none", seed=1)
    print_ = teacher.fingerprint()
    assert print_ == again.fingerprint()
    assert print_["weights_sha256"] != other.fingerprint()["weights_sha256"]
    assert print_["preprocess"]["size"] == [32, 32] and print_["preprocess"]["interpolation"] == "bicubic"
    assert print_["embed_dim"] == teacher.embed_dim and print_["word_dim"] == teacher.word_dim
    assert fingerprint_mismatch(print_, again.fingerprint()) is None
    message = fingerprint_mismatch(print_, other.fingerprint())
    assert "weights_sha256" in message and print_["weights_sha256"][:12] in message


def test_weights_file_loads_with_open_clips_meaning(tmp_path, clip_teacher):
    from safetensors.torch import save_file

    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in clip_teacher.model.state_dict().items()}, path)
    loaded = load_teacher(clip_teacher.name, str(path), seed=123)
    assert loaded.weights_sha256() == clip_teacher.weights_sha256()
    assert loaded.pretrained == str(path)
    assert expected_preprocess(clip_teacher.name, str(path)) == loaded.fingerprint()["preprocess"]


@pytest.mark.parametrize("name", ["isa-tiny-ViT", "isa-world-ViT", "ViT-B-32"])
def test_the_expected_preprocessing_is_the_loaded_teachers(name):
    assert expected_preprocess(name, "none") == load_teacher(name, "none").fingerprint()["preprocess"]


def test_a_pretrained_tags_preprocessing_is_expected_without_its_weights():
    siglip = expected_preprocess("ViT-B-16-SigLIP", "webli")  # open_clip's table: its own mean, std and resizing
    assert siglip == {
        "size": [224, 224],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "resize_mode": "squash",
    }
    assert expected_preprocess("ViT-L-14-336", "openai")["size"] == [336, 336]
    assert expected_preprocess("hf-hub:timm/ViT-B-16-SigLIP", "none") is None  # not told without the hub


def test_hf_text_tower_is_refused_clearly():
    with pytest.raises(TeacherNotSupportedError, match="Hugging Face text tower"):
        load_teacher("roberta-ViT-B-32", "none")


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-model'"):
        load_teacher("no-such-model", "none")


def test_sizes_and_embed_scale(teacher):
    table = teacher.token_embeddings
    assert teacher.word_dim == table.shape[1] and teacher.context_length == 77
    assert teacher.embed_scale == pytest.approx(float(table.norm(dim=-1).mean()), rel=1e-6)


def test_random_init_asked_for_is_built_without_open_clips_warning(caplog):
    caplog.set_level(logging.WARNING)
    load_teacher("isa-tiny-ViT", "none")
    assert not [r for r in caplog.records if RANDOM_INIT_NOTICE in r.getMessage()]
    assert not logging.getLogger().filters  # only while the model was built
    open_clip.create_model_and_transforms("isa-tiny-ViT", pretrained=None)  # outside load_teacher: open_clip warns
    assert [r for r in caplog.records if RANDOM_INIT_NOTICE in r.getMessage()]
