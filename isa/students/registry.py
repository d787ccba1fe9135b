"""Student registry: ``create_student(name, ...)`` builds any registered student by name.

A builder is a function taking the keyword arguments of ``create_student`` after its checks
(``word_dim, embed_scale, mapper, num_tokens, token_dim, depth, heads, dropout, pretrained,
image_feature_fn, image_feature_dim``) and returning an ``nn.Module`` whose forward maps images
(B, 3, H, W) in [0, 1] to a ``StudentOutput`` and which has ``num_tokens``, ``word_dim`` and
``parameter_groups()``. A new timm backbone is registered with::

    @register_student("resnet18")
    def _resnet18(*, image_feature_fn=None, image_feature_dim=None, **kwargs):
        return build_asymmetric_student("resnet18", **kwargs)  # from isa.students
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from isa.names import SYMMETRIC

from .asymmetric import MAPPERS, build_asymmetric_student
from .backbones import BACKBONES
from .symmetric import ImageFeatureFn, SymmetricStudent
from .token_learner import AdaptiveTokenLearner

StudentBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, StudentBuilder] = {}


def register_student(name: str) -> Callable[[StudentBuilder], StudentBuilder]:
    """Decorator that registers a student builder under ``name``.

    Args:
        name: The name ``create_student`` will accept; must not be registered yet.

    Returns:
        The decorator; it returns the builder unchanged.
    """

    def decorator(builder: StudentBuilder) -> StudentBuilder:
        if name in _REGISTRY:
            raise ValueError(f"student {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_students() -> list[str]:
    """Names of all registered students, sorted."""
    return sorted(_REGISTRY)


def create_student(
    name: str,
    *,
    word_dim: int,
    embed_scale: float,
    mapper: str = "atl",
    num_tokens: int | None = None,
    token_dim: int = 512,
    depth: int = 2,
    heads: int = 8,
    dropout: float = 0.1,
    pretrained: bool = False,
    image_feature_fn: ImageFeatureFn | None = None,
    image_feature_dim: int | None = None,
) -> nn.Module:
    """Builds a registered student.

    Args:
        name: A name from ``list_students()``: a backbone (asymmetric student) or ``"symmetric"``.
        word_dim: Width ``w`` of the teacher's token embeddings.
        embed_scale: L2 norm of every output token (mean norm of the teacher's token embeddings).
        mapper: ``"atl"`` (adaptive token learner) or ``"mlp"`` (Pic2Word-style, one token).
        num_tokens: Sentence length ``M``; None means the mapper's default (4 for ``"atl"``, 1 for
            ``"mlp"``). ``"mlp"`` accepts only 1.
        token_dim: ATL token width ``d``; hidden width of the MLP mapper.
        depth: ATL refinement blocks.
        heads: ATL attention heads.
        dropout: Dropout of the mapper.
        pretrained: Load timm's ImageNet weights for the backbone (asymmetric students).
        image_feature_fn: ``"symmetric"`` only: maps images (B, 3, H, W) in [0, 1] to the frozen
            teacher's patch feature map (B, C, h, w). Ignored by the other students.
        image_feature_dim: ``"symmetric"`` only: ``C`` of that feature map.

    Returns:
        The student module.

    Raises:
        ValueError: Unknown name or mapper, ``"mlp"`` with ``num_tokens != 1``, or ``"symmetric"``
            without ``image_feature_fn``/``image_feature_dim``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown student {name!r}; registered students: {', '.join(list_students())}")
    if mapper not in MAPPERS:
        raise ValueError(f"unknown mapper {mapper!r}; valid mappers: {', '.join(MAPPERS)}")
    if num_tokens is None:
        num_tokens = 1 if mapper == "mlp" else 4
    if mapper == "mlp" and num_tokens != 1:
        raise ValueError(
            f"mapper 'mlp' makes exactly one token; got num_tokens={num_tokens} (use 1 or the 'atl' mapper)"
        )
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return _REGISTRY[name](
        word_dim=word_dim,
        embed_scale=embed_scale,
        mapper=mapper,
        num_tokens=num_tokens,
        token_dim=token_dim,
        depth=depth,
        heads=heads,
        dropout=dropout,
        pretrained=pretrained,
        image_feature_fn=image_feature_fn,
        image_feature_dim=image_feature_dim,
    )


def _build_backbone_student(
    backbone_name: str,
    *,
    image_feature_fn: ImageFeatureFn | None = None,
    image_feature_dim: int | None = None,
    **kwargs,
) -> nn.Module:
    del image_feature_fn, image_feature_dim  # only the symmetric student reads the teacher
    return build_asymmetric_student(backbone_name, **kwargs)


for _backbone in BACKBONES:
    register_student(_backbone)(functools.partial(_build_backbone_student, _backbone))
del _backbone


@register_student(SYMMETRIC)
def _build_symmetric_student(
    *,
    word_dim: int,
    embed_scale: float,
    mapper: str,
    num_tokens: int,
    token_dim: int,
    depth: int,
    heads: int,
    dropout: float,
    pretrained: bool,
    image_feature_fn: ImageFeatureFn | None,
    image_feature_dim: int | None,
) -> nn.Module:
    del pretrained  # the teacher's weights are the teacher wrapper's business
    if mapper != "atl":
        raise ValueError(f"student 'symmetric' uses the 'atl' mapper only; got mapper={mapper!r}")
    if image_feature_fn is None or image_feature_dim is None:
        raise ValueError(
            "student 'symmetric' needs image_feature_fn (the frozen teacher's patch feature map) "
            "and image_feature_dim (its channel count)"
        )
    token_learner = AdaptiveTokenLearner(
        image_feature_dim,
        word_dim,
        embed_scale,
        num_tokens=num_tokens,
        dim=token_dim,
        depth=depth,
        heads=heads,
        dropout=dropout,
    )
    return SymmetricStudent(image_feature_fn, image_feature_dim, token_learner)
