"""The ITM re-rank of each query's top-k, shared by `tpas infer --rerank-k` (the engine) and the trainer's evaluation.

A family with a matching head scores (query, image) pairs with `model.match`. Each query's k candidates are its k
best cells of a first-stage matrix under the one tie rule (`tpas.ranking.topk_stable`); all pairs are ordered by
image and scored in fixed-size batches across queries (a batch then reads few images' states); the filled matrix
holds the match score in each query's top-k cells and the row minimum of those k scores everywhere else (the rule of
the original code). The family's `finalize_rerank` turns it into the final matrix.

Where the per-image states come from is the caller's business: an `ImageFeatures` callable maps gallery columns to
their features (`match` inputs), read from the engine's on-disk store or, for the trainer, from memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TpasInputError
from ..ranking import topk_stable
from ..runtime import Autocast
from ..sims import SimsMatrix
from .base import Features, RetrievalModel

ImageFeatures = Callable[[torch.Tensor], Features]
"""Gallery columns [n] (int64) -> the features `match` needs of those images, item axis first, in that order."""

RerankProgress = Callable[[int, int], None]
"""Called after every batch with (pairs done, pairs in all)."""


@dataclass(frozen=True)
class Reranked:
    """A re-rank of q queries: `filled` [q, G] (top-k cells = match score, others = the row's minimum of them; None
    from a top-K run, which never holds [q, G]), `top` [q, k] the re-ranked gallery columns (best first-stage
    first), `scores` [q, k] their match scores."""

    filled: torch.Tensor | None
    top: torch.Tensor
    scores: torch.Tensor


def in_memory(features: Features) -> ImageFeatures:
    """An `ImageFeatures` over tensors already in memory (one row per gallery column)."""
    return lambda cols: {name: v[cols] for name, v in features.items()}


def to_device(feats: Features, device: torch.device) -> Features:
    """Every tensor of `feats` on `device` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in feats.items()}


def rerank_topk(
    model: RetrievalModel,
    images: ImageFeatures,
    text: Features,
    first: torch.Tensor,
    k: int,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    batch_size: int = 256,
    progress: RerankProgress | None = None,
) -> Reranked:
    """Match scores of each row's top-k of `first` [q, G].

    Args:
        model: a family with `has_match_head`.
        images: features of gallery columns (see `ImageFeatures`).
        text: per-query `match` inputs (the `tokenize` output merged with `encode_texts`), q rows, on the CPU.
        first: first-stage scores; -inf cells are never chosen while a row has k finite ones.
        k: candidates per query (at most G).
        device: where `match` runs.
        autocast: a factory of the forward's precision context (`tpas.runtime.Precision.autocast`).
        batch_size: (query, image) pairs per `match` call.
        progress: see `RerankProgress`.
    """
    q, g = first.shape
    if q == 0:
        return Reranked(torch.empty(0, g), torch.empty(0, k, dtype=torch.long), torch.empty(0, k))
    top = topk_stable(first, k)  # [q, k] gallery columns
    matched = match_candidates(model, images, text, top, device, autocast, batch_size, progress)
    filled = matched.min(dim=1, keepdim=True).values.expand(q, g).clone()
    filled.scatter_(1, top, matched)
    return Reranked(filled, top, matched)


def match_candidates(
    model: RetrievalModel,
    images: ImageFeatures,
    text: Features,
    top: torch.Tensor,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
    batch_size: int = 256,
    progress: RerankProgress | None = None,
) -> torch.Tensor:
    """Match scores [q, k] of each row's candidate gallery columns `top` [q, k] (arguments as `rerank_topk`)."""
    q, k = top.shape
    rows = torch.arange(q).repeat_interleave(k)
    cols = top.reshape(-1)
    # Pairs ordered by image, so a batch reads few images (and few store chunks).
    order = torch.argsort(cols * q + rows)
    rows, cols = rows[order], cols[order]
    scores = torch.empty(len(rows))
    for s in range(0, len(rows), batch_size):
        r, c = rows[s : s + batch_size], cols[s : s + batch_size]
        uniq, inverse = torch.unique(c, return_inverse=True)
        image_pairs = {name: v[inverse] for name, v in images(uniq).items()}
        text_pairs = {name: v[r] for name, v in text.items()}
        with torch.inference_mode(), autocast():
            m = model.match(to_device(text_pairs, device), to_device(image_pairs, device))
        scores[s : s + len(r)] = m.detach().float().cpu().reshape(-1)
        if progress:
            progress(s + len(r), len(rows))
    matched = torch.empty(q * k)
    matched[order] = scores  # back to (row, rank) order
    return matched.view(q, k)


def final_on_kept(
    model: RetrievalModel,
    itc_values: torch.Tensor,
    itc_min: float,
    matched: torch.Tensor,
) -> torch.Tensor:
    """The family's final scores [Q, K] on each row's ITC top-K cells, equal to the dense path's on those cells.

    `itc_values` [Q, K] are the rows' K best ITC scores (best first), `matched` [Q, k] the match scores of their
    first k (k <= K), `itc_min` the ITC minimum over the whole [Q, G] matrix. `finalize_rerank` runs on a compact
    [Q, K + 1] matrix: the K kept cells plus one column standing for every cell not kept (ITC at the global minimum,
    unscored). Each family's rule reads per cell, per row or global minima and maxima, which that column preserves
    (the unscored cells share one filled value; the global ITC extremes are the top-1 maximum and `itc_min`).
    """
    q, k = matched.shape
    itc = torch.cat([itc_values.float(), torch.full((q, 1), float(itc_min))], dim=1)
    filled = matched.min(dim=1, keepdim=True).values.expand(q, itc.shape[1]).clone()
    filled[:, :k] = matched
    top = torch.arange(k).expand(q, k)
    return model.finalize_rerank(filled, itc, top).float()[:, :-1]


def load_candidates(
    candidates: str | Path | SimsMatrix, query_ids: list[str], gallery_ids: list[str], k: int | None
) -> torch.Tensor:
    """Dense [Q, G] first-stage scores from another model's matrix, aligned to our ids (cells it lacks: -inf)."""
    m = candidates if isinstance(candidates, SimsMatrix) else SimsMatrix.load(candidates)
    where = candidates if isinstance(candidates, (str, Path)) else None
    if not m.is_dense and k is not None and (m.k or 0) < k:
        raise TpasInputError(
            f"--candidates keeps only the top-{m.k} per query; --rerank-k {k} needs at least {k}", where
        )
    try:
        m = m.align(query_ids=query_ids, gallery_ids=gallery_ids)
    except TpasInputError as e:
        raise TpasInputError(f"--candidates does not match this gallery/query set: {e.message}", where) from None
    return m.to_dense(fill=float("-inf")).float()
