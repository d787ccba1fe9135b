"""The adaptive token learner (ATL, docs/method.md §2.1): feature map -> sentence of M pseudo-words.

Notation: ``F`` (B, C, h, w) is the image feature map, ``N = h * w`` its positions, ``d`` the token
width, ``M`` the number of tokens and ``word_dim`` the width ``w`` of the teacher's word embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .output import StudentOutput


def sincos_pos_embed_2d(height: int, width: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE convention), valid for any grid size.

    The first half of the channels encodes the row, the second half the column; each half is
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_k = 10000 ** (-k / (dim / 4))``.

    Args:
        height: Grid rows ``h``.
        width: Grid columns ``w``.
        dim: Embedding width; must be divisible by 4.
        device: Device of the result.
        dtype: Dtype of the result (computed in float32, then cast).

    Returns:
        The embedding, shape (h * w, dim), row-major over the grid like ``flatten(2)``.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sine-cosine position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)  # (d/4,)
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (h*w, d/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (h*w, d/2)

    embed = torch.cat([encode(grid_y), encode(grid_x)], dim=1)  # (h*w, d)
    return embed if dtype is None else embed.to(dtype)


class RefinementBlock(nn.Module):
    """Pre-norm block: cross-attention tokens -> X, self-attention among tokens, MLP.

    Args:
        dim: Token width ``d``.
        heads: Attention heads (``dim`` must be divisible by it).
        dropout: Dropout on attention weights and on every residual branch.
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
    """

    def __init__(self, dim: int, heads: int, dropout: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Refines tokens (B, M, d) against the positions ``memory`` (B, N, d)."""
        query = self.norm_cross(tokens)  # (B, M, d)
        memory = self.norm_memory(memory)  # (B, N, d)
        tokens = tokens + self.drop(self.cross_attn(query, memory, memory, need_weights=False)[0])
        normed = self.norm_self(tokens)  # (B, M, d)
        tokens = tokens + self.drop(self.self_attn(normed, normed, normed, need_weights=False)[0])
        return tokens + self.drop(self.mlp(self.norm_mlp(tokens)))  # (B, M, d)


class AdaptiveTokenLearner(nn.Module):
    """Maps a feature map to a sentence of ``num_tokens`` vectors in the teacher's word space.

    ``X = norm(conv1x1(F)) + pos2d``; ``A = softmax_N(Q X^T / sqrt(d))`` with ``M`` learned queries
    ``Q``; ``T0 = A X``; ``depth`` refinement blocks; ``S = embed_scale * normalize(Linear(T))``.

    Args:
        in_channels: Channels ``C`` of the input feature map.
        word_dim: Width ``w`` of the teacher's token embeddings.
        embed_scale: L2 norm given to every output token (the mean norm of the teacher's real token
            embeddings).
        num_tokens: Number of tokens ``M`` in the sentence.
        dim: Token width ``d``; divisible by 4 (position embedding) and by ``heads``.
        depth: Number of refinement blocks ``L``.
        heads: Attention heads in the refinement blocks.
        dropout: Dropout in the refinement blocks.
    """

    def __init__(
        self,
        in_channels: int,
        word_dim: int,
        embed_scale: float,
        num_tokens: int = 4,
        dim: int = 512,
        depth: int = 2,
        heads: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if dim % heads != 0:
            raise ValueError(f"token dim {dim} must be divisible by heads {heads}")
        if dim % 4 != 0:
            raise ValueError(f"token dim must be divisible by 4 (2-D position embedding), got {dim}")
        if embed_scale <= 0:
            raise ValueError(f"embed_scale must be > 0, got {embed_scale}")
        self.in_channels = in_channels
        self.word_dim = word_dim
        self.embed_scale = float(embed_scale)
        self.num_tokens = num_tokens
        self.dim = dim
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)
        # Unit-variance queries: the logits Q.X/sqrt(d) start at O(1), so the M tokens look at
        # different places from the first step instead of all starting as uniform average pooling.
        self.queries = nn.Parameter(torch.randn(num_tokens, dim))  # (M, d)
        self.blocks = nn.ModuleList(RefinementBlock(dim, heads, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.to_word = nn.Linear(dim, word_dim)

    def embed_positions(self, features: torch.Tensor) -> torch.Tensor:
        """Computes ``X = norm(conv1x1(F)) + pos2d``: (B, C, h, w) -> (B, N, d)."""
        _, _, height, width = features.shape
        x = self.proj(features).flatten(2).transpose(1, 2)  # (B, N, d)
        pos = sincos_pos_embed_2d(height, width, self.dim, device=x.device, dtype=x.dtype)  # (N, d)
        return self.norm(x) + pos  # (B, N, d)

    def forward(self, features: torch.Tensor) -> StudentOutput:
        """Turns a feature map into a sentence.

        Args:
            features: Feature map, shape (B, C, h, w).

        Returns:
            ``StudentOutput`` with ``sentence`` (B, M, w) and ``attention`` (B, M, h, w), the
            spatial attention ``A`` of each token (sums to 1 over the grid).
        """
        batch, _, height, width = features.shape
        x = self.embed_positions(features)  # (B, N, d)
        logits = torch.einsum("md,bnd->bmn", self.queries.to(x.dtype), x) / math.sqrt(self.dim)
        # Softmax and output normalization run in at least float32, also under bf16/fp16 autocast.
        wide = torch.promote_types(logits.dtype, torch.float32)
        attention = logits.to(wide).softmax(dim=-1)  # (B, M, N)
        tokens = attention.to(x.dtype) @ x  # (B, M, d)
        for block in self.blocks:
            tokens = block(tokens, x)  # (B, M, d)
        words = self.to_word(self.norm_out(tokens))  # (B, M, w)
        sentence = self.embed_scale * F.normalize(words.to(wide), dim=-1)  # (B, M, w)
        return StudentOutput(sentence, attention.reshape(batch, self.num_tokens, height, width))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_tokens={self.num_tokens}, dim={self.dim}, "
            f"word_dim={self.word_dim}, embed_scale={self.embed_scale:.4g}"
        )
