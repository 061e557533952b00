"""One-to-one assignment: the global optimum on a case where greedy top-1 choices collide."""

from __future__ import annotations

import itertools

import pytest
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


def test_greedy_visits_queries_by_confidence_and_takes_the_best_free_image():
    # q1 is the more confident of the two that want g0 (a wide margin over its second choice), so it keeps g0 and q0
    # falls back to g1 although q0 scores g0 higher than q1 does.
    s = torch.tensor([[0.90, 0.88, 0.0], [0.80, 0.10, 0.0], [0.0, 0.1, 0.7]])
    m = SimsMatrix(ids("q", 3), ids("g", 3), scores=s)
    out, rep = assign(m, {"k": 3, "method": "greedy", "temperature": 0.05})
    assert topk_stable(out.scores, 1)[:, 0].tolist() == [1, 0, 2]
    assert rep["collisions_after"]["images"] == 0 and rep["params"]["method"] == "greedy"
    # A greedy pass by top-1 score instead would have let q0 keep g0.


def test_greedy_query_with_every_candidate_taken_keeps_its_ranking():
    s = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.0, 0.1]])
    out, rep = assign(SimsMatrix(ids("q", 2), ids("g", 3), scores=s), {"k": 1, "method": "greedy"})
    assert torch.equal(out.scores, s) and rep["unmatched_queries"] == 1


def test_flow_touches_only_collision_components():
    # q0, q1 collide on g0; q1's second choice g2 is q2's top-1, so q2 joins their component; q3 stands alone.
    s = torch.tensor(
        [
            [0.9, 0.5, 0.0, 0.0, 0.0],
            [0.8, 0.0, 0.7, 0.0, 0.0],
            [0.0, 0.0, 0.9, 0.6, 0.0],
            [0.0, 0.0, 0.0, 0.3, 0.9],
        ]
    )
    m = SimsMatrix(ids("q", 4), ids("g", 5), scores=s)
    out, rep = assign(m, {"k": 3, "method": "flow"})
    top1 = topk_stable(out.scores, 1)[:, 0].tolist()
    assert len(set(top1)) == 4 and torch.equal(out.scores[3], s[3])
    # Normalised costs (1 - minmax over each query's top-3): q0 {g0: 0, g1: 0.44}, q1 {g0: 0, g2: 0.125},
    # q2 {g2: 0, g3: 0.33}. Cheapest injective choice: q0 g0, q1 g2, q2 g3 (0.458) vs q0 g1, q1 g0, q2 g2 (0.444).
    assert top1 == [1, 0, 2, 4]
    assert rep["collisions_before"]["images"] == 1 and rep["collisions_after"]["images"] == 0


def test_flow_slack_keeps_a_ranking_when_every_arc_costs_more():
    s = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.1, 0.2]])  # both want g0; their second choices are near the bottom
    m = SimsMatrix(ids("q", 2), ids("g", 3), scores=s)
    _, rep = assign(m, {"k": 3, "method": "flow", "slack": 0.5})
    assert rep["unmatched_queries"] == 1 and rep["collisions_after"]["images"] == 1
    _, rep = assign(m, {"k": 3, "method": "flow", "slack": 1.0})
    assert rep["unmatched_queries"] == 0 and rep["collisions_after"]["images"] == 0


def test_assignment_parameters_are_checked():
    import pytest

    from tpas.errors import TpasInputError

    m = SimsMatrix(ids("q", 2), ids("g", 3), scores=torch.rand(2, 3))
    for bad, word in (({"method": "hungarian"}, "method"), ({"temperature": 0}, "temperature"),
                      ({"slack": "big"}, "slack")):  # fmt: skip
        with pytest.raises(TpasInputError, match=word):
            assign(m, bad)


def _popular(q: int = 30, g: int = 60) -> SimsMatrix:
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(q, g, generator=gen) * 0.5
    scores[:, :6] += torch.rand(q, 6, generator=gen) * 0.6  # images 0-5 are everybody's favourites: collisions
    return SimsMatrix(ids("q", q), ids("g", g), scores=scores)


@pytest.mark.parametrize("method", ["matching", "greedy", "flow"])
def test_assignment_on_a_topk_matrix_stays_topk_and_equals_the_dense_path(method):
    from tpas.submit import top_gallery_ids

    dense = _popular()
    top = dense.top_k(20)
    # Scramble the kept slots: candidates and ties must come from gallery columns, not storage order.
    perm = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(i)) for i in range(30)])
    top = SimsMatrix(top.query_ids, top.gallery_ids, indices=top.indices.gather(1, perm),
                     values=top.values.gather(1, perm))  # fmt: skip
    params = {"method": method, "k": 8}
    out_k, rep_k = assign(top, params)
    out_d, rep_d = assign(dense, params)
    assert out_k.k == 20 and rep_k["collisions_before"]["images"] > 0 and rep_k["rows_changed"] > 0
    assert rep_k == rep_d
    # The top-K answer holds the dense answer's first 20 of every row, with the same scores.
    assert top_gallery_ids(out_k, dense.query_ids, k=20) == top_gallery_ids(out_d, dense.query_ids, k=20)
    want = out_d.top_k(20)
    assert torch.equal(out_k.top_k(20).values, want.values)
