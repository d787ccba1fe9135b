"""``rank`` against a brute-force stable sort of the whole gallery; ``image_retrieval_recall`` on top of it."""

from __future__ import annotations

import pytest
import torch

from isa import retrieval
from isa.retrieval import image_retrieval_recall, rank, top_k


def brute_rank(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    """Every score, a stable sort of the negated scores (ties: lower index first), the excluded index dropped."""
    scores = queries.double() @ gallery.double().T  # (Q, N) exact for the small-integer data used below
    order = torch.sort(-scores, dim=1, stable=True).indices  # (Q, N)
    rows = []
    for i, row in enumerate(order.tolist()):
        if exclude is not None and int(exclude[i]) >= 0:
            row = [j for j in row if j != int(exclude[i])]
        rows.append(row)
    width = min(k, min(len(row) for row in rows))
    return torch.tensor([row[:width] for row in rows], dtype=torch.long)


def integer_data(seed: int, queries: int, gallery: int, dim: int, duplicates: int):
    """Small-integer embeddings (exact in fp16 and float32, so many exact ties) with duplicated gallery rows."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (queries, dim), generator=generator).float()
    g = torch.randint(-2, 3, (gallery, dim), generator=generator).float()
    source = torch.randint(0, gallery, (duplicates,), generator=generator)
    target = torch.randint(0, gallery, (duplicates,), generator=generator)
    g[target] = g[source]  # exact duplicate rows, in either order of index
    return q, g


@pytest.mark.parametrize(
    "seed,queries,gallery,dim,k,chunk",
    [(0, 40, 300, 4, 10, 7), (1, 33, 1000, 3, 50, 1024), (2, 17, 60, 2, 60, 5), (3, 25, 500, 8, 1, 4)],
)
@pytest.mark.parametrize("block", [retrieval.GALLERY_BLOCK, 7, 64])
def test_rank_matches_stable_sort_with_ties(monkeypatch, seed, queries, gallery, dim, k, chunk, block):
    monkeypatch.setattr(retrieval, "GALLERY_BLOCK", block)  # small blocks: many merges, blocks smaller than k
    q, g = integer_data(seed, queries, gallery, dim, duplicates=gallery // 3)
    got = rank(q, g, k, chunk=chunk)
    expected = brute_rank(q, g, k)
    assert got.dtype == torch.long and got.shape == (queries, min(k, gallery))
    assert torch.equal(got, expected)
    exclude = torch.randint(-1, gallery, (queries,), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(rank(q, g, k, exclude=exclude, chunk=chunk), brute_rank(q, g, k, exclude))


def test_rank_tie_at_the_boundary_keeps_lower_indices():
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])  # 1, 3, 5 tie
    q = torch.tensor([[1.0, 0.0]])
    assert rank(q, g, 1).tolist() == [[4]]
    assert rank(q, g, 2).tolist() == [[4, 1]]
    assert rank(q, g, 3).tolist() == [[4, 1, 3]]
    assert rank(q, g, 4).tolist() == [[4, 1, 3, 5]]
    assert rank(q.repeat(9, 1), g, 3, chunk=2).tolist() == [[4, 1, 3]] * 9


def test_rank_random_floats_with_injected_duplicates():
    generator = torch.Generator().manual_seed(4)
    q = torch.nn.functional.normalize(torch.randn(64, 32, generator=generator), dim=1)
    g = torch.nn.functional.normalize(torch.randn(2000, 32, generator=generator), dim=1)
    g[1500:1600] = g[100:200]  # exact duplicates of earlier rows
    g[10] = g[1999]
    got = rank(q, g, 20, chunk=16)
    expected = brute_rank(q, g, 20)
    # float32 and float64 scores can disagree only on near-ties; the ranked sets and positions should agree here.
    assert torch.equal(got, expected)
    # Each duplicated pair that appears together is ordered lower index first, adjacent.
    for row in got.tolist():
        for j in range(1500, 1600):
            if j in row and j - 1400 in row:
                assert row.index(j - 1400) + 1 == row.index(j)


def test_rank_spans_several_gallery_blocks():
    q, g = integer_data(5, 6, retrieval.GALLERY_BLOCK * 2 + 123, 3, duplicates=5000)
    assert torch.equal(rank(q, g, 30, chunk=4), brute_rank(q, g, 30))


def test_rank_exclude():
    q, g = integer_data(6, 30, 200, 4, duplicates=60)
    exclude = torch.randint(-1, 200, (30,), generator=torch.Generator().manual_seed(0))
    exclude[:3] = -1
    got = rank(q, g, 25, exclude=exclude, chunk=8)
    assert torch.equal(got, brute_rank(q, g, 25, exclude))
    assert not (got == exclude[:, None]).any()
    # Excluding each query's own best row removes it and shifts the rest up.
    best = rank(q, g, 1)[:, 0]
    shifted = rank(q, g, 10, exclude=best)
    assert torch.equal(shifted[:, :9], rank(q, g, 11)[:, 1:10])


def test_rank_k_larger_than_gallery():
    q, g = integer_data(7, 5, 12, 3, duplicates=4)
    got = rank(q, g, 100)
    assert got.shape == (5, 12)
    assert torch.equal(got, brute_rank(q, g, 100))
    assert all(sorted(row) == list(range(12)) for row in got.tolist())
    excluded = rank(q, g, 100, exclude=torch.tensor([0, -1, 5, 11, -1]))
    assert excluded.shape == (5, 11)
    assert torch.equal(excluded, brute_rank(q, g, 100, torch.tensor([0, -1, 5, 11, -1])))


def test_rank_float16_inputs():
    q, g = integer_data(8, 20, 400, 6, duplicates=100)
    got = rank(q.half(), g.half(), 15, exclude=torch.arange(20))
    assert torch.equal(got, brute_rank(q, g, 15, torch.arange(20)))
    assert torch.equal(rank(q.half(), g, 15), rank(q, g.bfloat16(), 15))


def test_rank_empty_and_invalid():
    q, g = integer_data(9, 3, 10, 2, duplicates=0)
    assert rank(q[:0], g, 5).shape == (0, 5)
    assert rank(q, g[:0], 5).shape == (3, 0)
    with pytest.raises(ValueError, match="k must be"):
        rank(q, g, 0)
    with pytest.raises(ValueError, match="share D"):
        rank(q, g[:, :1], 5)
    with pytest.raises(ValueError, match="exclude"):
        rank(q, g, 5, exclude=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="exclude"):
        rank(q, g, 5, exclude=torch.tensor([0, 1, 10]))


def test_top_k_still_returns_the_best_set():
    q, g = integer_data(10, 8, 50, 8, duplicates=0)
    scores = q @ g.T
    best = top_k(q, g, 5)
    assert best.shape == (8, 5)
    assert torch.equal(scores.gather(1, best), scores.topk(5, dim=1).values)


def test_image_retrieval_recall_matches_brute_force():
    generator = torch.Generator().manual_seed(11)
    gallery = torch.nn.functional.normalize(torch.randn(200, 16, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(gallery + 0.4 * torch.randn(200, 16, generator=generator), dim=1)
    got = image_retrieval_recall(queries, gallery, ks=(1, 5, 10))
    order = torch.sort(-(queries.double() @ gallery.double().T), dim=1, stable=True).indices
    for k in (1, 5, 10):
        hits = sum(i in order[i, :k].tolist() for i in range(200))
        assert got[f"R@{k}"] == pytest.approx(100 * hits / 200)
    assert 0 < got["R@1"] < got["R@10"]
