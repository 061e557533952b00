"""One-to-one assignment: the global optimum on a case where greedy top-1 choices collide."""

from __future__ import annotations

import itertools

import torch
from ens_helpers import ids

from tpas.ensemble.assignment import assign, match_queries
from tpas.ranking import topk_stable
from tpas.sims import SimsMatrix


def test_known_optimum_beats_greedy():
    # Greedy top-1: q0 -> g0, q1 -> g0 (collision). Best total: q0 -> g1 (0.8) + q1 -> g0 (0.85) = 1.65,
    # better than q0 -> g0 (0.9) + q1 -> g1 (0.3) = 1.2.
    s = torch.tensor([[0.9, 0.8, 0.0], [0.85, 0.3, 0.0], [0.0, 0.1, 0.7]])
    m = SimsMatrix(ids("q", 3), ids("g", 3), scores=s)
    out, rep = assign(m, {"k": 2})
    top = topk_stable(out.scores, 3)
    assert top[:, 0].tolist() == [1, 0, 2]
    assert top[0].tolist() == [1, 0, 2]  # the matched image first, the rest in its old order
    assert torch.equal(out.scores[1], s[1]) and torch.equal(out.scores[2], s[2])
    assert rep["collisions_before"]["images"] == 1 and rep["collisions_after"]["images"] == 0
    assert rep["rows_changed"] == 1 and out.meta["transductive"] is True


def test_matching_is_maximum_weight_against_brute_force():
    gen = torch.Generator().manual_seed(5)
    q, k = 5, 3
    cand = torch.stack([torch.randperm(6, generator=gen)[:k] for _ in range(q)])
    cs = torch.rand(q, k, generator=gen)
    slot = match_queries(cand, cs)
    chosen = [int(cand[i, s]) for i, s in enumerate(slot) if s >= 0]
    assert len(chosen) == len(set(chosen))
    got = sum(float(cs[i, s]) for i, s in enumerate(slot) if s >= 0)
    best = -1.0
    for choice in itertools.product(range(k), repeat=q):
        imgs = [int(cand[i, c]) for i, c in enumerate(choice)]
        if len(set(imgs)) == q:
            best = max(best, sum(float(cs[i, c]) for i, c in enumerate(choice)))
    assert best < 0 or abs(got - best) < 1e-9


def test_unmatchable_query_keeps_its_ranking():
    s = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.0, 0.1]])  # k=1: both can only have g0
    m = SimsMatrix(ids("q", 2), ids("g", 3), scores=s)
    out, rep = assign(m, {"k": 1})
    assert torch.equal(out.scores, s) and rep["unmatched_queries"] == 1
