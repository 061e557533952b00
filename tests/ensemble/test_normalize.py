"""Normalisations against hand-computed values, and the top-K (ITM) form against its densified twin."""

from __future__ import annotations

import pytest
import torch

from tpas.ensemble.normalize import NORMALIZERS, affine_params, normalize
from tpas.ensemble.rerank_fill import FilledTopK
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix

X = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 9.0]])


def test_registry_uses_ranx_names():
    assert {"min-max", "zmuv", "rank", "none"} <= set(NORMALIZERS)


def test_min_max_global_and_query():
    # global: min 1, max 9
    assert torch.allclose(normalize(X, "min-max", "global"), (X - 1) / 8)
    expected_rows = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    assert torch.allclose(normalize(X, "min-max", "query"), expected_rows)


def test_min_max_constant_row_maps_to_zero_not_nan():
    out = normalize(torch.tensor([[2.0, 2.0], [1.0, 3.0]]), "min-max", "query")
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_zmuv_global_and_query():
    mean, std = X.mean(), X.std(correction=0)
    assert torch.allclose(normalize(X, "zmuv", "global"), (X - mean) / std, atol=1e-6)
    row0 = torch.tensor([1.0, 3.0, 2.0])
    expected0 = (row0 - 2.0) / (2.0 / 3.0) ** 0.5  # mean 2, population variance 2/3
    assert torch.allclose(normalize(X, "zmuv", "query")[0], expected0, atol=1e-6)


def test_rank_global_and_query_ties_share():
    # query scope, row [5, 5, 9]: strictly-lower counts 0, 0, 2 -> (c + 1) / 3
    assert torch.allclose(normalize(X, "rank", "query")[1], torch.tensor([1 / 3, 1 / 3, 1.0]))
    assert torch.allclose(normalize(X, "rank", "query")[0], torch.tensor([1 / 3, 1.0, 2 / 3]))
    # global over 6 cells: 1,2,3,5,5,9 -> lower counts 0,2,1 | 3,3,5
    assert torch.allclose(normalize(X, "rank", "global"), torch.tensor([[1, 3, 2], [4, 4, 6]]) / 6.0)


def test_none_is_identity():
    assert normalize(X, "none") is X


@pytest.mark.parametrize("method,scope", [("minmax", "global"), ("min-max", "row")])
def test_unknown_method_or_scope_names_the_key(method, scope):
    with pytest.raises(TpasInputError, match="normalize"):
        normalize(X, method, scope)


def _topk_matrix(q=6, g=40, k=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(g, generator=gen)[:k] for _ in range(q)])
    vals = torch.randn(q, k, generator=gen) * 3
    return SimsMatrix([f"q{i}" for i in range(q)], [f"g{i}" for i in range(g)], indices=idx, values=vals)


@pytest.mark.parametrize("fill", ["row-min", -7.5, 2.0])
@pytest.mark.parametrize("method", ["min-max", "zmuv", "none"])
@pytest.mark.parametrize("scope", ["global", "query"])
def test_topk_normalisation_equals_dense(fill, method, scope):
    m = _topk_matrix()
    ftk = FilledTopK.from_sims(m, fill)
    dense = m.to_dense(fill)
    assert torch.equal(ftk.dense(), dense)
    p_sparse = ftk.affine_params(method, scope)
    p_dense = affine_params(dense, method, scope)
    got = ftk.rows(0, m.shape[0], p_sparse)
    want = p_dense.apply(dense)
    assert torch.allclose(got, want, atol=1e-5)
    if method == "min-max":  # min-max must be exact: the seed's formula is compared bit for bit
        assert torch.equal(got, want)


def test_row_min_fill_is_the_seed_rule():
    m = SimsMatrix(["a"], ["x", "y", "z", "w"], indices=torch.tensor([[2, 0]]), values=torch.tensor([[4.0, 1.5]]))
    assert torch.equal(FilledTopK.from_sims(m).dense(), torch.tensor([[1.5, 1.5, 4.0, 1.5]]))
    assert torch.equal(FilledTopK.from_sims(m, 0.0).dense(), torch.tensor([[1.5, 0.0, 4.0, 0.0]]))
