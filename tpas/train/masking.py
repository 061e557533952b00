"""Masked-language-modelling targets as the CMP/APTM recipe builds them.

Two ways to choose the positions (`MaskingConfig.candidates`):

- `padded` (the original code's generator, the default): it runs on the ids padded to `max_tokens`, so the number of
  masks is 25% of the padded length (at most 10: with 56 tokens always 10) and every position after [CLS] can be
  chosen, [SEP] and [PAD] included (the model then learns to predict them). Start positions are drawn in random
  order; with probability 0.2 a start opens a skip-gram span of 2..3 tokens; a span is widened to whole words (a
  WordPiece `##` piece joins its word); if the spans overshoot, a random subset of the chosen positions is kept.
  A random replacement may be any id of the vocabulary.
- `caption`: only the caption's own tokens (never [CLS]/[SEP]/[PAD]), 25% of them, at most 10; a whole word that no
  longer fits is skipped rather than cut; random replacements are never special tokens.

Then each chosen position becomes [MASK] (80%), a random token (10%) or stays (10%); the model predicts the original
ids at the chosen positions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import TpasInputError


@dataclass(frozen=True)
class MaskingConfig:
    """Parameters of the MLM masking (defaults = the CMP config)."""

    mask_prob: float = 0.25
    max_masks: int = 10
    skipgram_prob: float = 0.2
    skipgram_size: int = 3
    whole_word: bool = True
    mask_token_prob: float = 0.8  # [MASK]
    random_token_prob: float = 0.1  # a random token; the rest stay unchanged
    candidates: str = "padded"  # padded (the original) | caption (see the module docstring)

    def __post_init__(self) -> None:
        if self.candidates not in ("padded", "caption"):
            raise TpasInputError(f"masking.candidates {self.candidates!r}; expected padded or caption")


@dataclass(frozen=True)
class MaskedText:
    """One masked caption: the model input and the MLM targets (fixed size, so batches stack)."""

    input_ids: torch.Tensor  # [L] ids with the chosen positions replaced
    masked_pos: torch.Tensor  # [max_masks] positions (0 = padding slot; position 0 is [CLS], never masked)
    masked_ids: torch.Tensor  # [max_masks] original ids at those positions, -100 in padding slots


def _word_spans(tokens: Sequence[str], candidates: list[int]) -> dict[int, tuple[int, int]]:
    """For each candidate position, the [start, end) of the whole word it belongs to (`##` pieces join)."""
    spans: dict[int, tuple[int, int]] = {}
    cand = set(candidates)
    i = 0
    while i < len(tokens):
        if i not in cand:
            i += 1
            continue
        j = i + 1
        while j < len(tokens) and j in cand and tokens[j].startswith("##"):
            j += 1
        for k in range(i, j):
            spans[k] = (i, j)
        i = j
    # A leading "##" piece (its word started before the candidates) forms its own word.
    return spans


def _choose_padded(tokens: Sequence[str], rng: random.Random, cfg: MaskingConfig) -> list[int]:
    """The original generator's positions over the whole padded sequence (see the module docstring)."""
    length = len(tokens)
    n_pred = min(cfg.max_masks, max(1, round(length * cfg.mask_prob)))
    order = list(range(1, length))
    rng.shuffle(order)
    chosen: set[int] = set()
    for start in order:
        if len(chosen) >= n_pred:
            break
        if start in chosen:
            continue
        end = start + 1
        if cfg.skipgram_prob > 0 and cfg.skipgram_size >= 2 and rng.random() < cfg.skipgram_prob:
            end = start + rng.randint(2, cfg.skipgram_size)
        if cfg.whole_word:
            while start >= 0 and tokens[start].startswith("##"):
                start -= 1
            while end < length and tokens[end].startswith("##"):
                end += 1
        for p in range(start, end):
            if not 0 < p < length:
                break
            chosen.add(p)
    picked = sorted(chosen)
    if len(picked) > n_pred:
        rng.shuffle(picked)
        picked = sorted(picked[:n_pred])
    return picked


def _choose_caption(
    ids: torch.Tensor, length: int, tokens: Sequence[str], rng: random.Random, cfg: MaskingConfig, specials: set[int]
) -> list[int]:
    """Positions among the caption's own tokens, whole words that fit (see the module docstring)."""
    candidates = [i for i in range(length) if int(ids[i]) not in specials]
    n_pred = min(cfg.max_masks, max(1, round(length * cfg.mask_prob))) if candidates else 0
    spans = _word_spans(tokens, candidates) if cfg.whole_word else {i: (i, i + 1) for i in candidates}
    order = list(candidates)
    rng.shuffle(order)
    chosen: list[int] = []
    chosen_set: set[int] = set()
    cand_set = set(candidates)
    for start in order:
        if len(chosen) >= n_pred:
            break
        if start in chosen_set:
            continue
        span_len = 1
        if cfg.skipgram_size >= 2 and rng.random() < cfg.skipgram_prob:
            span_len = rng.randint(2, cfg.skipgram_size)
        # Grow word by word from the start position until the span covers span_len tokens.
        first, last = spans[start]
        while last - first < span_len and last in cand_set:
            last = spans[last][1]
        positions = [p for p in range(first, last) if p not in chosen_set]
        if len(chosen) + len(positions) > n_pred and chosen:
            continue  # a whole word that no longer fits; try another start
        for p in positions:
            chosen.append(p)
            chosen_set.add(p)
    return sorted(chosen[: cfg.max_masks])


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: Sequence[str],
    rng: random.Random,
    cfg: MaskingConfig,
    *,
    mask_token_id: int,
    special_ids: Sequence[int],
    vocab_size: int,
) -> MaskedText:
    """Mask one tokenized caption ([L] ids, [L] attention mask, its L WordPiece strings) -> MaskedText.

    With `rng` seeded per sample, the result does not depend on batch composition, worker or rank.
    """
    ids = input_ids.clone()
    specials = set(int(s) for s in special_ids)
    if cfg.candidates == "padded":
        chosen = _choose_padded(tokens, rng, cfg)
    else:
        chosen = _choose_caption(ids, int(attention_mask.sum()), tokens, rng, cfg, specials)
    originals = [int(ids[p]) for p in chosen]
    for p in chosen:
        r = rng.random()
        if r < cfg.mask_token_prob:
            ids[p] = mask_token_id
        elif r < cfg.mask_token_prob + cfg.random_token_prob:
            token = rng.randrange(vocab_size)
            while cfg.candidates == "caption" and token in specials:
                token = rng.randrange(vocab_size)
            ids[p] = token
    pos = torch.zeros(cfg.max_masks, dtype=torch.long)
    tgt = torch.full((cfg.max_masks,), -100, dtype=torch.long)
    if chosen:
        pos[: len(chosen)] = torch.tensor(chosen, dtype=torch.long)
        tgt[: len(chosen)] = torch.tensor(originals, dtype=torch.long)
    return MaskedText(input_ids=ids, masked_pos=pos, masked_ids=tgt)
