"""Summary plots for `tpas report`: R@K curves, metric breakdowns and the ensemble tuning surface.

Every function draws on its own `matplotlib.figure.Figure` rendered by the Agg canvas: no pyplot, no global backend
switch, no display needed, so it runs the same on a headless server as on a laptop. Functions return the path they
wrote; the values behind a plot come from separate pure functions so tests can check them without pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import TpasInputError
from ..io import atomic_write

# Columns of a trials CSV that describe bookkeeping, never a tuned parameter.
_BOOKKEEPING = {
    "trial",
    "number",
    "index",
    "fold",
    "seed",
    "rank",
    "duration",
    "duration_s",
    "seconds",
    "time",
    "elapsed",
    "restart",
    "step",
    "iteration",
}
# Names under which tuners commonly store the objective value, most specific first.
_OBJECTIVE_NAMES = ("objective", "value", "score", "mAP", "map", "R@1", "r@1", "metric")
# Distinct hues that stay distinguishable for up to ten models.
_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _figure(width: float, height: float):  # -> matplotlib.figure.Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The constrained layout keeps titles, tick labels, colour bars and figure legends ("outside" ones too) apart.
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: str | Path) -> Path:
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))


def recall_at_k_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """R@K in percent for K = 1..max_k from 1-based ground-truth ranks (one relevant image per query)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return np.zeros(max_k)
    # counts[k] = number of queries whose relevant image sits at rank k; the cumulative sum is the hit count at K.
    clipped = np.clip(ranks, 1, max_k + 1).astype(np.int64)
    counts = np.bincount(clipped, minlength=max_k + 2)[1 : max_k + 1]
    return 100.0 * np.cumsum(counts) / ranks.size


def plot_recall_curves(ranks: Mapping[str, np.ndarray], out: str | Path, max_k: int = 20) -> Path:
    """Draw one R@K curve (K = 1..max_k) per model; returns the PNG path."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ks = np.arange(1, max_k + 1)
    for i, (name, r) in enumerate(ranks.items()):
        curve = recall_at_k_curve(r, max_k)
        ax.plot(
            ks, curve, marker="o", markersize=3, color=_COLOURS[i % len(_COLOURS)], label=f"{name} ({curve[0]:.1f})"
        )
    ax.set_xlabel("K")
    ax.set_ylabel("R@K (%)")
    ax.set_title("Recall at K (legend: R@1)")
    ax.set_xlim(1, max_k)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out)


def plot_breakdown(
    panels: Mapping[str, pd.DataFrame], out: str | Path, *, title: str, counts: pd.Series | None = None
) -> Path:
    """Grouped bars, one panel per metric: `panels` maps a metric name to a groups x models table of values (%).

    Groups are e.g. normal/anomaly or the scenes; `counts` (queries per group) is added to the group labels. Panels sit
    side by side while they fit a page width and stack otherwise; one legend (the models) serves them all.
    """
    n_panels = len(panels)
    first = next(iter(panels.values()))
    n_groups, n_models = first.shape
    groups = [str(g) if counts is None else f"{g}\n(n={int(counts[g])})" for g in first.index]
    panel_w = min(9.0, max(3.5, 0.3 * n_groups * max(1, n_models) + 1.5))
    side_by_side = panel_w * n_panels <= 9.0
    rows, cols = (1, n_panels) if side_by_side else (n_panels, 1)
    fig = _figure(panel_w * cols, 3.0 * rows + 0.5)
    width = 0.8 / max(1, n_models)
    x = np.arange(n_groups)
    for p, (metric, values) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, p + 1)
        for i, model in enumerate(values.columns):
            ax.bar(
                x + (i - (n_models - 1) / 2) * width,
                values[model].to_numpy(dtype=float),
                width,
                color=_COLOURS[i % len(_COLOURS)],
                label=str(model),
            )
        ax.set_xticks(x)
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{metric} by {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(n_models, 5), fontsize=8, frameon=False)
    return _save(fig, out)


def _label(column: str) -> str:
    """Axis label of a parameter column: without the tuner's `param:` / `params_` prefix."""
    for prefix in ("param:", "params_"):
        if column.startswith(prefix):
            return column[len(prefix) :]
    return column


