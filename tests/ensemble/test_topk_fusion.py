"""Top-K fusion output: exactly the dense fused matrix's stable top-K, by the sparse and the blocked paths."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from ens_helpers import ids

from tpas.data.pab import GroundTruth
from tpas.ensemble.fusion import FuseSpec, fuse_prepared, prepare
from tpas.ensemble.topk_fusion import fuse_topk, sparse_terms
from tpas.ranking import topk_stable
from tpas.scoring import evaluate
from tpas.sims import SimsMatrix

Q, G = 7, 60


def _inputs(dense_too: bool = False, fill="row-min", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qids, gids = ids("q", Q), ids("g", G)
    mats = {}
    for i, k in enumerate((5, 9, 13)):
        s = torch.randint(0, 6, (Q, G), generator=gen).float()  # integer scores: ties everywhere
        mats[f"m{i}"] = SimsMatrix(qids, gids, scores=s).top_k(k)
    if dense_too:
        mats["d"] = SimsMatrix(qids, gids, scores=torch.randint(0, 6, (Q, G), generator=gen).float())
    return [prepare(n, m, fill=fill) for n, m in mats.items()]


SPECS = {
    "iterative": lambda names: FuseSpec("iterative", names, [0.4, 0.7, 0.9][: len(names) - 1]),
    "wsum": lambda names: FuseSpec("wsum", names, {n: 0.1 * (i + 1) for i, n in enumerate(names)}),
    "rrf": lambda names: FuseSpec("rrf", names, None, k=2.0, depth=8),
    "exact": lambda names: FuseSpec("iterative", names, [0.4, 0.7, 0.9][: len(names) - 1], exact=True),
}


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("dense_too", [False, True])
@pytest.mark.parametrize("keep", [1, 10, 27, 200])
def test_topk_fusion_equals_the_dense_fusion_topk(method, dense_too, keep):
    prepared = _inputs(dense_too)
    spec = SPECS[method]([p.name for p in prepared])
    dense = fuse_prepared(prepared, spec)
    idx, val = fuse_topk(prepared, spec, keep)
    want = topk_stable(dense, min(keep, G))
    assert torch.equal(idx, want) and torch.equal(val, dense.gather(1, want))
    sparse = sparse_terms(prepared, spec) is not None
    assert sparse == (not dense_too and method != "exact")


def test_numeric_fill_above_some_values_is_still_exact():
    prepared = _inputs(fill=3.0)  # kept cells below the fill: outside cells then rank above them
    spec = SPECS["wsum"]([p.name for p in prepared])
    dense = fuse_prepared(prepared, spec)
    idx, _ = fuse_topk(prepared, spec, 30)
    assert torch.equal(idx, topk_stable(dense, 30))


def test_topk_output_scores_every_query_as_the_dense_output():
    prepared = _inputs()
    spec = SPECS["iterative"]([p.name for p in prepared])
    qids, gids = ids("q", Q), ids("g", G)
    dense = SimsMatrix(qids, gids, scores=fuse_prepared(prepared, spec))
    idx, val = fuse_topk(prepared, spec, 5 + 9 + 13)  # the sum of the inputs' K: every cell above the fill
    top = SimsMatrix(qids, gids, indices=idx, values=val)
    rel = {q: gids[(7 * i) % G] for i, q in enumerate(qids)}
    frame = pd.DataFrame({"gallery_id": list(rel.values()), "image_id": qids}, index=pd.Index(qids, name="query_id"))
    truth = GroundTruth(qids, rel, frame)
    a, b = evaluate(dense, truth).per_query, evaluate(top, truth).per_query
    assert a["rank"].tolist() == b["rank"].tolist()


def test_run_ensemble_keep_top_writes_the_dense_paths_ranking_file(tmp_path):
    from ens_helpers import write_config

    from tpas.ensemble.config import load_config
    from tpas.ensemble.pipeline import run_ensemble
    from tpas.submit import top_gallery_ids

    gen = torch.Generator().manual_seed(5)
    qids, gids = ids("q", 30), ids("g", 80)
    for n, k in (("a", 20), ("b", 25)):
        s = torch.rand(30, 80, generator=gen)
        s[:, :4] += 0.5  # popular images: SCA has collisions to resolve
        SimsMatrix(qids, gids, scores=s).top_k(k).save(tmp_path / f"{n}.pt")
    cfg = load_config(write_config(tmp_path / "c.yaml", {
        "inputs": {"a": "a.pt", "b": "b.pt"}, "fuse": {"method": "iterative", "order": ["a", "b"], "weights": [0.6]},
        "post": [{"sca": {"depth": 10}}]}))  # fmt: skip
    dense, _ = run_ensemble(cfg)
    top, steps = run_ensemble(cfg, keep_top=45)
    assert top.k == 45 and dense.is_dense and any(s.get("keep_top") == 45 for s in steps)
    assert top.meta["post"][0]["rows_changed"] == dense.meta["post"][0]["rows_changed"] > 0
    assert top_gallery_ids(top, qids) == top_gallery_ids(dense, qids)
