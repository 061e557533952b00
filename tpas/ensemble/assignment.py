"""One-to-one assignment: the top-1 conflict problem solved globally.

A maximum-weight matching between queries and gallery images, restricted to each query's top-`k` candidates
(scipy's sparse bipartite matching). Every query also gets a private "unmatched" option of weight 0 and every real
edge a positive weight (score - lowest candidate score + 1), so the matching prefers giving as many queries as
possible a distinct image, then the highest total score. Each matched image is moved to the front of its query's
ranking; the rest of the ranking keeps its order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from ..errors import TpasInputError
from ..sims import SimsMatrix
from .reorder import move_to_front, scores_of, top1_collisions, top_candidates, with_post_step

DEFAULTS: dict[str, Any] = {"k": 10}


def validate(params: dict[str, Any] | None, key: str, base_dir: Any = None) -> dict[str, Any]:
    """Defaults filled in and values checked (TpasInputError naming `key.<param>`)."""
    p = dict(DEFAULTS)
    for k, v in (params or {}).items():
        if k not in DEFAULTS:
            raise TpasInputError(f"{key}.{k}: unknown assignment parameter; known: {sorted(DEFAULTS)}")
        p[k] = v
    if isinstance(p["k"], bool) or not isinstance(p["k"], int) or p["k"] < 1:
        raise TpasInputError(f"{key}.k: expected an integer >= 1, got {p['k']!r}")
    return p


def match_queries(cand: torch.Tensor, cand_scores: torch.Tensor) -> np.ndarray:
    """For each query, the candidate slot of its matched image, or -1 when it stays unmatched.

    Args:
        cand: [Q, k] gallery columns of each query's candidates.
        cand_scores: [Q, k] their scores.
    """
    q, k = cand.shape
    cols, inverse = np.unique(cand.numpy().ravel(), return_inverse=True)
    n_img = len(cols)
    s = cand_scores.double().numpy().ravel()
    weight = s - s.min() + 1.0  # > 0: a real match always beats staying unmatched
    big = weight.max() + 1.0
    rows = np.repeat(np.arange(q), k)
    # Columns: the images, then one private dummy column per query (cost `big`, i.e. weight 0).
    r = np.concatenate([rows, np.arange(q)])
    c = np.concatenate([inverse.ravel(), n_img + np.arange(q)])
    cost = np.concatenate([big - weight, np.full(q, big)])  # all > 0: csgraph treats explicit zeros as no edge
    graph = sp.csr_matrix((cost, (r, c)), shape=(q, n_img + q))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    slot = np.full(q, -1, dtype=np.int64)
    inv = inverse.reshape(q, k)
    for i, col in zip(row_ind.tolist(), col_ind.tolist(), strict=True):
        if col < n_img:
            slot[i] = int(np.flatnonzero(inv[i] == col)[0])
    return slot


def assign(sims: SimsMatrix, params: dict[str, Any] | None = None, inplace: bool = False):
    """Apply the one-to-one assignment; returns the new matrix and a report (collisions before/after, rows changed)."""
    p = validate(params, "assignment")
    scores = scores_of(sims, inplace)
    q, g = scores.shape
    k = min(int(p["k"]), g)
    cand = top_candidates(scores, k)
    cs = scores.gather(1, cand)
    slot = torch.from_numpy(match_queries(cand, cs))
    before = top1_collisions(cand[:, 0], g)
    unmatched = int((slot < 0).sum())
    pos = slot.clamp_min(0)
    first = cand[torch.arange(q), pos]
    changed = move_to_front(scores, cand, pos)
    report = {
        "step": "assignment",
        "params": p,
        "collisions_before": before,
        "collisions_after": top1_collisions(first, g),
        "rows_changed": changed,
        "unmatched_queries": unmatched,
        "transductive": True,
    }
    return with_post_step(sims, scores, report), report
