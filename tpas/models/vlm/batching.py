"""Pair assembly and left-padded collation, so one forward pass scores many (caption, image) pairs.

A processor turns [text with one image placeholder] + [image] into token ids where the placeholder is expanded to the
image's visual tokens (their number depends on the image size), plus pixel tensors. tpas runs that expansion once
per distinct image (`ImageSegmenter`, in DataLoader workers: the placeholder alone, no special tokens) and once per
query (`tokenize_prompt`: the rendered prompt, whose one placeholder token marks where the image goes), then splices
the two for each pair (`assemble`). Placeholders are special tokens, so tokenizing the pieces apart gives the same
ids as tokenizing the whole; `check_assembly` compares one pair per run with the processor's own output anyway.

Collation pads every sequence on the left (the scored position is the last one of every row) with the attention mask
at 0; pixel tensors of the pairs are concatenated along their first axis, after padding their other axes with zeros
to the batch maximum (Qwen-style flat patch lists need no padding; per-image stacks such as Idefics3's sub-images or
LLaVA-OneVision's tiles are padded as their processors pad a batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ...errors import TpasInputError

Features = dict[str, torch.Tensor]
# Keys that run along the token sequence; every other processor output belongs to the image.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def image_placeholder(processor: Any, rendered: str) -> str:
    """The token the chat template emits for an image and the processor expands (Gemma-style templates emit a
    begin-of-image token instead of the image token itself)."""
    for name in ("image_token", "boi_token"):
        token = getattr(processor, name, None)
        if isinstance(token, str) and rendered.count(token) == 1:
            return token
    found = getattr(processor, "image_token", None)
    raise TpasInputError(
        f"the chat template renders {rendered.count(found) if found else 0} image placeholder(s) {found!r} for one "
        "image; tpas needs exactly one"
    )


class ImageSegmenter:
    """One image -> its expanded placeholder tokens and pixel tensors (picklable: holds only the processor)."""

    def __init__(self, processor: Any, placeholder: str):
        self.processor = processor
        self.placeholder = placeholder

    def __call__(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        out = self.processor(text=[self.placeholder], images=[image], add_special_tokens=False, return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class PromptTokens:
    """A rendered prompt's token ids and the position of its one image placeholder token."""

    ids: torch.Tensor  # [L] int64
    image_at: int


def tokenize_prompt(processor: Any, rendered: str, placeholder: str) -> PromptTokens:
    """Tokenize as the processor does (its tokenizer, default special tokens) and locate the placeholder."""
    ids = torch.as_tensor(processor.tokenizer(rendered)["input_ids"], dtype=torch.long).reshape(-1)
    token_id = processor.tokenizer.convert_tokens_to_ids(placeholder)
    where = (ids == token_id).nonzero().flatten()
    if len(where) != 1:
        raise TpasInputError(f"the rendered prompt holds {len(where)} {placeholder!r} tokens; tpas needs exactly one")
    return PromptTokens(ids, int(where[0]))


def assemble(prompt: PromptTokens, segment: Features) -> tuple[Features, Features]:
    """(token tensors [L'] , image tensors) of one pair: the prompt with its placeholder replaced by the segment."""
    seg_ids = segment["input_ids"].reshape(-1)
    head, tail = prompt.ids[: prompt.image_at], prompt.ids[prompt.image_at + 1 :]
    tokens = {"input_ids": torch.cat([head, seg_ids, tail])}
    tokens["attention_mask"] = torch.ones_like(tokens["input_ids"])
    for key in TOKEN_KEYS[2:]:
        if key in segment:
            seg = segment[key].reshape(-1).to(torch.long)
            tokens[key] = torch.cat([torch.zeros_like(head), seg, torch.zeros_like(tail)])
    image = {k: v for k, v in segment.items() if k not in TOKEN_KEYS}
    return tokens, image


def _pad_to(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(t.shape[1:]) == shape:
        return t
    out = t.new_zeros((t.shape[0], *shape))
    out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
    return out


def collate(pairs: list[tuple[Features, Features]], pad_id: int) -> Features:
    """One model input from assembled pairs: tokens left-padded (`pad_id`, mask 0), image tensors concatenated."""
    length = max(int(t["input_ids"].shape[0]) for t, _ in pairs)
    batch: Features = {}
    for key in pairs[0][0]:
        fill = pad_id if key == "input_ids" else 0
        rows = []
        for tokens, _ in pairs:
            t = tokens[key]
            rows.append(torch.cat([t.new_full((length - t.shape[0],), fill), t]))
        batch[key] = torch.stack(rows)
    for key in pairs[0][1]:
        parts = [image[key] for _, image in pairs]
        shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim)]
        batch[key] = torch.cat([_pad_to(p, shape) for p in parts])
    return batch


def check_assembly(processor: Any, rendered: str, image_path: Path, assembled: tuple[Features, Features]) -> None:
    """Compare one assembled pair with the processor's own output for the same text and image; a processor that
    expands images in a way splicing does not reproduce is refused rather than scored wrongly."""
    with Image.open(image_path) as im:
        im.load()
        ref = processor(text=[rendered], images=[im], return_tensors="pt")
    tokens, image = assembled
    for key, ours in [*tokens.items(), *image.items()]:
        theirs = ref.get(key)
        if key == "attention_mask" and theirs is None:
            continue
        if (
            theirs is None
            or theirs.reshape(-1).shape != ours.reshape(-1).shape
            or not torch.equal(theirs.reshape(-1).to(ours.dtype), ours.reshape(-1))
        ):
            raise TpasInputError(
                f"this processor ({type(processor).__name__}) expands images in a way tpas cannot batch: its "
                f"{key!r} for one pair differs from tpas's assembly"
            )
