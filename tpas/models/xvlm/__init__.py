"""X-VLM and APTM families: `tpas infer xvlm` / `tpas infer aptm` on the released retrieval checkpoints, and
`load_xvlm_pretrained` (X-VLM's 16M pre-training as CMP's initialisation)."""

from __future__ import annotations

from ..base import register
from .config import APTM_NORMS, XVLMConfig, infer_xvlm_config, observed_image_hw
from .model import APTM, XVLM, XVLMFamily, config_from_mapping, xvlm_fill
from .pretrained import PretrainedReport, load_xvlm_pretrained
from .text import clean_xvlm_caption

register("xvlm")(XVLM)
register("aptm")(APTM)

__all__ = [
    "APTM",
    "APTM_NORMS",
    "XVLM",
    "PretrainedReport",
    "XVLMConfig",
    "XVLMFamily",
    "clean_xvlm_caption",
    "config_from_mapping",
    "infer_xvlm_config",
    "load_xvlm_pretrained",
    "observed_image_hw",
    "xvlm_fill",
]
