"""`tpas tune`: search an ensemble config's parameters on a labelled split, with optional K-fold cross-validation.

A trial is a set of overrides (dotted config keys -> values) applied to the config. It is scored from the rank of
each query's ground-truth image alone (`tpas.ranking.gt_ranks`, no sort of the gallery), turned into metrics by
`tpas.scoring`. Without post-processing the fused matrix is never materialised: each block of rows is fused,
ranked and dropped. Ranks are cached per parameter point, so cross-validation reuses every trial it can.

Search space (`tune.space` in the config; without one, every fusion weight on [0, 1]):
    fuse.weights.0: {low: 0.0, high: 0.3, step: 0.005}    # numeric: values generated with integer arithmetic
    normalize.method: [min-max, zmuv]                      # categorical
    post.0.sca.tau: [0.0, 0.05, 0.1]
Searches: grid (exhaustive), coordinate (ascent over one key at a time, restarts from random points until the trial
budget is spent), random, optuna (TPE, when optuna is installed). Everything random draws from `seed`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TpasInputError
from ..io import atomic_write, get_key, set_key
from ..ranking import gt_ranks
from ..scoring.metrics import aggregate, per_query_metrics
from .config import EnsembleConfig, build_config, dump_config
from .fusion import Prepared, block_rows, fuse_prepared, fused_dtype, fusion_kernel, prepare
from .parallel import map_row_ranges
from .pipeline import apply_post, load_inputs

SEARCHES = ("grid", "coordinate", "random", "optuna")
METRIC_NAMES = ("R@1", "R@5", "R@10", "mAP", "mINP", "mAP@10")
GRID_LIMIT = 2_000_000
Progress = Callable[[str, int, int | None, float | None], None]


# ------------------------------------------------------------------------------------------------ objective
def parse_objective(text: str | None) -> dict[str, float]:
    """'mAP' -> {'mAP': 1}; '0.5*R@1+0.5*mAP' -> weighted mix. TpasInputError on unknown metric names."""
    text = (text or "mAP").replace(" ", "")
    out: dict[str, float] = {}
    for term in text.split("+"):
        m = re.fullmatch(r"(?:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\*)?(.+)", term)
        coef, name = (float(m.group(1)) if m and m.group(1) else 1.0), (m.group(2) if m else term)
        if name not in METRIC_NAMES:
            raise TpasInputError(
                f"--metric: unknown metric {name!r}; use {list(METRIC_NAMES)} or a mix like '0.5*R@1+0.5*mAP'"
            )
        out[name] = out.get(name, 0.0) + coef
    return out


def score_of(metrics: dict[str, float], objective: dict[str, float]) -> float:
    """The objective's value for a metrics dict."""
    return sum(c * metrics[n] for n, c in objective.items())


def metrics_of(ranks: torch.Tensor) -> dict[str, float]:
    """Every metric name of METRIC_NAMES (percent) from 1-based ranks."""
    return aggregate(per_query_metrics(ranks), METRIC_NAMES)


# ------------------------------------------------------------------------------------------------ space
@dataclass
class Dimension:
    """One tunable config key and its candidate values (numeric ones generated without float drift)."""

    key: str
    values: list[Any]
    numeric: bool


