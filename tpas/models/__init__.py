"""Model families, their registry and the shared inference engine."""

from __future__ import annotations

import importlib

from .base import RetrievalModel, get_model_class, list_models, load_model, register

# Family modules register themselves on import; importing them lazily keeps `tpas --help` fast.
_FAMILY_MODULES = ("clip", "blip2", "beit3", "cmp", "xvlm")


def _load_families() -> None:
    for name in _FAMILY_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise


__all__ = ["RetrievalModel", "get_model_class", "list_models", "load_model", "register"]
