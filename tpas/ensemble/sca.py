"""SCA, similarity-coverage conflict resolution (HFUT-LMC, WWW'25).

When several queries claim the same gallery image as their top-1, the most confident one keeps it. Another claimant
gives it up (its ranking moves on to its next candidate that no query currently claims) only when the winner's
confidence exceeds its own by more than `tau`, and, with the text gate, only when its caption is similar enough to
the winner's (near-duplicate captions are the confusion SCA targets). Rounds repeat until nothing changes or
`max_iter`. Only the top-`depth` of a ranking is reordered (see `reorder.move_to_front`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import TpasInputError
from ..io import resolve_against
from ..sims import SimsMatrix
from .parallel import map_row_ranges
from .reorder import move_to_front, ranked_scores, top1_collisions, top_candidates, with_post_step

CONFIDENCES = ("top1", "margin", "softmax")
DEFAULTS: dict[str, Any] = {
    "confidence": "margin",
    "tau": 0.0,
    "depth": 10,
    "max_iter": 10,
    "temperature": 0.05,
    "text_sim_min": None,
    "text_features": None,
    "captions": None,
}


def validate(params: dict[str, Any] | None, key: str, base_dir: Path | None = None) -> dict[str, Any]:
    """Defaults filled in, values checked (TpasInputError naming `key.<param>`), paths resolved against base_dir."""
    p = dict(DEFAULTS)
    for k, v in (params or {}).items():
        if k not in DEFAULTS:
            raise TpasInputError(f"{key}.{k}: unknown SCA parameter; known: {sorted(DEFAULTS)}")
        p[k] = v
    if p["confidence"] not in CONFIDENCES:
        raise TpasInputError(f"{key}.confidence: {p['confidence']!r} is not one of {list(CONFIDENCES)}")
    _number(p["tau"], f"{key}.tau", low=0.0)
    _number(p["temperature"], f"{key}.temperature", low=0.0, strict=True)
    _integer(p["depth"], f"{key}.depth", low=2)
    _integer(p["max_iter"], f"{key}.max_iter", low=1)
    if p["text_sim_min"] is not None:
        _number(p["text_sim_min"], f"{key}.text_sim_min", low=-1.0, high=1.0)
    for k in ("text_features", "captions"):
        if p[k] is not None:
            path = Path(str(p[k]))
            p[k] = str(resolve_against(path, base_dir))
    if p["text_sim_min"] is not None and p["text_features"] is None and p["captions"] is None:
        raise TpasInputError(f"{key}.text_sim_min: the text gate needs `text_features` or `captions`")
    return p


def _number(v: Any, key: str, low: float | None = None, high: float | None = None, strict: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TpasInputError(f"{key}: expected a number, got {v!r}")
    if low is not None and (v <= low if strict else v < low):
        raise TpasInputError(f"{key}: must be {'>' if strict else '>='} {low}, got {v!r}")
    if high is not None and v > high:
        raise TpasInputError(f"{key}: must be <= {high}, got {v!r}")


def _integer(v: Any, key: str, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise TpasInputError(f"{key}: expected an integer >= {low}, got {v!r}")


# ------------------------------------------------------------------------------------------- caption similarity
_TOKEN = re.compile(r"[a-z0-9]+")


def tfidf_matrix(captions: Sequence[str]) -> sp.csr_matrix:
    """L2-normalised TF-IDF rows (raw term counts, smoothed idf = ln((1 + n) / (1 + df)) + 1)."""
    vocab: dict[str, int] = {}
    rows, cols, data = [], [], []
    for i, text in enumerate(captions):
        for tok, cnt in Counter(_TOKEN.findall(text.lower())).items():
            rows.append(i)
            cols.append(vocab.setdefault(tok, len(vocab)))
            data.append(float(cnt))
    m = sp.csr_matrix((data, (rows, cols)), shape=(len(captions), max(1, len(vocab))), dtype=np.float64)
    df = np.bincount(np.asarray(cols, dtype=np.int64), minlength=m.shape[1])
    idf = np.log((1.0 + len(captions)) / (1.0 + df)) + 1.0
    m = m @ sp.diags(idf)
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / norms) @ m)


class CaptionSimilarity:
    """Cosine similarity between queries' captions, from text features or TF-IDF rows, computed pair by pair."""

    def __init__(self, feats: torch.Tensor | sp.csr_matrix):
        self.feats = feats

    def to(self, i: int, others: Sequence[int]) -> np.ndarray:
        """Similarity of query i to each of `others`."""
        if isinstance(self.feats, torch.Tensor):
            return (self.feats[list(others)] @ self.feats[i]).numpy().astype(np.float64)
        return np.asarray((self.feats[list(others)] @ self.feats[i].T).todense()).ravel()

    @classmethod
    def from_captions(cls, path: str | Path, query_ids: Sequence[str]) -> CaptionSimilarity:
        """TF-IDF over the captions of a queries file (any format `tpas.data.pab.read_queries` reads)."""
        from ..data.pab import read_queries

        by_id = {q.id: q.caption for q in read_queries(path)}
        missing = next((q for q in query_ids if q not in by_id), None)
        if missing is not None:
            raise TpasInputError(f"query id {missing!r} of the matrix has no caption in this file", path)
        return cls(tfidf_matrix([by_id[q] for q in query_ids]))

    @classmethod
    def from_features(cls, path: str | Path, query_ids: Sequence[str]) -> CaptionSimilarity:
        """Text features a model wrote: a dict {query_ids, features [Q, D]} (cosine after L2 normalisation)."""
        from ..models.checkpoint import load_checkpoint  # the one sniffing, refusing loader of tensor files

        obj = load_checkpoint(path)
        if not isinstance(obj, dict) or "query_ids" not in obj or "features" not in obj:
            raise TpasInputError("expected a dict with `query_ids` and `features` [Q, D]", path)
        ids = [str(q) for q in obj["query_ids"]]
        feats = obj["features"]
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or feats.shape[0] != len(ids):
            raise TpasInputError("`features` must be a [Q, D] tensor with one row per query id", path)
        pos = {q: i for i, q in enumerate(ids)}
        missing = next((q for q in query_ids if q not in pos), None)
        if missing is not None:
            raise TpasInputError(f"query id {missing!r} of the matrix has no text feature", path)
        f = torch.nn.functional.normalize(feats.double()[[pos[q] for q in query_ids]], dim=1)
        return cls(f)


