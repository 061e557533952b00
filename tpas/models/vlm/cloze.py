"""Cloze re-ranking text logic (AnomalyLMM's scheme): mask a caption's behaviour and colour words, ask the model to
fill the blanks from a candidate image, and score the candidate by how many blanks it fills with the masked word.

Pure functions, no model: `make_cloze` masks, `cloze_prompt` asks, `parse_answers` reads the model's reply,
`cloze_score` compares. AnomalyLMM weights words by a "behavioral saliency prediction" whose method was not published;
tpas masks every word of the lexicon's kinds instead (behaviour words and colour words), each blank counting equally.

The lexicon (`tpas/models/data/cloze_lexicon.json`, extensible with a user file of the same shape) maps each kind
("behaviour", "colour") to groups of words that count as the same answer: inflections ("falls", "fell", "falling")
and synonyms ("tumbles", "collapses"). A blank matches when the answer and the masked word fall in the same group,
or are equal after normalisation (lower case, punctuation and articles dropped). UNKNOWN, an empty or a missing answer
never matches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import TpasInputError

KINDS = ("behaviour", "colour")
DEFAULT_LEXICON = Path(__file__).resolve().parent.parent / "data" / "cloze_lexicon.json"
UNKNOWN = "unknown"
_ARTICLES = re.compile(r"^(?:a|an|the|is|are|being)\s+")
# An answer marker: "1:", "1.", "1)", "1 -", "[1]", "(1)", "blank 1:" at the start of the text or after a separator.
_MARKER = re.compile(
    r"(?:(?<=^)|(?<=[\s,;]))(?:blank\s*)?(?:\[(\d{1,2})\]\s*[:.=\-]?|\((\d{1,2})\)\s*[:.=\-]?|(\d{1,2})\s*[:.=)\-])",
    re.IGNORECASE,
)


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces, leading articles/auxiliaries dropped."""
    text = re.sub(r"[^\w\s'-]", " ", text.lower()).replace("'", "")
    text = " ".join(text.split())
    while True:
        shorter = _ARTICLES.sub("", text)
        if shorter == text:
            return text
        text = shorter


@dataclass(frozen=True)
class Blank:
    """One masked word: its number in the masked caption (1-based), the caption's text, its kind and group."""

    number: int
    word: str
    kind: str
    group: str


@dataclass(frozen=True)
class Cloze:
    """A caption with its blanks: `masked` shows them as [1], [2], ...; `blanks` lists what was removed."""

    caption: str
    masked: str
    blanks: tuple[Blank, ...]


class Lexicon:
    """Word groups per kind, and the pattern that finds any of their words in a caption (longest first)."""

    def __init__(self, groups: dict[str, dict[str, list[str]]]) -> None:
        self.groups = groups
        self._group_of: dict[str, tuple[str, str]] = {}
        raw: set[str] = set()
        for kind in KINDS:
            for group, words in groups.get(kind, {}).items():
                for w in words:
                    self._group_of.setdefault(normalise(w), (kind, group))
                    raw.add(" ".join(w.lower().split()))
        # Searched as written ("being hit" is masked whole), looked up normalised.
        phrases = sorted((w for w in raw if normalise(w)), key=lambda w: (-len(w), w))
        body = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in phrases)
        self._pattern = re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE) if phrases else None

    @classmethod
    def load(cls, extra: str | Path | None = None) -> Lexicon:
        """The packaged lexicon, extended by `extra` (same JSON shape; its words join the groups of the same name)."""
        groups = _read_lexicon(DEFAULT_LEXICON)
        if extra is not None:
            for kind, more in _read_lexicon(Path(extra)).items():
                for group, words in more.items():
                    groups.setdefault(kind, {}).setdefault(group, [])
                    groups[kind][group] = [*groups[kind][group], *words]
        return cls(groups)

    def digest(self) -> str:
        """sha256 of the groups (the score cache key of a cloze run: another lexicon masks other words)."""
        import hashlib

        return hashlib.sha256(json.dumps(self.groups, sort_keys=True).encode()).hexdigest()

    def group_of(self, text: str) -> tuple[str, str] | None:
        """(kind, group) of a word or phrase, or None when the lexicon does not know it."""
        return self._group_of.get(normalise(text))

    def find(self, caption: str, kinds: Iterable[str] = KINDS) -> list[tuple[int, int, str, str]]:
        """Non-overlapping (start, end, kind, group) of every lexicon word in `caption`, left to right."""
        if self._pattern is None:
            return []
        wanted = set(kinds)
        hits = []
        for m in self._pattern.finditer(caption):
            kind, group = self._group_of[normalise(m.group(0))]
            if kind in wanted:
                hits.append((m.start(), m.end(), kind, group))
        return hits


