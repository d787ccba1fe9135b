"""Rows mixed across batches on their own device (isa/shuffle.py)."""

from __future__ import annotations

import torch

from isa.shuffle import mixed_batches


def _batches(count: int, size: int) -> list[dict[str, torch.Tensor]]:
    """Row i holds id i and, in a second column, the image-like rows (3, 2, 2) filled with i."""
    ids = torch.arange(count * size)
    return [
        {
            "id": ids[start : start + size].clone(),
            "view": ids[start : start + size, None, None, None].expand(-1, 3, 2, 2) * 1,
        }
        for start in range(0, count * size, size)
    ]


def test_every_row_comes_out_once_in_whole_batches_with_its_columns():
    batches = _batches(count=12, size=8)
    before = [{k: v.clone() for k, v in b.items()} for b in batches]
    out = list(mixed_batches(iter(batches), pool_batches=4, generator=torch.Generator().manual_seed(0)))
    assert len(out) == 12 and all(b["id"].shape == (8,) and b["view"].shape == (8, 3, 2, 2) for b in out)
    assert torch.equal(torch.cat([b["id"] for b in out]).sort().values, torch.arange(96))
    for b in out:  # the columns of a row travel together
        assert torch.equal(b["view"], b["id"][:, None, None, None].expand(-1, 3, 2, 2))
    for b, original in zip(batches, before):  # the incoming batches are never written into
        assert all(torch.equal(b[k], original[k]) for k in b)


def test_batches_draw_their_rows_from_across_the_pool():
    out = list(
        mixed_batches(iter(_batches(count=12, size=8)), pool_batches=4, generator=torch.Generator().manual_seed(1))
    )
    sources = [set((b["id"] // 8).tolist()) for b in out]  # which incoming batches each batch's rows came from
    assert all(len(s) >= 2 for s in sources)
    assert all(max(s) <= k + 3 for k, s in enumerate(sources))  # batch k is drawn before batch k + 4 arrives
    other = list(mixed_batches(iter(_batches(count=12, size=8)), 4, generator=torch.Generator().manual_seed(2)))
    assert any(not torch.equal(a["id"], b["id"]) for a, b in zip(out, other))  # another draw, other batches


def test_a_stream_shorter_than_the_pool_and_a_pool_of_one():
    out = list(
        mixed_batches(iter(_batches(count=2, size=8)), pool_batches=4, generator=torch.Generator().manual_seed(0))
    )
    assert len(out) == 2 and torch.equal(torch.cat([b["id"] for b in out]).sort().values, torch.arange(16))
    assert not torch.equal(torch.cat([b["id"] for b in out]), torch.arange(16))
    same = list(mixed_batches(iter(_batches(count=3, size=4)), pool_batches=1))
    assert torch.equal(torch.cat([b["id"] for b in same]), torch.arange(12))
    assert list(mixed_batches(iter([]), pool_batches=4)) == []
