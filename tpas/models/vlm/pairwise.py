"""Pairwise re-ranking by pivot-promote (ActPair): the re-ranking logic, independent of any model.

For each query, its top-K candidates are walked in first-stage order with a pivot, the current best (initially the
first candidate). Each challenger is compared with the pivot twice, once as [pivot, challenger] and once swapped;
`compare` returns the model's margin for "the first image matches better" (logit("1") - logit("2")). The decision
margin is the mean of the two orders' margins with the challenger's sign: (m(challenger, pivot) - m(pivot,
challenger)) / 2, so a constant preference for a slot (position bias) cancels. The challenger becomes the pivot
when that margin exceeds `margin`.

All queries advance together, one challenger slot per round, so each round is one batch of 2 x Q comparisons
(K - 1 rounds, 2 x (K - 1) model calls per query).

Output order per query: the pivots from the last to the first (each promoted candidate beat the one before it), then
the candidates that never became pivot in first-stage order. The value of the candidate at 0-based position r is
K - r: higher is better, one apart, so min-max or z-score fusion treats every query's list alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Comparison = tuple[int, int, int]
"""(query row, first image column, second image column)."""
CompareFn = Callable[[Sequence[Comparison]], Sequence[float]]


@dataclass(frozen=True)
class PairwiseResult:
    """The decided order of each query's candidates, their values, and the work done."""

    order: torch.Tensor  # [Q, K] gallery columns, best first
    values: torch.Tensor  # [Q, K] K - position
    margins: torch.Tensor  # [Q, K] decision margin of each first-stage slot against its pivot (slot 0: 0)
    promotions: torch.Tensor  # [Q] how many times the pivot changed
    calls: int  # model comparisons made (both orders counted)


def pivot_promote(candidates: torch.Tensor, compare: CompareFn, margin: float = 0.0) -> PairwiseResult:
    """Run pivot-promote over `candidates` [Q, K] (gallery columns in first-stage order)."""
    q, k = candidates.shape
    pivot_slot = torch.zeros(q, dtype=torch.long)
    margins = torch.zeros(q, k, dtype=torch.float64)
    chain: list[list[int]] = [[0] for _ in range(q)]  # slots that were pivot, in promotion order
    calls = 0
    rows = torch.arange(q)
    for slot in range(1, k):
        pivots = candidates[rows, pivot_slot].tolist()
        challengers = candidates[:, slot].tolist()
        pairs = [(r, p, c) for r, p, c in zip(range(q), pivots, challengers, strict=True)]
        swapped = [(r, c, p) for r, p, c in pairs]
        out = list(compare([*pairs, *swapped]))
        if len(out) != 2 * q:
            raise ValueError(f"compare returned {len(out)} margins for {2 * q} comparisons")
        calls += 2 * q
        pivot_first = torch.tensor(out[:q], dtype=torch.float64)
        challenger_first = torch.tensor(out[q:], dtype=torch.float64)
        decided = (challenger_first - pivot_first) / 2
        margins[:, slot] = decided
        win = decided > margin
        pivot_slot = torch.where(win, torch.full_like(pivot_slot, slot), pivot_slot)
        for r in win.nonzero().flatten().tolist():
            chain[r].append(slot)
    order_slots = torch.empty(q, k, dtype=torch.long)
    for r in range(q):
        promoted = chain[r][::-1]
        seen = set(promoted)
        rest = [s for s in range(k) if s not in seen]
        order_slots[r] = torch.tensor(promoted + rest)
    order = candidates.gather(1, order_slots)
    values = (k - torch.arange(k, dtype=torch.float32)).expand(q, k).clone()
    promotions = torch.tensor([len(c) - 1 for c in chain])
    return PairwiseResult(order, values, margins.float(), promotions, calls)
