"""`tpas tune`: search an ensemble config's parameters on a labelled split, with optional K-fold cross-validation.

A trial is a set of overrides (dotted config keys -> values) applied to the config. It is scored from the rank of
each query's relevant images alone (`tpas.ranking.relevant_ranks`, no sort of the gallery; relevance through
`tpas.scoring.relevance`, as `tpas evaluate`: `match` image | identity, `ties` stable | optimistic | pessimistic),
turned into metrics by `tpas.scoring`. Without post-processing the fused matrix is never materialised: each block of
rows is fused, ranked and dropped. Ranks are cached per parameter point, so cross-validation reuses every trial it can.

Search space (`tune.space` in the config; without one, every fusion weight on [0, 1]):
    fuse.weights.0: {low: 0.0, high: 0.3, step: 0.005}    # numeric: values generated with integer arithmetic
    normalize.method: [min-max, zmuv]                      # categorical
    post.0.sca.tau: [0.0, 0.05, 0.1]
Searches: grid (exhaustive), coordinate (ascent over one key at a time, restarts from random points until the trial
budget is spent), random, optuna (TPE, when optuna is installed). Everything random draws from `seed`.

Modules: `space` (dimensions, configs from a point), `evaluation` (objective, ranks per point), `searches`, `report`
(result, markdown, tuned config); this one runs them, with K-fold cross-validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import TpasInputError
from ...ranking import Ties
from ...scoring.relevance import Match, check_policies
from ..config import EnsembleConfig
from .evaluation import METRIC_NAMES, Evaluator, metrics_of, parse_objective, score_of
from .report import TuneResult, write_outputs
from .searches import SEARCH_FNS, SEARCHES, Progress, Search, Trial
from .space import Dimension, build_space, decimal_range, start_point

if TYPE_CHECKING:
    from ...data.pab import GroundTruth

__all__ = [
    "METRIC_NAMES",
    "SEARCHES",
    "Dimension",
    "Evaluator",
    "Trial",
    "TuneResult",
    "decimal_range",
    "metrics_of",
    "parse_objective",
    "stratified_folds",
    "tune",
    "write_outputs",
]

GRID_LIMIT = 2_000_000


def stratified_folds(strata: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold number of each query: each stratum shuffled with `seed`, then dealt round-robin to the K folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(strata), dtype=np.int64)
    offset = 0
    for s in sorted(set(strata)):
        idx = np.flatnonzero(np.asarray(strata) == s)
        idx = idx[rng.permutation(len(idx))]
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # continue dealing where the last stratum stopped, so fold sizes stay balanced
    return fold


def tune(
    cfg: EnsembleConfig,
    gt: GroundTruth,
    *,
    metric: str | None = None,
    search: str = "coordinate",
    trials: int = 200,
    step: float | None = None,
    folds: int = 0,
    seed: int = 0,
    match: Match | str = Match.IMAGE,
    ties: Ties | str = Ties.STABLE,
    progress: Progress | None = None,
) -> TuneResult:
    """Search the config's tunable parameters for the best objective on the labelled queries.

    Args:
        cfg: the ensemble config (its `tune.space`, or every fusion weight).
        gt: a `tpas.data.pab.GroundTruth` (query id -> relevant gallery id, optional behaviour column).
        metric: objective ('mAP' default, any metric name or a weighted mix); `tune.metric` of the config otherwise.
        search: grid | coordinate | random | optuna.
        trials: trial budget per search (grid ignores it).
        step: grid step for every numeric range (overrides their own steps).
        folds: K >= 2 for K-fold cross-validation over queries, stratified by normal/anomaly.
        seed: makes trials and folds reproducible.
        match: which images are relevant, as `tpas evaluate --match` (image | identity).
        ties: the tie rule, as `tpas evaluate --ties` (stable | optimistic | pessimistic).
        progress: callback(stage, done, total, best_so_far).
    """
    _check_arguments(search, trials, step, folds)
    match, ties = check_policies(match, ties)
    objective = parse_objective(metric or cfg.tune.get("metric"))
    dims = build_space(cfg, step)
    if search == "grid":
        n = math.prod(len(d.values) for d in dims)
        if n > GRID_LIMIT:
            raise TpasInputError(
                f"--search grid: {n} points is too many (limit {GRID_LIMIT}); use a coarser --step "
                "or --search coordinate"
            )
        trials = n
    ev = Evaluator(cfg, gt, match, ties)
    n_eval = len(ev.eval_ids)
    if folds and folds > n_eval:
        raise TpasInputError(f"--folds: {folds} folds need at least {folds} labelled queries, there are {n_eval}")

    def run(subset: np.ndarray, label: str, s: int) -> Search:
        srch = Search(ev, dims, objective, subset, label, progress, trials)
        SEARCH_FNS[search](srch, cfg, np.random.default_rng(s))
        return srch

    fold_trials, fold_reports = _cross_validate(ev, run, objective, folds, seed) if folds else ([], [])
    main = run(np.arange(n_eval), "all", seed)
    start = main.seen.get(tuple(start_point(cfg, dims)[d.key] for d in dims))
    trials_all = main.trials + fold_trials
    return TuneResult(main.best, objective, search, seed, dims, trials_all, fold_reports, n_eval, start, match, ties)


def _check_arguments(search: str, trials: int, step: float | None, folds: int) -> None:
    if search not in SEARCHES:
        raise TpasInputError(f"--search: {search!r} is not one of {list(SEARCHES)}")
    if trials < 1:
        raise TpasInputError(f"--trials: must be >= 1, got {trials}")
    if step is not None and not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
        raise TpasInputError(f"--step: must be a number > 0, got {step}")
    if folds == 1 or folds < 0:
        raise TpasInputError(f"--folds: use 0 (no cross-validation) or K >= 2, got {folds}")


def _cross_validate(
    ev: Evaluator, run: Callable[[np.ndarray, str, int], Search], objective: dict[str, float], folds: int, seed: int
) -> tuple[list[Trial], list[dict[str, Any]]]:
    """Search each fold's parameters on the other folds, score them on the held-out one: (trials, fold reports)."""
    trials: list[Trial] = []
    reports: list[dict[str, Any]] = []
    assign = stratified_folds(ev.strata, folds, seed)
    for f in range(folds):
        train = np.flatnonzero(assign != f)
        held = np.flatnonzero(assign == f)
        srch = run(train, f"fold-{f}", seed + 1 + f)
        trials += srch.trials
        best = srch.best
        r = ev.ranks(best.params)
        reports.append(
            {
                "fold": f,
                "n_held_out": len(held),
                "params": best.params,
                "in_sample": best.score,
                "held_out": score_of(metrics_of(r[torch.from_numpy(held)]), objective),
            }
        )
    return trials, reports
