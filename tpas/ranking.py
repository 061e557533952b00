"""The one ordering rule of tpas: stable descending (equal scores keep gallery order).

Both the ranking file and the metrics use it, so what `tpas evaluate` reports is what the written file scores.
"""

from __future__ import annotations

import torch


def topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [Q, k] of each row's k best scores, best first; ties broken by lower column index.

    Uses `torch.topk` (no full sort). Rows whose k-th and (k+1)-th scores tie are the only ones where topk's choice
    among equal values could differ from the stable rule; those rows are redone exactly.
    """
    q, g = scores.shape
    k = min(k, g)
    if k == 0:
        return torch.empty(q, 0, dtype=torch.long)
    kk = min(k + 1, g)
    vals, idx = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
    # Reorder the kept cells by (score desc, column asc): sort by column, then a stable sort by score.
    col_order = idx[:, :k].sort(dim=1).values
    col_vals = scores.gather(1, col_order)
    out = col_order.gather(1, col_vals.sort(dim=1, descending=True, stable=True).indices)
    if kk > k:
        for r in (vals[:, k - 1] == vals[:, k]).nonzero().flatten().tolist():
            row = scores[r]
            cand = (row >= vals[r, k - 1]).nonzero().flatten()  # ascending column order
            order = row[cand].sort(descending=True, stable=True).indices[:k]
            out[r] = cand[order]
    return out
