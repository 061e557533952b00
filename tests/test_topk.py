"""Blocked top-K similarity: exactly the dense matrix's stable top-K (ties in gallery order), any block size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpas.ranking import topk_stable
from tpas.topk import StreamingTopK, block_cols, topk_similarity


def _feats(q: int, g: int, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Small integer features: many dot products are equal, so the tie rule decides most rows.
    return torch.randint(-1, 2, (q, d), generator=gen).float(), torch.randint(-1, 2, (g, d), generator=gen).float()


@pytest.mark.parametrize("block", [1, 3, 7, 50, 1000])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_blocked_topk_equals_the_dense_stable_topk(block, k):
    qf, gf = _feats(9, 40)
    dense = qf @ gf.T
    idx, val = topk_similarity(qf, gf, k, block=block)
    want = topk_stable(dense, k)
    assert torch.equal(idx, want) and torch.equal(val, dense.gather(1, want))


def test_blocks_may_come_from_an_iterable_and_a_custom_similarity():
    gen = torch.Generator().manual_seed(3)
    qf = torch.randint(0, 3, (5, 4, 8), generator=gen).float()  # 4 query tokens (BLIP-2 style): max over tokens
    gf = torch.randint(0, 3, (23, 8), generator=gen).float()

    def max_tokens(q, g):
        return torch.einsum("qtd,gd->qtg", q, g).amax(dim=1)

    chunks = [gf[:4], gf[4:5], gf[5:19], gf[19:]]  # uneven blocks, in gallery order
    seen = []
    idx, val = topk_similarity(qf, iter(chunks), 6, similarity=max_tokens, progress=seen.append)
    dense = max_tokens(qf, gf)
    assert torch.equal(idx, topk_stable(dense, 6)) and seen == [4, 5, 19, 23]
    assert torch.equal(val, dense.gather(1, idx))


def test_all_equal_scores_keep_the_first_columns_and_k_beyond_the_gallery_is_cut():
    acc = StreamingTopK(2, 3)
    for _ in range(4):
        acc.add(torch.zeros(2, 2))
    assert acc.indices.tolist() == [[0, 1, 2], [0, 1, 2]] and acc.n_cols == 8
    idx, _ = topk_similarity(torch.ones(1, 2), torch.ones(3, 2), 10, block=2)
    assert idx.tolist() == [[0, 1, 2]]
    assert block_cols(2000, 100) == (64 << 20) // 8000 and block_cols(10**9, 100) == 101


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 60), st.integers(1, 70), st.integers(1, 70), st.integers(0, 99))
def test_blocked_topk_property(q, g, k, block, seed):
    qf, gf = _feats(q, g, d=2, seed=seed)
    idx, _ = topk_similarity(qf, gf, k, block=block)
    assert torch.equal(idx, topk_stable(qf @ gf.T, k))
