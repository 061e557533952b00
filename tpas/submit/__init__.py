"""Leaderboard files: the ranking-file writer, its validator, and the validated submission of a matrix."""

from .ranking_file import ANSWER_NAME, check_ids, top_gallery_ids, write_ranking_file
from .submission import write_submission
from .validate import Problem, ValidationReport, validate_answer

__all__ = [
    "ANSWER_NAME",
    "Problem",
    "ValidationReport",
    "check_ids",
    "top_gallery_ids",
    "validate_answer",
    "write_ranking_file",
    "write_submission",
]
