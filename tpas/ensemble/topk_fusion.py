"""Fusion with a top-K output: each query's K best fused cells, without the dense [Q, G] fused matrix.

The result is exactly `topk_stable` of the matrix `fuse_prepared` would return (same values, same tie rule), by one
of two paths:
- sparse (every input top-K; `wsum`/`iterative` in the linear form, or `rrf`): a fused row is a per-row constant b
  plus each input's term at its own kept cells, so it is known from the union of the inputs' columns alone. Every
  other cell equals b, so the row's best cells lie among the union and the lowest-numbered columns outside it (equal
  scores keep gallery order). Work and memory are O(Q * sum of the inputs' K).
- blocked (anything else: dense inputs, `exact: true`, non-affine normalisations): the dense kernel fuses a few rows
  at a time and only their top-K is kept. Memory is O(Q * K + rows * G); time is that of a dense fusion.

A top-K matrix ranks unkept cells after its kept ones in gallery order, which is also the dense order when every
unkept cell holds b: with `keep` at least the number of union cells above b (sum of the inputs' K for the sparse
path with row-min fills), the top-K output ranks every gallery image as the dense fused matrix does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from ..parallel import map_row_ranges
from ..ranking import topk_stable
from .fusion import FuseSpec, LinearFusion, Prepared, block_rows, fused_dtype, fusion_kernel

Terms = tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]  # (bias [Q, 1], [(columns, term) [Q, K]])


def fuse_topk(
    inputs: Sequence[Prepared], spec: FuseSpec, keep: int, progress: Callable[[int, int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns and fused scores [Q, keep] of each query's best fused cells, best first (stable ties)."""
    q, g = inputs[0].shape
    keep = min(int(keep), g)
    terms = sparse_terms(inputs, spec)
    if terms is not None:
        out = _sparse_topk(*terms, g, keep)
        if progress is not None:
            progress(q, q)
        return out
    return _blocked_topk(inputs, spec, keep, progress)


def sparse_terms(inputs: Sequence[Prepared], spec: FuseSpec) -> Terms | None:
    """The fused matrix as bias + per-input terms at kept cells, or None when some input is dense or the fusion is
    not of that form. The terms are the ones the dense kernels add, in the same order (bit-identical sums)."""
    if any(p.topk is None for p in inputs):
        return None
    if spec.method in ("iterative", "wsum") and not spec.exact:
        lin = LinearFusion(inputs, spec, fused_dtype(inputs))
        return lin.bias, [(c.long(), v) for c, v in lin.sparse]
    if spec.method != "rrf":
        return None
    q, dtype = inputs[0].shape[0], fused_dtype(inputs)
    terms = []
    for p in inputs:  # as `fusion._rrf`: weight / (k + rank) at each input's top-`depth` cells
        cols, d = p.raw_topk(0, q, int(spec.depth))
        ranks = torch.arange(1, d + 1, dtype=dtype)
        terms.append((cols.long(), (spec.weight_of(p.name) / (float(spec.k) + ranks)).expand(q, d).contiguous()))
    return torch.zeros(q, 1, dtype=dtype), terms


def _sparse_topk(
    bias: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]], n_cols: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    q = bias.shape[0]
    cols = torch.cat([c for c, _ in terms], dim=1)
    m = cols.shape[1]
    srt = cols.sort(dim=1).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    union = srt.masked_fill(dup, n_cols).sort(dim=1).values  # each row's distinct columns ascending, then padding
    vals = bias.expand(q, m).clone()
    for c, t in terms:  # input by input, as the dense scatter_add: the same sums, bit for bit
        vals.scatter_add_(1, torch.searchsorted(union, c), t)
    neg_inf = float("-inf")
    vals.masked_fill_(union == n_cols, neg_inf)
    # Cells outside the union all hold the bias; the lowest-numbered `keep` of them are the only ones that can rank.
    f = min(n_cols, keep + m)
    free = torch.arange(f).repeat(q, 1)
    taken = union.gather(1, torch.searchsorted(union, free).clamp_max(m - 1)) == free
    cand_cols = torch.cat([union, free], dim=1)
    cand_vals = torch.cat([vals, bias.expand(q, f).masked_fill(taken, neg_inf)], dim=1)
    # Candidates in gallery order, so the stable rule on candidates is the rule on columns; a masked duplicate of a
    # union column (-inf) and the padding (-inf, column n_cols) are never picked: at least `keep` cells are finite.
    order = cand_cols.sort(dim=1, stable=True).indices
    cand_cols, cand_vals = cand_cols.gather(1, order), cand_vals.gather(1, order)
    pick = topk_stable(cand_vals, keep)
    return cand_cols.gather(1, pick), cand_vals.gather(1, pick)


def _blocked_topk(
    inputs: Sequence[Prepared], spec: FuseSpec, keep: int, progress: Callable[[int, int], None] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    q, g = inputs[0].shape
    dtype = fused_dtype(inputs)
    kernel = fusion_kernel(inputs, spec)
    indices = torch.empty(q, keep, dtype=torch.long)
    values = torch.empty(q, keep, dtype=dtype)
    step = block_rows(g)
    done = [0]
    lock = threading.Lock()

    def run(lo: int, hi: int) -> None:
        buf = torch.empty(step, g, dtype=dtype)
        for start in range(lo, hi, step):
            stop = min(hi, start + step)
            rows = kernel(start, stop, buf[: stop - start])
            idx = topk_stable(rows, keep)
            indices[start:stop], values[start:stop] = idx, rows.gather(1, idx)
            if progress is not None:
                with lock:
                    done[0] += stop - start
                    progress(done[0], q)

    map_row_ranges(run, q)
    return indices, values
