"""Evaluate a SimsMatrix against PAB ground truth: overall metrics, per-query table, breakdowns by any column."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..data.pab import GroundTruth
from ..errors import TpasInputError
from ..ranking import Ties, relevant_ranks, topk_relevant_ranks
from ..sims import SimsMatrix
from .metrics import METRICS, aggregate, per_query_metrics
from .relevance import Match, check_policies, join_ground_truth

TABLE_METRICS = (*METRICS, "mAP@10")
"""Columns of the overall and breakdown tables (besides `n`): the five of `--json` plus the leaderboard's top-10 mAP."""

# What users type after --by for the normal/anomaly split, mapped to the ground-truth column.
COLUMN_ALIASES = {"normal/anomaly": "behaviour", "anomaly": "behaviour", "normal": "behaviour", "behavior": "behaviour"}


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
    match, ties = check_policies(match, ties)
    columns = ["query_id", *gt.frame.columns]
    by = tuple(resolve_column(b, columns) for b in by)
    rel = join_ground_truth(gt, sims.query_ids, sims.gallery_ids, match)
    rows = None if rel.is_every_row(len(sims.query_ids)) else rel.rows
    if sims.is_dense:
        ranks = relevant_ranks(sims.scores, rel.cols, ties, rows=rows)
    else:
        idx, val = (sims.indices, sims.values) if rows is None else (sims.indices[rows], sims.values[rows])
        ranks = topk_relevant_ranks(idx, val, len(sims.gallery_ids), rel.cols, ties)
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
