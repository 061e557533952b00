"""Scoring: ranks under one tie rule, then R@K / mAP / mINP, per query and broken down by annotation columns."""

from .evaluate import Evaluation, evaluate
from .metrics import METRICS, aggregate, metrics_from_ranks, per_query_metrics
from .relevance import Match, Relevance, join_ground_truth

__all__ = [
    "METRICS",
    "Evaluation",
    "Match",
    "Relevance",
    "aggregate",
    "evaluate",
    "join_ground_truth",
    "metrics_from_ranks",
    "per_query_metrics",
]
