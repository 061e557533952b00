"""Fusion: the WWW'25 presets bit for bit against the seed's formula, wsum/rrf by hand, top-K inputs, alignment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ens_helpers import ids, save

from tpas.ensemble.config import load_config
from tpas.ensemble.fusion import FuseSpec, fuse
from tpas.ensemble.pipeline import run_ensemble
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "ensemble"


def seed_formula(itm_idx, itm_vals, beit3, blip2, clip, wb, wl, wc):
    """The seed's evaluation_itm, re-typed from its description: sentinel fill, row-min, global min-max, nesting."""
    q, g = beit3.shape
    itm = torch.full((q, g), 1000.0)
    for i in range(q):
        itm[i, itm_idx[i]] = itm_vals[i]
    row_min = itm.min(dim=1).values
    for i in range(q):
        itm[i][itm[i] == 1000.0] = row_min[i]

    def mm(x):
        return (x - x.min()) / (x.max() - x.min())

    itm, b3, b2, cl = mm(itm), mm(beit3), mm(blip2), mm(clip)
    return (((1 - wb) * itm + wb * b3) * wl + (1 - wl) * b2) * wc + (1 - wc) * cl


def _seed_inputs(tmp_path, q=37, g=211, k=10, seed=0, topk_form=True):
    gen = torch.Generator().manual_seed(seed)
    beit3 = torch.randn(q, g, generator=gen)
    blip2 = torch.rand(q, g, generator=gen) * 4 - 1
    clip = torch.randn(q, g, generator=gen) * 0.3 + 0.2
    idx = beit3.topk(k, dim=1).indices  # the seed re-ranked BEiT-3's top-k
    vals = torch.randn(q, k, generator=gen) * 6
    qi, gi = ids("q", q), ids("g", g)
    if topk_form:
        itm = SimsMatrix(qi, gi, indices=idx, values=vals, source="cmp-itm")
    else:
        dense = vals.min(dim=1, keepdim=True).values.expand(q, g).clone().scatter_(1, idx, vals)
        itm = SimsMatrix(qi, gi, scores=dense, source="cmp-itm")
    paths = {
        "cmp_itm": save(itm, tmp_path / "itm.pt"),
        "beit3": save(SimsMatrix(qi, gi, scores=beit3), tmp_path / "beit3.pt"),
        "blip2": save(SimsMatrix(qi, gi, scores=blip2), tmp_path / "blip2.pt"),
        "clip": save(SimsMatrix(qi, gi, scores=clip), tmp_path / "clip.pt"),
    }
    return paths, (idx, vals, beit3, blip2, clip)


def _overrides(paths):
    return [f"inputs.{n}.path={p}" if n == "cmp_itm" else f"inputs.{n}={p}" for n, p in paths.items()]


@pytest.mark.parametrize(
    "preset,wb", [("www25_iterative.yaml", 0.925), ("www25_iterative_as_run.yaml", 0.9)], ids=["readme", "as-run"]
)
@pytest.mark.parametrize("topk_form", [True, False], ids=["itm-topk", "itm-dense"])
def test_preset_equals_seed_formula_exactly(tmp_path, preset, wb, topk_form):
    paths, (idx, vals, beit3, blip2, clip) = _seed_inputs(tmp_path, topk_form=topk_form)
    cfg = load_config(PRESETS / preset, _overrides(paths))
    fused, _ = run_ensemble(cfg)
    expected = seed_formula(idx, vals, beit3, blip2, clip, wb, 0.9, 0.9)
    assert torch.equal(fused.scores, expected)


def test_preset_without_exact_agrees_to_a_few_ulp_and_ranks_the_same(tmp_path):
    paths, (idx, vals, beit3, blip2, clip) = _seed_inputs(tmp_path, q=60, g=400)
    cfg = load_config(PRESETS / "www25_iterative.yaml", [*_overrides(paths), "fuse.exact=false"])
    assert cfg.fuse.exact is False
    fast, _ = run_ensemble(cfg)
    expected = seed_formula(idx, vals, beit3, blip2, clip, 0.925, 0.9, 0.9)
    assert not torch.equal(fast.scores, expected)  # really the other code path
    assert torch.allclose(fast.scores, expected, rtol=0, atol=4e-7)
    assert torch.equal(fast.scores.topk(10).indices, expected.topk(10).indices)


def test_presets_differ_only_in_the_beit3_weight():
    a, b = (load_config(PRESETS / n) for n in ("www25_iterative.yaml", "www25_iterative_as_run.yaml"))
    assert a.fuse.weights == [0.075, 0.9, 0.9] and b.fuse.weights == [0.1, 0.9, 0.9]
    assert a.normalize == b.normalize == {n: ("min-max", "global") for n in a.inputs}


