"""best-rank fusion: each cell's best rank over the inputs, so a pool's top-(n x k) is the union of the top-ks."""

from __future__ import annotations

import pytest
import torch
from ens_helpers import ids

from tpas.ensemble.config import build_config
from tpas.ensemble.fusion import FuseSpec, fuse
from tpas.errors import TpasInputError
from tpas.ranking import topk_stable
from tpas.sims import SimsMatrix


def _mats(scores: dict[str, torch.Tensor]) -> dict[str, SimsMatrix]:
    q, g = next(iter(scores.values())).shape
    return {n: SimsMatrix(ids("q", q), ids("g", g), scores=s, source=n) for n, s in scores.items()}


def test_best_rank_by_hand():
    m = _mats({"a": torch.tensor([[0.9, 0.1, 0.5, 0.0]]), "b": torch.tensor([[0.2, 0.3, 0.1, 0.0]])})
    out = fuse(m, FuseSpec("best-rank", ["a", "b"], depth=2))
    # a ranks g0=1, g2=2; b ranks g1=1, g0=2 (depth 2): best ranks g0=1, g1=1, g2=2, g3 none -> 3 - rank, 0.
    assert out.scores.tolist() == [[2.0, 2.0, 1.0, 0.0]]
    assert out.meta["fusion"]["depth"] == 2 and out.meta["effective_weights"] == {}


@pytest.mark.parametrize("topk_form", [False, True])
def test_top_n_times_k_of_the_pool_holds_every_inputs_top_k(topk_form: bool):
    gen = torch.Generator().manual_seed(0)
    q, g, n, k = 30, 80, 3, 6
    scores = {f"m{i}": torch.randn(q, g, generator=gen) for i in range(n)}
    # Exact ties inside the top-k: the stable rule (gallery order) decides, in the inputs and in the pool alike.
    scores["m0"][:, 10:20] = 5.0
    mats = _mats(scores)
    if topk_form:
        mats = {name: mm.top_k(2 * k) for name, mm in mats.items()}
    pool = fuse(mats, FuseSpec("best-rank", list(mats), depth=2 * k))
    top = topk_stable(pool.scores, n * k)
    for r in range(q):
        union = set()
        for s in scores.values():
            union |= set(topk_stable(s[r : r + 1], k)[0].tolist())
        assert union <= set(top[r].tolist()), r
        assert len(union) <= n * k


def test_best_rank_config_validation(tmp_path):
    m = SimsMatrix(ids("q", 2), ids("g", 3), scores=torch.rand(2, 3), source="a")
    m.save(tmp_path / "a.pt")
    m.save(tmp_path / "b.pt")
    raw = {"inputs": {"a": "a.pt", "b": "b.pt"}, "fuse": {"method": "best-rank", "order": ["a", "b"], "depth": 20}}
    assert build_config(raw, tmp_path).fuse.depth == 20
    for fuse_raw, key in (({"depth": 0}, "fuse.depth"), ({"weights": {"a": 0.5}}, "fuse.weights")):
        bad = {**raw, "fuse": {**raw["fuse"], **fuse_raw}}
        with pytest.raises(TpasInputError, match=key):
            build_config(bad, tmp_path)


def test_packaged_pool_recipe_holds_the_union_of_the_top_10s(tmp_path):
    from pathlib import Path

    from tpas.ensemble.config import load_config
    from tpas.ensemble.pipeline import run_ensemble

    preset = Path(__file__).resolve().parents[2] / "configs" / "ensemble" / "candidate_pool.yaml"
    gen = torch.Generator().manual_seed(5)
    q, g = 12, 120
    overrides = []
    mats = {}
    for name in ("beit3", "blip2", "clip"):
        mats[name] = torch.randn(q, g, generator=gen)
        SimsMatrix(ids("q", q), ids("g", g), scores=mats[name], source=name).save(tmp_path / f"{name}.pt")
        overrides.append(f"inputs.{name}={tmp_path / name}.pt")
    pool, _ = run_ensemble(load_config(preset, overrides))
    top30 = topk_stable(pool.scores, 30)
    for r in range(q):
        union = set().union(*(set(topk_stable(s[r : r + 1], 10)[0].tolist()) for s in mats.values()))
        assert union <= set(top30[r].tolist())
