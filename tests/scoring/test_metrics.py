"""Metrics kernel: standard IR definitions, checked against a brute-force full sort with hypothesis."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpas.ranking import Ties, relevant_ranks
from tpas.scoring.metrics import METRICS, metrics_from_ranks, per_query_metrics


def brute_metrics(scores: torch.Tensor, rel: list[list[int]]) -> dict[str, float]:
    """Full stable sort of every row, then textbook R@K / AP / INP over the relevance list."""
    r1 = r5 = r10 = ap = inp = 0.0
    for row, cols in zip(scores.tolist(), rel, strict=True):
        relevant = {c for c in cols if c >= 0}
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))
        hits = [c in relevant for c in order]
        positions = [p + 1 for p, h in enumerate(hits) if h]
        r1 += any(hits[:1])
        r5 += any(hits[:5])
        r10 += any(hits[:10])
        ap += sum((i + 1) / p for i, p in enumerate(positions)) / len(relevant)
        inp += len(relevant) / positions[-1]
    n = len(rel)
    return {"R@1": r1 / n * 100, "R@5": r5 / n * 100, "R@10": r10 / n * 100, "mAP": ap / n * 100, "mINP": inp / n * 100}


@st.composite
def cases(draw):
    q = draw(st.integers(1, 6))
    g = draw(st.integers(1, 14))
    cells = draw(st.lists(st.sampled_from([0.0, 0.5, 0.5, 1.0, 2.0, -0.25]), min_size=q * g, max_size=q * g))
    m = draw(st.integers(1, min(3, g)))
    rel = []
    for _ in range(q):
        n = draw(st.integers(1, m))
        cols = draw(st.lists(st.integers(0, g - 1), min_size=n, max_size=n, unique=True))
        rel.append(cols + [-1] * (m - n))
    return torch.tensor(cells).reshape(q, g), rel


@settings(max_examples=150, deadline=None)
@given(cases())
def test_metrics_equal_brute_force_full_sort(case):
    scores, rel = case
    got = metrics_from_ranks(relevant_ranks(scores, torch.tensor(rel), Ties.STABLE))
    want = brute_metrics(scores, rel)
    assert set(got) == set(METRICS)
    for k in METRICS:
        assert math.isclose(got[k], want[k], rel_tol=1e-9, abs_tol=1e-9), k


def test_one_relevant_image_ap_is_inverse_rank():
    per = per_query_metrics(torch.tensor([1, 2, 4, 11]))
    assert per["AP"].tolist() == [1.0, 0.5, 0.25, 1 / 11]
    assert per["INP"].tolist() == per["AP"].tolist()
    assert per["R@1"].tolist() == [1, 0, 0, 0]
    assert per["R@5"].tolist() == [1, 1, 1, 0]
    assert per["R@10"].tolist() == [1, 1, 1, 0]
    assert per["AP@10"].tolist() == [1.0, 0.5, 0.25, 0.0]  # the leaderboard's top-10 mAP drops rank 11
    m = metrics_from_ranks(torch.tensor([1, 2, 4, 11]))
    assert m["R@1"] == 25.0 and m["R@5"] == 75.0 and math.isclose(m["mAP"], (1 + 0.5 + 0.25 + 1 / 11) / 4 * 100)


def test_several_relevant_images_textbook_values():
    # Relevant at positions 1, 3, 6: AP = (1/1 + 2/3 + 3/6) / 3, INP = 3/6.
    per = per_query_metrics(torch.tensor([[6, 1, 3, 0]]))
    assert math.isclose(float(per["AP"][0]), (1 + 2 / 3 + 0.5) / 3)
    assert math.isclose(float(per["INP"][0]), 0.5)
    assert int(per["rank"][0]) == 1


def test_invalid_ranks_are_rejected():
    with pytest.raises(ValueError, match="at least one relevant"):
        per_query_metrics(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="integers"):
        per_query_metrics(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=">= 1"):
        per_query_metrics(torch.tensor([-1]))
