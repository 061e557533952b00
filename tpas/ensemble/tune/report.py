"""What `tpas tune` reports and writes: the result, its terminal summary and markdown report, and the tuned config."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...io import atomic_write
from ...ranking import Ties
from ...scoring.relevance import Match
from ..config import EnsembleConfig, dump_config
from .evaluation import METRIC_NAMES
from .searches import Trial
from .space import Dimension, apply_params


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
    match: Match = Match.IMAGE
    ties: Ties = Ties.STABLE

    @property
    def n_main_trials(self) -> int:
        """Trials of the search over all labelled queries (the fold searches come on top)."""
        return sum(t.search == "all" for t in self.trials)

    @property
    def params(self) -> dict[str, Any]:
        """The chosen parameters (dotted key -> value)."""
        return self.best.params

    def objective_text(self) -> str:
        """The objective as text: 'mAP', '0.5*R@1 + 0.5*mAP'."""
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
            f"- objective: {self.objective_text()} (percent), {self.n_queries} labelled queries "
            f"({self.match.value} match, {self.ties.value} ties)",
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
        out += self._top_trials_markdown(top)
        if self.folds:
            out += self._folds_markdown()
        return "\n".join(out) + "\n"

    def _top_trials_markdown(self, top: int) -> list[str]:
        main = [t for t in self.trials if t.search == "all"]
        ranked = sorted(main, key=lambda t: (-t.score, t.number))[:top]
        keys = [d.key for d in self.dims]
        out = [
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
        return out

    def _folds_markdown(self) -> list[str]:
        cv = self.cv_summary()
        out = [
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
        return out

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


def write_outputs(result: TuneResult, cfg: EnsembleConfig, out: str | Path) -> tuple[Path, Path, Path]:
    """Write the tuned config (same schema) at `out`, `<stem>.report.md` and `<stem>.trials.csv` beside it."""
    out = Path(out)
    tuned = apply_params(cfg, result.params)
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