# ----------------------------------------------------------------------------------------------------- SCA
def _confidence(cs: torch.Tensor, ptr: torch.Tensor, kind: str, lse: torch.Tensor | None, temp: float):
    """Confidence of each query in its current pick cs[q, ptr[q]]."""
    ar = torch.arange(cs.shape[0])
    pick = cs[ar, ptr]
    if kind == "top1":
        return pick.double()
    if kind == "margin":
        nxt = cs[ar, (ptr + 1).clamp_max(cs.shape[1] - 1)]
        return (pick - nxt).double()
    return torch.exp(pick.double() / temp - lse)


def _row_logsumexp(x: torch.Tensor, scale: float, rows: int = 16) -> torch.Tensor:
    return torch.cat([torch.logsumexp(x[i : i + rows].double() * scale, dim=1) for i in range(0, x.shape[0], rows)])


def _softmax_lse(scores: torch.Tensor, scale: float, n_cols: int) -> torch.Tensor:
    """Row log-sum-exp of scale * scores over the whole gallery. Top-K values (fewer columns than the gallery):
    the unkept cells count at the row minimum, as `to_dense("row-min")` would fill them."""
    q, width = scores.shape
    lse = torch.cat(map_row_ranges(lambda lo, hi: _row_logsumexp(scores[lo:hi], scale), q))  # no float64 copy
    if width < n_cols:
        rest = math.log(n_cols - width) + scores.min(dim=1).values.double() * scale
        lse = torch.logaddexp(lse, rest)
    return lse


def resolve_conflicts(
    sims: SimsMatrix,
    params: dict[str, Any] | None = None,
    text_sim: CaptionSimilarity | None = None,
    inplace: bool = False,
) -> tuple[SimsMatrix, dict[str, Any]]:
    """Run SCA on a matrix; returns the new matrix and a report (collisions before/after, rows changed, rounds).

    Args:
        sims: query x gallery scores, dense or top-K (reordered among its kept cells and returned top-K; unkept
            cells count at the row minimum in the softmax confidence).
        params: see DEFAULTS; validated here.
        text_sim: caption similarity for the gate; built from params' `text_features`/`captions` when None.
        inplace: modify `sims.scores` instead of a copy (the ensemble pipeline owns its fused matrix).
    """
    p = validate(params, "sca")
    scores, columns = ranked_scores(sims, inplace)  # top-K: values [Q, K] of `columns`, never densified
    q, width = scores.shape
    g = len(sims.gallery_ids)
    depth = min(int(p["depth"]), width)
    # One extra candidate so the margin of the last reorderable slot is defined.
    slots_ext = top_candidates(scores, min(depth + 1, width))
    cs = scores.gather(1, slots_ext)
    slots = slots_ext[:, :depth]
    cand = slots if columns is None else columns.gather(1, slots)  # gallery columns: what queries compete for
    lse = None
    if p["confidence"] == "softmax":
        lse = _softmax_lse(scores, 1.0 / float(p["temperature"]), g)
    gate = p["text_sim_min"]
    if gate is not None and text_sim is None:
        text_sim = (
            CaptionSimilarity.from_features(p["text_features"], sims.query_ids)
            if p["text_features"]
            else CaptionSimilarity.from_captions(p["captions"], sims.query_ids)
        )
    ptr = torch.zeros(q, dtype=torch.long)
    before = top1_collisions(cand[:, 0], g)
    rounds = 0
    for _ in range(int(p["max_iter"])):
        rounds += 1
        picks = cand[torch.arange(q), ptr]
        conf = _confidence(cs, ptr, p["confidence"], lse, float(p["temperature"]))
        claimed = Counter(picks.tolist())
        shared = [img for img, c in claimed.items() if c > 1]
        if not shared:
            break
        picks_np = picks.numpy()
        conf_np = conf.numpy()
        changed = False
        for img in shared:
            members = np.flatnonzero(picks_np == img)
            winner = int(members[np.argmax(conf_np[members])])
            others = [int(m) for m in members if m != winner]
            if gate is not None:
                sims_to_w = text_sim.to(winner, others)
                others = [m for m, s in zip(others, sims_to_w, strict=True) if s >= gate]
            for m in others:
                if conf_np[winner] - conf_np[m] <= p["tau"]:
                    continue
                nxt = next((j for j in range(int(ptr[m]) + 1, depth) if claimed[int(cand[m, j])] == 0), None)
                if nxt is None:
                    continue
                claimed[img] -= 1
                claimed[int(cand[m, nxt])] += 1
                ptr[m] = nxt
                changed = True
        if not changed:
            break
    changed_rows = move_to_front(scores, slots, ptr)
    after = top1_collisions(cand[torch.arange(q), ptr], g)
    report = {
        "step": "sca",
        "params": {k: v for k, v in p.items() if v is not None},
        "collisions_before": before,
        "collisions_after": after,
        "rows_changed": changed_rows,
        "rounds": rounds,
        "transductive": True,
    }
    return with_post_step(sims, scores, report, columns), report
