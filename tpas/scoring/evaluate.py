"""Evaluate a SimsMatrix against PAB ground truth: overall metrics, per-query table, breakdowns by any column."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pandas as pd
import torch

from ..data.pab import GroundTruth
from ..errors import TpasInputError
from ..ranking import Ties, relevant_ranks, topk_relevant_ranks
from ..sims import SimsMatrix
from .metrics import METRICS, aggregate, per_query_metrics

TABLE_METRICS = (*METRICS, "mAP@10")
"""Columns of the overall and breakdown tables (besides `n`): the five of `--json` plus the leaderboard's top-10 mAP."""

# What users type after --by for the normal/anomaly split, mapped to the ground-truth column.
COLUMN_ALIASES = {"normal/anomaly": "behaviour", "anomaly": "behaviour", "normal": "behaviour", "behavior": "behaviour"}


class Match(str, Enum):
    """Which gallery images count as relevant for a caption.

    - `image` (the PAB protocol): its own record's image.
    - `identity`: every image whose record has the same `image_id` (the person identity, where the annotation reuses
      an id across records).
    """

    IMAGE = "image"
    IDENTITY = "identity"


@dataclass
class Evaluation:
    """Result of `evaluate`: `overall` (one row), `per_query` (one row per query) and breakdowns on demand."""

    overall: pd.DataFrame
    per_query: pd.DataFrame
    ties: Ties
    match: Match
    unscored_rows: int = 0
    by: tuple[str, ...] = field(default_factory=tuple)

    def metrics(self) -> dict[str, float]:
        """The five overall metrics in percent, keys exactly R@1, R@5, R@10, mAP, mINP (the `--json` content)."""
        row = self.overall.iloc[0]
        return {k: float(row[k]) for k in METRICS}

    def breakdown(self, column: str) -> pd.DataFrame:
        """Metrics per value of a ground-truth column (`behaviour` a.k.a. normal/anomaly, `scene`, `action`, ...)."""
        col = resolve_column(column, self.per_query.columns, exclude=_METRIC_COLUMNS)
        rows = {}
        for value, grp in self.per_query.groupby(col, sort=True):
            rows[value] = _summary(grp)
        out = pd.DataFrame.from_dict(rows, orient="index")
        out.index.name = col
        return out


_METRIC_COLUMNS = frozenset({"rank", "R@1", "R@5", "R@10", "AP", "INP", "AP@10"})


def resolve_column(name: str, columns: Sequence[str], exclude: frozenset[str] = frozenset()) -> str:
    """Map a `--by` name to a ground-truth column (aliases: normal/anomaly -> behaviour); error lists the choices."""
    col = COLUMN_ALIASES.get(name, name)
    if col not in columns or col in exclude:
        choices = [c for c in columns if c not in exclude and c not in ("query_id", "caption")]
        raise TpasInputError(f"no ground-truth column {name!r} to break down by; choose from {', '.join(choices)}")
    return col


def _summary(frame: pd.DataFrame) -> dict[str, Any]:
    per = {k: torch.tensor(frame[k].to_numpy(dtype="float64")) for k in ("R@1", "R@5", "R@10", "AP", "INP", "AP@10")}
    return {"n": len(frame), **aggregate(per, TABLE_METRICS)}


def _relevant_columns(sims: SimsMatrix, gt: GroundTruth, match: Match) -> torch.Tensor:
    """[Q, M] gallery columns of each gt query's relevant images (-1 padding); errors name query and gallery id."""
    col_of = {g: i for i, g in enumerate(sims.gallery_ids)}
    where = None if gt.path is None else gt.path
    if match is Match.IMAGE:
        cols = []
        for q in gt.query_ids:
            gid = gt.relevant[q]
            c = col_of.get(gid)
            if c is None:
                raise TpasInputError(
                    f"query {q!r}: its relevant image {gid!r} is not a gallery id of the matrix "
                    f"({len(sims.gallery_ids)} gallery ids, e.g. {sims.gallery_ids[:2]})",
                    where,
                )
            cols.append([c])
        return torch.tensor(cols, dtype=torch.long).reshape(len(cols), 1)
    groups = gt.identity_groups()
    lists = []
    for q, ident in zip(gt.query_ids, gt.frame["image_id"], strict=True):
        lst = []
        for gid in groups[ident]:
            c = col_of.get(gid)
            if c is None:
                raise TpasInputError(
                    f"query {q!r}: image {gid!r} of identity {ident!r} is not a gallery id of the matrix", where
                )
            lst.append(c)
        lists.append(lst)
    width = max(len(x) for x in lists)
    return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long)


def evaluate(
    sims: SimsMatrix,
    gt: GroundTruth,
    ties: Ties | str = Ties.STABLE,
    by: Sequence[str] = (),
    match: Match | str = Match.IMAGE,
) -> Evaluation:
    """Score `sims` (dense or top-K) against `gt`: ranks once (no full sort), then R@1/5/10, mAP, mINP, mAP@10.

    Every ground-truth query must be a row of the matrix and every relevant image a column (TpasInputError naming the
    first missing id otherwise). Matrix rows that are not ground-truth queries are ignored and counted in
    `unscored_rows`. `by` names columns to break down by; they are checked here so a typo fails before any work.
    """
    ties, match = Ties(ties), Match(match)
    columns = ["query_id", *gt.frame.columns]
    by = tuple(resolve_column(b, columns) for b in by)
    row_of = {qid: i for i, qid in enumerate(sims.query_ids)}
    missing = next((q for q in gt.query_ids if q not in row_of), None)
    if missing is not None:
        n_missing = sum(q not in row_of for q in gt.query_ids)
        raise TpasInputError(
            f"ground-truth query {missing!r} is not a row of the matrix ({n_missing} of {len(gt.query_ids)} "
            f"ground-truth queries missing; matrix rows look like {sims.query_ids[:2]})",
            gt.path,
        )
    rel = _relevant_columns(sims, gt, match)
    rows = torch.tensor([row_of[q] for q in gt.query_ids], dtype=torch.long)
    identity_rows = len(rows) == len(sims.query_ids) and bool((rows == torch.arange(len(rows))).all())
    if sims.is_dense:
        ranks = relevant_ranks(sims.scores, rel, ties, rows=None if identity_rows else rows)
    else:
        idx, val = (sims.indices, sims.values) if identity_rows else (sims.indices[rows], sims.values[rows])
        ranks = topk_relevant_ranks(idx, val, len(sims.gallery_ids), rel, ties)
    per = per_query_metrics(ranks)
    per_query = pd.DataFrame({k: per[k].numpy() for k in ("rank", "R@1", "R@5", "R@10", "AP", "INP", "AP@10")})
    per_query.insert(0, "query_id", gt.query_ids)
    per_query = per_query.join(gt.frame.reset_index(drop=True))
    overall = pd.DataFrame([{"n": len(per_query), **aggregate(per, TABLE_METRICS)}], index=pd.Index(["all"]))
    return Evaluation(
        overall=overall,
        per_query=per_query,
        ties=ties,
        match=match,
        unscored_rows=len(sims.query_ids) - len(gt.query_ids),
        by=by,
    )
