"""Retrieval metrics from ranks: one per-query kernel, aggregation separate.

Ranks come from `tpas.ranking` (computed once, under one tie rule). Definitions are the standard IR ones: for a query
whose relevant images sit at 1-based positions r_1 < ... < r_n,

- R@K (the person-search "Rank-K"): 1 if r_1 <= K else 0;
- AP = (1/n) * sum_i i / r_i  (with one relevant image, AP = 1 / r_1);
- INP = n / r_n (the inverse of the position that retrieves the hardest relevant image);
- AP@10, the leaderboard's top-10 mAP = (1/min(n, 10)) * sum_{i: r_i <= 10} i / r_i.

Aggregates are means over queries, in percent.
"""

from __future__ import annotations

import torch

METRICS = ("R@1", "R@5", "R@10", "mAP", "mINP")
"""The overall metrics of `tpas evaluate --json`, in this order."""

_PER_QUERY_OF = {"R@1": "R@1", "R@5": "R@5", "R@10": "R@10", "mAP": "AP", "mINP": "INP", "mAP@10": "AP@10"}


def _as_2d(ranks: torch.Tensor) -> torch.Tensor:
    ranks = torch.as_tensor(ranks)
    if ranks.ndim == 1:
        ranks = ranks.unsqueeze(1)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be [Q] or [Q, M], got shape {tuple(ranks.shape)}")
    if ranks.is_floating_point():
        raise ValueError("ranks must be integers (1-based positions, 0 = padding)")
    ranks = ranks.long()
    if ranks.numel() and int(ranks.min()) < 0:
        raise ValueError("ranks must be >= 1 (or 0 for padding)")
    if ranks.shape[0] and bool((ranks.max(dim=1).values == 0).any()):
        raise ValueError("every query needs at least one relevant image (a row of ranks is all padding)")
    return ranks


def per_query_metrics(ranks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query values from 1-based ranks.

    Args:
        ranks: [Q] (one relevant image per query) or [Q, M] (several; 0 marks padding), 1-based positions.

    Returns:
        {"rank": first relevant position (long), "R@1", "R@5", "R@10" (0/1 float64), "AP", "INP", "AP@10"
        (float64)}, each a [Q] tensor.
    """
    r = _as_2d(ranks)
    valid = r > 0
    # Sort positions ascending with padding last, so the i-th relevant image sits in column i-1.
    big = torch.iinfo(torch.long).max
    srt = torch.where(valid, r, big).sort(dim=1).values
    v = srt != big
    n = v.sum(1)
    pos = torch.where(v, srt, 1).double()
    i = torch.arange(1, r.shape[1] + 1, dtype=torch.float64).expand_as(pos)
    prec = torch.where(v, i / pos, 0.0)
    first = srt[:, 0]
    last = torch.where(v, srt, 0).max(dim=1).values
    in10 = v & (srt <= 10)
    out = {
        "rank": first,
        "R@1": (first <= 1).double(),
        "R@5": (first <= 5).double(),
        "R@10": (first <= 10).double(),
        "AP": prec.sum(1) / n,
        "INP": n.double() / last.double(),
        "AP@10": torch.where(in10, prec, 0.0).sum(1) / n.clamp(max=10),
    }
    return out


def aggregate(per_query: dict[str, torch.Tensor], names: tuple[str, ...] = METRICS) -> dict[str, float]:
    """Mean of the per-query values, in percent, for each requested metric name (R@1..R@10, mAP, mINP, mAP@10)."""
    out = {}
    for name in names:
        vals = per_query[_PER_QUERY_OF[name]]
        out[name] = float(vals.mean()) * 100.0 if len(vals) else float("nan")
    return out


def metrics_from_ranks(ranks: torch.Tensor) -> dict[str, float]:
    """R@1, R@5, R@10, mAP, mINP in percent from 1-based ranks ([Q], or [Q, M] with 0 padding)."""
    return aggregate(per_query_metrics(ranks))
