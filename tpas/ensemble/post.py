"""Post-processing steps of an ensemble (the config's `post:` list), registered like fusions and normalisations.

A step is a name, a `validate(params, key, base_dir) -> params` that fills defaults and names the bad key, and a
`run(sims, params, inplace=...) -> (sims, report)`. The config validates every step through `get_post_step` and the
pipeline runs each through the same entry, so an unknown step is refused by name at load time and can never fall
through to another step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TpasInputError
from ..sims import SimsMatrix
from . import assignment, rescore, sca

Validate = Callable[[dict[str, Any] | None, str, Path | None], dict[str, Any]]
Run = Callable[..., tuple[SimsMatrix, dict[str, Any]]]


@dataclass(frozen=True)
class PostStep:
    """One registered post step: its config name, parameter check and the function that applies it."""

    name: str
    validate: Validate
    run: Run


POST_STEPS: dict[str, PostStep] = {}


def register_post_step(name: str, validate: Validate) -> Callable[[Run], Run]:
    """Register `run(sims, params, inplace=...) -> (sims, report)` as the post step `name`, checked by `validate`."""

    def deco(run: Run) -> Run:
        POST_STEPS[name] = PostStep(name, validate, run)
        return run

    return deco


def get_post_step(name: str, key: str = "post") -> PostStep:
    """The step registered as `name`; TpasInputError naming `key` and every known step otherwise."""
    if name not in POST_STEPS:
        raise TpasInputError(f"{key}: unknown post step {name!r}; choose one of {sorted(POST_STEPS)}")
    return POST_STEPS[name]


register_post_step("sca", sca.validate)(sca.resolve_conflicts)
register_post_step("assignment", assignment.validate)(assignment.assign)
register_post_step("rescore", rescore.validate)(rescore.rescore)
