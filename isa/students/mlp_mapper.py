"""Pic2Word-style mapper (docs/method.md §2.2): pooled feature -> 3-layer MLP -> one pseudo-word."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .output import StudentOutput


class MLPMapper(nn.Module):
    """Maps the global-average-pooled feature map to a single token in the teacher's word space.

    Three linear layers (``C -> hidden -> hidden -> w``) with ReLU and dropout between them, as in
    Pic2Word's ``IM2TEXT``. The output is scaled like the ATL's, ``embed_scale * normalize(.)``
    **(ours: Pic2Word feeds the raw MLP output)**, so the two mappers differ only in the mapping.

    Args:
        in_channels: Channels ``C`` of the input feature map.
        word_dim: Width ``w`` of the teacher's token embeddings.
        embed_scale: L2 norm given to the output token.
        hidden_dim: Width of the two hidden layers.
        dropout: Dropout after each hidden layer.
    """

    num_tokens: int = 1  # the MLP mapper always makes one token

    def __init__(
        self,
        in_channels: int,
        word_dim: int,
        embed_scale: float,
        hidden_dim: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if embed_scale <= 0:
            raise ValueError(f"embed_scale must be > 0, got {embed_scale}")
        self.in_channels = in_channels
        self.word_dim = word_dim
        self.embed_scale = float(embed_scale)
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, word_dim),
        )

    def forward(self, features: torch.Tensor) -> StudentOutput:
        """Turns a feature map (B, C, h, w) into a one-token sentence (B, 1, w); attention is None."""
        pooled = features.mean(dim=(2, 3))  # (B, C)
        words = self.mlp(pooled).unsqueeze(1)  # (B, 1, w)
        # Our choice: the same output scaling as the ATL (Pic2Word leaves the MLP output unscaled).
        words = words.to(torch.promote_types(words.dtype, torch.float32))  # at least fp32 under autocast
        return StudentOutput(self.embed_scale * F.normalize(words, dim=-1), None)  # (B, 1, w)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, word_dim={self.word_dim}, embed_scale={self.embed_scale:.4g}"
