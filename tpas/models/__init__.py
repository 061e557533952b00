"""Model families, their registry and the shared inference engine.

A family is a module (or package) of `tpas.models`, or of any installed distribution that declares it under the
`tpas.families` entry-point group, that registers a `RetrievalModel` subclass with `@register("name")`. Nothing
else lists the families: the registry imports a family's module when its name is first asked for.
"""

from __future__ import annotations

from .base import FamilyOption, RetrievalModel, get_model_class, list_models, load_model, register

__all__ = ["FamilyOption", "RetrievalModel", "get_model_class", "list_models", "load_model", "register"]
