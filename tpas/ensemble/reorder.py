"""Shared by the post-processing steps: moving one candidate to the front of a ranking (SCA, assignment), and the
output matrix every post step (re-scoring too) returns.

A step changes a ranking, not a model's opinion, so it permutes the scores among each changed row's top-`depth`
cells: the new first cell takes the row's best score, the others keep their order and take the next scores down.
Cells beyond the depth are untouched, so the written ranking (stable descending order) is exactly the new order.
"""

from __future__ import annotations

import torch

from ..parallel import map_row_ranges
from ..ranking import topk_stable
from ..sims import SimsMatrix


def scores_of(m: SimsMatrix, inplace: bool = False) -> torch.Tensor:
    """Dense scores to work on: a top-K matrix is densified with its row minimum (always a new tensor); a dense
    matrix's own tensor is returned when `inplace` (the caller may modify or only read it), else a copy."""
    if not m.is_dense:
        return m.to_dense("row-min")
    return m.scores if inplace else m.scores.clone()


def ranked_scores(m: SimsMatrix, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores a reordering step permutes, without densifying a top-K matrix: (scores, None) for a dense matrix (as
    `scores_of`), or (values [Q, K], columns [Q, K]) for a top-K one, its kept cells put in gallery-column order so
    that slot order is gallery order for the tie rule (always new tensors)."""
    if m.is_dense:
        return scores_of(m, inplace), None
    cols, order = m.indices.long().sort(dim=1)
    return m.values.gather(1, order), cols


def with_post_step(
    sims: SimsMatrix, scores: torch.Tensor, report: dict, columns: torch.Tensor | None = None
) -> SimsMatrix:
    """The post-processed matrix: new scores, the step's report appended to `meta.post`, marked transductive.

    `columns` (from `ranked_scores`) makes the output top-K: `scores` are then the values of those columns.
    Every post step (SCA, assignment, re-scoring) uses the whole query set, so the output always says so.
    """
    meta = dict(sims.meta)
    meta["post"] = [*meta.get("post", []), report]
    meta["transductive"] = True
    form = {"scores": scores} if columns is None else {"indices": columns, "values": scores}
    return SimsMatrix(sims.query_ids, sims.gallery_ids, **form, source=sims.source or "fused", meta=meta)


def top1_collisions(first: torch.Tensor, n_cols: int) -> dict[str, int]:
    """How many gallery images are the top-1 of more than one query, and how many queries share one."""
    counts = torch.bincount(first, minlength=n_cols)
    shared = counts > 1
    return {"images": int(shared.sum()), "queries": int(counts[shared].sum())}


def move_to_front(scores: torch.Tensor, cand: torch.Tensor, pos: torch.Tensor) -> int:
    """In place: for each row r with pos[r] > 0, move candidate cand[r, pos[r]] to the front of cand[r].

    `cand` [Q, D] is each row's current top-D order (best first). Returns the number of rows changed.
    """
    rows = (pos > 0).nonzero().flatten()
    if len(rows) == 0:
        return 0
    c = cand[rows]
    p = pos[rows]
    d = c.shape[1]
    ar = torch.arange(d).expand(len(rows), d)
    # New order: the chosen slot, then every other slot in its old order.
    key = torch.where(ar == p[:, None], torch.full_like(ar, -1), ar)
    new_order = c.gather(1, key.argsort(dim=1))
    vals = scores[rows].gather(1, c)  # old top-D scores, descending
    vals = _strictly_decreasing(vals)
    sub = scores[rows]
    sub.scatter_(1, new_order, vals)
    scores[rows] = sub
    return len(rows)


def _strictly_decreasing(vals: torch.Tensor) -> torch.Tensor:
    # Equal scores would let the stable tie rule reorder the moved cells by gallery column; step such values down
    # by one ulp each so the new order is the written order.
    vals = vals.clone()
    for j in range(1, vals.shape[1]):
        tie = vals[:, j] >= vals[:, j - 1]
        if tie.any():
            vals[tie, j] = torch.nextafter(vals[tie, j - 1], torch.tensor(float("-inf"), dtype=vals.dtype))
    return vals


def top_candidates(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """Each row's top-`depth` columns under the stable tie rule, best first."""
    d = min(depth, scores.shape[1])
    return torch.cat(map_row_ranges(lambda lo, hi: topk_stable(scores[lo:hi], d), scores.shape[0]))
