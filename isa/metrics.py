"""Official composed-image-retrieval metrics (docs/method.md §5) as pure functions over ranked lists of ids.

A ranking is a sequence of gallery ids (any hashable: image names or integer indices), best first;
``rankings[i]`` belongs to query ``i``. Tensors and arrays are accepted too (read through ``tolist()``).
Every metric is returned in percent (0..100) except :func:`average_precision_at_k`, a fraction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Hashable, Mapping, Sequence
from statistics import fmean
from typing import Any

CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)
CIRCO_ASPECT_K = 10  # per semantic aspect, mAP@10 as the CIRCO paper reports
FASHIONIQ_KS = (10, 50)


def recall_at_k(
    rankings: Sequence[Sequence[Hashable]], targets: Sequence[Hashable], ks: Sequence[int]
) -> dict[str, float]:
    """Share of queries whose target lies within the first k entries of their ranking.

    Args:
        rankings: one ranked list of ids per query, best first.
        targets: the one correct id per query.
        ks: cut-offs, each at least 1.

    Returns:
        ``{"R@{k}": percent}`` for each k.

    Raises:
        ValueError: on mismatched lengths, no queries or k < 1.
    """
    _check_ks(ks)
    rankings, targets = _rows(rankings), _as_list(targets)
    _check_lengths(rankings=rankings, targets=targets)
    positions = [_position(ranking, target) for ranking, target in zip(rankings, targets)]  # None: not ranked
    return {f"R@{k}": _percent(sum(p is not None and p < k for p in positions), len(positions)) for k in ks}


def cirr_recall(
    rankings: Sequence[Sequence[Hashable]],
    targets: Sequence[Hashable],
    references: Sequence[Hashable],
    ks: Sequence[int] = CIRR_KS,
) -> dict[str, float]:
    """CIRR Recall@K: each query's reference image is removed from its ranking before counting.

    Args:
        rankings: one ranked list of ids per query over the whole split gallery, best first; the
            reference may appear anywhere in it (or not at all).
        targets: the target id per query.
        references: the reference id per query.
        ks: cut-offs.

    Returns:
        ``{"R@{k}": percent}``.
    """
    rankings, references = _rows(rankings), _as_list(references)
    _check_lengths(rankings=rankings, references=references)
    kept = [
        [image_id for image_id in ranking if image_id != reference] for ranking, reference in zip(rankings, references)
    ]
    return recall_at_k(kept, targets, ks)


def cirr_recall_subset(
    rankings: Sequence[Sequence[Hashable]],
    targets: Sequence[Hashable],
    references: Sequence[Hashable],
    members: Sequence[Sequence[Hashable]],
    ks: Sequence[int] = CIRR_SUBSET_KS,
) -> dict[str, float]:
    """CIRR Recall_subset@K: the ranking restricted to the query's ``img_set`` members minus the reference.

    Args:
        rankings: one ranked list per query that covers every member of its set (the ranking over the
            whole gallery, or over the members alone), best first.
        targets: the target id per query.
        references: the reference id per query.
        members: the ids of each query's ``img_set``.
        ks: cut-offs.

    Returns:
        ``{"Rs@{k}": percent}``.

    Raises:
        ValueError: naming the query when a member other than the reference is missing from its ranking.
    """
    rankings, references, members = _rows(rankings), _as_list(references), _rows(members)
    _check_lengths(rankings=rankings, references=references, members=members)
    subsets = [_subset(i, *row) for i, row in enumerate(zip(rankings, references, members))]
    return {key.replace("R@", "Rs@"): value for key, value in recall_at_k(subsets, targets, ks).items()}


def cirr_metrics(
    rankings: Sequence[Sequence[Hashable]],
    targets: Sequence[Hashable],
    references: Sequence[Hashable],
    members: Sequence[Sequence[Hashable]],
) -> dict[str, float]:
    """Every CIRR number: R@1,5,10,50, Rs@1,2,3 and ``"(R@5+Rs@1)/2"``, all in percent."""
    result = cirr_recall(rankings, targets, references, CIRR_KS)
    result.update(cirr_recall_subset(rankings, targets, references, members, CIRR_SUBSET_KS))
    result["(R@5+Rs@1)/2"] = (result["R@5"] + result["Rs@1"]) / 2
    return result


def average_precision_at_k(ranking: Sequence[Hashable], ground_truths: Collection[Hashable], k: int) -> float:
    """CIRCO's AP@K = Σ_{i≤K} P@i·rel_i / min(#GT, K), counting every ground truth.

    Args:
        ranking: ranked ids, best first, each id at most once.
        ground_truths: every correct id.
        k: cut-off, at least 1.

    Returns:
        AP@K as a fraction in [0, 1].

    Raises:
        ValueError: on a duplicate id in the ranking, empty ground truths or k < 1.
    """
    _check_ks([k])
    ranking, relevant = _as_list(ranking), set(_as_list(ground_truths))
    duplicate = _first_duplicate(ranking)
    if duplicate is not None:
        raise ValueError(f"ranking holds id {duplicate[0]!r} more than once; CIRCO rankings must hold unique ids")
    if not relevant:
        raise ValueError("ground truths are empty")
    hits, total = 0, 0.0
    for position, image_id in enumerate(ranking[:k], start=1):
        if image_id in relevant:
            hits += 1
            total += hits / position  # P@position, counted where rel_position = 1
    return total / min(len(relevant), k)


def circo_map(
    rankings: Sequence[Sequence[Hashable]],
    ground_truths: Sequence[Collection[Hashable]],
    ks: Sequence[int] = CIRCO_KS,
) -> dict[str, float]:
    """CIRCO mAP@K: the mean over queries of :func:`average_precision_at_k`.

    Args:
        rankings: one ranked list of unique ids per query, best first.
        ground_truths: every correct id per query (``gt_img_ids``).
        ks: cut-offs.

    Returns:
        ``{"mAP@{k}": percent}``.

    Raises:
        ValueError: naming the query index and the id when a ranking holds a duplicate; on mismatched
            lengths, empty ground truths or k < 1.
    """
    _check_ks(ks)
    return {f"mAP@{k}": 100 * fmean(_average_precisions(rankings, ground_truths, k)) for k in ks}


def circo_metrics(
    rankings: Sequence[Sequence[Hashable]],
    targets: Sequence[Hashable],
    ground_truths: Sequence[Collection[Hashable]],
    aspects: Sequence[Sequence[str]],
) -> dict[str, float]:
    """Every CIRCO number, in percent.

    Args:
        rankings: one ranked list of unique ids per query, best first (the reference stays in the gallery).
        targets: ``target_img_id`` per query, the only id Recall@K looks at.
        ground_truths: ``gt_img_ids`` per query, every id mAP@K counts.
        aspects: ``semantic_aspects`` per query; a query with several aspects counts in each.

    Returns:
        ``mAP@{5,10,25,50}``, ``R@{5,10,25,50}`` and ``mAP@10/{aspect}`` for each aspect some query has.
    """
    rankings, aspects = _rows(rankings), _as_list(aspects)
    _check_lengths(rankings=rankings, targets=targets, ground_truths=ground_truths, aspects=aspects)
    result = circo_map(rankings, ground_truths, CIRCO_KS)
    result.update(recall_at_k(rankings, targets, CIRCO_KS))
    precisions = _average_precisions(rankings, ground_truths, CIRCO_ASPECT_K)  # (Q,)
    for aspect, queries in sorted(_queries_by_aspect(aspects).items()):
        result[f"mAP@{CIRCO_ASPECT_K}/{aspect}"] = 100 * fmean(precisions[i] for i in queries)
    return result


def fashioniq_metrics(
    per_category: Mapping[str, tuple[Sequence[Sequence[Hashable]], Sequence[Hashable]]],
    ks: Sequence[int] = FASHIONIQ_KS,
) -> dict[str, float]:
    """FashionIQ Recall@K per category (the reference stays in the gallery) and their unweighted mean.

    Args:
        per_category: ``{category: (rankings, targets)}``, each ranking over that category's gallery.
        ks: cut-offs.

    Returns:
        ``"{category}/R@{k}"`` for each category and ``"mean/R@{k}"``, the mean over categories (not queries).

    Raises:
        ValueError: on no categories, a category named ``mean``, or invalid rankings (naming the category).
    """
    _check_ks(ks)
    if not per_category:
        raise ValueError("per_category is empty")
    if "mean" in per_category:
        raise ValueError("a category may not be named 'mean': the key is taken by the mean over categories")
    result = {}
    for category, (rankings, targets) in per_category.items():
        try:
            recalls = recall_at_k(rankings, targets, ks)
        except ValueError as error:
            raise ValueError(f"category {category!r}: {error}") from error
        result.update({f"{category}/{key}": value for key, value in recalls.items()})
    for k in ks:
        result[f"mean/R@{k}"] = fmean(result[f"{category}/R@{k}"] for category in per_category)
    return result


def _average_precisions(
    rankings: Sequence[Sequence[Hashable]], ground_truths: Sequence[Collection[Hashable]], k: int
) -> list[float]:
    """AP@k per query, with errors that name the query."""
    rankings, ground_truths = _rows(rankings), [_as_list(truths) for truths in _as_list(ground_truths)]
    _check_lengths(rankings=rankings, ground_truths=ground_truths)
    for i, (ranking, truths) in enumerate(zip(rankings, ground_truths)):
        duplicate = _first_duplicate(ranking)
        if duplicate is not None:
            raise ValueError(f"query {i}: ranking holds id {duplicate[0]!r} more than once; CIRCO needs unique ids")
        if not truths:
            raise ValueError(f"query {i}: ground truths are empty")
    return [average_precision_at_k(ranking, truths, k) for ranking, truths in zip(rankings, ground_truths)]


def _queries_by_aspect(aspects: list[Sequence[str]]) -> dict[str, list[int]]:
    """``{aspect: [query index, ...]}``; a query listing an aspect twice counts once."""
    queries = defaultdict(list)
    for i, names in enumerate(aspects):
        if isinstance(names, str):
            raise ValueError(f"query {i}: aspects must be a list of names, got the string {names!r}")
        for name in dict.fromkeys(names):
            queries[name].append(i)
    return dict(queries)


def _subset(i: int, ranking: list[Hashable], reference: Hashable, members: list[Hashable]) -> list[Hashable]:
    """Query ``i``'s ranking restricted to its set members minus the reference, in ranking order."""
    wanted = set(members) - {reference}
    subset = list(dict.fromkeys(image_id for image_id in ranking if image_id in wanted))
    missing = wanted.difference(subset)
    if missing:
        raise ValueError(
            f"query {i}: {len(missing)} img_set member(s) missing from its ranking, e.g. {next(iter(missing))!r}; "
            "rank the whole gallery or the members"
        )
    return subset


