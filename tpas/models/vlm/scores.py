"""Score modes: how the logits at the last prompt position become one number per pair (higher = better).

- `yes-no`: max logit over the "yes" token variants minus max logit over the "no" variants.
- `p-yes`: the summed softmax probability (over the whole vocabulary) of the "yes" variants (VQAScore).
- `qwen3-vl-reranker`: sigmoid of logit("yes") - logit("no") for the vocabulary entries "yes" and "no", as the
  Qwen3-VL-Reranker scoring script computes it (there with a linear layer of the two lm_head rows; the same value).
- `pairwise`: two images per prompt; max logit over the "1" variants minus max over the "2" variants (the margin for
  "the first image matches better"), read by pivot-promote (`tpas.models.vlm.pairwise`).
- `cloze`: no logit score; the model's greedy answer fills a masked caption (`tpas.models.vlm.cloze`).
A word's variants are the word encoded without special tokens with and without a leading space, kept when exactly
one token: byte-level BPE vocabularies hold "yes" and " yes" as different tokens, and "YES" is often two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import TpasInputError

POINTWISE_MODES = ("yes-no", "p-yes", "qwen3-vl-reranker")
SCORE_MODES = (*POINTWISE_MODES, "pairwise", "cloze")
DEFAULT_YES = "yes,Yes,YES"
DEFAULT_NO = "no,No,NO"
PAIRWISE_WORDS = ("1", "2")  # the answers of the two-image prompt: first image, second image


@dataclass(frozen=True)
class Answers:
    """The token ids whose logits a score reads, with the strings they came from (for meta)."""

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]
    yes_tokens: tuple[str, ...]
    no_tokens: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "yes_ids": list(self.yes_ids),
            "no_ids": list(self.no_ids),
            "yes_tokens": list(self.yes_tokens),
            "no_tokens": list(self.no_tokens),
        }


def _words(text: str, option: str) -> list[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise TpasInputError(f"{option} lists no words")
    return words


def single_token_variants(tokenizer: Any, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids (and spellings) of every word with and without a leading space that encodes to exactly one token."""
    ids: list[int] = []
    spelled: list[str] = []
    for word in words:
        for variant in (word, " " + word):
            enc = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(int(enc[0]))
                spelled.append(variant)
    return ids, spelled


def resolve_answers(tokenizer: Any, score: str, yes: str | None, no: str | None) -> Answers:
    """The yes/no token ids of `score`; TpasInputError when a side has no single-token variant."""
    if score not in SCORE_MODES:
        raise TpasInputError(f"--score {score!r}; expected one of {', '.join(SCORE_MODES)}")
    if score in ("qwen3-vl-reranker", "pairwise", "cloze") and (yes is not None or no is not None):
        reads = {"qwen3-vl-reranker": "it reads 'yes' and 'no'", "pairwise": "it reads '1' and '2'"}
        raise TpasInputError(f"--yes/--no do not apply to --score {score} ({reads.get(score, 'it generates text')})")
    if score == "cloze":
        return Answers((), (), (), ())
    if score == "qwen3-vl-reranker":
        vocab = tokenizer.get_vocab()
        missing = [w for w in ("yes", "no") if w not in vocab]
        if missing:
            raise TpasInputError(f"--score qwen3-vl-reranker: the vocabulary has no token {missing[0]!r}")
        return Answers((vocab["yes"],), (vocab["no"],), ("yes",), ("no",))
    sides = []
    words = (("answer 1", PAIRWISE_WORDS[0]), ("answer 2", PAIRWISE_WORDS[1])) if score == "pairwise" else None
    for option, text in words or (("--yes", yes or DEFAULT_YES), ("--no", no or DEFAULT_NO)):
        words = _words(text, option)
        ids, spelled = single_token_variants(tokenizer, words)
        if not ids:
            raise TpasInputError(
                f"{option} {text!r}: no variant (with or without a leading space) is a single token of this tokenizer"
            )
        sides.append((ids, spelled))
    (yes_ids, yes_sp), (no_ids, no_sp) = sides
    shared = set(yes_ids) & set(no_ids)
    if shared:
        raise TpasInputError(f"--yes and --no share the token id {sorted(shared)[0]}")
    return Answers(tuple(yes_ids), tuple(no_ids), tuple(yes_sp), tuple(no_sp))


def score_logits(score: str, logits: torch.Tensor, answers: Answers) -> torch.Tensor:
    """[B] scores from the last-position logits [B, V] (computed in float32)."""
    logits = logits.float()
    yes = logits[:, list(answers.yes_ids)]
    no = logits[:, list(answers.no_ids)]
    if score in ("yes-no", "pairwise"):
        return yes.max(dim=1).values - no.max(dim=1).values
    if score == "p-yes":
        return torch.softmax(logits, dim=1)[:, list(answers.yes_ids)].sum(dim=1)
    return torch.sigmoid(yes[:, 0] - no[:, 0])
