"""CMP captions: the reference's cleaning rule and its BERT WordPiece tokenizer over a local vocab file."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ...errors import TpasInputError

_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def clean_caption(caption: str, max_words: int = 56, split_on: str | None = None) -> str:
    """The reference's `pre_caption` at test time, step by step.

    Lowercase and delete the characters ,.'!?"()*#:;~ ; then '-' and '/' become spaces and '<person>' becomes
    'person'; runs of two or more whitespace characters become one space (a single tab or newline stays, as in the
    reference); strip trailing newlines then spaces; keep at most `max_words` words, split on any whitespace
    (`split_on=None`, CMP) or on `split_on` only (" ": X-VLM's pre_caption). A caption that cleans to nothing
    raises ValueError (the reference raises too).
    """
    text = _PUNCT.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACES.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(split_on)
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise ValueError(f"caption {caption!r} is empty after cleaning")
    return text


def find_vocab(vocab: str | Path | None, checkpoint: str | Path | None) -> Path:
    """The vocab file to use: `vocab` when given, else `vocab.txt` beside the checkpoint; TpasInputError otherwise."""
    if vocab is not None:
        path = Path(vocab)
        if not path.is_file():
            raise TpasInputError("vocab file not found (expected the bert-base-uncased vocab.txt)", path)
        return path
    if checkpoint is not None:
        cand = Path(checkpoint).parent / "vocab.txt"
        if cand.is_file():
            return cand
        raise TpasInputError(
            f"no vocab.txt beside the checkpoint (looked for {cand}); pass --vocab with the bert-base-uncased "
            "vocab.txt (30,522 WordPiece tokens)"
        )
    raise TpasInputError("CMP needs a WordPiece vocab: pass --vocab PATH (the bert-base-uncased vocab.txt)")


class CMPTokenizer:
    """Uncased BERT WordPiece tokenizer (the slow, Python algorithm the reference used), padded to max length.

    `__call__(captions)` cleans each caption, tokenizes with truncation to `max_tokens` and padding='max_length'
    (padding to exactly `max_tokens` matters: the text feature pools over [PAD] positions) and returns
    `input_ids` / `attention_mask` as LongTensors [N, max_tokens].
    """

    def __init__(self, vocab_path: str | Path, max_tokens: int = 56, max_words: int = 56) -> None:
        self.vocab_path = Path(vocab_path)
        self.max_tokens = max_tokens
        self.max_words = max_words
        lines = self.vocab_path.read_text(encoding="utf-8").splitlines()
        missing = [t for t in SPECIAL_TOKENS if t not in set(lines)]
        if missing:
            raise TpasInputError(
                f"not a BERT WordPiece vocab: special token(s) {', '.join(missing)} missing", self.vocab_path
            )
        try:
            # transformers 5 keeps the slow (Python) BERT tokenizer as BertTokenizerLegacy; 4.x calls it BertTokenizer.
            from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as _Slow

            self._tok = _Slow(vocab_file=str(self.vocab_path), do_lower_case=True)
        except ImportError:  # transformers 4.x
            from transformers import BertTokenizer

            self._tok = BertTokenizer(vocab_file=str(self.vocab_path), do_lower_case=True)
        self.vocab_size = len(self._tok)
        self.pad_token_id = self._tok.pad_token_id
        self.cls_token_id = self._tok.cls_token_id
        self.sep_token_id = self._tok.sep_token_id
        self.mask_token_id = self._tok.mask_token_id

    def __call__(self, captions: Sequence[str], clean: bool = True) -> dict[str, torch.Tensor]:
        """Tokenize `captions` (cleaned first unless clean=False) -> input_ids, attention_mask [N, max_tokens]."""
        texts = [clean_caption(c, self.max_words) if clean else c for c in captions]
        enc = self._tok(texts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """WordPiece strings for token ids (for masking whole words during training)."""
        return self._tok.convert_ids_to_tokens(list(ids))
