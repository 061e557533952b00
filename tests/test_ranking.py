"""Ranking rule: topk_stable, gt_ranks, relevant_ranks and topk_relevant_ranks against a full-sort brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tpas.ranking as ranking
from tpas.ranking import Ties, gt_ranks, relevant_ranks, topk_relevant_ranks, topk_stable


def brute_positions(row: list[float], relevant: set[int], ties: Ties) -> dict[int, int]:
    """1-based position of every column after a full sort: score desc, then the tie rule, then column asc."""

    def key(c: int) -> tuple:
        tie = {Ties.STABLE: 0, Ties.OPTIMISTIC: 0 if c in relevant else 1, Ties.PESSIMISTIC: 1 if c in relevant else 0}
        return (-row[c], tie[ties], c)

    order = sorted(range(len(row)), key=key)
    return {c: p + 1 for p, c in enumerate(order)}


def brute_ranks(scores: torch.Tensor, rel: list[list[int]], ties: Ties) -> list[list[int]]:
    out = []
    for row, cols in zip(scores.tolist(), rel, strict=True):
        pos = brute_positions(row, {c for c in cols if c >= 0}, ties)
        out.append([pos[c] if c >= 0 else 0 for c in cols])
    return out


# Few distinct values, so ties are frequent; fp16-like rounding is the case that matters in practice.
score_values = st.sampled_from([0.0, 0.25, 0.5, 0.5, 1.0, -1.0, 3.0])


@st.composite
def matrices(draw, max_q: int = 5, max_g: int = 9):
    q = draw(st.integers(1, max_q))
    g = draw(st.integers(1, max_g))
    cells = draw(st.lists(score_values, min_size=q * g, max_size=q * g))
    return torch.tensor(cells, dtype=torch.float32).reshape(q, g)


@st.composite
def with_relevant(draw, max_m: int = 3):
    s = draw(matrices())
    q, g = s.shape
    m = draw(st.integers(1, min(max_m, g)))
    rel = []
    for _ in range(q):
        n = draw(st.integers(1, m))
        cols = draw(st.lists(st.integers(0, g - 1), min_size=n, max_size=n, unique=True))
        rel.append(cols + [-1] * (m - n))
    return s, rel


@settings(max_examples=150, deadline=None)
@given(matrices(), st.data(), st.sampled_from(list(Ties)))
def test_gt_ranks_equal_full_sort(scores, data, ties):
    q, g = scores.shape
    gt = data.draw(st.lists(st.integers(0, g - 1), min_size=q, max_size=q))
    got = gt_ranks(scores, torch.tensor(gt), ties)
    assert got.tolist() == [r[0] for r in brute_ranks(scores, [[c] for c in gt], ties)]


@settings(max_examples=150, deadline=None)
@given(with_relevant(), st.sampled_from(list(Ties)))
def test_relevant_ranks_equal_full_sort(case, ties):
    scores, rel = case
    assert relevant_ranks(scores, torch.tensor(rel), ties).tolist() == brute_ranks(scores, rel, ties)


@settings(max_examples=100, deadline=None)
@given(with_relevant(), st.sampled_from(list(Ties)), st.data())
def test_topk_relevant_ranks_equal_full_sort_with_unkept_cells_last(case, ties, data):
    scores, rel = case
    q, g = scores.shape
    k = data.draw(st.integers(0, g))
    idx = topk_stable(scores, k)
    # Shuffle each row's kept slots: the result must not depend on slot order.
    perm = torch.stack([torch.randperm(k) for _ in range(q)]) if k else idx
    idx = idx.gather(1, perm)
    vals = scores.gather(1, idx)
    # Brute force: kept cells keep their scores, every other cell ties below all of them.
    dense = torch.full_like(scores, float(scores.min()) - 1.0)
    dense.scatter_(1, idx, vals)
    got = topk_relevant_ranks(idx, vals, g, torch.tensor(rel), ties)
    assert got.tolist() == brute_ranks(dense, rel, ties)


@settings(max_examples=100, deadline=None)
@given(matrices(), st.integers(0, 12))
def test_topk_stable_is_prefix_of_stable_sort_and_agrees_with_gt_ranks(scores, k):
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    k = min(k, scores.shape[1])
    assert topk_stable(scores, k).tolist() == order[:, :k].tolist()
    # The stable rank of any column is its position in the stable order (what the ranking file writes).
    cols = order[:, -1]
    assert gt_ranks(scores, cols).tolist() == [scores.shape[1]] * scores.shape[0]


@settings(max_examples=100, deadline=None)
@given(st.data(), st.integers(1, 4), st.integers(2, 3), st.integers(0, 2))
def test_blocked_topk_stable_equals_stable_sort(data, k, block, extra):
    # Wide rows with few distinct values: many ties across blocks, a short last block, and rows that must be redone.
    q = data.draw(st.integers(1, 4))
    g = data.draw(st.integers((k + extra + 1) * block * 4, 90))
    cells = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0]), min_size=q * g, max_size=q * g))
    scores = torch.tensor(cells).reshape(q, g)
    want = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ranking, "_BLOCK", block)
        mp.setattr(ranking, "_EXTRA_BLOCKS", extra)
        mp.setattr(ranking, "_BLOCKED_MIN_COLS", 0)
        got = topk_stable(scores, k)
    assert got.tolist() == want.tolist()


def test_blocked_topk_on_a_large_fp16_like_matrix():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(40, 9000, generator=gen).mul(0.05).half().float()  # ties at the 10th place are common
    assert torch.equal(topk_stable(scores, 10), torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :10])


def test_small_chunks_and_row_subset_give_same_ranks(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (37, 23), generator=gen).float()
    gt = torch.randint(0, 23, (37,), generator=gen)
    want = {t: gt_ranks(scores, gt, t) for t in Ties}
    monkeypatch.setattr(ranking, "_CHUNK_CELLS", 50)  # 2 rows per chunk
    for t in Ties:
        assert torch.equal(gt_ranks(scores, gt, t), want[t])
        rows = torch.tensor([5, 0, 36])
        assert torch.equal(gt_ranks(scores, gt[rows], t, rows=rows), want[t][rows])


def test_half_precision_and_float64_inputs_rank_exactly():
    scores = torch.tensor([[0.5, 0.25, 0.5, 0.5], [1.0, 2.0, 2.0, 0.0]])
    gt = torch.tensor([2, 2])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert gt_ranks(scores.to(dtype), gt).tolist() == [2, 2]
        assert gt_ranks(scores.to(dtype), gt, "optimistic").tolist() == [1, 1]
        assert gt_ranks(scores.to(dtype), gt, "pessimistic").tolist() == [3, 2]


def test_bad_arguments_are_rejected():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="gt_cols must have shape"):
        gt_ranks(s, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="relevant columns must lie"):
        gt_ranks(s, torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        gt_ranks(s, torch.tensor([0, 1]), "random")


def test_padding_cells_tied_with_column_zero_leave_ranks_unchanged():
    # Identity matching pads short rows with -1; a padding cell reads column 0's score, which here ties with most of
    # the row, so without `valid` in the tie mask it would go through the per-cell tie loop (and must stay 0).
    rows = [[1.0, 1.0, 1.0, 0.0, 1.0, 2.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 1.0, 1.0, 3.0, 0.0]]
    scores = torch.tensor(rows)
    rel = [[4, -1, -1], [5, 2, -1], [1, 2, 3]]
    for ties in Ties:
        assert relevant_ranks(scores, torch.tensor(rel), ties).tolist() == brute_ranks(scores, rel, ties)
