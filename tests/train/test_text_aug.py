"""EDA: the four operations, determinism, and the offline synonym table."""

from __future__ import annotations

import random
from collections import Counter

from tpas.train.text_aug import SYNONYMS, eda, random_deletion, random_insertion, random_swap, synonym_replacement

CAPTION = "A man in a red jacket and blue trousers slips and falls on a wet parking lot."


def test_same_generator_state_gives_the_same_view() -> None:
    views = [eda(CAPTION, random.Random(7)) for _ in range(3)]
    assert len(set(views)) == 1
    assert len({eda(CAPTION, random.Random(s)) for s in range(40)}) > 5


def test_synonym_replacement_uses_the_table_and_skips_stop_words() -> None:
    words = ["a", "man", "in", "a", "red", "jacket", "falls"]
    out = synonym_replacement(words, 10, random.Random(0))
    assert len(out) == len(words)
    for before, after in zip(words, out, strict=True):
        assert after == before or after in SYNONYMS[before]
    assert out[0] == "a" and out[2] == "in"
    assert out != words


def test_insertion_swap_and_deletion_keep_their_invariants() -> None:
    words = ["the", "woman", "runs", "on", "the", "lawn"]
    ins = random_insertion(words, 2, random.Random(1))
    assert len(ins) == len(words) + 2
    assert Counter(ins) - Counter(words)  # something new was inserted
    assert Counter(random_swap(words, 3, random.Random(2))) == Counter(words)
    assert random_deletion(["one"], 0.9, random.Random(3)) == ["one"]
    kept = random_deletion(words, 0.999, random.Random(4))
    assert len(kept) == 1 and kept[0] in words


def test_punctuation_does_not_hide_words_from_the_table() -> None:
    rng = random.Random(0)
    outs = {eda("lawn.", rng) for _ in range(50)}
    assert outs & set(SYNONYMS["lawn"])
