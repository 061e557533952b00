"""Pivot-promote pairwise re-ranking: the procedure against scripted comparators (no model)."""

from __future__ import annotations

import torch

from tpas.models.vlm.pairwise import pivot_promote


def scripted(quality: dict[int, float], bias: float = 0.0, log: list | None = None):
    """A comparator whose margin for 'first image better' is quality difference + a constant slot-1 bias."""

    def compare(pairs):
        if log is not None:
            log.extend(pairs)
        return [quality[a] - quality[b] + bias for _, a, b in pairs]

    return compare


def test_visits_k_minus_one_challengers_per_query_in_both_orders() -> None:
    cand = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    log: list = []
    res = pivot_promote(cand, scripted({c: 0.0 for c in range(10, 24)}, log=log))
    assert res.calls == 2 * 3 * 2 == len(log)
    assert sorted((r, a, b) for r, a, b in log if r == 0) == sorted(
        [(0, 10, 11), (0, 11, 10), (0, 10, 12), (0, 12, 10), (0, 10, 13), (0, 13, 10)]
    )
    assert torch.equal(res.order, cand) and res.promotions.tolist() == [0, 0]  # ties never promote


def test_promotion_follows_the_margins() -> None:
    # Qualities: 11 beats 10, 12 loses to 11, 13 beats 11 -> pivots 10, 11, 13.
    cand = torch.tensor([[10, 11, 12, 13]])
    res = pivot_promote(cand, scripted({10: 0.0, 11: 1.0, 12: 0.5, 13: 2.0}))
    assert res.order.tolist() == [[13, 11, 10, 12]]
    assert res.values.tolist() == [[4.0, 3.0, 2.0, 1.0]]
    assert res.margins.tolist() == [[0.0, 1.0, -0.5, 1.0]]
    assert res.promotions.tolist() == [2]


def test_margin_threshold_keeps_the_pivot_on_small_wins() -> None:
    cand = torch.tensor([[10, 11, 12]])
    res = pivot_promote(cand, scripted({10: 0.0, 11: 0.2, 12: 1.0}), margin=0.5)
    assert res.order.tolist() == [[12, 10, 11]]


def test_swapping_cancels_a_position_bias() -> None:
    # A model that prefers whatever is shown first by +5 would never promote if asked once; both orders cancel it.
    quality = {10: 0.0, 11: 1.0, 12: -1.0}
    cand = torch.tensor([[10, 11, 12]])
    unbiased = pivot_promote(cand, scripted(quality))
    for bias in (5.0, -5.0):
        biased = pivot_promote(cand, scripted(quality, bias=bias))
        assert torch.equal(biased.order, unbiased.order)
        assert torch.allclose(biased.margins, unbiased.margins)
