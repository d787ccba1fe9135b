"""Tests for isa.students: every registered student, both mappers, the symmetric variant's isolation
from the teacher, the ATL's attention, parameter groups, errors and determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from isa.students import (
    BACKBONES,
    SYMMETRIC,
    AdaptiveTokenLearner,
    StudentOutput,
    TimmBackbone,
    create_student,
    list_students,
    register_student,
    sincos_pos_embed_2d,
)
from isa.students import registry as registry_module

WORD_DIM = 32
EMBED_SCALE = 0.7
IMAGE_SIZE = 96  # smallest size at which every backbone (efficientvit_m2: stride 64) gives a >1x1 grid
BATCH = 2
SMALL = dict(word_dim=WORD_DIM, embed_scale=EMBED_SCALE, token_dim=64, depth=2, heads=8, dropout=0.1)
FEATURE_DIM = 24  # channels of the stand-in teacher feature map


def _stand_in_teacher() -> nn.Module:
    """A small frozen conv net standing in for the teacher image tower: (B,3,96,96) -> (B,24,6,6)."""
    net = nn.Sequential(nn.Conv2d(3, FEATURE_DIM, kernel_size=16, stride=16), nn.GELU())
    return net.requires_grad_(False).eval()


def _cases() -> list[tuple[str, str]]:
    cases = []
    for name in list_students():
        mappers = ("atl",) if name == SYMMETRIC else ("atl", "mlp")
        cases.extend((name, mapper) for mapper in mappers)
    return cases


CASES = _cases()
CASE_IDS = [f"{name}-{mapper}" for name, mapper in CASES]


def _build(name: str, mapper: str, teacher: nn.Module | None = None, **overrides) -> nn.Module:
    kwargs = dict(SMALL, mapper=mapper, **overrides)
    if name == SYMMETRIC:
        teacher = teacher if teacher is not None else _stand_in_teacher()
        kwargs.update(image_feature_fn=lambda images: teacher(images), image_feature_dim=FEATURE_DIM)
    return create_student(name, **kwargs)


def _images(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)  # (B, 3, H, W) in [0, 1]


def test_registry_lists_every_backbone_and_symmetric():
    assert set(list_students()) >= set(BACKBONES) | {SYMMETRIC}


@pytest.mark.parametrize(("name", "mapper"), CASES, ids=CASE_IDS)
def test_forward_backward(name: str, mapper: str):
    torch.manual_seed(0)
    student = _build(name, mapper).train()
    out = student(_images())
    assert isinstance(out, StudentOutput)
    num_tokens = 1 if mapper == "mlp" else 4
    assert student.num_tokens == num_tokens and student.word_dim == WORD_DIM
    assert out.sentence.shape == (BATCH, num_tokens, WORD_DIM)
    assert torch.isfinite(out.sentence).all()
    torch.testing.assert_close(
        out.sentence.norm(dim=-1), torch.full((BATCH, num_tokens), EMBED_SCALE), rtol=1e-5, atol=1e-5
    )
    if mapper == "mlp":
        assert out.attention is None
    else:
        assert out.attention.ndim == 4 and out.attention.shape[:2] == (BATCH, num_tokens)
        assert out.attention.shape[2] * out.attention.shape[3] > 1  # a real grid, not one position
        assert torch.isfinite(out.attention).all() and (out.attention >= 0).all()
        torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(BATCH, num_tokens), rtol=1e-5, atol=1e-5)

    loss = (out.sentence * torch.randn_like(out.sentence)).sum()
    loss.backward()
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"


@pytest.mark.parametrize(("name", "mapper"), CASES, ids=CASE_IDS)
def test_parameter_groups_partition_trainable_parameters(name: str, mapper: str):
    student = _build(name, mapper)
    groups = student.parameter_groups()
    assert set(groups) == {"backbone", "head"}
    grouped = [id(p) for group in groups.values() for p in group]
    assert len(grouped) == len(set(grouped)), "a parameter sits in two groups"
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert set(grouped) == trainable
    assert groups["head"]
    assert bool(groups["backbone"]) == (name != SYMMETRIC)


@pytest.mark.parametrize(("name", "mapper"), CASES, ids=CASE_IDS)
def test_deterministic_under_manual_seed(name: str, mapper: str):
    outputs, states = [], []
    teacher = _stand_in_teacher()
    for _ in range(2):
        torch.manual_seed(123)
        student = _build(name, mapper, teacher=teacher).train()  # dropout on: seeded too
        outputs.append(student(_images()).sentence)
        states.append(student.state_dict())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


@pytest.mark.parametrize("pass_module_itself", [False, True], ids=["lambda", "module"])
def test_symmetric_student_keeps_teacher_out(pass_module_itself: bool):
    torch.manual_seed(0)
    teacher = _stand_in_teacher()
    feature_fn = teacher if pass_module_itself else (lambda images: teacher(images))
    student = create_student(SYMMETRIC, **SMALL, image_feature_fn=feature_fn, image_feature_dim=FEATURE_DIM).train()

    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}
    teacher_tensors = {p.data_ptr() for p in teacher.parameters()}
    assert not any(t.data_ptr() in teacher_tensors for t in student.state_dict().values())
    assert all(key.startswith("head.") for key in student.state_dict())
    assert not any(isinstance(m, nn.Conv2d) and m.in_channels == 3 for m in student.modules())
    assert not teacher.training, "student.train() must not reach the teacher"

    # The teacher is frozen here, but the student must not depend on that: unfreeze it and check
    # that it still gets no gradient (the student calls it under torch.no_grad()).
    teacher.requires_grad_(True)
    out = student(_images())
    assert out.sentence.shape == (BATCH, 4, WORD_DIM)
    assert out.attention.shape == (BATCH, 4, IMAGE_SIZE // 16, IMAGE_SIZE // 16)
    out.sentence.sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def _reference_pos_embed(height: int, width: int, dim: int) -> torch.Tensor:
    """Position embedding written out element by element (MAE's 2-D sine-cosine convention)."""
    quarter = dim // 4
    table = torch.zeros(height * width, dim, dtype=torch.float64)
    for row in range(height):
        for col in range(width):
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                n = row * width + col
                table[n, k], table[n, quarter + k] = math.sin(row * omega), math.cos(row * omega)
                table[n, 2 * quarter + k] = math.sin(col * omega)
                table[n, 3 * quarter + k] = math.cos(col * omega)
    return table.float()


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_atl_attention_is_softmax_of_queries_against_positions(num_tokens: int):
    torch.manual_seed(0)
    channels, dim, height, width = 10, 16, 3, 5  # a non-square grid
    atl = AdaptiveTokenLearner(channels, WORD_DIM, EMBED_SCALE, num_tokens=num_tokens, dim=dim, heads=4)
    atl.eval()
    with torch.no_grad():  # non-trivial norm affine so the check covers it
        atl.norm.weight.normal_()
        atl.norm.bias.normal_()
    features = torch.randn(BATCH, channels, height, width)  # (B, C, h, w)

    with torch.no_grad():
        out = atl(features)
        projected = torch.einsum("bchw,dc->bhwd", features, atl.proj.weight[:, :, 0, 0]) + atl.proj.bias
        x = projected.reshape(BATCH, height * width, dim)  # (B, N, d), row-major like flatten
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + atl.norm.eps) * atl.norm.weight + atl.norm.bias
        x = x + _reference_pos_embed(height, width, dim)
        scores = torch.einsum("md,bnd->bmn", atl.queries, x) / math.sqrt(dim)  # (B, M, N)
        expected = torch.exp(scores - scores.amax(-1, keepdim=True))
        expected = expected / expected.sum(-1, keepdim=True)

    assert out.attention.shape == (BATCH, num_tokens, height, width)
    torch.testing.assert_close(out.attention.reshape(BATCH, num_tokens, -1), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        sincos_pos_embed_2d(height, width, dim),
        _reference_pos_embed(height, width, dim),
        rtol=1e-5,
        atol=1e-6,
    )


