"""Retrieval helpers: rankings and image-only recall (pure functions over tensors)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

GALLERY_BLOCK = 65536  # gallery rows scored at a time: a (chunk, GALLERY_BLOCK) float32 block in memory


def top_k(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Indices of the ``k`` most similar gallery rows for each query, best first.

    Ties are broken arbitrarily; use :func:`rank` for a deterministic order.

    Args:
        queries: (Q, D) L2-normalized; gallery: (N, D) L2-normalized.

    Returns:
        (Q, min(k, N)) int64.
    """
    k = min(k, gallery.shape[0])
    parts = [(queries[i : i + chunk] @ gallery.T).topk(k, dim=1).indices for i in range(0, queries.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.long)


def rank(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None = None, chunk: int = 1024
) -> torch.Tensor:
    """The ``k`` best gallery rows per query by dot product, best first, equal scores by lower index first.

    Scores are computed in float32 whatever the input dtype, ``chunk`` queries against ``GALLERY_BLOCK``
    gallery rows at a time; each block's best k are merged into the running best k, so memory stays one
    (chunk, GALLERY_BLOCK) float32 score block whatever N. The order is deterministic even at the k
    boundary: of several rows tied with the k-th best score, the lowest indices are kept.

    Args:
        queries: (Q, D) float, any dtype.
        gallery: (N, D) float, any dtype.
        k: how many gallery rows to return per query, at least 1.
        exclude: optional (Q,) int64, one gallery index per query to leave out of its ranking (the CIRR
            reference), -1 for none. When any query excludes a row, every query gets at most N - 1 rows.
        chunk: queries scored at a time.

    Returns:
        (Q, min(k, N_eligible)) int64 gallery indices, where N_eligible is N less one if any row is excluded.

    Raises:
        ValueError: on k < 1, mismatched shapes or an exclude index outside [-1, N).
    """
    _check_rank_inputs(queries, gallery, k, exclude, chunk)
    num_gallery = gallery.shape[0]
    excluding = exclude is not None and bool((exclude >= 0).any())
    k = min(k, num_gallery - int(excluding))
    if k < 1 or queries.shape[0] == 0:
        return torch.zeros(queries.shape[0], max(k, 0), dtype=torch.long, device=queries.device)
    if not excluding:
        exclude = torch.full((queries.shape[0],), -1, dtype=torch.long)
    parts = [
        _rank_chunk(queries[start : start + chunk], gallery, k, exclude[start : start + chunk])
        for start in range(0, queries.shape[0], chunk)
    ]
    return torch.cat(parts)


def _check_rank_inputs(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None, chunk: int
) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries (Q, D) and gallery (N, D) must share D, got {tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    if exclude is None:
        return
    if exclude.shape != (queries.shape[0],):
        raise ValueError(f"exclude must have shape ({queries.shape[0]},), got {tuple(exclude.shape)}")
    if exclude.numel() and (int(exclude.min()) < -1 or int(exclude.max()) >= gallery.shape[0]):
        raise ValueError(
            f"exclude indices must lie in [-1, {gallery.shape[0]}), got [{int(exclude.min())}, {int(exclude.max())}]"
        )


def _rank_chunk(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor) -> torch.Tensor:
    """(C, k) best gallery indices for a chunk of queries, scoring one gallery block at a time.

    Each row of the overall best k is among the best k of its own block under the same (-score, index)
    order, so ordering the union of every block's best k and keeping k gives the exact answer.
    """
    queries = queries.float()  # (C, D)
    exclude = exclude.to(queries.device)  # (C,)
    # Buffers reused across blocks: fresh large allocations would page-fault on every block.
    score_buffer = queries.new_empty(queries.shape[0], min(GALLERY_BLOCK, gallery.shape[0]))  # (C, B)
    block_buffer = (
        None if gallery.dtype == torch.float32 else queries.new_empty(score_buffer.shape[1], gallery.shape[1])
    )
    candidates, candidate_scores = [], []
    for start in range(0, gallery.shape[0], GALLERY_BLOCK):
        block = gallery[start : start + GALLERY_BLOCK]  # (B, D)
        if block_buffer is not None:
            block = block_buffer[: block.shape[0]].copy_(block)  # float32
        scores = torch.mm(queries, block.T, out=score_buffer[:, : block.shape[0]])  # (C, B) float32
        _drop(scores, exclude - start)
        local = _stable_top_k(scores, min(k, scores.shape[1]))  # (C, k_b) block-local indices
        candidates.append(local + start)
        candidate_scores.append(scores.gather(1, local))
    indices, _ = _order(torch.cat(candidates, dim=1), torch.cat(candidate_scores, dim=1))  # (C, sum k_b)
    return indices[:, :k]


def _drop(scores: torch.Tensor, columns: torch.Tensor) -> None:
    """Set ``scores[i, columns[i]]`` to -inf in place where the column lies in the block. (C, B), (C,)."""
    rows = ((columns >= 0) & (columns < scores.shape[1])).nonzero().squeeze(1)  # (E,)
    scores[rows, columns[rows]] = float("-inf")


def _stable_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(C, k) indices of the k best columns per row, ordered by (-score, index); k <= N."""
    probe = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)  # values sorted, ties picked arbitrarily
    indices = _order(probe.indices[:, :k], probe.values[:, :k])[0]  # (C, k)
    if probe.values.shape[1] > k:
        # A row whose (k+1)-th value equals its k-th has a tie across the boundary: topk's pick is arbitrary.
        for row in (probe.values[:, k] == probe.values[:, k - 1]).nonzero().squeeze(1).tolist():
            indices[row] = _stable_row(scores[row], probe.values[row, k - 1], k)
    return indices


def _order(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates by descending value, equal values by ascending index. (C, M) -> (C, M), (C, M)."""
    indices, by_index = indices.sort(dim=1)
    values = values.gather(1, by_index)
    values, by_value = values.sort(dim=1, descending=True, stable=True)
    return indices.gather(1, by_value), values


def _stable_row(row: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """The k best of one (N,) score row given its k-th best value: every column >= threshold, ordered."""
    candidates = (row >= threshold).nonzero().squeeze(1)  # (M,) ascending, M >= k
    return _order(candidates[None], row[candidates][None])[0][0, :k]


def image_retrieval_recall(queries: torch.Tensor, gallery: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Image-only retrieval (docs/method.md §5): query ``i`` must find gallery row ``i``; R@k in percent."""
    ranks = rank(queries, gallery, max(ks))  # (Q, K)
    hits = ranks == torch.arange(queries.shape[0], device=ranks.device)[:, None]
    return {f"R@{k}": float(hits[:, :k].any(dim=1).float().mean() * 100) for k in ks}
