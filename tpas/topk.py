"""Each query's top-K over a gallery too large to score at once: similarities in gallery blocks, merged as they come.

Memory is O(Q * K + Q * block): the [Q, G] matrix never exists. The result is exactly `topk_stable` of the dense
matrix (the tpas tie rule: equal scores keep gallery order), because a cell of the global top-K is also in its own
block's top-K under the same order, and the merge keeps that order (see `StreamingTopK.add`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .ranking import topk_stable

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BLOCK_BYTES = 64 << 20  # one block of float32 scores ~ 64 MiB: large matmuls, bounded memory


class StreamingTopK:
    """Running top-K of every row over column blocks given in gallery order.

    `values` / `indices` [Q, <=K] stay sorted best first, ties by lower column, so merging a block is one stable sort.
    """

    def __init__(self, n_rows: int, k: int, device: torch.device | str | None = None):
        self.k = k
        self.n_cols = 0
        self.values = torch.empty(n_rows, 0, device=device)
        self.indices = torch.empty(n_rows, 0, dtype=torch.long, device=device)

    def add(self, scores: torch.Tensor) -> None:
        """Merge the next block of columns, [Q, b] scores of gallery columns n_cols .. n_cols + b - 1."""
        b = scores.shape[1]
        if b == 0:
            return
        cols = vals = None
        if self.values.shape[1] == self.k:
            # Once K cells are kept, a new cell can only enter by beating the row's K-th score: equal is not enough,
            # since a later column loses every tie. After the first blocks few cells pass; those are taken as they
            # are (in column order) instead of ranking the whole block.
            rows, where = (scores > self.values[:, -1:]).nonzero(as_tuple=True)  # row-major: columns ascending
            if len(rows) == 0:
                self.n_cols += b
                return
            counts = torch.bincount(rows, minlength=scores.shape[0])  # (a bool row sum is many times slower)
            most = int(counts.max())
            if most <= _FEW * self.k:
                cols, vals = _passing_cells(scores, rows, where, counts, most)
        if cols is None:
            cols = topk_stable(scores, min(self.k, b))
            vals = scores.gather(1, cols)
        # Every kept column is lower than every column of this block, and each part is in (score desc, column asc)
        # or column order: a stable sort by score of [kept, block] therefore leaves equal scores in column order.
        cand_v = torch.cat([self.values.to(vals.dtype), vals], dim=1)
        cand_i = torch.cat([self.indices, cols + self.n_cols], dim=1)
        order = cand_v.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values, self.indices = cand_v.gather(1, order), cand_i.gather(1, order)
        self.n_cols += b


_FEW = 4  # at most this many times K passing cells in a row: take them all rather than a top-k of the block


def _passing_cells(
    scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's passing cells (row-major (rows, cols)) in column order, padded to `width` with -inf (sorted last,
    never kept)."""
    pos = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    out_c = torch.zeros(scores.shape[0], width, dtype=torch.long, device=scores.device)
    out_v = torch.full((scores.shape[0], width), float("-inf"), dtype=scores.dtype, device=scores.device)
    out_c[rows, pos] = cols
    out_v[rows, pos] = scores[rows, cols]
    return out_c, out_v


def block_cols(n_rows: int, k: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Gallery columns per block so one float32 [n_rows, block] block is about `block_bytes` (and holds > k)."""
    return max(k + 1, block_bytes // max(1, 4 * n_rows))


def topk_similarity(
    query_feats: torch.Tensor,
    gallery: torch.Tensor | Iterable[torch.Tensor],
    k: int,
    similarity: Similarity | None = None,
    block: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices and scores [Q, K] of each query's K best gallery items, best first, stable ties.

    Args:
        query_feats: [Q, ...] query features.
        gallery: [G, ...] gallery features (split into blocks of `block` rows), or an iterable of such blocks in
            gallery order (e.g. produced on the fly, so not even the features need to be held at once).
        k: cells kept per query (fewer when the gallery is smaller).
        similarity: `fn(query_feats, gallery_block) -> [Q, b]`; default the dot product (cosine for normalised
            features), which is what `model.similarity` computes for every family except BLIP-2.
        block: gallery items per block; default `block_cols` (about 64 MiB of scores).
        progress: called with the number of gallery items done after each block.
    """
    sim = similarity or (lambda q, g: q @ g.T)
    q = query_feats.shape[0]
    step = block or block_cols(q, k)
    blocks = (gallery[i : i + step] for i in range(0, len(gallery), step)) if torch.is_tensor(gallery) else gallery
    acc = StreamingTopK(q, k, device=query_feats.device)
    for g in blocks:
        acc.add(sim(query_feats, g))
        if progress is not None:
            progress(acc.n_cols)
    return acc.indices, acc.values
