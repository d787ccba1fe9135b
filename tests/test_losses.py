"""Losses against straightforward reference computations, and the gathered global batch."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from _gloo import run_ranks  # tests/ is this file's folder, on the path

from isa.losses import GCDLoss, attended_local_features, relational_kl, symmetric_info_nce, word_manifold


def _reference_info_nce(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """Symmetric InfoNCE written out with loops in float64."""
    a, b = a.double(), b.double()
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(a[i] @ b[j]) for j in range(n)]
        col = [scale * float(a[j] @ b[i]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def test_gcd_single_process_matches_reference():
    torch.manual_seed(0)
    q, g = _unit(6, 8), _unit(6, 8)
    got = GCDLoss()(q, g, torch.tensor(1 / 0.07))
    assert abs(float(got) - _reference_info_nce(q, g, 1 / 0.07)) < 1e-5


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    return {"weight": torch.randn(5, 8), "x": torch.randn(8, 5), "g": _unit(8, 8), "scale": torch.tensor(12.0)}


def _single_process(data):
    weight = data["weight"].clone().requires_grad_(True)
    loss = GCDLoss()(F.normalize(data["x"] @ weight, dim=-1), data["g"], data["scale"])
    loss.backward()
    return loss.detach(), weight.grad


def test_gcd_simulated_two_workers_equals_single_process():
    data = _problem()
    expected_loss, expected_grad = _single_process(data)
    weight = data["weight"].clone().requires_grad_(True)
    xs, gs = data["x"].chunk(2), data["g"].chunk(2)
    queries = [F.normalize(x @ weight, dim=-1) for x in xs]  # each rank's local slice, with grad

    def gather(local: torch.Tensor) -> torch.Tensor:  # all_gather with autograd, simulated
        return torch.cat(queries) if any(local is q for q in queries) else torch.cat(gs)

    losses = [GCDLoss(rank, 2, gather)(queries[rank], gs[rank], data["scale"]) for rank in range(2)]
    torch.testing.assert_close(torch.stack(losses).mean(), expected_loss, rtol=0, atol=1e-6)
    grads = [torch.autograd.grad(loss, weight, retain_graph=True)[0] for loss in losses]
    torch.testing.assert_close(sum(grads) / 2, expected_grad, rtol=0, atol=1e-6)  # DDP's average


def test_gcd_two_real_processes_equal_single_process(tmp_path: Path):
    data = _problem(seed=3)
    torch.save(data, tmp_path / "inputs.pt")
    files = [str(tmp_path / "init"), "2", str(tmp_path / "inputs.pt")]
    run_ranks(
        Path(__file__).with_name("_gcd_worker.py"),
        lambda rank: [files[0], str(rank), *files[1:], str(tmp_path / f"out{rank}.pt")],
    )
    result = torch.load(tmp_path / "out0.pt", weights_only=True)
    expected_loss, expected_grad = _single_process(data)
    torch.testing.assert_close(result["loss"], expected_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(result["grad"], expected_grad, rtol=0, atol=1e-6)


def test_attended_local_features_matches_explicit_pooling():
    torch.manual_seed(1)
    attention = torch.softmax(torch.randn(2, 3, 16), dim=-1).view(2, 3, 4, 4)  # student grid 4x4
    local = _unit(2, 4, 6)  # teacher grid 2x2
    got, share = attended_local_features(attention, local)
    torch.testing.assert_close(share, torch.ones(2, 3))  # the view is the teacher frame: all attention lands
    for b in range(2):
        for m in range(3):
            cells = torch.stack(
                [attention[b, m, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean() for r in range(2) for c in range(2)]
            )
            cells = cells / cells.sum()
            expected = F.normalize(sum(cells[k] * local[b, k] for k in range(4)), dim=-1)
            torch.testing.assert_close(got[b, m], expected, rtol=0, atol=1e-6)


def test_symmetric_info_nce_matches_reference():
    torch.manual_seed(2)
    a, b = _unit(7, 5), _unit(7, 5)
    assert abs(float(symmetric_info_nce(a, b, 1 / 0.07)) - _reference_info_nce(a, b, 1 / 0.07)) < 1e-5


def test_relational_kl_matches_reference():
    torch.manual_seed(3)
    q, g = _unit(4, 6), _unit(4, 6)
    got = relational_kl(q, g, g, torch.tensor(10.0), teacher_temperature=0.1)
    expected = 0.0
    for i in range(4):
        p = torch.softmax(g[i].double() @ g.double().T / 0.1, dim=0)
        r = torch.softmax(10.0 * q[i].double() @ g.double().T, dim=0)
        expected += float((p * (p.log() - r.log())).sum())
    assert abs(float(got) - expected / 4) < 1e-5


def test_word_manifold_matches_brute_force():
    torch.manual_seed(4)
    sentence, vocabulary = torch.randn(2, 3, 5), torch.randn(50, 5)
    got = word_manifold(sentence, vocabulary, chunk=7)  # several chunks
    words = sentence.reshape(-1, 5)
    best = [max(float(F.cosine_similarity(w, v, dim=0)) for v in vocabulary) for w in words]
    assert abs(float(got) - sum(1 - b for b in best) / len(best)) < 1e-5
    assert float(word_manifold(vocabulary[:4].view(2, 2, 5), vocabulary)) < 1e-6  # real words: zero
