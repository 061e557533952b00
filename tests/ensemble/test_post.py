"""Post steps are a registry: the config validates and the pipeline runs each step through it, by name."""

from __future__ import annotations

import pytest
import torch
from ens_helpers import ids, save, write_config

from tpas.ensemble import post
from tpas.ensemble.config import load_config
from tpas.ensemble.pipeline import apply_post, run_ensemble
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix


@pytest.fixture
def config(tmp_path):
    """A one-input config whose post list the test chooses."""
    scores = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    save(SimsMatrix(ids("q", 4), ids("g", 6), scores=scores), tmp_path / "a.pt")

    def make(steps: list) -> object:
        raw = {"inputs": {"a": "a.pt"}, "fuse": {"method": "wsum", "order": ["a"]}, "post": steps}
        return load_config(write_config(tmp_path / "c.yaml", raw), [])

    return make


def test_builtin_steps_are_registered_with_their_functions():
    from tpas.ensemble import assignment, rescore, sca

    assert sorted(post.POST_STEPS) == ["assignment", "rescore", "sca"]
    assert post.get_post_step("sca").run is sca.resolve_conflicts
    assert post.get_post_step("assignment").validate is assignment.validate
    assert post.get_post_step("rescore").run is rescore.rescore


def test_a_registered_step_is_validated_and_dispatched_by_name(config, monkeypatch):
    seen = {}

    def validate(params, key, base_dir=None):
        if not isinstance(params.get("by", 1.0), float):
            raise TpasInputError(f"{key}.by: expected a number")
        return {"by": 1.0, **params}

    def negate(sims, params, inplace=False):
        seen["params"] = params
        out = SimsMatrix(sims.query_ids, sims.gallery_ids, scores=-params["by"] * sims.scores, source=sims.source,
                         meta=sims.meta)  # fmt: skip
        return out, {"step": "negate", "by": params["by"]}

    monkeypatch.setitem(post.POST_STEPS, "negate", post.PostStep("negate", validate, negate))
    plain, _ = run_ensemble(config([]))
    fused, steps = run_ensemble(config([{"negate": {"by": 2.0}}]))
    assert seen["params"] == {"by": 2.0}
    assert torch.equal(fused.scores, -2.0 * plain.scores)
    assert steps[-1]["step"] == "negate" and "seconds" in steps[-1]
    with pytest.raises(TpasInputError, match=r"post\.0\.negate\.by: expected a number"):
        config([{"negate": {"by": "two"}}])


def test_an_unknown_step_is_refused_naming_the_known_ones(config):
    with pytest.raises(TpasInputError, match=r"post\.1: unknown post step 'dedupe'; choose one of \['assignment', "):
        config(["sca", {"dedupe": {}}])
    cfg = config([])
    cfg.post = [("dedupe", {})]  # a step that bypassed the config: never run as another step
    fused, _ = run_ensemble(config([]))
    with pytest.raises(TpasInputError, match=r"post\.0: unknown post step 'dedupe'"):
        apply_post(fused, cfg)


def test_register_post_step_decorator_adds_a_step(monkeypatch):
    monkeypatch.setattr(post, "POST_STEPS", dict(post.POST_STEPS))

    @post.register_post_step("noop", lambda params, key, base_dir=None: dict(params or {}))
    def noop(sims, params, inplace=False):
        return sims, {"step": "noop"}

    assert post.get_post_step("noop").run is noop
