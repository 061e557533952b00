"""Paired comparison of two systems on the same queries: is the difference in a metric more than noise?

Both systems are scored per query (`evaluate`), then, per metric, on the per-query differences d = model - baseline:
- a two-sided Fisher randomization (sign-flip) test: under "no difference" each d is as likely to have the opposite
  sign; p = (1 + #{resamples with |mean| >= |observed mean|}) / (1 + resamples), as ranx's `fisher` test;
- a percentile bootstrap confidence interval of the mean difference (queries resampled with replacement).
Everything random draws from one seeded generator, so a comparison is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import TpasInputError
from .evaluate import Evaluation

PER_QUERY_COLUMN = {"R@1": "R@1", "R@5": "R@5", "R@10": "R@10", "mAP": "AP", "mINP": "INP", "mAP@10": "AP@10"}
"""Metric name -> its per-query column in `Evaluation.per_query` (values in [0, 1])."""
_CHUNK = 1000  # resamples drawn at a time: bounds memory at 1000 x Q values


@dataclass
class Comparison:
    """`table`: one row per metric with baseline, model, diff (percentage points), ci_low, ci_high, p_value."""

    table: pd.DataFrame
    n_queries: int
    resamples: int
    confidence: float
    seed: int

    def significant(self, metric: str, alpha: float = 0.05) -> bool:
        """Whether the metric's difference is significant at `alpha` (randomization test)."""
        return bool(self.table.loc[metric, "p_value"] < alpha)


def paired_test(
    diff: np.ndarray, resamples: int = 10_000, confidence: float = 0.95, rng: np.random.Generator | None = None
) -> tuple[float, float, float]:
    """(p-value of the sign-flip randomization test, bootstrap CI low, CI high) of the mean of `diff`."""
    rng = rng if rng is not None else np.random.default_rng(0)
    d = np.asarray(diff, dtype=np.float64)
    n = len(d)
    observed = abs(d.mean())
    at_least = 0
    boot = np.empty(resamples)
    for lo in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - lo)
        signs = rng.integers(0, 2, size=(b, n), dtype=np.int8) * 2 - 1
        # A tolerance keeps resamples equal to the observed mean (e.g. all signs kept) counted despite rounding.
        at_least += int((np.abs(signs @ d) / n >= observed - 1e-12).sum())
        boot[lo : lo + b] = d[rng.integers(0, n, size=(b, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return (1 + at_least) / (1 + resamples), float(low), float(high)


def compare_evaluations(
    model: Evaluation,
    baseline: Evaluation,
    metrics: Sequence[str] = ("R@1", "R@5", "R@10", "mAP"),
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Compare two evaluations of the same ground truth query by query (see the module docstring)."""
    unknown = [m for m in metrics if m not in PER_QUERY_COLUMN]
    if unknown:
        raise TpasInputError(f"unknown metric {unknown[0]!r}; choose from {', '.join(PER_QUERY_COLUMN)}")
    if resamples < 1:
        raise TpasInputError(f"--resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise TpasInputError(f"--confidence must lie in (0, 1), got {confidence}")
    a = model.per_query.set_index("query_id")
    b = baseline.per_query.set_index("query_id")
    if len(a) != len(b) or not a.index.equals(b.index):
        raise TpasInputError("the two evaluations are not of the same queries (compare needs one ground truth)")
    rng = np.random.default_rng(seed)
    rows = {}
    for m in metrics:
        col = PER_QUERY_COLUMN[m]
        x, y = a[col].to_numpy(np.float64), b[col].to_numpy(np.float64)
        p, low, high = paired_test(x - y, resamples, confidence, rng)
        rows[m] = {
            "baseline": 100 * y.mean(),
            "model": 100 * x.mean(),
            "diff": 100 * (x.mean() - y.mean()),
            "ci_low": 100 * low,
            "ci_high": 100 * high,
            "p_value": p,
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    return Comparison(table, len(a), resamples, confidence, seed)