def decimal_range(low: float, high: float, step: float) -> list[float]:
    """low, low + step, ..., high using integer arithmetic: 0.075 is 75/1000, never 0.07500000000000001."""
    decs = [Decimal(str(x)) for x in (low, high, step)]
    places = max(max(0, -d.as_tuple().exponent) for d in decs)
    scale = 10**places
    lo, hi, st = (int(d * scale) for d in decs)
    if st <= 0 or hi < lo:
        raise ValueError("need step > 0 and high >= low")
    return [(lo + i * st) / scale for i in range((hi - lo) // st + 1)]


def _dimension(key: str, spec: Any, default_step: float | None) -> Dimension:
    where = f"tune.space.{key}"
    if isinstance(spec, list):
        if not spec:
            raise TpasInputError(f"{where}: empty list of values")
        return Dimension(key, list(spec), all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec))
    if isinstance(spec, dict):
        bad = set(spec) - {"low", "high", "step"}
        if bad or "low" not in spec or "high" not in spec:
            raise TpasInputError(f"{where}: expected {{low, high, step}} or a list of values")
        step = default_step if default_step is not None else spec.get("step", 0.05)
        try:
            values = decimal_range(float(spec["low"]), float(spec["high"]), float(step))
        except (TypeError, ValueError) as e:
            raise TpasInputError(f"{where}: {e}") from None
        if all(isinstance(spec[k], int) for k in ("low", "high")) and float(step).is_integer():
            values = [int(v) for v in values]
        return Dimension(key, values, True)
    raise TpasInputError(f"{where}: expected {{low, high, step}} or a list of values, got {spec!r}")


def build_space(cfg: EnsembleConfig, step: float | None = None) -> list[Dimension]:
    """The dimensions of `tune.space`, or every fusion weight on [0, 1] when the config lists none."""
    space = cfg.tune.get("space")
    if space is None:
        spec = cfg.fuse
        space = {}
        if spec.method == "iterative":
            space = {f"fuse.weights.{i}": {"low": 0.0, "high": 1.0} for i in range(len(spec.order) - 1)}
        else:
            space = {f"fuse.weights.{n}": {"low": 0.0, "high": 1.0} for n in spec.order}
            if spec.method == "rrf":
                space["fuse.k"] = [10, 20, 40, 60, 80, 100]
    if not isinstance(space, dict) or not space:
        raise TpasInputError("tune.space: expected a mapping of config keys to value ranges")
    dims = [_dimension(str(k), v, step) for k, v in space.items()]
    for d in dims:  # every value must make a valid config; check each once now rather than fail mid-search
        for v in d.values:
            _apply(cfg, {d.key: v})
    return dims


def _apply(cfg: EnsembleConfig, params: dict[str, Any]) -> EnsembleConfig:
    raw = copy.deepcopy(cfg.raw)
    tunes_named_weights = cfg.fuse.method != "iterative" and any(k.startswith("fuse.weights.") for k in params)
    if tunes_named_weights and not isinstance(raw.get("fuse", {}).get("weights"), dict):
        raw.setdefault("fuse", {})["weights"] = {n: 1.0 for n in cfg.fuse.order}
    for k, v in params.items():
        try:
            set_key(raw, k, v)
        except TpasInputError as e:
            raise TpasInputError(f"tune.space.{k}: {e.message}") from None
    return build_config(raw, cfg.base_dir)


# ------------------------------------------------------------------------------------------------ evaluator
class Evaluator:
    """Scores parameter points: per-query ground-truth ranks, cached by point."""

    def __init__(self, cfg: EnsembleConfig, gt: Any):
        self.cfg = cfg
        self.matrices = load_inputs(cfg)
        ref = self.matrices[cfg.fuse.order[0]]
        self.query_ids, self.gallery_ids = ref.query_ids, ref.gallery_ids
        g_pos = {g: i for i, g in enumerate(ref.gallery_ids)}
        rows, cols = [], []
        for i, q in enumerate(ref.query_ids):
            rel = gt.relevant.get(q)
            if rel is None:
                continue
            if rel not in g_pos:
                raise TpasInputError(
                    f"query {q!r}: its relevant image {rel!r} is not in the gallery of the matrices",
                    getattr(gt, "path", None),
                )
            rows.append(i)
            cols.append(g_pos[rel])
        if not rows:
            raise TpasInputError(
                "no query of the matrices has a ground truth in this annotation (query ids differ: the matrices "
                f"use e.g. {ref.query_ids[0]!r}, the annotation e.g. {gt.query_ids[0]!r})",
                getattr(gt, "path", None),
            )
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.cols = torch.tensor(cols, dtype=torch.long)
        self.all_rows = len(rows) == len(ref.query_ids)
        self.eval_ids = [ref.query_ids[i] for i in rows]
        frame = getattr(gt, "frame", None)
        self.strata = (
            [str(frame.loc[q, "behaviour"]) for q in self.eval_ids]
            if frame is not None and "behaviour" in getattr(frame, "columns", [])
            else ["" for _ in self.eval_ids]
        )
        self._prepared: dict[tuple, Prepared] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        self.evaluations = 0

    def _prepared_inputs(self, cfg: EnsembleConfig) -> list[Prepared]:
        out = []
        for n in cfg.fuse.order:
            key = (n, *cfg.normalize[n], cfg.inputs[n].fill)
            if key not in self._prepared:
                self._prepared[key] = prepare(n, self.matrices[n], *cfg.normalize[n], fill=cfg.inputs[n].fill)
            out.append(self._prepared[key])
        return out

    def ranks(self, params: dict[str, Any]) -> torch.Tensor:
        """1-based ground-truth ranks [Qe] of the evaluated queries for one parameter point (cached)."""
        key = tuple(sorted((k, repr(v)) for k, v in params.items()))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        cfg = _apply(self.cfg, params)
        # Trials fuse in the linear form even when the config asks for the seed's exact float operations: the two
        # agree to ~1e-7, which cannot change which weights win, and it is the fast path. The tuned config keeps
        # `fuse.exact`, so `tpas ensemble` with it still writes the bit-identical matrix.
        cfg.fuse = dataclasses.replace(cfg.fuse, exact=False)
        prepared = self._prepared_inputs(cfg)
        if cfg.post:
            from ..sims import SimsMatrix

            fused = SimsMatrix(self.query_ids, self.gallery_ids, scores=fuse_prepared(prepared, cfg.fuse))
            fused, _ = apply_post(fused, cfg)
            scores = fused.scores.index_select(0, self.rows) if not self.all_rows else fused.scores
            r = torch.cat(map_row_ranges(lambda lo, hi: gt_ranks(scores[lo:hi], self.cols[lo:hi]), len(self.cols)))
        else:
            r = self._fast_ranks(prepared, cfg)
        self._cache[key] = r
        self.evaluations += 1
        return r

    def _fast_ranks(self, prepared: list[Prepared], cfg: EnsembleConfig) -> torch.Tensor:
        # Fuse a block of rows, rank its ground-truth cells, drop the block: no [Q, G] allocation per trial.
        q, g = prepared[0].shape
        step = 4 * block_rows(g)  # ranking a block has a fixed cost per call: 4 fusion blocks at once amortise it
        full = torch.zeros(q, dtype=torch.long)
        gt_col = torch.zeros(q, dtype=torch.long)
        gt_col[self.rows] = self.cols

        kernel = fusion_kernel(prepared, cfg.fuse)

        def run(lo: int, hi: int) -> None:
            buf = torch.empty(step, g, dtype=fused_dtype(prepared))
            for start in range(lo, hi, step):
                stop = min(hi, start + step)
                block = kernel(start, stop, buf[: stop - start])
                full[start:stop] = gt_ranks(block, gt_col[start:stop])

        map_row_ranges(run, q)
        return full if self.all_rows else full[self.rows]


# ------------------------------------------------------------------------------------------------ searches
@dataclass
class Trial:
    """One evaluated point of one search."""

    search: str
    number: int
    params: dict[str, Any]
    score: float
    metrics: dict[str, float]
    seconds: float


class _Search:
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
        return len(self.trials) >= self.budget


def _start_point(cfg: EnsembleConfig, dims: list[Dimension]) -> dict[str, Any]:
    """The config's own values (snapped to the nearest candidate), so a search never starts worse than the preset."""
    out = {}
    for d in dims:
        try:
            cur = get_key(cfg.raw, d.key)
        except (KeyError, IndexError, TypeError, ValueError):
            cur = None
        if cur in d.values:
            out[d.key] = cur
        elif d.numeric and isinstance(cur, (int, float)):
            out[d.key] = min(d.values, key=lambda v: abs(v - cur))
        else:
            out[d.key] = d.values[0]
    return out


def _grid(s: _Search, cfg: EnsembleConfig, rng: np.random.Generator) -> None:
    for combo in itertools.product(*(d.values for d in s.dims)):
        s.evaluate({d.key: v for d, v in zip(s.dims, combo, strict=True)})


def _random(s: _Search, cfg: EnsembleConfig, rng: np.random.Generator) -> None:
    s.evaluate(_start_point(cfg, s.dims))
    tries = 0
    while not s.spent and tries < s.budget * 20:
        tries += 1
        s.evaluate({d.key: d.values[int(rng.integers(len(d.values)))] for d in s.dims})


def _coordinate(s: _Search, cfg: EnsembleConfig, rng: np.random.Generator) -> None:
    point = _start_point(cfg, s.dims)
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


def _optuna(s: _Search, cfg: EnsembleConfig, rng: np.random.Generator) -> None:
    try:
        import optuna
    except ImportError:
        raise TpasInputError("--search optuna: optuna is not installed (pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=int(rng.integers(2**31)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    start = _start_point(cfg, s.dims)
    study.enqueue_trial({d.key: d.values.index(start[d.key]) for d in s.dims})

    def objective(trial: Any) -> float:
        # Indices into each value list keep numeric values on their integer-arithmetic grid.
        params = {d.key: d.values[trial.suggest_int(d.key, 0, len(d.values) - 1)] for d in s.dims}
        return s.evaluate(params).score

    study.optimize(objective, n_trials=s.budget)


_SEARCH_FNS = {"grid": _grid, "coordinate": _coordinate, "random": _random, "optuna": _optuna}


# ------------------------------------------------------------------------------------------------ tune
@dataclass
class TuneResult:
    """Everything `tpas tune` reports and writes."""

    best: Trial
    objective: dict[str, float]
    search: str
    seed: int
    dims: list[Dimension]
    trials: list[Trial]
    folds: list[dict[str, Any]] = field(default_factory=list)
    n_queries: int = 0
    start: Trial | None = None

    @property
    def n_main_trials(self) -> int:
        """Trials of the search over all labelled queries (the fold searches come on top)."""
        return sum(t.search == "all" for t in self.trials)

    @property
    def params(self) -> dict[str, Any]:
        return self.best.params

    def objective_text(self) -> str:
        return " + ".join(n if c == 1 else f"{c:g}*{n}" for n, c in self.objective.items())

    def cv_summary(self) -> dict[str, float] | None:
        """Mean/std of the held-out scores, mean in-sample score and their gap (None without folds)."""
        if not self.folds:
            return None
        held = np.array([f["held_out"] for f in self.folds])
        ins = np.array([f["in_sample"] for f in self.folds])
        return {
            "held_out_mean": float(held.mean()),
            "held_out_std": float(held.std(ddof=1)) if len(held) > 1 else 0.0,
            "in_sample_mean": float(ins.mean()),
            "gap": float(ins.mean() - held.mean()),
        }

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"best {self.objective_text()} = {self.best.score:.3f} on {self.n_queries} queries "
            f"({self.n_main_trials} trials, {self.search} search, seed {self.seed}"
            + (f"; {len(self.trials) - self.n_main_trials} more in the fold searches)" if self.folds else ")")
        ]
        if self.start is not None:
            lines.append(f"start point (the config's values) scored {self.start.score:.3f}")
        lines.append("params: " + ", ".join(f"{k}={v}" for k, v in self.best.params.items()))
        cv = self.cv_summary()
        if cv:
            lines.append(
                f"{len(self.folds)}-fold CV: held-out {cv['held_out_mean']:.3f} +- {cv['held_out_std']:.3f}, "
                f"in-sample {cv['in_sample_mean']:.3f}, gap {cv['gap']:.3f}"
            )
        return "\n".join(lines)

    def report_markdown(self, top: int = 10) -> str:
        """The markdown report: chosen parameters, top trials, per-fold scores."""
        out = [
            "# tpas tune report",
            "",
            f"- objective: {self.objective_text()} (percent), {self.n_queries} labelled queries",
            f"- search: {self.search}, {self.n_main_trials} trials (+ {len(self.trials) - self.n_main_trials} in fold "
            f"searches), seed {self.seed}",
            f"- best: {self.best.score:.4f}"
            + (f" (config's own values: {self.start.score:.4f})" if self.start else ""),
            "",
            "## Chosen parameters",
            "",
            "| key | value |",
            "| --- | --- |",
        ]
        out += [f"| {k} | {v} |" for k, v in self.best.params.items()]
        out += [
            "",
            "## Metrics of the chosen parameters (all labelled queries)",
            "",
            "| " + " | ".join(METRIC_NAMES) + " |",
            "|" + " --- |" * len(METRIC_NAMES),
            "| " + " | ".join(f"{self.best.metrics[n]:.3f}" for n in METRIC_NAMES) + " |",
            "",
        ]
        main = [t for t in self.trials if t.search == "all"]
        ranked = sorted(main, key=lambda t: (-t.score, t.number))[:top]
        keys = [d.key for d in self.dims]
        out += [
            f"## Top {len(ranked)} trials",
            "",
            "| # | " + " | ".join(keys) + " | objective | R@1 | mAP |",
            "|" + " --- |" * (len(keys) + 4),
        ]
        out += [
            f"| {t.number} | "
            + " | ".join(str(t.params[k]) for k in keys)
            + f" | {t.score:.4f} | {t.metrics['R@1']:.3f} | {t.metrics['mAP']:.3f} |"
            for t in ranked
        ]
        if self.folds:
            cv = self.cv_summary()
            out += [
                "",
                f"## {len(self.folds)}-fold cross-validation (stratified by normal/anomaly when annotated)",
                "",
                "Each fold's parameters were searched on the other folds only, then scored on the held-out fold.",
                "",
                "| fold | queries | in-sample | held-out | params |",
                "| --- | --- | --- | --- | --- |",
            ]
            for f in self.folds:
                ps = ", ".join(f"{k}={v}" for k, v in f["params"].items())
                out.append(f"| {f['fold']} | {f['n_held_out']} | {f['in_sample']:.4f} | {f['held_out']:.4f} | {ps} |")
            out += [
                "",
                f"Held-out: {cv['held_out_mean']:.4f} +- {cv['held_out_std']:.4f} (mean +- std); "
                f"in-sample {cv['in_sample_mean']:.4f}; gap {cv['gap']:.4f}. A large gap means the weights fit "
                "this split more than they generalise.",
            ]
        return "\n".join(out) + "\n"

    def trials_frame(self):
        """All trials of all searches as a pandas DataFrame."""
        import pandas as pd

        rows = [
            {
                "search": t.search,
                "trial": t.number,
                **{f"param:{k}": v for k, v in t.params.items()},
                "objective": t.score,
                **t.metrics,
                "seconds": round(t.seconds, 5),
            }
            for t in self.trials
        ]
        return pd.DataFrame(rows)


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
    gt: Any,
    *,
    metric: str | None = None,
    search: str = "coordinate",
    trials: int = 200,
    step: float | None = None,
    folds: int = 0,
    seed: int = 0,
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
        progress: callback(stage, done, total, best_so_far).
    """
    if search not in SEARCHES:
        raise TpasInputError(f"--search: {search!r} is not one of {list(SEARCHES)}")
    if trials < 1:
        raise TpasInputError(f"--trials: must be >= 1, got {trials}")
    if step is not None and not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
        raise TpasInputError(f"--step: must be a number > 0, got {step}")
    if folds == 1 or folds < 0:
        raise TpasInputError(f"--folds: use 0 (no cross-validation) or K >= 2, got {folds}")
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
    ev = Evaluator(cfg, gt)
    n_eval = len(ev.eval_ids)
    if folds and folds > n_eval:
        raise TpasInputError(f"--folds: {folds} folds need at least {folds} labelled queries, there are {n_eval}")
    fn = _SEARCH_FNS[search]

    def run(subset: np.ndarray, label: str, s: int) -> _Search:
        srch = _Search(ev, dims, objective, subset, label, progress, trials)
        fn(srch, cfg, np.random.default_rng(s))
        return srch

    all_trials: list[Trial] = []
    fold_reports: list[dict[str, Any]] = []
    if folds:
        assign = stratified_folds(ev.strata, folds, seed)
        for f in range(folds):
            train = np.flatnonzero(assign != f)
            held = np.flatnonzero(assign == f)
            srch = run(train, f"fold-{f}", seed + 1 + f)
            all_trials += srch.trials
            best = srch.best
            r = ev.ranks(best.params)
            fold_reports.append(
                {
                    "fold": f,
                    "n_held_out": len(held),
                    "params": best.params,
                    "in_sample": best.score,
                    "held_out": score_of(metrics_of(r[torch.from_numpy(held)]), objective),
                }
            )
    main = run(np.arange(n_eval), "all", seed)
    all_trials = main.trials + all_trials
    start = main.seen.get(tuple(_start_point(cfg, dims)[d.key] for d in dims))
    return TuneResult(main.best, objective, search, seed, dims, all_trials, fold_reports, n_eval, start)


def write_outputs(result: TuneResult, cfg: EnsembleConfig, out: str | Path) -> tuple[Path, Path, Path]:
    """Write the tuned config (same schema) at `out`, `<stem>.report.md` and `<stem>.trials.csv` beside it."""
    out = Path(out)
    tuned = _apply(cfg, result.params)
    cv = result.cv_summary()
    header = (
        f"# Tuned by `tpas tune` on {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}: "
        f"{result.objective_text()} = {result.best.score:.4f} on {result.n_queries} queries "
        f"({result.search} search, {result.n_main_trials} trials, seed {result.seed}).\n"
    )
    if cv:
        header += (
            f"# {len(result.folds)}-fold CV held-out {cv['held_out_mean']:.4f} +- {cv['held_out_std']:.4f}, "
            f"gap to in-sample {cv['gap']:.4f}.\n"
        )
    text = dump_config(tuned.raw, cfg.base_dir, out, header)
    report = out.with_name(out.stem + ".report.md")
    csv_path = out.with_name(out.stem + ".trials.csv")
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    atomic_write(report, lambda tmp: tmp.write_text(result.report_markdown(), encoding="utf-8"))
    frame = result.trials_frame()
    atomic_write(csv_path, lambda tmp: frame.to_csv(tmp, index=False))
    return out, report, csv_path
