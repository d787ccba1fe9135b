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


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows of ``a`` (N, D) and ``b`` (N, D), both L2-normalized."""
    logits = logit_scale * a @ b.T  # (N, N)
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


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


def attended_local_features(attention: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """What each token sees: ``u = normalize(Â · P)`` (docs/method.md §4, LAR).

    Args:
        attention: (B, K, h, w) attention maps of K tokens over the student's feature grid.
        local: (B, G, D) teacher local features on a ``g x g`` grid, ``G = g*g``, row-major.

    Returns:
        (B, K, D) L2-normalized.
    """
    grid = math.isqrt(local.shape[1])
    if grid * grid != local.shape[1]:
        raise ValueError(f"teacher_local has {local.shape[1]} cells, not a square grid")
    resized = F.adaptive_avg_pool2d(attention.float(), grid).flatten(2)  # (B, K, G): area resize
    resized = resized / resized.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return F.normalize(resized @ local.float(), dim=-1)


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
