"""The symmetric variant: the ATL reads the frozen teacher image tower's patch tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .output import StudentOutput
from .token_learner import AdaptiveTokenLearner

ImageFeatureFn = Callable[[torch.Tensor], torch.Tensor]


class SymmetricStudent(nn.Module):
    """Large model on both sides: ``atl(image_feature_fn(images))``; only the ATL is trainable.

    ``image_feature_fn`` is kept as a plain attribute, never as a submodule, so the teacher's weights
    never enter this module's ``parameters()``, ``state_dict()``, optimizer or DDP wrapper, and
    ``.to()``/``.train()`` on the student leave the teacher alone. It is called under
    ``torch.no_grad()``.

    Args:
        image_feature_fn: Maps images (B, 3, H, W) in [0, 1] to the teacher's patch feature map
            (B, C, h, w); it does its own resizing and normalization.
        image_feature_dim: ``C``, channels of that feature map.
        token_learner: The ATL, built with ``in_channels == image_feature_dim``.
    """

    def __init__(
        self,
        image_feature_fn: ImageFeatureFn,
        image_feature_dim: int,
        token_learner: AdaptiveTokenLearner,
    ) -> None:
        super().__init__()
        if not callable(image_feature_fn):
            raise TypeError(f"image_feature_fn must be callable, got {type(image_feature_fn).__name__}")
        if token_learner.in_channels != image_feature_dim:
            raise ValueError(
                f"token learner reads {token_learner.in_channels} channels, image_feature_dim is {image_feature_dim}"
            )
        # object.__setattr__ bypasses nn.Module registration even when the callable is an nn.Module.
        object.__setattr__(self, "image_feature_fn", image_feature_fn)
        self.image_feature_dim = image_feature_dim
        self.head = token_learner
        self.num_tokens: int = token_learner.num_tokens  # M
        self.word_dim: int = token_learner.word_dim  # w

    def forward(self, images: torch.Tensor) -> StudentOutput:
        """Encodes query images.

        Args:
            images: Float images with values in [0, 1], shape (B, 3, H, W).

        Returns:
            ``StudentOutput``: ``sentence`` (B, M, w) and ``attention`` (B, M, h, w).
        """
        with torch.no_grad():
            features = self.image_feature_fn(images)  # (B, C, h, w)
        if features.ndim != 4 or features.shape[1] != self.image_feature_dim:
            raise ValueError(
                f"image_feature_fn must return (B, {self.image_feature_dim}, h, w); got {tuple(features.shape)}"
            )
        return self.head(features.detach())

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: ``"backbone"`` is empty (the teacher is frozen), ``"head"`` is the ATL."""
        return {"backbone": [], "head": [p for p in self.head.parameters() if p.requires_grad]}