def _mats(values: dict[str, list[list[float]]]):
    return {n: SimsMatrix(ids("q", len(v)), ids("g", len(v[0])), scores=torch.tensor(v)) for n, v in values.items()}


def test_iterative_by_hand():
    m = _mats({"a": [[0.0, 1.0, 0.5]], "b": [[2.0, 0.0, 1.0]], "c": [[0.0, 0.0, 4.0]]})
    out = fuse(m, FuseSpec("iterative", ["a", "b", "c"], [0.5, 0.75]), ("none", "global"))
    # s = 0.5*a + 0.5*b = [1, .5, .75]; s = 0.75*s + 0.25*c = [.75, .375, 1.5625]
    assert torch.allclose(out.scores, torch.tensor([[0.75, 0.375, 1.5625]]))
    assert out.meta["effective_weights"] == pytest.approx({"a": 0.375, "b": 0.375, "c": 0.25})


def test_wsum_by_hand_with_min_max():
    m = _mats({"a": [[0.0, 2.0], [4.0, 1.0]], "b": [[1.0, 3.0], [3.0, 3.0]]})
    out = fuse(m, FuseSpec("wsum", ["a", "b"], {"a": 0.25, "b": 1.0}))
    a = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(out.scores, 0.25 * a + b)


def test_rrf_by_hand():
    m = _mats({"a": [[0.9, 0.1, 0.5]], "b": [[0.2, 0.3, 0.1]]})
    out = fuse(m, FuseSpec("rrf", ["a", "b"], {"a": 1.0, "b": 0.5}, k=10, depth=2))
    # a ranks: g0=1, g2=2 ; b ranks (depth 2): g1=1, g0=2
    want = torch.tensor([[1 / 11 + 0.5 / 12, 0.5 / 11, 1 / 12]])
    assert torch.allclose(out.scores, want)


def test_topk_input_matches_densified_input_in_every_method():
    gen = torch.Generator().manual_seed(3)
    q, g = 9, 50
    dense = SimsMatrix(ids("q", q), ids("g", g), scores=torch.randn(q, g, generator=gen))
    topk = dense.top_k(7)
    densified = SimsMatrix(dense.query_ids, dense.gallery_ids, scores=topk.to_dense("row-min"))
    other = SimsMatrix(dense.query_ids, dense.gallery_ids, scores=torch.rand(q, g, generator=gen))
    for spec in (
        FuseSpec("iterative", ["t", "o"], [0.3]),
        FuseSpec("wsum", ["t", "o"], {"t": 0.6, "o": 0.4}),
    ):
        for norm in (("min-max", "global"), ("zmuv", "query"), ("rank", "query")):
            a = fuse({"t": topk, "o": other}, spec, norm).scores
            b = fuse({"t": densified, "o": other}, spec, norm).scores
            assert torch.allclose(a, b, atol=1e-6), (spec.method, norm)


def test_inputs_are_aligned_by_ids():
    gen = torch.Generator().manual_seed(1)
    a = SimsMatrix(ids("q", 4), ids("g", 6), scores=torch.randn(4, 6, generator=gen))
    b = SimsMatrix(ids("q", 4), ids("g", 6), scores=torch.randn(4, 6, generator=gen))
    rq, rg = [3, 1, 0, 2], [5, 0, 4, 1, 3, 2]
    shuffled = SimsMatrix([b.query_ids[i] for i in rq], [b.gallery_ids[j] for j in rg], scores=b.scores[rq][:, rg])
    spec = FuseSpec("iterative", ["a", "b"], [0.4])
    assert torch.equal(fuse({"a": a, "b": b}, spec).scores, fuse({"a": a, "b": shuffled}, spec).scores)


def test_misaligned_ids_are_an_error_naming_them():
    a = SimsMatrix(ids("q", 2), ["x", "y"], scores=torch.zeros(2, 2))
    b = SimsMatrix(ids("q", 2), ["x", "zz"], scores=torch.zeros(2, 2))
    with pytest.raises(TpasInputError, match="'zz'"):
        fuse({"a": a, "b": b}, FuseSpec("iterative", ["a", "b"], [0.5]))


