"""Distillation losses (docs/method.md §4): tensor in, tensor out.

Rank and world size come from the caller. With ``world_size > 1`` features are all-gathered with
autograd (:func:`all_gather_with_grad`), each rank scores its *local* rows against the
*global* batch (open_clip ``ClipLoss`` with ``local_loss=True, gather_with_grad=True``): the mean of the
per-rank losses is the loss of the global batch, and the gradients that DDP averages are exactly the
gradients of that global loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Gather = Callable[[torch.Tensor], torch.Tensor]


def all_gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's features (W*B, ...); gradients flow back to the rank that owns each row."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as collectives

    gather = getattr(collectives, "all_gather_single_autograd", None)
    if gather is None:  # torch < 2.12
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(features.contiguous()), dim=0)
    return gather(features.contiguous(), 0, dist.group.WORLD)


def symmetric_info_nce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows of ``a`` (N, D) and ``b`` (N, D), both L2-normalized.

    ``valid`` (N,) bool leaves pairs out, both as positives and as negatives (without a host sync: the rows
    stay, masked); the loss is the mean over the valid pairs, 0 when there is none.
    """
    logits = logit_scale * a @ b.T  # (N, N)
    labels = torch.arange(a.shape[0], device=a.device)
    if valid is None:
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    keep = valid[:, None] & valid[None, :]
    logits = logits.float().masked_fill(~keep, -1e9)  # a masked pair weighs exp(-1e9) = 0
    rows = F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")
    return (rows * valid).sum() / (2 * valid.sum().clamp_min(1))


class GCDLoss(nn.Module):
    """Global contrastive distillation: symmetric InfoNCE between queries ``q`` and teacher images ``g``.

    Args:
        rank: this worker's rank.
        world_size: number of workers whose batches form the global batch.
        gather: concatenates every rank's rows with autograd; defaults to ``all_gather_with_grad``.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather: Gather | None = None):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.gather = gather or all_gather_with_grad

    def forward(self, query: torch.Tensor, target: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """Loss of the local rows against the global batch.

        Args:
            query: (B, D) L2-normalized student queries (with grad).
            target: (B, D) L2-normalized teacher image embeddings.
            logit_scale: 1/τ, a scalar tensor.
        """
        all_query, all_target = query, target
        if self.world_size > 1:
            all_query, all_target = self.gather(query), self.gather(target)  # (W*B, D)
        labels = torch.arange(query.shape[0], device=query.device) + self.rank * query.shape[0]
        query_logits = logit_scale * query @ all_target.T  # (B, W*B)
        target_logits = logit_scale * target @ all_query.T  # (B, W*B)
        return (F.cross_entropy(query_logits, labels) + F.cross_entropy(target_logits, labels)) / 2


def attended_local_features(
    attention: torch.Tensor, local: torch.Tensor, cells: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What each token sees: ``u = normalize(Â · P)`` (docs/method.md §4, LAR), with ``Â`` the token's attention
    brought onto the teacher's cells.

    Each teacher cell receives the attention mass of the part of the view it covers (student grid cells
    weighted by the share of them inside it), so a flipped or off-centre view compares the regions that
    correspond, and cells the view does not show receive none.

    Args:
        attention: (B, K, h, w) attention maps of K tokens over the student's feature grid (each sums to 1).
        local: (B, G, D) teacher local features on a ``g x g`` grid, ``G = g*g``, row-major.
        cells: (B, G, 4) each teacher cell in the view, ``(u0, v0, u1, v1)`` fractions of its width and height
            (:func:`isa.augment.teacher_cells_in_view`); None: the view is the teacher's own frame.

    Returns:
        (B, K, D) L2-normalized features and (B, K) the share of each map's attention on the teacher's cells
        (0 where the view shows none of them: such a feature is meaningless).
    """
    grid = math.isqrt(local.shape[1])
    if grid * grid != local.shape[1]:
        raise ValueError(f"teacher_local has {local.shape[1]} cells, not a square grid")
    if cells is None:
        edges = torch.arange(grid + 1, device=attention.device, dtype=torch.float32) / grid  # made on the device
        low, high = edges[:-1], edges[1:]  # (g,): cell (i, j) spans columns j and rows i, row-major
        own = torch.stack(
            [low.repeat(grid), low.repeat_interleave(grid), high.repeat(grid), high.repeat_interleave(grid)], -1
        )
        cells = own.expand(attention.shape[0], -1, -1)  # (B, G, 4)
    cells = cells.float()
    across = _coverage(cells[..., 0], cells[..., 2], attention.shape[3])  # (B, G, w)
    down = _coverage(cells[..., 1], cells[..., 3], attention.shape[2])  # (B, G, h)
    mass = torch.einsum("bkhw,bgh,bgw->bkg", attention.float(), down, across)  # (B, K, G)
    share = mass.sum(dim=-1)  # (B, K)
    weights = mass / share[..., None].clamp_min(1e-12)
    return F.normalize(weights @ local.float(), dim=-1), share


def _coverage(low: torch.Tensor, high: torch.Tensor, cells: int) -> torch.Tensor:
    """Which share of each of ``cells`` equal intervals of [0, 1] lies inside [low, high]: (..., cells)."""
    edges = torch.arange(cells + 1, device=low.device, dtype=low.dtype) / cells
    inside = torch.minimum(high[..., None], edges[1:]) - torch.maximum(low[..., None], edges[:-1])
    return inside.clamp_min(0) * cells


def relational_kl(
    query: torch.Tensor,
    target: torch.Tensor,
    all_target: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_temperature: float,
) -> torch.Tensor:
    """``KL(softmax(g·gᵀ/τ_t) ‖ softmax(q·gᵀ/τ))`` averaged over the local rows.

    Args:
        query: (B, D) student queries; target: (B, D) their teacher embeddings; all_target: (N, D) the
        columns (the global batch); logit_scale: 1/τ.
    """
    teacher_log_p = F.log_softmax(target @ all_target.T / teacher_temperature, dim=-1)  # (B, N)
    student_log_q = F.log_softmax(logit_scale * query @ all_target.T, dim=-1)
    return F.kl_div(student_log_q, teacher_log_p, log_target=True, reduction="batchmean")


def word_manifold(sentence: torch.Tensor, vocabulary: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``mean_m(1 − max_v cos(s_m, E_v))``: how far each pseudo-word is from the nearest real word.

    Args:
        sentence: (B, M, w); vocabulary: (V, w) the teacher's token embeddings.
    """
    words = F.normalize(sentence.reshape(-1, sentence.shape[-1]).float(), dim=-1)  # (B*M, w)
    best = None
    for start in range(0, vocabulary.shape[0], chunk):
        table = F.normalize(vocabulary[start : start + chunk].float(), dim=-1)
        cos = (words @ table.T).amax(dim=-1)  # (B*M,)
        best = cos if best is None else torch.maximum(best, cos)
    return (1 - best).mean()
