"""EDA text augmentation (Wei & Zou, 2019): synonym replacement, random insertion, random swap, random deletion.

The CMP recipe trains on a second, EDA-augmented view of every caption (weight 0.8). The original code looks synonyms
up in WordNet (an nltk download); tpas ships a small synonym table for the words pedestrian descriptions use, so
augmentation works offline and is deterministic for a given `random.Random`.
"""

from __future__ import annotations

import random
import re

# Groups of interchangeable words (each word maps to the other members of its group).
_SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("man", "guy", "male", "gentleman"),
    ("woman", "lady", "female"),
    ("person", "pedestrian", "individual", "someone"),
    ("boy", "kid", "youngster"),
    ("girl", "kid", "youngster"),
    ("wearing", "dressed in", "in", "wears"),
    ("shirt", "top", "tee", "blouse"),
    ("jacket", "coat", "windbreaker"),
    ("sweater", "jumper", "pullover"),
    ("trousers", "pants", "slacks"),
    ("jeans", "denims"),
    ("shoes", "sneakers", "footwear"),
    ("bag", "backpack", "handbag"),
    ("hair", "hairstyle"),
    ("short", "cropped"),
    ("long", "lengthy"),
    ("young", "youthful"),
    ("old", "elderly", "aged"),
    ("slim", "thin", "slender"),
    ("heavyset", "stocky", "chubby"),
    ("falls", "tumbles", "collapses"),
    ("falling", "tumbling", "collapsing"),
    ("fell", "tumbled", "collapsed"),
    ("slips", "skids", "slides"),
    ("slipping", "skidding", "sliding"),
    ("runs", "jogs", "sprints"),
    ("running", "jogging", "sprinting"),
    ("walks", "strolls", "steps"),
    ("walking", "strolling", "stepping"),
    ("jumps", "leaps", "hops"),
    ("jumping", "leaping", "hopping"),
    ("stands", "waits"),
    ("standing", "waiting"),
    ("lies", "lays", "rests"),
    ("lying", "laying", "resting"),
    ("hit", "struck", "knocked"),
    ("ground", "floor"),
    ("street", "road", "avenue"),
    ("lawn", "grass", "field"),
    ("gym", "gymnasium"),
    ("beach", "shore", "seaside"),
    ("photo", "picture", "image"),
    ("shows", "depicts", "displays"),
    ("big", "large"),
    ("small", "little"),
    ("red", "crimson"),
    ("grey", "gray"),
)
SYNONYMS: dict[str, tuple[str, ...]] = {}
for _group in _SYNONYM_GROUPS:
    for _w in _group:
        SYNONYMS[_w] = tuple(dict.fromkeys(SYNONYMS.get(_w, ()) + tuple(o for o in _group if o != _w)))

_PUNCT = re.compile(r"[,.!?;:\"()]")

# Words EDA never replaces (function words carry no synonym and replacing them breaks the sentence).
STOP_WORDS = frozenset((
    "a", "an", "the", "and", "or", "but", "of", "on", "in", "at", "to", "by", "for", "with", "is", "are", "was",
    "were", "be", "been", "his", "her", "their", "its", "this", "that", "there", "who", "which", "while", "as",
    "from", "into", "onto", "over", "under", "near",
))  # fmt: skip


def synonym_replacement(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Replace up to `n` distinct non-stop words that have synonyms with a random synonym."""
    out = list(words)
    candidates = [i for i, w in enumerate(out) if w not in STOP_WORDS and w in SYNONYMS]
    rng.shuffle(candidates)
    for i in candidates[:n]:
        out[i] = rng.choice(SYNONYMS[out[i]])
    return out


def random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Insert a synonym of a random word at a random position, `n` times (no-op when no word has synonyms)."""
    out = list(words)
    for _ in range(n):
        candidates = [w for w in out if w in SYNONYMS and w not in STOP_WORDS]
        if not candidates:
            break
        out.insert(rng.randint(0, len(out)), rng.choice(SYNONYMS[rng.choice(candidates)]))
    return out


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Swap two random positions, `n` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability `p`; always keeps at least one word."""
    if len(words) <= 1:
        return list(words)
    out = [w for w in words if rng.random() > p]
    return out or [rng.choice(words)]


def eda(caption: str, rng: random.Random, alpha: float = 0.1) -> str:
    """One EDA view of `caption`: one of the four operations, chosen at random, with strength `alpha`.

    Words are whitespace-separated; `alpha` is the fraction of words changed (at least one) for replacement,
    insertion and swap, and the deletion probability for deletion. Captions are cleaned (lower case, punctuation
    removed) later by the tokenizer anyway, so it is done here first to hit the synonym table.
    """
    words = _PUNCT.sub(" ", caption.lower()).split()
    if not words:
        return caption
    n = max(1, int(alpha * len(words)))
    op = rng.randrange(4)
    if op == 0:
        out = synonym_replacement(words, n, rng)
    elif op == 1:
        out = random_insertion(words, n, rng)
    elif op == 2:
        out = random_swap(words, n, rng)
    else:
        out = random_deletion(words, alpha, rng)
    return " ".join(out)
