"""Retrieval helpers: rankings and image-only recall (pure functions over tensors)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top_k(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Indices of the ``k`` most similar gallery rows for each query, best first.

    Args:
        queries: (Q, D) L2-normalized; gallery: (N, D) L2-normalized.

    Returns:
        (Q, min(k, N)) int64.
    """
    k = min(k, gallery.shape[0])
    parts = [(queries[i : i + chunk] @ gallery.T).topk(k, dim=1).indices for i in range(0, queries.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.long)


def image_retrieval_recall(queries: torch.Tensor, gallery: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Image-only retrieval (METHOD.md §5): query ``i`` must find gallery row ``i``; R@k in percent."""
    ranks = top_k(queries.float(), gallery.float(), max(ks))  # (Q, K)
    hits = ranks == torch.arange(queries.shape[0], device=ranks.device)[:, None]
    return {f"R@{k}": float(hits[:, :k].any(dim=1).float().mean() * 100) for k in ks}
