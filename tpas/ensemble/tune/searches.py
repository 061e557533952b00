"""The searches of `tpas tune` (grid, coordinate ascent, random, optuna TPE) and the trials they record."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...errors import TpasInputError
from ..config import EnsembleConfig
from .evaluation import Evaluator, metrics_of, score_of
from .space import Dimension, start_point

# progress(stage, done, total, best_so_far)
Progress = Callable[[str, int, int | None, float | None], None]


@dataclass
class Trial:
    """One evaluated point of one search."""

    search: str
    number: int
    params: dict[str, Any]
    score: float
    metrics: dict[str, float]
    seconds: float


class Search:
    """Runs one search over `subset` of the evaluated queries, recording trials."""

    def __init__(
        self,
        ev: Evaluator,
        dims: list[Dimension],
        objective: dict[str, float],
        subset: np.ndarray,
        label: str,
        progress: Progress | None,
        budget: int,
    ):
        self.ev, self.dims, self.objective, self.subset = ev, dims, objective, torch.from_numpy(subset)
        self.label, self.progress, self.budget = label, progress, budget
        self.trials: list[Trial] = []
        self.seen: dict[tuple, Trial] = {}
        self.best: Trial | None = None

    def evaluate(self, params: dict[str, Any]) -> Trial:
        """Score one point (each point once: a repeat returns its first trial)."""
        key = tuple(params[d.key] for d in self.dims)
        if key in self.seen:
            return self.seen[key]
        t0 = time.perf_counter()
        r = self.ev.ranks(params).index_select(0, self.subset)
        m = metrics_of(r)
        t = Trial(self.label, len(self.trials), dict(params), score_of(m, self.objective), m, time.perf_counter() - t0)
        self.trials.append(t)
        self.seen[key] = t
        if self.best is None or t.score > self.best.score:
            self.best = t
        if self.progress is not None:
            self.progress(self.label, len(self.trials), self.budget, self.best.score)
        return t

    @property
    def spent(self) -> bool:
        """True once the trial budget is used up."""
        return len(self.trials) >= self.budget


def _grid(s: Search, cfg: EnsembleConfig, rng: np.random.Generator) -> None:
    for combo in itertools.product(*(d.values for d in s.dims)):
        s.evaluate({d.key: v for d, v in zip(s.dims, combo, strict=True)})


def _random(s: Search, cfg: EnsembleConfig, rng: np.random.Generator) -> None:
    s.evaluate(start_point(cfg, s.dims))
    tries = 0
    while not s.spent and tries < s.budget * 20:
        tries += 1
        s.evaluate({d.key: d.values[int(rng.integers(len(d.values)))] for d in s.dims})


def _coordinate(s: Search, cfg: EnsembleConfig, rng: np.random.Generator) -> None:
    point = start_point(cfg, s.dims)
    restarts = 0
    while not s.spent:
        cur = s.evaluate(point)
        improved = True
        while improved and not s.spent:
            improved = False
            for d in s.dims:
                for v in d.values:
                    if s.spent:
                        break
                    t = s.evaluate({**cur.params, d.key: v})
                    if t.score > cur.score:
                        cur, improved = t, True
        restarts += 1
        if restarts > s.budget:  # every point already seen: the space is exhausted
            break
        point = {d.key: d.values[int(rng.integers(len(d.values)))] for d in s.dims}


def _optuna(s: Search, cfg: EnsembleConfig, rng: np.random.Generator) -> None:
    try:
        import optuna
    except ImportError:
        raise TpasInputError("--search optuna: optuna is not installed (pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=int(rng.integers(2**31)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    start = start_point(cfg, s.dims)
    study.enqueue_trial({d.key: d.values.index(start[d.key]) for d in s.dims})

    def objective(trial: Any) -> float:
        # Indices into each value list keep numeric values on their integer-arithmetic grid.
        params = {d.key: d.values[trial.suggest_int(d.key, 0, len(d.values) - 1)] for d in s.dims}
        return s.evaluate(params).score

    study.optimize(objective, n_trials=s.budget)


SEARCH_FNS = {"grid": _grid, "coordinate": _coordinate, "random": _random, "optuna": _optuna}
SEARCHES = tuple(SEARCH_FNS)
