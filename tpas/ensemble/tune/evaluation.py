"""Scoring one point of `tpas tune`: the objective, and ranks of each labelled query's relevant images, cached."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

import torch

from ...errors import TpasInputError
from ...parallel import map_row_ranges
from ...ranking import Ties, relevant_ranks
from ...scoring.metrics import aggregate, per_query_metrics
from ...scoring.relevance import Match, join_ground_truth
from ...sims import SimsMatrix
from ..config import EnsembleConfig
from ..fusion import Prepared, block_rows, fuse_prepared, fused_dtype, fusion_kernel, prepare
from ..pipeline import apply_post, load_inputs
from .space import apply_params

if TYPE_CHECKING:
    from ...data.pab import GroundTruth

METRIC_NAMES = ("R@1", "R@5", "R@10", "mAP", "mINP", "mAP@10")


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


class Evaluator:
    """Scores parameter points: per-query ground-truth ranks, cached by point."""

    def __init__(
        self, cfg: EnsembleConfig, gt: GroundTruth, match: Match | str = Match.IMAGE, ties: Ties | str = Ties.STABLE
    ):
        self.cfg, self.ties = cfg, Ties(ties)
        self.matrices = load_inputs(cfg)
        ref = self.matrices[cfg.fuse.order[0]]
        self.query_ids, self.gallery_ids = ref.query_ids, ref.gallery_ids
        # Queries in matrix-row order (the folds are dealt in this order); ground-truth queries the matrices lack are
        # left out, so a labelled split can be tuned on matrices of a larger query set and vice versa.
        rel = join_ground_truth(gt, ref.query_ids, ref.gallery_ids, match, every_query=False).in_row_order()
        self.rows, self.cols = rel.rows, rel.cols  # [Qe], [Qe, M]
        self.all_rows = rel.is_every_row(len(ref.query_ids))
        self.eval_ids = rel.query_ids
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
        """1-based ranks [Qe, M] of the evaluated queries' relevant images for one parameter point (cached)."""
        key = tuple(sorted((k, repr(v)) for k, v in params.items()))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        cfg = apply_params(self.cfg, params)
        # Trials fuse in the linear form even when the config asks for the seed's exact float operations: the two
        # agree to ~1e-7, which cannot change which weights win, and it is the fast path. The tuned config keeps
        # `fuse.exact`, so `tpas ensemble` with it still writes the bit-identical matrix.
        cfg.fuse = dataclasses.replace(cfg.fuse, exact=False)
        prepared = self._prepared_inputs(cfg)
        if cfg.post:
            fused = SimsMatrix(self.query_ids, self.gallery_ids, scores=fuse_prepared(prepared, cfg.fuse))
            fused, _ = apply_post(fused, cfg)
            scores = fused.scores.index_select(0, self.rows) if not self.all_rows else fused.scores
            r = torch.cat(
                map_row_ranges(
                    lambda lo, hi: relevant_ranks(scores[lo:hi], self.cols[lo:hi], self.ties), len(self.cols)
                )
            )
        else:
            r = self._fast_ranks(prepared, cfg)
        self._cache[key] = r
        self.evaluations += 1
        return r

    def _fast_ranks(self, prepared: list[Prepared], cfg: EnsembleConfig) -> torch.Tensor:
        # Fuse a block of rows, rank its ground-truth cells, drop the block: no [Q, G] allocation per trial.
        q, g = prepared[0].shape
        step = 4 * block_rows(g)  # ranking a block has a fixed cost per call: 4 fusion blocks at once amortise it
        full = torch.zeros(q, self.cols.shape[1], dtype=torch.long)
        rel_cols = torch.zeros_like(full)  # rows without a ground truth rank column 0, dropped below (cheaper than -1)
        rel_cols[self.rows] = self.cols

        kernel = fusion_kernel(prepared, cfg.fuse)

        def run(lo: int, hi: int) -> None:
            buf = torch.empty(step, g, dtype=fused_dtype(prepared))
            for start in range(lo, hi, step):
                stop = min(hi, start + step)
                block = kernel(start, stop, buf[: stop - start])
                full[start:stop] = relevant_ranks(block, rel_cols[start:stop], self.ties)

        map_row_ranges(run, q)
        return full if self.all_rows else full[self.rows]
