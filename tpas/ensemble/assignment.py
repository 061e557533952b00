"""One-to-one assignment: each gallery image is the top-1 of at most one query. Three ways to decide who gets it:

- `matching` (default): a maximum-weight matching between queries and images over each query's top-`k` candidates
  (scipy's sparse bipartite matching). Every query also gets a private "unmatched" option of weight 0 and every real
  edge a positive weight (score - lowest candidate score + 1), so the matching gives as many queries as possible a
  distinct image, then the highest total score.
- `greedy`: the AICity'26 winner's injective assignment. Queries are visited from the most to the least confident
  (softmax over the query's top-`k` scores at temperature `temperature`, probability of its top-1); each takes its
  best candidate that no earlier query took. A query whose candidates are all taken keeps its ranking.
- `flow`: the protocol-aware pipeline's per-component min-cost flow. Only queries whose top-1 collides are touched;
  they and the queries sharing their top-2 images form components, and each component solves a min-cost assignment
  whose arcs are each query's top-2 images at cost 1 - (score min-max-normalised over the query's top-`k`) plus a
  private slack arc at cost `slack` (1.0: as costly as the query's worst candidate), which keeps its ranking.

Each chosen image is moved to the front of its query's ranking; the rest of the ranking keeps its order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from ..errors import TpasInputError
from ..sims import SimsMatrix
from .reorder import move_to_front, ranked_scores, top1_collisions, top_candidates, with_post_step

DEFAULTS: dict[str, Any] = {"k": 10, "method": "matching", "temperature": 0.05, "slack": 1.0}
METHODS = ("matching", "greedy", "flow")


def validate(params: dict[str, Any] | None, key: str, base_dir: Any = None) -> dict[str, Any]:
    """Defaults filled in and values checked (TpasInputError naming `key.<param>`)."""
    p = dict(DEFAULTS)
    for k, v in (params or {}).items():
        if k not in DEFAULTS:
            raise TpasInputError(f"{key}.{k}: unknown assignment parameter; known: {sorted(DEFAULTS)}")
        p[k] = v
    if isinstance(p["k"], bool) or not isinstance(p["k"], int) or p["k"] < 1:
        raise TpasInputError(f"{key}.k: expected an integer >= 1, got {p['k']!r}")
    if p["method"] not in METHODS:
        raise TpasInputError(f"{key}.method: expected one of {', '.join(METHODS)}, got {p['method']!r}")
    for name in ("temperature", "slack"):
        v = p[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise TpasInputError(f"{key}.{name}: expected a number > 0, got {v!r}")
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


def greedy_queries(cand: torch.Tensor, cand_scores: torch.Tensor, temperature: float) -> np.ndarray:
    """Greedy injective assignment: the candidate slot each query takes, or -1 (all its candidates already taken).

    Queries go from the highest to the lowest top-1 softmax probability (ties: query order).
    """
    conf = torch.softmax(cand_scores.double() / temperature, dim=1)[:, 0].numpy()
    order = np.argsort(-conf, kind="stable")
    taken: set[int] = set()
    slot = np.full(len(cand), -1, dtype=np.int64)
    cols = cand.numpy()
    for i in order.tolist():
        for j, col in enumerate(cols[i].tolist()):
            if col not in taken:
                taken.add(col)
                slot[i] = j
                break
    return slot


def flow_queries(cand: torch.Tensor, cand_scores: torch.Tensor, slack: float) -> np.ndarray:
    """Per collision component min-cost assignment over top-2 arcs plus a slack arc; -1 keeps a query's ranking.

    Queries outside every component keep slot 0 (their top-1 is theirs alone).
    """
    q = len(cand)
    slot = np.zeros(q, dtype=np.int64)
    top2 = cand[:, :2].numpy()
    first = top2[:, 0]
    shared = np.bincount(first, minlength=int(top2.max()) + 1) > 1
    s = cand_scores.double()
    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
    cost = (1.0 - (s - lo) / (hi - lo).clamp_min(1e-12))[:, :2].numpy()
    for rows in _components(top2, np.flatnonzero(shared[first])):
        sub = _solve_component(top2[rows], cost[rows], slack)
        slot[rows] = sub
    return slot


def _components(top2: np.ndarray, seeds: np.ndarray) -> list[np.ndarray]:
    """Groups of queries linked through shared top-2 images, grown from the colliding queries `seeds`."""
    by_image: dict[int, list[int]] = {}
    for i, cols in enumerate(top2.tolist()):
        for c in cols:
            by_image.setdefault(c, []).append(i)
    seen: set[int] = set()
    groups = []
    for start in seeds.tolist():
        if start in seen:
            continue
        stack, group = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            group.append(i)
            for c in top2[i].tolist():
                for j in by_image[c]:
                    if j not in seen:
                        seen.add(j)
                        stack.append(j)
        groups.append(np.array(sorted(group)))
    return groups


def _solve_component(top2: np.ndarray, cost: np.ndarray, slack: float) -> np.ndarray:
    """Min-cost assignment of one component: slot 0/1 of each query's top-2, or -1 for its slack arc."""
    n, k = top2.shape
    cols, inverse = np.unique(top2.ravel(), return_inverse=True)
    shift = 1.0  # csgraph treats explicit zeros as missing edges: keep every cost > 0
    r = np.concatenate([np.repeat(np.arange(n), k), np.arange(n)])
    c = np.concatenate([inverse, len(cols) + np.arange(n)])
    w = np.concatenate([cost.ravel() + shift, np.full(n, slack + shift)])
    graph = sp.csr_matrix((w, (r, c)), shape=(n, len(cols) + n))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    out = np.full(n, -1, dtype=np.int64)
    inv = inverse.reshape(n, k)
    for i, col in zip(row_ind.tolist(), col_ind.tolist(), strict=True):
        if col < len(cols):
            out[i] = int(np.flatnonzero(inv[i] == col)[0])
    return out


def assign(sims: SimsMatrix, params: dict[str, Any] | None = None, inplace: bool = False):
    """Apply the one-to-one assignment; returns the new matrix and a report (collisions before/after, rows changed).

    A top-K matrix stays top-K (memory O(Q * K)): its kept cells are the candidates, as on its row-min densified form
    whenever each row's top-`k` lies among its kept cells.
    """
    p = validate(params, "assignment")
    scores, columns = ranked_scores(sims, inplace)  # columns: gallery column of each slot of a top-K matrix
    q = scores.shape[0]
    g = len(sims.gallery_ids)
    k = min(int(p["k"]), scores.shape[1])
    slots = top_candidates(scores, k)
    cand = slots if columns is None else columns.gather(1, slots)  # gallery columns
    cs = scores.gather(1, slots)
    if p["method"] == "greedy":
        slot = torch.from_numpy(greedy_queries(cand, cs, float(p["temperature"])))
    elif p["method"] == "flow":
        slot = torch.from_numpy(flow_queries(cand, cs, float(p["slack"])))
    else:
        slot = torch.from_numpy(match_queries(cand, cs))
    before = top1_collisions(cand[:, 0], g)
    unmatched = int((slot < 0).sum())
    pos = slot.clamp_min(0)
    first = cand[torch.arange(q), pos]
    changed = move_to_front(scores, slots, pos)
    report = {
        "step": "assignment",
        "params": p,
        "collisions_before": before,
        "collisions_after": top1_collisions(first, g),
        "rows_changed": changed,
        "unmatched_queries": unmatched,
        "transductive": True,
    }
    return with_post_step(sims, scores, report, columns), report
