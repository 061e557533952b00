"""MLM masking. `caption` mode: 25% of real tokens, at most 10, whole words, never special tokens, 80/10/10
replacement. `padded` mode (the original generator): see tests/train/test_recipe.py."""

from __future__ import annotations

import itertools
import random

import torch

from tpas.train.masking import MaskingConfig, mask_tokens

MASK, CLS, SEP, PAD = 4, 2, 3, 0
VOCAB = 50


def _caption(n_words: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """[CLS] words (some split into ## pieces) [SEP] [PAD]...; ids of pieces are >= 5."""
    tokens = ["[CLS]"]
    for w in range(n_words):
        tokens.append(f"w{w}")
        if rng.random() < 0.3:
            tokens += [f"##p{w}a", f"##p{w}b"][: rng.randint(1, 2)]
    tokens.append("[SEP]")
    length = 40
    ids = [CLS] + [rng.randrange(5, VOCAB) for _ in tokens[1:-1]] + [SEP]
    ids += [PAD] * (length - len(ids))
    mask = [1] * len(tokens) + [0] * (length - len(tokens))
    return torch.tensor(ids), torch.tensor(mask), tokens + ["[PAD]"] * (length - len(tokens))


CAPTION = MaskingConfig(candidates="caption")


def _run(n_words: int, seed: int, cfg: MaskingConfig = CAPTION):
    rng = random.Random(seed)
    ids, att, tokens = _caption(n_words, rng)
    out = mask_tokens(ids, att, tokens, rng, cfg, mask_token_id=MASK, special_ids=[PAD, 1, CLS, SEP, MASK],
                      vocab_size=VOCAB)  # fmt: skip
    return ids, att, tokens, out


def test_counts_positions_and_targets() -> None:
    for seed in range(200):
        ids, att, _tokens, out = _run(random.Random(seed).randint(3, 25), seed)
        chosen = out.masked_pos[out.masked_ids != -100].tolist()
        real = int(att.sum()) - 2
        assert 1 <= len(chosen) <= 10
        assert len(chosen) <= max(round((real + 2) * 0.25), 1) + 2  # whole words may add a piece or two
        assert all(0 < p < int(att.sum()) - 1 for p in chosen)  # never [CLS], [SEP] or padding
        assert out.masked_ids[: len(chosen)].tolist() == [int(ids[p]) for p in chosen]
        untouched = [i for i in range(len(ids)) if i not in chosen]
        assert torch.equal(out.input_ids[untouched], ids[untouched])


def test_whole_words_are_masked_together() -> None:
    for seed in range(200):
        _, _att, tokens, out = _run(12, seed)
        chosen = set(out.masked_pos[out.masked_ids != -100].tolist())
        for p in chosen:
            if tokens[p].startswith("##"):
                assert p - 1 in chosen, (tokens, sorted(chosen))
            if p + 1 < len(tokens) and tokens[p + 1].startswith("##") and len(chosen) < 10:
                assert p + 1 in chosen


def test_replacement_split_is_80_10_10() -> None:
    masked = random_ = kept = 0
    for seed in range(600):
        _ids, _, _, out = _run(20, seed)
        for p, orig in zip(out.masked_pos.tolist(), out.masked_ids.tolist(), strict=True):
            if orig == -100:
                continue
            new = int(out.input_ids[p])
            if new == MASK:
                masked += 1
            elif new == orig:
                kept += 1
            else:
                random_ += 1
                assert new >= 5
    total = masked + random_ + kept
    assert abs(masked / total - 0.8) < 0.03
    # A random replacement can draw the original id by chance (1 in 45 here); it then counts as kept.
    assert abs(random_ / total - 0.1) < 0.03 and abs(kept / total - 0.1) < 0.03


def test_skipgram_spans_appear_and_can_be_switched_off() -> None:
    def adjacent_pairs(cfg: MaskingConfig) -> int:
        n = 0
        for seed in range(300):
            _, _, tokens, out = _run(30, seed, cfg)
            chosen = sorted(out.masked_pos[out.masked_ids != -100].tolist())
            n += sum(1 for a, b in itertools.pairwise(chosen)
                     if b == a + 1 and not tokens[b].startswith("##"))  # fmt: skip
        return n

    plain = MaskingConfig(skipgram_prob=0.0, candidates="caption")
    assert adjacent_pairs(MaskingConfig(skipgram_prob=1.0, candidates="caption")) > 2 * adjacent_pairs(plain)