def _position(ranking: list[Hashable], target: Hashable) -> int | None:
    """0-based position of the first occurrence of ``target``; None when it is not ranked."""
    for position, image_id in enumerate(ranking):
        if image_id == target:
            return position
    return None


def _first_duplicate(ranking: list[Hashable]) -> tuple[Hashable] | None:
    """``(id,)`` for the first id seen twice, None when every id is unique."""
    seen = set()
    for image_id in ranking:
        if image_id in seen:
            return (image_id,)
        seen.add(image_id)
    return None


def _as_list(values: Any) -> list:
    """A list from a sequence, a tensor or an array (``tolist()`` turns tensor elements into Python ids)."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _rows(rankings: Any) -> list[list[Hashable]]:
    return [_as_list(ranking) for ranking in _as_list(rankings)]


def _check_ks(ks: Sequence[int]) -> None:
    if len(ks) == 0:
        raise ValueError("ks is empty")
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")


def _check_lengths(**named: Sequence) -> None:
    lengths = {name: len(values) for name, values in named.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            "one entry per query expected, got lengths " + ", ".join(f"{n}={v}" for n, v in lengths.items())
        )
    if not next(iter(lengths.values())):
        raise ValueError("no queries")


def _percent(count: int, total: int) -> float:
    return 100.0 * count / total
