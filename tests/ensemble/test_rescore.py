"""Re-scoring: dual softmax, inverted softmax with and without a query bank, QB-Norm (dynamic), Sinkhorn; all
transductive."""

from __future__ import annotations

import pytest
import torch
from ens_helpers import ids, save

from tpas.ensemble.rescore import rescore
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix

S = torch.tensor([[0.9, 0.2, 0.4], [0.8, 0.1, 0.3], [0.1, 0.7, 0.2], [0.3, 0.3, 0.9]])


def _m(s=S):
    return SimsMatrix(ids("q", s.shape[0]), ids("g", s.shape[1]), scores=s.clone())


def test_dual_softmax_formula():
    out, rep = rescore(_m(), {"method": "dual-softmax", "temperature": 0.1})
    want = S * torch.softmax(S / 0.1, dim=0)
    assert torch.allclose(out.scores, want, atol=1e-6)
    assert rep["transductive"] and out.meta["transductive"] is True


def test_inverted_softmax_without_and_with_bank(tmp_path):
    out, _ = rescore(_m(), {"method": "inverted-softmax", "temperature": 0.5})
    assert torch.allclose(out.scores, S / 0.5 - torch.logsumexp(S / 0.5, dim=0), atol=1e-5)
    bank = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    bank_path = save(SimsMatrix(["b0", "b1"], ["g2", "g0", "g1"], scores=bank[:, [2, 0, 1]]), tmp_path / "bank.pt")
    out, _ = rescore(_m(), {"method": "inverted-softmax", "temperature": 0.5, "bank": str(bank_path)})
    assert torch.allclose(out.scores, S / 0.5 - torch.logsumexp(bank / 0.5, dim=0), atol=1e-5)


def test_qb_norm_normalises_only_queries_whose_top1_is_a_bank_hub(tmp_path):
    # Bank queries both retrieve g0 first: the activation set is {g0}. Queries 0 and 1 (top-1 g0) are normalised,
    # queries 2 and 3 (top-1 g1, g2) keep their scores.
    bank = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    bank_path = save(SimsMatrix(["b0", "b1"], ["g2", "g0", "g1"], scores=bank[:, [2, 0, 1]]), tmp_path / "bank.pt")
    out, rep = rescore(_m(), {"method": "qb-norm", "temperature": 0.5, "bank": str(bank_path)})
    inverted = S / 0.5 - torch.logsumexp(bank / 0.5, dim=0)
    assert torch.allclose(out.scores[:2], inverted[:2], atol=1e-5) and torch.equal(out.scores[2:], S[2:])
    assert rep["activation_set"] == 1 and rep["rows_normalised"] == 2 and out.meta["transductive"] is True
    # Without a bank the test queries are the bank: every query's top-1 is active, so it is the inverted softmax.
    plain, rep = rescore(_m(), {"method": "qb-norm", "temperature": 0.5})
    assert torch.equal(plain.scores, rescore(_m(), {"method": "inverted-softmax", "temperature": 0.5})[0].scores)
    assert rep["rows_normalised"] == 4


def test_sinkhorn_balances_rows_and_columns():
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(6, 9, generator=gen)
    out, _ = rescore(_m(s), {"method": "sinkhorn", "epsilon": 0.1, "iterations": 200})
    p = out.scores.double().exp()
    assert torch.allclose(p.sum(0), torch.full((9,), 1 / 9, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(p.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"method": "softmax3"}, "rescore.method"),
        ({"temperature": 0}, "rescore.temperature"),
        ({"method": "dual-softmax", "bank": "x.pt"}, "only inverted-softmax and qb-norm use a query bank"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(TpasInputError, match=match):
        rescore(_m(), params)


@pytest.mark.parametrize(
    "params",
    [
        {"method": "dual-softmax", "temperature": 0.1},
        {"method": "inverted-softmax", "temperature": 0.1},
        {"method": "qb-norm", "temperature": 0.1},
        {"method": "qb-norm", "temperature": 0.1, "bank": "bank.pt"},
        {"method": "sinkhorn", "epsilon": 0.1, "iterations": 20},
    ],
)
def test_rescore_on_a_topk_matrix_stays_topk_and_equals_the_dense_path(params, tmp_path):
    # The dense path re-scores the row-min densified matrix; the top-K path must give its kept cells the same scores
    # without densifying (cells not kept count as the row minimum in every column sum).
    gen = torch.Generator().manual_seed(3)
    q, g, k = 12, 30, 8
    dense = torch.rand(q, g, generator=gen)
    dense[:, :4] += 0.5  # popular images: kept by many rows, so the column sums matter
    top = SimsMatrix(ids("q", q), ids("g", g), scores=dense).top_k(k)
    perm = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(i)) for i in range(q)])
    top = SimsMatrix(top.query_ids, top.gallery_ids, indices=top.indices.gather(1, perm),
                     values=top.values.gather(1, perm))  # fmt: skip
    if params.get("bank"):
        bank = SimsMatrix(ids("b", 5), ids("g", g), scores=torch.rand(5, g, generator=gen)).top_k(6)
        params = {**params, "bank": str(save(bank, tmp_path / "bank.pt"))}
    out_k, rep_k = rescore(top, params)
    out_d, rep_d = rescore(SimsMatrix(top.query_ids, top.gallery_ids, scores=top.to_dense("row-min")), params)
    assert out_k.k == k and torch.equal(out_k.indices, top.indices.sort(dim=1).values) and rep_k == rep_d
    torch.testing.assert_close(out_k.values, out_d.scores.gather(1, out_k.indices), atol=1e-6, rtol=1e-6)
