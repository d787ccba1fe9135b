"""The asymmetric student: a light timm backbone followed by the ATL or the MLP mapper."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import TimmBackbone
from .mlp_mapper import MLPMapper
from .output import StudentOutput
from .token_learner import AdaptiveTokenLearner

MAPPERS: tuple[str, ...] = ("atl", "mlp")


class AsymmetricStudent(nn.Module):
    """Light query encoder: ``head(backbone(images))``.

    Args:
        backbone: Maps images (B, 3, H, W) in [0, 1] to a feature map (B, C, h, w), normalizing
            the images itself.
        head: ``AdaptiveTokenLearner`` or ``MLPMapper`` reading that feature map.
    """

    def __init__(self, backbone: TimmBackbone, head: AdaptiveTokenLearner | MLPMapper) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_tokens: int = head.num_tokens  # M
        self.word_dim: int = head.word_dim  # w

    def forward(self, images: torch.Tensor) -> StudentOutput:
        """Encodes query images.

        Args:
            images: Float images with values in [0, 1], shape (B, 3, H, W).

        Returns:
            ``StudentOutput``: ``sentence`` (B, M, w); ``attention`` (B, M, h, w) or None (MLP).
        """
        return self.head(self.backbone(images))  # features: (B, C, h, w)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split into ``"backbone"`` and ``"head"`` (for separate learning rates)."""
        return {
            "backbone": [p for p in self.backbone.parameters() if p.requires_grad],
            "head": [p for p in self.head.parameters() if p.requires_grad],
        }


def build_asymmetric_student(
    backbone_name: str,
    *,
    word_dim: int,
    embed_scale: float,
    mapper: str = "atl",
    num_tokens: int = 4,
    token_dim: int = 512,
    depth: int = 2,
    heads: int = 8,
    dropout: float = 0.1,
    pretrained: bool = False,
) -> AsymmetricStudent:
    """Builds a timm backbone plus the chosen mapper.

    Args:
        backbone_name: timm model name.
        word_dim: Width ``w`` of the teacher's token embeddings.
        embed_scale: L2 norm of every output token.
        mapper: ``"atl"`` or ``"mlp"``.
        num_tokens: ``M``; must be 1 for ``"mlp"``.
        token_dim: ATL token width ``d``; hidden width of the MLP mapper.
        depth: ATL refinement blocks.
        heads: ATL attention heads.
        dropout: Dropout of the mapper.
        pretrained: Load timm's ImageNet weights for the backbone.

    Returns:
        The student.
    """
    if mapper not in MAPPERS:
        raise ValueError(f"unknown mapper {mapper!r}; valid mappers: {', '.join(MAPPERS)}")
    if mapper == "mlp" and num_tokens != 1:
        raise ValueError(f"mapper 'mlp' makes exactly one token; got num_tokens={num_tokens} (use 1)")
    backbone = TimmBackbone(backbone_name, pretrained=pretrained)
    head: AdaptiveTokenLearner | MLPMapper
    if mapper == "atl":
        head = AdaptiveTokenLearner(
            backbone.num_features,
            word_dim,
            embed_scale,
            num_tokens=num_tokens,
            dim=token_dim,
            depth=depth,
            heads=heads,
            dropout=dropout,
        )
    else:
        head = MLPMapper(backbone.num_features, word_dim, embed_scale, hidden_dim=token_dim, dropout=dropout)
    return AsymmetricStudent(backbone, head)
