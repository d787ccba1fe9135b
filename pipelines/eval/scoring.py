"""Ranking and the official metrics of ``isa eval``, per benchmark (docs/method.md §5).

Rankings are lists of image names; the metric functions of :mod:`isa.metrics` take it from there. Gallery
rows come first, distractor rows (named ``distractor:<i>``, never a ground truth) after them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from isa.data.benchmarks import Benchmark, Query
from isa.metrics import circo_metrics, cirr_recall, cirr_recall_subset, fashioniq_metrics
from isa.retrieval import rank

TOP_K = 50  # the longest ranking any protocol reads (CIRR R@50, CIRCO mAP@50, the test-server files)


@dataclass
class Ranked:
    """One gallery's rankings for one method."""

    queries: tuple[Query, ...]
    top: list[list[str]]  # per query, the TOP_K best names (CIRR: reference removed)
    subset: list[list[str]] | None = None  # CIRR: img_set members minus the reference, best first


def rank_gallery(
    queries: tuple[Query, ...],
    query_emb: torch.Tensor,
    names: tuple[str, ...],
    gallery: torch.Tensor,
    remove_reference: bool,
) -> list[list[str]]:
    """Top names per query over ``gallery`` (N, D) whose first ``len(names)`` rows are the named images."""
    position = {name: i for i, name in enumerate(names)}
    exclude = None
    if remove_reference:
        exclude = torch.as_tensor([position.get(q.reference, -1) for q in queries], dtype=torch.long)
    order = rank(query_emb, gallery, TOP_K, exclude=exclude)  # (Q, K)
    all_names = list(names) + [f"distractor:{i}" for i in range(gallery.shape[0] - len(names))]
    return [[all_names[i] for i in row] for row in order.tolist()]


def rank_members(queries: tuple[Query, ...], query_emb: torch.Tensor, emb_of) -> list[list[str]]:
    """CIRR Recall_subset rankings: each query's ``img_set`` members minus its reference, best first."""
    out = []
    for row, query in enumerate(queries):
        members = [m for m in query.members if m != query.reference]
        scores = emb_of(members).float() @ query_emb[row].float()  # (n,)
        order = sorted(range(len(members)), key=lambda i: (-float(scores[i]), i))
        out.append([members[i] for i in order])
    return out


def metrics(benchmark: Benchmark, ranked: dict[str, Ranked]) -> dict[str, float]:
    """The benchmark's official metrics from each gallery's rankings (val splits only)."""
    if benchmark.name == "cirr":
        r = ranked["all"]
        targets = [q.target for q in r.queries]
        references = [q.reference for q in r.queries]
        members = [q.members for q in r.queries]
        out = cirr_recall(r.top, targets, references)
        out.update(cirr_recall_subset(r.subset, targets, references, members))
        out["(R@5+Rs@1)/2"] = (out["R@5"] + out["Rs@1"]) / 2
        return out
    if benchmark.name == "circo":
        r = ranked["all"]
        return circo_metrics(
            r.top,
            [q.target for q in r.queries],
            [q.ground_truths for q in r.queries],
            [q.aspects for q in r.queries],
        )
    return fashioniq_metrics({key: (r.top, [q.target for q in r.queries]) for key, r in ranked.items()})


def submissions(benchmark: Benchmark, ranked: dict[str, Ranked]) -> dict[str, dict]:
    """Test-server files by file name: CIRR ``recall`` / ``recall_subset`` (rc2), CIRCO top-50 ids."""
    if benchmark.name == "cirr":
        r = ranked["all"]
        recall = {str(q.query_id): top for q, top in zip(r.queries, r.top)}  # TOP_K each
        subset = {str(q.query_id): members[:3] for q, members in zip(r.queries, r.subset)}
        return {
            "recall_submission.json": {"version": "rc2", "metric": "recall", **recall},
            "recall_subset_submission.json": {"version": "rc2", "metric": "recall_subset", **subset},
        }
    if benchmark.name == "circo":
        r = ranked["all"]
        return {"circo_submission.json": {str(q.query_id): [int(n) for n in top] for q, top in zip(r.queries, r.top)}}
    return {}
