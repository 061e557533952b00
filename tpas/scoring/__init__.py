"""Scoring: ranks under one tie rule, then R@K / mAP / mINP, per query and broken down by annotation columns."""

from .evaluate import Evaluation, Match, evaluate
from .metrics import METRICS, aggregate, metrics_from_ranks, per_query_metrics

__all__ = ["METRICS", "Evaluation", "Match", "aggregate", "evaluate", "metrics_from_ranks", "per_query_metrics"]