def test_atl_accepts_any_grid_and_normalizes_output():
    torch.manual_seed(0)
    atl = AdaptiveTokenLearner(8, WORD_DIM, 2.5, num_tokens=3, dim=32, heads=8).eval()
    for height, width in [(1, 1), (2, 7), (6, 6)]:
        out = atl(torch.randn(BATCH, 8, height, width))
        assert out.sentence.shape == (BATCH, 3, WORD_DIM)
        assert out.attention.shape == (BATCH, 3, height, width)
        torch.testing.assert_close(out.sentence.norm(dim=-1), torch.full((BATCH, 3), 2.5))


def test_backbone_normalizes_with_pretrained_cfg_and_keeps_stats_out_of_state_dict():
    backbone = TimmBackbone("efficientnet_b0")
    cfg = backbone.model.pretrained_cfg
    torch.testing.assert_close(backbone.mean.flatten(), torch.tensor(cfg["mean"]))
    torch.testing.assert_close(backbone.std.flatten(), torch.tensor(cfg["std"]))
    assert "mean" not in backbone.state_dict() and "std" not in backbone.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="resnet9000"), r"unknown student 'resnet9000'.*efficientnet_b0.*symmetric"),
        (dict(name="efficientnet_b0", mapper="transformer"), r"unknown mapper 'transformer'.*atl, mlp"),
        (dict(name="efficientnet_b0", mapper="mlp", num_tokens=4), r"'mlp' makes exactly one token.*4"),
        (dict(name=SYMMETRIC), r"'symmetric' needs image_feature_fn.*image_feature_dim"),
        (
            dict(name=SYMMETRIC, image_feature_fn=lambda images: images),
            r"'symmetric' needs image_feature_fn.*image_feature_dim",
        ),
        (
            dict(name=SYMMETRIC, mapper="mlp", num_tokens=1, image_feature_fn=lambda x: x, image_feature_dim=3),
            r"'symmetric' uses the 'atl' mapper only",
        ),
    ],
    ids=[
        "unknown-name",
        "unknown-mapper",
        "mlp-many-tokens",
        "symmetric-no-fn",
        "symmetric-no-dim",
        "symmetric-mlp",
    ],
)
def test_errors_name_the_problem(kwargs: dict, message: str):
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        create_student(name, word_dim=WORD_DIM, embed_scale=EMBED_SCALE, **kwargs)


