"""`tpas infer aptm`: APTM lives with X-VLM in `tpas.models.xvlm`; this module lets the registry find it by name."""

from .xvlm import APTM

__all__ = ["APTM"]
