"""The one ordering rule of tpas: stable descending (equal scores keep gallery order).

Both the ranking file and the metrics use it, so what `tpas evaluate` reports is what the written file scores.
"""

from __future__ import annotations

from enum import Enum

import torch

# Blocked top-k: columns are grouped in blocks of _BLOCK; one cheap max per block finds the few blocks that can hold
# a row's k best cells, and only those are ranked. Used when the gallery is large compared with k.
_BLOCK = 128
_EXTRA_BLOCKS = 6
_BLOCKED_MIN_COLS = 8192


def topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [Q, k] of each row's k best scores, best first; ties broken by lower column index.

    No full sort. Large galleries: each row's block maxima (blocks of 128 columns) pick the k + 6 blocks that can
    hold its k best cells; those candidates are ranked exactly, and a row is redone on all columns if a block left
    out could tie with its k-th cell. Otherwise `torch.topk`, redoing exactly the rows whose k-th and (k+1)-th
    scores tie (the only rows where topk's choice among equal values could differ from the stable rule).
    """
    q, g = scores.shape
    k = min(k, g)
    if k == 0:
        return torch.empty(q, 0, dtype=torch.long)
    kb = k + _EXTRA_BLOCKS
    if g >= _BLOCKED_MIN_COLS and (kb + 1) * _BLOCK * 4 <= g:
        return _topk_stable_blocked(scores, k, kb)
    return _topk_stable_direct(scores, k)


def _topk_stable_direct(scores: torch.Tensor, k: int) -> torch.Tensor:
    g = scores.shape[1]
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


def _topk_stable_blocked(scores: torch.Tensor, k: int, kb: int) -> torch.Tensor:
    q, g = scores.shape
    b = _BLOCK
    n_full = g // b
    g0 = n_full * b
    # Splitting the column dimension is a view (no copy); amax reads the matrix once.
    blocked = scores[:, :g0].unflatten(1, (n_full, b))
    top_max, top_blocks = torch.topk(blocked.amax(dim=2), kb + 1, dim=1, largest=True, sorted=True)
    # Candidates: the kb best full blocks in ascending block order, then the short tail block (always included), so
    # candidate position order is gallery column order and the stable rule on candidates is the rule on columns.
    blocks = top_blocks[:, :kb].sort(dim=1).values
    cand = blocked[torch.arange(q).unsqueeze(1), blocks].reshape(q, kb * b)  # copies whole 64-cell runs
    cols = (blocks.unsqueeze(2) * b + torch.arange(b)).reshape(q, kb * b)
    if g0 < g:
        cand = torch.cat([cand, scores[:, g0:]], dim=1)
        cols = torch.cat([cols, torch.arange(g0, g).expand(q, g - g0)], dim=1)
    pos = _topk_stable_direct(cand, k)
    out = cols.gather(1, pos)
    # A block left out may still hold a cell >= the k-th score (only through ties): redo those rows on all columns.
    kth = cand.gather(1, pos[:, k - 1 : k]).squeeze(1)
    rows = (top_max[:, kb] >= kth).nonzero().flatten()
    if len(rows):
        out[rows] = _topk_stable_direct(scores.index_select(0, rows), k)
    return out


class Ties(str, Enum):
    """How a relevant image that ties with others is ranked.

    - `stable` (the tpas rule, used by the ranking file): equal scores keep gallery order.
    - `optimistic`: a relevant image comes before every irrelevant image with the same score (best case).
    - `pessimistic`: it comes after every irrelevant image with the same score (worst case).
    """

    STABLE = "stable"
    OPTIMISTIC = "optimistic"
    PESSIMISTIC = "pessimistic"


# Rows per chunk are chosen so one chunk's comparison results stay around this many elements: small enough to stay in
# cache (the [rows, G] float work buffer is 4 bytes/cell), large enough that per-chunk Python overhead does not matter.
_CHUNK_CELLS = 1 << 19


def _rows_per_chunk(g: int, m: int = 1) -> int:
    return max(1, _CHUNK_CELLS // max(1, g * m))


def gt_ranks(
    scores: torch.Tensor,
    gt_cols: torch.Tensor,
    ties: Ties | str = Ties.STABLE,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-based rank of each query's one relevant column, without sorting.

    Args:
        scores: [Q, G] scores (higher is better).
        gt_cols: [Q] integer column of each row's relevant gallery image.
        ties: the tie rule (`Ties`); `stable` gives exactly the position in `topk_stable`'s order.
        rows: optional row indices into `scores` to rank (default: every row), see `relevant_ranks`.

    Returns:
        LongTensor [Q]. Work is done in row chunks, so no temporary is as large as the matrix.
    """
    gt_cols = torch.as_tensor(gt_cols)
    q = scores.shape[0] if rows is None else len(rows)
    if gt_cols.ndim != 1 or gt_cols.shape[0] != q:
        raise ValueError(f"gt_cols must have shape [{q}], got {tuple(gt_cols.shape)}")
    return relevant_ranks(scores, gt_cols.reshape(-1, 1), ties, rows)[:, 0]


def relevant_ranks(
    scores: torch.Tensor,
    rel_cols: torch.Tensor,
    ties: Ties | str = Ties.STABLE,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-based rank of every relevant column of every row (several relevant images per query), without sorting.

    Args:
        scores: [N, G] scores.
        rel_cols: [Q, M] integer columns of each row's relevant images, padded with -1 where a row has fewer than M.
        ties: the tie rule. Relevant images never share a position: among themselves they keep gallery order.
        rows: optional [Q] row indices into `scores` (default: all N rows, Q = N); only those rows are read, chunk by
            chunk, so scoring a subset never copies the matrix.

    Returns:
        LongTensor [Q, M]: the position of each relevant column in its row's ranking, 0 at padding.
    """
    ties = Ties(ties)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D, got shape {tuple(scores.shape)}")
    rel_cols = torch.as_tensor(rel_cols, dtype=torch.long)
    g = scores.shape[1]
    q = scores.shape[0] if rows is None else len(rows)
    if rel_cols.ndim != 2 or rel_cols.shape[0] != q:
        raise ValueError(f"rel_cols must have shape [{q}, M], got {tuple(rel_cols.shape)}")
    m = rel_cols.shape[1]
    if rel_cols.numel() and (int(rel_cols.max()) >= g or int(rel_cols.min()) < -1):
        raise ValueError(f"relevant columns must lie in [0, {g}) (or be -1 for padding)")
    out = torch.zeros(q, m, dtype=torch.long)
    if q == 0 or m == 0:
        return out
    valid = rel_cols >= 0
    step = min(q, _rows_per_chunk(g, m))
    # One work buffer reused by every chunk: a fresh multi-MB allocation per chunk costs page faults each time.
    work_dtype = (
        scores.dtype
        if scores.dtype in (torch.float32, torch.float64) or not scores.is_floating_point()
        else (torch.float32)
    )
    work = torch.empty(step, m, g, dtype=work_dtype)
    for r0 in range(0, q, step):
        r1 = min(q, r0 + step)
        chunk = scores[r0:r1] if rows is None else scores.index_select(0, rows[r0:r1])
        out[r0:r1] = _chunk_ranks(chunk, rel_cols[r0:r1], valid[r0:r1], ties, work[: r1 - r0])
    return out.masked_fill_(~valid, 0)


def _chunk_ranks(
    s: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor, ties: Ties, work: torch.Tensor
) -> torch.Tensor:
    # Counting through float arithmetic is several times faster on CPU than summing bool comparison masks:
    # d = sign(s - t) is +1 / 0 / -1, so sum(d) = #greater - #less and sum(|d|) = #greater + #less. Counts stay below
    # 2^24, so float32 sums are exact. Half types are widened first (exactly) so their sums do not lose integers.
    s = s.to(work.dtype)
    t = s.gather(1, cols.clamp(min=0))  # [b, m] score of each relevant column
    # d = s - t into the work buffer [b, m, G]; x - y == 0 exactly when x == y (IEEE, no flush-to-zero).
    d = torch.sub(s.unsqueeze(1), t.unsqueeze(2), out=work)
    d.sign_()
    diff = d.sum(2)
    d.abs_()  # zeros stay zeros: they mark the cells tied with the relevant one
    nonzero = d.sum(2)
    greater = ((diff + nonzero) / 2).round().long()
    equal = s.shape[1] - nonzero.round().long()  # includes the relevant cell itself
    # Relevant-vs-relevant counts ([b, m, m], tiny): which relevant columns rank before relevant j.
    ti, tj = t.unsqueeze(1), t.unsqueeze(2)  # ti[.., i] over the row, tj[.., j] down the column
    ci, cj = cols.unsqueeze(1), cols.unsqueeze(2)
    vi = valid.unsqueeze(1)
    rel_greater = ((ti > tj) & vi).sum(2)
    rel_equal = ((ti == tj) & vi).sum(2)  # includes j itself when j is valid
    rel_before = ((ti > tj) | ((ti == tj) & (ci < cj))) & vi
    rank = 1 + (greater - rel_greater) + rel_before.sum(2)  # irrelevant strictly better + relevant before
    if ties is Ties.PESSIMISTIC:
        return rank + (equal - rel_equal)
    if ties is Ties.OPTIMISTIC:
        return rank
    # Stable: irrelevant columns with the same score *and a lower column index* also come first. Only cells whose
    # score ties with an irrelevant column need this, so compute it for those rows alone.
    # Padding cells (-1, read as column 0) are masked out at the end: keep them out of the per-cell loop too.
    tied = (((equal - rel_equal) > 0) & valid).nonzero().tolist()
    if tied:
        # |d| is 0 exactly at the cells tied with relevant j, so the tied cells left of column j number
        # j - sum(|d|[:j]). One slice sum per tied cell: it only reads, and stays serial (no thread fan-out), which
        # measured 4x cheaper than a cumsum over the chunk even when every row ties (fp16 matrices).
        cl = cols.tolist()
        before = torch.tensor([cl[r][k] - float(d[r, k, : cl[r][k]].sum()) for r, k in tied])
        rr, kk = torch.tensor(tied).T
        rel_tied_before = ((ti == tj) & (ci < cj) & vi).sum(2)[rr, kk]
        rank[rr, kk] += before.round().long() - rel_tied_before
    return rank


def topk_relevant_ranks(
    indices: torch.Tensor,
    values: torch.Tensor,
    n_gallery: int,
    rel_cols: torch.Tensor,
    ties: Ties | str = Ties.STABLE,
) -> torch.Tensor:
    """Ranks of relevant columns in a top-K matrix (`indices`, `values` [Q, K]); same contract as `relevant_ranks`.

    Kept cells rank by score (ties by the rule, stable = gallery order). Cells that were not kept rank after every
    kept cell, all tied: under `stable` in gallery order, `optimistic` with the relevant ones first, `pessimistic`
    with them last. This is the order a ranking file written from the same top-K matrix follows.
    """
    ties = Ties(ties)
    rel_cols = torch.as_tensor(rel_cols, dtype=torch.long)
    k = indices.shape[1]
    # Put each row's kept cells in gallery-column order, so "slot order" is "column order" for the tie rule.
    cols_sorted, order = indices.long().sort(dim=1)
    vals = values.gather(1, order)
    valid = rel_cols >= 0
    if k:
        match = cols_sorted.unsqueeze(1) == rel_cols.unsqueeze(2)  # [Q, M, K]
        kept = match.any(2) & valid
        slot = torch.where(kept, match.to(torch.uint8).argmax(2), torch.full_like(rel_cols, -1))
        out = relevant_ranks(vals, slot, ties)
    else:
        kept, out = torch.zeros_like(valid), torch.zeros_like(rel_cols)
    missing = valid & ~kept
    if missing.any():
        j = rel_cols.unsqueeze(2)
        mi = missing.unsqueeze(1)  # other missing relevant columns, along the row
        if ties is Ties.STABLE:
            kept_before = (cols_sorted.unsqueeze(1) < j).sum(2)
            pos = k + 1 + rel_cols - kept_before
        elif ties is Ties.OPTIMISTIC:
            pos = k + 1 + ((rel_cols.unsqueeze(1) < j) & mi).sum(2)
        else:
            pos = n_gallery - ((rel_cols.unsqueeze(1) > j) & mi).sum(2)
        out = torch.where(missing, pos, out)
    return out.masked_fill_(~valid, 0)
