"""Caption cleaning of X-VLM and APTM at test time (the tokenizer is CMP's slow uncased WordPiece, padded to length).

X-VLM (dataset/utils.py `pre_caption`): CMP's rule, except that words are counted by splitting on spaces only.
APTM (dataset/utils.py `pre_caption`): on CUHK-PEDES nothing but truncation to max_words whitespace-separated words;
with `icfg_rstp` (ICFG-PEDES, RSTPReid) the caption is lower-cased and every run of characters outside [0-9a-z]
becomes one space first. Both raise on a caption left empty.
"""

from __future__ import annotations

import re

from ..cmp.text import clean_caption

_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


def clean_xvlm_caption(caption: str, rule: str, max_words: int) -> str:
    """Clean one caption by `rule` ("pre_caption", "words" or "alnum", see XVLMConfig); ValueError if it is empty."""
    if rule == "pre_caption":
        return clean_caption(caption, max_words, split_on=" ")
    text = caption
    if rule == "alnum":
        text = " ".join(_NOT_ALNUM.sub(" ", caption.lower()).split())
    words = text.split()
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise ValueError(f"caption {caption!r} is empty after cleaning")
    return text