def _read_lexicon(path: Path) -> dict[str, dict[str, list[str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TpasInputError("cloze lexicon not found", path) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TpasInputError(f"not a readable JSON lexicon ({e})", path) from None
    if not isinstance(data, dict):
        raise TpasInputError(f"a cloze lexicon is a JSON object with keys {', '.join(KINDS)}", path)
    out: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        groups: Any = data.get(kind, {})
        ok = isinstance(groups, dict) and all(
            isinstance(ws, list) and all(isinstance(w, str) and w.strip() for w in ws) for ws in groups.values()
        )
        if not ok:
            raise TpasInputError(f"{kind!r} must map group names to lists of non-empty words", path)
        out[kind] = {str(g): list(ws) for g, ws in groups.items()}
    unknown = sorted(set(data) - {*KINDS, "about"})
    if unknown:
        raise TpasInputError(f"unknown key(s) {', '.join(unknown)}; expected {', '.join(KINDS)}", path)
    return out


def make_cloze(caption: str, lexicon: Lexicon, kinds: Sequence[str] = KINDS) -> Cloze:
    """Mask every lexicon word of `kinds` in `caption` with a numbered blank (a caption without any has no blanks)."""
    parts, blanks, last = [], [], 0
    for start, end, kind, group in lexicon.find(caption, kinds):
        parts.append(caption[last:start])
        blanks.append(Blank(len(blanks) + 1, caption[start:end], kind, group))
        parts.append(f"[{len(blanks)}]")
        last = end
    parts.append(caption[last:])
    return Cloze(caption, "".join(parts), tuple(blanks))


def cloze_prompt(cloze: Cloze) -> str:
    """The question for one candidate image: fill each blank from the image, UNKNOWN when unsure."""
    n = len(cloze.blanks)
    lines = "\n".join(f"{i}: word" for i in range(1, n + 1))
    return (
        f"The description below has {n} numbered blank{'s' if n != 1 else ''} ([1]{', ...' if n > 1 else ''}). "
        "Fill each blank with the word that makes the description true for the person in this image. "
        "If the image does not show it clearly, answer UNKNOWN for that blank.\n"
        f"Description: {cloze.masked}\n"
        f"Answer with one line per blank and nothing else:\n{lines}"
    )


def parse_answers(reply: str, n: int) -> list[str | None]:
    """The answer to each of `n` blanks in a model's reply ("1: red" lines, "[1] red", "1. red, 2. falls", ...);
    None for a blank without an answer. A reply without markers answers a single blank as a whole."""
    answers: list[str | None] = [None] * n
    marks = [(m.start(), m.end(), int(next(g for g in m.groups() if g))) for m in _MARKER.finditer(reply)]
    if not marks:
        if n == 1 and normalise(reply):
            answers[0] = reply.strip().splitlines()[0].strip()
        return answers
    for (_, end, number), nxt in zip(marks, [*marks[1:], (len(reply), 0, 0)], strict=True):
        text = reply[end : nxt[0]].strip().strip(",;").strip()
        if 1 <= number <= n and answers[number - 1] is None and text:
            answers[number - 1] = text.splitlines()[0].strip()
    return answers


def answer_matches(answer: str | None, blank: Blank, lexicon: Lexicon) -> bool:
    """Whether an answer fills `blank` correctly: same lexicon group, or the same words after normalisation."""
    if answer is None:
        return False
    said = normalise(answer)
    if not said or said == UNKNOWN:
        return False
    if said == normalise(blank.word):
        return True
    found = lexicon.group_of(said)
    return found is not None and found == (blank.kind, blank.group)


def cloze_score(answers: Sequence[str | None], cloze: Cloze, lexicon: Lexicon) -> float:
    """Fraction of blanks answered correctly; 0 without blanks (the caller keeps such a caption's first-stage order)."""
    if not cloze.blanks:
        return 0.0
    hits = sum(answer_matches(a, b, lexicon) for a, b in zip(answers, cloze.blanks, strict=False))
    return hits / len(cloze.blanks)
