"""The value every student returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class StudentOutput(NamedTuple):
    """What a student makes of a batch of query images.

    Attributes:
        sentence: Pseudo-word embeddings in the teacher's word-embedding space, each of L2 norm
            ``embed_scale``.
        attention: Spatial attention of each token over the feature grid (each map sums to 1 over
            ``h * w``); ``None`` for the MLP mapper, which has no spatial attention.
    """

    sentence: torch.Tensor  # (B, M, w) pseudo-word embeddings in the teacher's word space
    attention: torch.Tensor | None  # (B, M, h, w) token attention over the feature grid; None for MLP