@pytest.mark.parametrize(
    "spec,match",
    [
        (FuseSpec("iterative", [], []), "fuse.order: the fusion list is empty"),
        (FuseSpec("iterative", ["a", "b"], [1.5]), r"fuse.weights\[0\]: weight must be a number in \[0, 1\]"),
        (FuseSpec("iterative", ["a", "b"], [-0.1]), r"fuse.weights\[0\]"),
        (FuseSpec("iterative", ["a", "b"], [0.1, 0.2]), "needs 1 weights"),
        (FuseSpec("wsum", ["a", "b"], {"a": 2.0}), "fuse.weights.a"),
        (FuseSpec("borda", ["a"]), "fuse.method"),
        (FuseSpec("iterative", ["a", "nope"], [0.5]), "unknown input 'nope'"),
        (FuseSpec("rrf", ["a", "b"], None, k=-1), "fuse.k"),
        (FuseSpec("rrf", ["a", "b"], None, depth=0), "fuse.depth"),
        (FuseSpec("iterative", ["a", "b"], [0.5], exact="yes"), "fuse.exact: must be true or false"),
    ],
)
def test_bad_fusion_specs(spec, match):
    m = _mats({"a": [[0.0, 1.0]], "b": [[1.0, 0.0]]})
    with pytest.raises(TpasInputError, match=match):
        fuse(m, spec)


@pytest.mark.parametrize("exact", [False, True], ids=["linear", "exact"])
@pytest.mark.parametrize("norm", [("min-max", "query"), ("zmuv", "query"), ("min-max", "global")])
def test_block_and_worker_splits_do_not_change_results(monkeypatch, norm, exact):
    from tpas.ensemble import fusion
    from tpas.ensemble.normalize import normalize

    gen = torch.Generator().manual_seed(4)
    q, g = 11, 30
    a = SimsMatrix(ids("q", q), ids("g", g), scores=torch.randn(q, g, generator=gen))
    b = SimsMatrix(ids("q", q), ids("g", g), scores=torch.randn(q, g, generator=gen))
    t = b.top_k(4)
    spec = FuseSpec("iterative", ["a", "t", "b"], [0.3, 0.6], exact=exact)
    whole = fuse({"a": a, "t": t, "b": b}, spec, norm).scores
    monkeypatch.setattr(fusion, "BLOCK_BYTES", 4 * g * 2)  # 2 rows per block
    monkeypatch.setenv("TPAS_THREADS", "3")
    split = fuse({"a": a, "t": t, "b": b}, spec, norm).scores
    assert torch.equal(whole, split)
    na, nb = normalize(a.scores, *norm), normalize(b.scores, *norm)
    nt = normalize(t.to_dense("row-min"), *norm)
    assert torch.allclose(split, 0.6 * (0.3 * na + 0.7 * nt) + 0.4 * nb, atol=1e-5)


@pytest.mark.parametrize("method", ["iterative", "wsum"])
@pytest.mark.parametrize(
    "norm",
    [
        ("min-max", "global"),
        ("min-max", "query"),
        ("zmuv", "global"),
        ("zmuv", "query"),
        ("rank", "query"),
        ("none", "global"),
    ],
)
def test_linear_form_equals_exact_operations(method, norm):
    gen = torch.Generator().manual_seed(5)
    q, g = 13, 70
    m = {n: SimsMatrix(ids("q", q), ids("g", g), scores=torch.randn(q, g, generator=gen) * 3 + 1) for n in "abc"}
    m["t"] = m.pop("c").top_k(6)  # a top-K input in the middle of the order
    weights = [0.3, 0.6] if method == "iterative" else {"a": 0.2, "t": 0.5, "b": 1.0}
    specs = [FuseSpec(method, ["a", "t", "b"], weights, exact=e) for e in (True, False)]
    exact, linear = (fuse(m, s, norm).scores for s in specs)
    assert torch.allclose(linear, exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("exact", [False, True], ids=["linear", "exact"])
def test_mixed_precision_inputs_fuse_in_the_wider_type(exact):
    gen = torch.Generator().manual_seed(2)
    a = SimsMatrix(ids("q", 3), ids("g", 5), scores=torch.rand(3, 5, generator=gen).half())
    b = SimsMatrix(ids("q", 3), ids("g", 5), scores=torch.rand(3, 5, generator=gen).double())
    out = fuse({"a": a, "b": b}, FuseSpec("iterative", ["a", "b"], [0.5], exact=exact))
    assert out.scores.dtype == torch.float64
    want = 0.5 * normalize_mm(a.scores.double()) + 0.5 * normalize_mm(b.scores)
    assert torch.allclose(out.scores, want, atol=1e-3)
    # A float32 top-K (ITM) input first, fused into the float64 output.
    t = SimsMatrix(ids("q", 3), ids("g", 5), scores=torch.rand(3, 5, generator=gen)).top_k(2)
    out = fuse({"t": t, "b": b}, FuseSpec("iterative", ["t", "b"], [0.5], exact=exact))
    want = 0.5 * normalize_mm(t.to_dense("row-min").double()) + 0.5 * normalize_mm(b.scores)
    assert out.scores.dtype == torch.float64 and torch.allclose(out.scores, want, atol=1e-6)


def normalize_mm(x):
    return (x - x.min()) / (x.max() - x.min())
