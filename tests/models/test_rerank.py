"""The shared ITM re-rank (`tpas.models.rerank`): engine and trainer call it, so its rules are pinned here."""

from __future__ import annotations

import torch

from tpas.models.base import Features, RetrievalModel
from tpas.models.rerank import in_memory, rerank_topk


class PairModel(RetrievalModel):
    """match(text i, image j) = 10 * text value + image value: every pair's score is known."""

    family = "pair"
    has_match_head = True

    def match(self, text: Features, image: Features) -> torch.Tensor:
        return 10 * text["v"] + image["v"]


def test_topk_by_the_stable_tie_rule_then_filled_with_the_row_minimum() -> None:
    first = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    text = {"v": torch.tensor([1.0, 2.0])}
    images = in_memory({"v": torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])})
    r = rerank_topk(PairModel(), images, text, first, 3, torch.device("cpu"))
    # Row 0: 0.9 first, then the tie at 0.5 in column order; row 1: all tie, the first three columns.
    assert r.top.tolist() == [[1, 0, 2], [0, 1, 2]]
    torch.testing.assert_close(r.scores, torch.tensor([[10.1, 10.0, 10.2], [20.0, 20.1, 20.2]]))
    torch.testing.assert_close(r.filled[0], torch.tensor([10.0, 10.1, 10.2, 10.0, 10.0]))
    torch.testing.assert_close(r.filled[1], torch.tensor([20.0, 20.1, 20.2, 20.0, 20.0]))


def test_batched_equals_one_pair_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    first = torch.randn(6, 9, generator=g)
    text = {"v": torch.randn(6, generator=g)}
    images = in_memory({"v": torch.randn(9, generator=g)})
    calls: list[tuple[int, int]] = []
    one = rerank_topk(PairModel(), images, text, first, 4, torch.device("cpu"), batch_size=1)
    many = rerank_topk(PairModel(), images, text, first, 4, torch.device("cpu"), batch_size=7,
                       progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    torch.testing.assert_close(one.filled, many.filled, atol=1e-6, rtol=0)
    assert torch.equal(one.top, many.top)
    assert calls[-1] == (24, 24) and len(calls) == 4
