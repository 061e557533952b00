"""Evaluate a SimsMatrix against PAB ground truth: overall metrics, per-query table, breakdowns by any column."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from ..data.pab import GroundTruth
from ..errors import TpasInputError
from ..parallel import map_row_ranges
from ..ranking import Ties, relevant_ranks, topk_relevant_ranks
from ..sims import SimsMatrix
from .metrics import METRICS, aggregate, per_query_metrics
from .relevance import Match, check_policies, join_ground_truth

if TYPE_CHECKING:
    import pandas as pd

TABLE_METRICS = (*METRICS, "mAP@10")
"""Columns of the overall and breakdown tables (besides `n`): the five of `--json` plus the leaderboard's top-10 mAP."""

# What users type after --by for the normal/anomaly split, mapped to the ground-truth column.
COLUMN_ALIASES = {"normal/anomaly": "behaviour", "anomaly": "behaviour", "normal": "behaviour", "behavior": "behaviour"}


@dataclass
class Evaluation:
    """Result of `evaluate`: `overall` (one row), `per_query` (one row per query) and breakdowns on demand.

    The tables are pandas frames built on first use from the per-query values `per`: the metrics alone need no
    pandas, whose import would otherwise be most of `tpas evaluate`'s own time.
    """

    per: dict[str, torch.Tensor]
    gt: GroundTruth
    ties: Ties
    match: Match
    unscored_rows: int = 0
    by: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> dict[str, Any]:
        """The overall row as a dict: `n` (queries scored) and every metric of TABLE_METRICS, in percent."""
        return {"n": len(self.per["rank"]), **aggregate(self.per, TABLE_METRICS)}

    def metrics(self) -> dict[str, float]:
        """The five overall metrics in percent, keys exactly R@1, R@5, R@10, mAP, mINP (the `--json` content)."""
        return aggregate(self.per, METRICS)

    @cached_property
    def overall(self) -> pd.DataFrame:
        """The overall metrics as a one-row frame indexed `all`: `n` and TABLE_METRICS."""
        import pandas as pd

        return pd.DataFrame([self.summary()], index=pd.Index(["all"]))

    @cached_property
    def per_query(self) -> pd.DataFrame:
        """One row per ground-truth query: `query_id`, rank and per-query metrics, then the annotation columns."""
        import pandas as pd

        frame = pd.DataFrame({k: self.per[k].numpy() for k in ("rank", "R@1", "R@5", "R@10", "AP", "INP", "AP@10")})
        frame.insert(0, "query_id", self.gt.query_ids)
        return frame if self.gt.frame is None else frame.join(self.gt.frame.reset_index(drop=True))

    def breakdown(self, column: str) -> pd.DataFrame:
        """Metrics per value of a ground-truth column (`behaviour` a.k.a. normal/anomaly, `scene`, `action`, ...)."""
        import pandas as pd

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


def _dense_ranks(scores: torch.Tensor, cols: torch.Tensor, ties: Ties, rows: torch.Tensor | None) -> torch.Tensor:
    # Row ranges on worker threads with one intra-op thread each: ranking is many small ops on cache-sized chunks,
    # which two intra-op threads slow down up to 10x when the cores are shared (see tpas/parallel.py).
    def ranks_of(lo: int, hi: int) -> torch.Tensor:
        part = scores[lo:hi] if rows is None else scores
        return relevant_ranks(part, cols[lo:hi], ties, rows=None if rows is None else rows[lo:hi])

    return torch.cat(map_row_ranges(ranks_of, len(cols)))


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
    columns = ["query_id", *gt.columns]
    by = tuple(resolve_column(b, columns) for b in by)
    rel = join_ground_truth(gt, sims.query_ids, sims.gallery_ids, match)
    rows = None if rel.is_every_row(len(sims.query_ids)) else rel.rows
    if sims.is_dense:
        ranks = _dense_ranks(sims.scores, rel.cols, ties, rows)
    else:
        idx, val = (sims.indices, sims.values) if rows is None else (sims.indices[rows], sims.values[rows])
        ranks = topk_relevant_ranks(idx, val, len(sims.gallery_ids), rel.cols, ties)
    per = per_query_metrics(ranks)
    unscored = len(sims.query_ids) - len(gt.query_ids)
    return Evaluation(per=per, gt=gt, ties=ties, match=match, unscored_rows=unscored, by=by)
