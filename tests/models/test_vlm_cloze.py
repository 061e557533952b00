"""Cloze re-ranking text logic: masking PAB-style captions, parsing model replies, matching answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tpas.data.synthetic import ACTION_PHRASES, _random_person, describe
from tpas.errors import TpasInputError
from tpas.models.vlm.cloze import (
    Lexicon,
    answer_matches,
    cloze_prompt,
    cloze_score,
    make_cloze,
    normalise,
    parse_answers,
)

ACTION_GROUP = {"standing": "stand", "walking": "walk", "running": "run", "jumping": "jump", "falling": "fall",
                "lying": "lie", "slipping": "slip", "being hit": "hit"}  # fmt: skip


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return Lexicon.load()


def test_the_readme_caption(lexicon: Lexicon) -> None:
    c = make_cloze("A man in a red jacket slips and falls on a wet parking lot.", lexicon)
    assert c.masked == "A man in a [1] jacket [2] and [3] on a wet parking lot."
    assert [(b.word, b.kind, b.group) for b in c.blanks] == [
        ("red", "colour", "red"),
        ("slips", "behaviour", "slip"),
        ("falls", "behaviour", "fall"),
    ]


def test_multi_word_behaviours_are_one_blank(lexicon: Lexicon) -> None:
    c = make_cloze("a guy in a grey sweater is being hit by a ball on a lawn", lexicon)
    assert c.masked == "a guy in a [1] sweater is [2] by a ball on a lawn"
    assert c.blanks[1].word == "being hit" and c.blanks[1].group == "hit"
    c = make_cloze("The image shows a lady with a navy blue coat lying down in a gym.", lexicon)
    assert [b.word for b in c.blanks] == ["navy blue", "lying down"]


def test_every_synthetic_caption_masks_its_behaviour_and_colours(lexicon: Lexicon) -> None:
    rng = np.random.default_rng(0)
    used: set = set()
    for i in range(200):
        person = _random_person(rng, used)
        action = list(ACTION_PHRASES)[i % len(ACTION_PHRASES)]
        caption = describe(person, action, rng)
        c = make_cloze(caption, lexicon)
        groups = {b.group for b in c.blanks if b.kind == "behaviour"}
        colours = {b.group for b in c.blanks if b.kind == "colour"}
        assert ACTION_GROUP[action] in groups, caption
        assert groups <= {ACTION_GROUP[action], "trip"}, caption  # "trips and falls" masks both verbs
        assert {person.upper, person.lower} <= colours <= {person.upper, person.lower, person.hair}, caption
        assert "[" not in caption and c.masked.count("[") == len(c.blanks)


def test_a_caption_without_lexicon_words_has_no_blanks_and_scores_zero(lexicon: Lexicon) -> None:
    c = make_cloze("somebody somewhere", lexicon)
    assert c.blanks == () and c.masked == "somebody somewhere"
    assert cloze_score([], c, lexicon) == 0.0


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        ("1: red\n2: slips\n3: UNKNOWN", ["red", "slips", "UNKNOWN"]),
        ("[1] crimson [2] slipped, [3] fell over", ["crimson", "slipped", "fell over"]),
        ("1. Red, 2. tumbling", ["Red", "tumbling", None]),
        ("Blank 2: falls\nBlank 1: blue", ["blue", "falls", None]),
        ("(1) red (2) - (3) walks", ["red", None, "walks"]),  # a dash is no answer
        ("I cannot tell.", [None, None, None]),
        ("1: red\n1: blue", ["red", None, None]),  # the first answer to a blank counts
        ("4: red", [None, None, None]),  # no such blank
    ],
)
def test_parse_answers(reply: str, want: list) -> None:
    assert parse_answers(reply, 3) == want


def test_a_single_blank_may_be_answered_without_a_marker() -> None:
    assert parse_answers("Falling\n", 1) == ["Falling"]
    assert parse_answers("  ", 1) == [None]


def test_matching_uses_groups_inflections_and_normalisation(lexicon: Lexicon) -> None:
    c = make_cloze("A man in a grey coat falls on a street.", lexicon)
    grey, falls = c.blanks
    assert answer_matches("Gray", grey, lexicon) and answer_matches("silver.", grey, lexicon)
    assert not answer_matches("blue", grey, lexicon)
    for said in ("fell", "Falling", "is falling", "tumbles", "collapsed", "falls down"):
        assert answer_matches(said, falls, lexicon), said
    for said in ("walks", "UNKNOWN", "unknown.", "", None):
        assert not answer_matches(said, falls, lexicon), said
    assert cloze_score(["gray", "UNKNOWN"], c, lexicon) == 0.5
    assert cloze_score(["gray"], c, lexicon) == 0.5  # a missing answer counts 0
    assert normalise("  The  RED!! ") == "red"


def test_prompt_names_every_blank_and_unknown(lexicon: Lexicon) -> None:
    c = make_cloze("A woman in a pink top runs on a beach.", lexicon)
    text = cloze_prompt(c)
    assert c.masked in text and "UNKNOWN" in text and "1: word\n2: word" in text and "3: word" not in text


def test_user_lexicon_extends_groups(tmp_path: Path) -> None:
    extra = tmp_path / "lex.json"
    extra.write_text(json.dumps({"behaviour": {"fall": ["wipes out"], "juggle": ["juggles", "juggling"]}}))
    lx = Lexicon.load(extra)
    c = make_cloze("a man juggles and wipes out", lx)
    assert [b.group for b in c.blanks] == ["juggle", "fall"]
    assert answer_matches("fell", c.blanks[1], lx)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable JSON lexicon"),
        ("[]", "JSON object"),
        ('{"behaviour": {"fall": "falls"}}', "lists of non-empty words"),
        ('{"behaviour": {"fall": [""]}}', "lists of non-empty words"),
        ('{"verbs": {}}', "unknown key"),
    ],
)
def test_bad_lexicon_files_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TpasInputError, match=message) as e:
        Lexicon.load(path)
    assert str(path) in str(e.value)
    with pytest.raises(TpasInputError, match="not found"):
        Lexicon.load(tmp_path / "missing.json")