def read_trials(path: str | Path) -> pd.DataFrame:
    """Read a tuning trials CSV (one row per trial); TpasInputError when missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise TpasInputError("file not found", path)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise TpasInputError(f"cannot be read as a trials CSV ({str(e).splitlines()[0]})", path) from None
    if df.empty:
        raise TpasInputError("holds no trials", path)
    return df


def tuning_columns(trials: pd.DataFrame, objective: str | None = None) -> tuple[str, list[str]]:
    """Pick the objective column and the tuned-parameter columns of a trials table.

    The objective is `objective` when given, else the first of the usual names (objective, value, score, mAP, R@1).
    Parameters are the numeric columns that vary across trials, excluding the objective, bookkeeping columns (trial,
    fold, seed, duration, ...) and other metric-looking columns; `params_*` columns (optuna's layout) win when present.
    Raises TpasInputError (no path: the caller knows the file) when no objective or no parameter is found.
    """
    cols = list(trials.columns)
    if objective is None:
        objective = next((c for c in _OBJECTIVE_NAMES if c in cols), None)
        if objective is None:
            raise TpasInputError(f"no objective column in the trials table (expected one of {_OBJECTIVE_NAMES})")
    elif objective not in cols:
        raise TpasInputError(f"objective column {objective!r} not in the trials table (columns: {cols})")
    numeric = [c for c in cols if pd.api.types.is_numeric_dtype(trials[c]) and trials[c].nunique(dropna=True) > 1]
    metricish = {"map", "minp", "objective", "value", "score", "metric", "in_sample", "cv_mean", "cv_std"}

    def is_param(c: str) -> bool:
        low = c.lower()
        return (
            c != objective
            and low not in _BOOKKEEPING
            and low not in metricish
            and not low.startswith("r@")
            and not low.startswith("cv_")
            and not low.startswith("fold_")
        )

    # Tuners that mark their parameter columns (`tpas tune`: "param:<key>", optuna: "params_<name>") are taken at
    # their word; otherwise every varying numeric column that is not bookkeeping or a metric counts.
    params = [c for c in numeric if c.startswith(("param:", "params_"))] or [c for c in numeric if is_param(c)]
    if not params:
        raise TpasInputError(f"no varying numeric parameter column in the trials table (columns: {cols})")
    return objective, params


def plot_tuning_surface(trials: pd.DataFrame, out: str | Path, objective: str | None = None) -> Path:
    """Draw the tuning surface: objective over the two most influential parameters, plus one panel per parameter.

    With two or more parameters the first panel is a scatter of the two parameters whose best-per-value objective
    varies most, coloured by the objective (a filled contour under it when the points allow a triangulation); each
    further panel shows the objective against one parameter (every trial as a dot, the best per value as a line).
    The best trial is starred.
    """
    if "search" in trials.columns and (trials["search"] == "all").any():
        # `tpas tune --folds K` also records the per-fold searches; the surface is the main search over all queries.
        trials = trials[trials["search"] == "all"]
    objective, params = tuning_columns(trials, objective)
    df = trials[[*params, objective]].dropna()
    if df.empty:
        raise TpasInputError("every trial has a missing parameter or objective value")
    y = df[objective].to_numpy(dtype=float)
    best = int(np.argmax(y))

    def spread(p: str) -> float:
        per_value = df.groupby(p)[objective].max()
        return float(per_value.max() - per_value.min())

    ranked = sorted(params, key=spread, reverse=True)
    panels = (1 if len(params) >= 2 else 0) + min(len(params), 4)
    fig = _figure(4.2 * panels, 3.8)
    i = 1
    if len(params) >= 2:
        a, b = ranked[0], ranked[1]
        ax = fig.add_subplot(1, panels, i)
        i += 1
        xa, xb = df[a].to_numpy(dtype=float), df[b].to_numpy(dtype=float)
        if len(np.unique(xa)) >= 3 and len(np.unique(xb)) >= 3 and len(df) >= 6:
            from matplotlib.tri import Triangulation

            try:
                tri = Triangulation(xa, xb)
                ax.tricontourf(tri, y, levels=12, cmap="viridis", alpha=0.55)
            except (ValueError, RuntimeError):
                pass  # collinear or degenerate points: the scatter alone still shows the surface
        sc = ax.scatter(xa, xb, c=y, cmap="viridis", s=18, edgecolors="k", linewidths=0.3)
        ax.scatter([xa[best]], [xb[best]], marker="*", s=220, c="#d62728", edgecolors="k", label="best")
        fig.colorbar(sc, ax=ax, label=objective)
        ax.set_xlabel(_label(a))
        ax.set_ylabel(_label(b))
        ax.set_title(f"{objective} over two parameters")
        ax.legend(fontsize=8, loc="best")
    for p in ranked[:4]:
        ax = fig.add_subplot(1, panels, i)
        i += 1
        x = df[p].to_numpy(dtype=float)
        ax.scatter(x, y, s=10, alpha=0.5, color=_COLOURS[0], label="trials")
        per_value = df.groupby(p)[objective].max().sort_index()
        ax.plot(
            per_value.index.to_numpy(dtype=float),
            per_value.to_numpy(dtype=float),
            color=_COLOURS[1],
            label="best per value",
        )
        ax.scatter([x[best]], [y[best]], marker="*", s=160, c="#d62728", edgecolors="k", zorder=3)
        ax.set_xlabel(_label(p))
        ax.set_ylabel(objective)
        ax.set_title(f"{objective} vs {_label(p)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)