def test_unknown_timm_backbone_lists_supported_ones():
    with pytest.raises(ValueError, match=r"unknown timm backbone 'not_a_net'.*efficientvit_b1"):
        TimmBackbone("not_a_net")


def test_symmetric_rejects_wrong_feature_shape():
    student = create_student(SYMMETRIC, **SMALL, image_feature_fn=lambda images: images, image_feature_dim=FEATURE_DIM)
    with pytest.raises(ValueError, match=r"image_feature_fn must return \(B, 24, h, w\)"):
        student(_images())


def test_mlp_mapper_defaults_to_one_token():
    student = create_student("mobilenetv2_100", word_dim=WORD_DIM, embed_scale=EMBED_SCALE, mapper="mlp")
    assert student.num_tokens == 1


def test_register_student_adds_a_name_and_refuses_duplicates(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_student("tiny_test_student")
    def _build_tiny(**kwargs):
        return _build(SYMMETRIC, "atl")

    assert "tiny_test_student" in list_students()
    student = create_student("tiny_test_student", word_dim=WORD_DIM, embed_scale=EMBED_SCALE)
    assert student(_images()).sentence.shape == (BATCH, 4, WORD_DIM)
    with pytest.raises(ValueError, match="'tiny_test_student' is already registered"):
        register_student("tiny_test_student")(_build_tiny)


def test_atl_output_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    atl = AdaptiveTokenLearner(8, WORD_DIM, EMBED_SCALE, num_tokens=4, dim=32, heads=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = atl(torch.randn(BATCH, 8, 3, 3))
    assert out.sentence.dtype == torch.float32 and out.attention.dtype == torch.float32
    torch.testing.assert_close(out.sentence.norm(dim=-1), torch.full((BATCH, 4), EMBED_SCALE))
    torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(BATCH, 4))
