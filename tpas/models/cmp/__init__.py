"""CMP (Cross-Modal Pose-aware) family: `tpas infer cmp`, the released cmp.pth layout, and the trainer's model API."""

from __future__ import annotations

from ..base import register
from .config import CMPConfig, infer_config
from .model import CMP, CMPPreprocess, cmp_final_scores, config_from_mapping, minmax_global
from .text import CMPTokenizer, clean_caption, find_vocab

register("cmp")(CMP)

__all__ = [
    "CMP",
    "CMPConfig",
    "CMPPreprocess",
    "CMPTokenizer",
    "clean_caption",
    "cmp_final_scores",
    "config_from_mapping",
    "find_vocab",
    "infer_config",
    "minmax_global",
]
