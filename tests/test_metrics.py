"""CIR metrics against brute-force references written here in another style (numpy, explicit loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isa.metrics import (
    average_precision_at_k,
    circo_map,
    circo_metrics,
    cirr_metrics,
    cirr_recall,
    cirr_recall_subset,
    fashioniq_metrics,
    recall_at_k,
)
from isa.retrieval import rank

ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "viewpoint")


# ---------------------------------------------------------------- brute-force references


def brute_recall(rankings: list[list], targets: list, k: int) -> float:
    hits = 0
    for ranking, target in zip(rankings, targets):
        j = 0
        while j < k and j < len(ranking):
            if ranking[j] == target:
                hits += 1
                break
            j += 1
    return 100.0 * hits / len(targets)


def brute_cirr_recall(rankings: list[list], targets: list, references: list, k: int) -> float:
    hits = 0
    for ranking, target, reference in zip(rankings, targets, references):
        ids = np.array(ranking, dtype=object)
        ids = ids[ids != reference]
        hits += bool(np.any(ids[:k] == target))
    return 100.0 * hits / len(targets)


def brute_subset_recall(rankings: list[list], targets: list, references: list, members: list[list], k: int) -> float:
    hits = 0
    for ranking, target, reference, group in zip(rankings, targets, references, members):
        others = [m for m in group if m != reference]
        order = np.argsort([ranking.index(m) for m in others], kind="stable")  # position of each member
        hits += target in [others[j] for j in order[:k]]
    return 100.0 * hits / len(targets)


def brute_ap(ranking: list, truths: list, k: int) -> float:
    rel = np.isin(np.array(ranking[:k], dtype=object), np.array(list(truths), dtype=object)).astype(float)
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / min(len(set(truths)), k))


# ---------------------------------------------------------------- random problems


def random_queries(seed: int, count: int, as_str: bool = False):
    """Rankings (unique ids, truncated), targets, references, img_set members and ground truths."""
    rng = np.random.default_rng(seed)
    name = (lambda i: f"img{i:05d}") if as_str else (lambda i: int(i))
    rankings, targets, references, members, truths, aspects = [], [], [], [], [], []
    for _ in range(count):
        gallery = int(rng.integers(12, 120))
        order = [name(i) for i in rng.permutation(gallery)]
        group = [name(i) for i in rng.choice(gallery, size=6, replace=False)]
        rankings.append(order[: int(rng.integers(6, gallery + 1))])  # may not cover the target
        references.append(group[0])
        targets.append(group[int(rng.integers(1, 6))])
        members.append(group)
        extra = [name(i) for i in rng.choice(gallery, size=int(rng.integers(0, 12)), replace=False)]
        truths.append(list(dict.fromkeys([targets[-1], *extra])))
        aspects.append([str(a) for a in rng.choice(ASPECTS, size=int(rng.integers(1, 4)), replace=False)])
    return rankings, targets, references, members, truths, aspects


def full_rankings(rankings: list[list], members: list[list]) -> list[list]:
    """Append the members a truncated ranking misses, so that it covers the img_set."""
    return [r + [m for m in group if m not in r] for r, group in zip(rankings, members)]


# ---------------------------------------------------------------- recall


@pytest.mark.parametrize("seed,as_str", [(0, False), (1, True), (2, False)])
def test_recall_at_k_matches_brute_force(seed, as_str):
    rankings, targets, *_ = random_queries(seed, 300, as_str)
    ks = (1, 2, 5, 10, 50, 200)
    got = recall_at_k(rankings, targets, ks)
    assert list(got) == [f"R@{k}" for k in ks]
    for k in ks:
        assert got[f"R@{k}"] == pytest.approx(brute_recall(rankings, targets, k))
    assert 0 < got["R@5"] < got["R@200"] <= 100


def test_recall_at_k_hand_example():
    rankings = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"], ["a", "b", "c"]]
    targets = ["a", "b", "z", "c"]
    assert recall_at_k(rankings, targets, (1, 2, 3)) == {"R@1": 25.0, "R@2": 25.0, "R@3": 75.0}


def test_recall_accepts_tensors():
    rankings = torch.tensor([[3, 1, 2], [0, 2, 1]])
    assert recall_at_k(rankings, torch.tensor([1, 0]), (1, 2)) == {"R@1": 50.0, "R@2": 100.0}


# ---------------------------------------------------------------- CIRR


@pytest.mark.parametrize("seed", [3, 4])
def test_cirr_recall_matches_brute_force(seed):
    rankings, targets, references, *_ = random_queries(seed, 300, as_str=True)
    got = cirr_recall(rankings, targets, references)
    assert list(got) == ["R@1", "R@5", "R@10", "R@50"]
    for k in (1, 5, 10, 50):
        assert got[f"R@{k}"] == pytest.approx(brute_cirr_recall(rankings, targets, references, k))


def test_cirr_reference_ranked_first_shifts_target_up():
    # Query 0: ref first, target 2nd -> after removal the target is 1st. Query 1: target 3rd behind the ref -> 2nd.
    rankings = [["ref0", "t0", "x", "y"], ["x", "ref1", "t1", "y"]]
    got = cirr_recall(rankings, ["t0", "t1"], ["ref0", "ref1"], ks=(1, 2))
    assert got == {"R@1": 50.0, "R@2": 100.0}
    assert recall_at_k(rankings, ["t0", "t1"], (1, 2)) == {"R@1": 0.0, "R@2": 50.0}  # without removal


def test_cirr_reference_absent_from_ranking():
    rankings = [["t0", "x", "y"], ["x", "t1", "y"]]
    got = cirr_recall(rankings, ["t0", "t1"], ["ref0", "ref1"], ks=(1, 2))
    assert got == recall_at_k(rankings, ["t0", "t1"], (1, 2)) == {"R@1": 50.0, "R@2": 100.0}


@pytest.mark.parametrize("seed,as_str", [(5, True), (6, False)])
def test_cirr_recall_subset_matches_brute_force(seed, as_str):
    rankings, targets, references, members, *_ = random_queries(seed, 300, as_str)
    rankings = full_rankings(rankings, members)
    got = cirr_recall_subset(rankings, targets, references, members)
    assert list(got) == ["Rs@1", "Rs@2", "Rs@3"]
    for k in (1, 2, 3):
        assert got[f"Rs@{k}"] == pytest.approx(brute_subset_recall(rankings, targets, references, members, k))
    # Ranking over the members alone gives the same numbers as ranking the whole gallery.
    only_members = [[i for i in r if i in set(m)] for r, m in zip(rankings, members)]
    assert cirr_recall_subset(only_members, targets, references, members) == got


def test_cirr_recall_subset_hand_example():
    members = [["r", "a", "b", "t", "c", "d"]]
    ranking = [["x", "r", "y", "a", "t", "z", "b", "c", "d"]]  # members minus ref in order: a, t, b, c, d
    assert cirr_recall_subset(ranking, ["t"], ["r"], members) == {"Rs@1": 0.0, "Rs@2": 100.0, "Rs@3": 100.0}


def test_cirr_recall_subset_missing_member_names_query():
    members = [["r", "a", "t"], ["r", "a", "t"]]
    rankings = [["a", "t", "r"], ["t", "x"]]  # query 1 misses member "a"
    with pytest.raises(ValueError, match=r"query 1\b.*'a'"):
        cirr_recall_subset(rankings, ["t", "t"], ["r", "r"], members)
    # The reference itself may be missing.
    assert cirr_recall_subset([["t", "a"]], ["t"], ["r"], [["r", "a", "t"]])["Rs@1"] == 100.0


def test_cirr_metrics_combines_and_averages():
    rankings, targets, references, members, *_ = random_queries(7, 200, as_str=True)
    rankings = full_rankings(rankings, members)
    got = cirr_metrics(rankings, targets, references, members)
    assert set(got) == {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "(R@5+Rs@1)/2"}
    r5 = brute_cirr_recall(rankings, targets, references, 5)
    rs1 = brute_subset_recall(rankings, targets, references, members, 1)
    assert got["(R@5+Rs@1)/2"] == pytest.approx((r5 + rs1) / 2)


def test_cirr_metrics_hand_example():
    members = [["r0", "t0", "a", "b"], ["r1", "t1", "a", "b"]]
    rankings = [["r0", "a", "t0", "b"], ["t1", "r1", "a", "b"]]  # after removing the ref: t0 2nd, t1 1st
    got = cirr_metrics(rankings, ["t0", "t1"], ["r0", "r1"], members)
    assert got["R@1"] == 50.0 and got["R@5"] == 100.0 and got["Rs@1"] == 50.0 and got["Rs@2"] == 100.0
    assert got["(R@5+Rs@1)/2"] == 75.0


# ---------------------------------------------------------------- CIRCO


@pytest.mark.parametrize("seed,as_str", [(8, False), (9, True)])
def test_average_precision_matches_brute_force(seed, as_str):
    rankings, _, _, _, truths, _ = random_queries(seed, 300, as_str)
    for ranking, truth in zip(rankings, truths):
        for k in (1, 5, 10, 25, 50):
            assert average_precision_at_k(ranking, truth, k) == pytest.approx(brute_ap(ranking, truth, k))


def test_average_precision_fewer_ground_truths_than_k():
    # Two ground truths at positions 1 and 3: (P@1 + P@3) / min(2, 5) = (1/1 + 2/3) / 2.
    assert average_precision_at_k(["g1", "x", "g2", "y", "z"], {"g1", "g2"}, 5) == pytest.approx((1 + 2 / 3) / 2)


def test_average_precision_more_ground_truths_than_k():
    # Five ground truths, K=3, hits at 1 and 3: (1/1 + 2/3) / min(5, 3).
    truths = ["g1", "g2", "g3", "g4", "g5"]
    assert average_precision_at_k(["g1", "x", "g2", "g3"], truths, 3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision_at_k(["g1", "g2", "g3"], truths, 3) == pytest.approx(1.0)


def test_average_precision_counts_every_ground_truth_not_only_the_target():
    assert average_precision_at_k(["x", "g2", "t"], ["t", "g2"], 3) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_average_precision_rejects_duplicates_and_empty_ground_truth():
    with pytest.raises(ValueError, match="'g1'"):
        average_precision_at_k(["g1", "x", "g1"], ["g1"], 5)
    with pytest.raises(ValueError, match="empty"):
        average_precision_at_k(["g1"], [], 5)
    with pytest.raises(ValueError, match="at least 1"):
        average_precision_at_k(["g1"], ["g1"], 0)


def test_circo_map_duplicate_names_query_and_id():
    rankings = [[1, 2, 3], [4, 5, 6], [7, 8, 7]]
    with pytest.raises(ValueError, match=r"query 2\b.*\b7\b"):
        circo_map(rankings, [[1], [4], [7]])


@pytest.mark.parametrize("seed", [10, 11])
def test_circo_map_matches_brute_force(seed):
    rankings, _, _, _, truths, _ = random_queries(seed, 300, as_str=True)
    got = circo_map(rankings, truths)
    assert list(got) == ["mAP@5", "mAP@10", "mAP@25", "mAP@50"]
    for k in (5, 10, 25, 50):
        expected = 100 * np.mean([brute_ap(r, t, k) for r, t in zip(rankings, truths)])
        assert got[f"mAP@{k}"] == pytest.approx(expected)


def test_circo_map_hand_example():
    rankings = [["g1", "x", "g2", "y", "z"], ["x", "y", "z", "w", "v"]]
    assert circo_map(rankings, [["g1", "g2"], ["g"]], ks=(5,)) == pytest.approx({"mAP@5": 100 * (5 / 6) / 2})


@pytest.mark.parametrize("seed", [12, 13])
def test_circo_metrics_matches_brute_force(seed):
    rankings, targets, _, _, truths, aspects = random_queries(seed, 400, as_str=True)
    got = circo_metrics(rankings, targets, truths, aspects)
    for k in (5, 10, 25, 50):
        assert got[f"R@{k}"] == pytest.approx(brute_recall(rankings, targets, k))
        assert got[f"mAP@{k}"] == pytest.approx(100 * np.mean([brute_ap(r, t, k) for r, t in zip(rankings, truths)]))
    for aspect in ASPECTS:
        picked = [i for i, names in enumerate(aspects) if aspect in names]
        expected = 100 * np.mean([brute_ap(rankings[i], truths[i], 10) for i in picked])
        assert got[f"mAP@10/{aspect}"] == pytest.approx(expected)
    assert len(got) == 8 + len(ASPECTS)


def test_circo_metrics_per_aspect_hand_example():
    rankings = [["t0", "x"], ["x", "t1"], ["x", "y"]]  # AP@10: 1, 1/2, 0
    aspects = [["addition", "negation"], ["negation"], ["addition"]]
    got = circo_metrics(rankings, ["t0", "t1", "t2"], [["t0"], ["t1"], ["t2"]], aspects)
    assert got["mAP@10/addition"] == pytest.approx(100 * (1 + 0) / 2)
    assert got["mAP@10/negation"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert got["mAP@10"] == pytest.approx(100 * 1.5 / 3)
    assert "mAP@10/viewpoint" not in got  # no query has it
    assert got["R@5"] == pytest.approx(200 / 3)


def test_circo_recall_uses_target_alone():
    # The second ground truth is ranked first but only the target counts for Recall@K.
    got = circo_metrics([["g", "a", "b", "c", "d", "t"]], ["t"], [["t", "g"]], [["cardinality"]])
    assert got["R@5"] == 0.0 and got["R@10"] == 100.0 and got["mAP@5"] == 50.0


# ---------------------------------------------------------------- FashionIQ


def test_fashioniq_mean_is_over_categories_not_queries():
    per_category = {
        "dress": ([["t"]] * 3, ["t"] * 3),  # 3 queries, R@10 = 100
        "shirt": ([["x"]] * 1, ["t"] * 1),  # 1 query,   R@10 = 0
    }
    got = fashioniq_metrics(per_category)
    assert got["dress/R@10"] == 100.0 and got["shirt/R@10"] == 0.0
    assert got["mean/R@10"] == 50.0  # over queries it would be 75
    assert set(got) == {"dress/R@10", "dress/R@50", "shirt/R@10", "shirt/R@50", "mean/R@10", "mean/R@50"}


def test_fashioniq_matches_brute_force_and_keeps_reference():
    per_category = {}
    for seed, category in enumerate(("dress", "shirt", "toptee")):
        rankings, targets, *_ = random_queries(20 + seed, 50 + 70 * seed, as_str=True)
        per_category[category] = (rankings, targets)
    got = fashioniq_metrics(per_category)
    for k in (10, 50):
        per = [brute_recall(*per_category[c], k) for c in per_category]
        for category, value in zip(per_category, per):
            assert got[f"{category}/R@{k}"] == pytest.approx(value)
        assert got[f"mean/R@{k}"] == pytest.approx(np.mean(per))
    # The reference stays: a query whose target equals its top-ranked id counts at rank 1.
    assert fashioniq_metrics({"dress": ([["r", "t"]], ["r"])}, ks=(1,))["dress/R@1"] == 100.0


def test_fashioniq_errors_name_the_category():
    with pytest.raises(ValueError, match="'shirt'.*rankings=2.*targets=1"):
        fashioniq_metrics({"dress": ([["a"]], ["a"]), "shirt": ([["a"], ["b"]], ["a"])})


# ---------------------------------------------------------------- validation


def test_mismatched_lengths_say_which():
    with pytest.raises(ValueError, match="rankings=2.*targets=3"):
        recall_at_k([["a"], ["b"]], ["a", "b", "c"], (1,))
    with pytest.raises(ValueError, match="references=1"):
        cirr_recall([["a"], ["b"]], ["a", "b"], ["r"])
    with pytest.raises(ValueError, match="members=1"):
        cirr_recall_subset([["a"], ["b"]], ["a", "b"], ["r", "r"], [["a"]])
    with pytest.raises(ValueError, match="ground_truths=1"):
        circo_map([["a"], ["b"]], [["a"]])
    with pytest.raises(ValueError, match="aspects=1"):
        circo_metrics([["a"], ["b"]], ["a", "b"], [["a"], ["b"]], [["negation"]])


@pytest.mark.parametrize("ks", [(0,), (5, -1), ()])
def test_invalid_ks_raise(ks):
    with pytest.raises(ValueError):
        recall_at_k([["a"]], ["a"], ks)
    with pytest.raises(ValueError):
        circo_map([["a"]], [["a"]], ks)


# ---------------------------------------------------------------- ties through rank


def test_ties_from_rank_are_deterministic_in_metrics():
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])  # rows 1 and 2 identical
    query = torch.tensor([[1.0, 0.0]])
    assert rank(query, gallery, 2).tolist() == [[1, 2]]  # lower index first
    assert rank(query, gallery, 1).tolist() == [[1]]  # at the k boundary the lower index is kept
    ids = [[f"img{i}" for i in row] for row in rank(query.repeat(50, 1), gallery, 1).tolist()]
    assert recall_at_k(ids, ["img1"] * 50, (1,)) == {"R@1": 100.0}
    assert recall_at_k(ids, ["img2"] * 50, (1,)) == {"R@1": 0.0}
