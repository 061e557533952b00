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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ...errors import TpasInputError

Features = dict[str, torch.Tensor]
# Keys that run along the token sequence; every other processor output belongs to the image.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def image_placeholder(processor: Any, rendered: str, count: int = 1) -> str:
    """The token the chat template emits for an image and the processor expands (Gemma-style templates emit a
    begin-of-image token instead of the image token itself); `rendered` holds `count` images."""
    for name in ("image_token", "boi_token"):
        token = getattr(processor, name, None)
        if isinstance(token, str) and rendered.count(token) == count:
            return token
    found = getattr(processor, "image_token", None)
    why = " (a single-image model: --score pairwise needs one that takes two images)" if count > 1 else ""
    raise TpasInputError(
        f"the chat template renders {rendered.count(found) if found else 0} image placeholder(s) {found!r} for "
        f"{count} image(s); tpas needs exactly {count}{why}"
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
    """A rendered prompt's token ids and the positions of its image placeholder tokens (one per image, in order)."""

    ids: torch.Tensor  # [L] int64
    image_at: tuple[int, ...]


def tokenize_prompt(processor: Any, rendered: str, placeholder: str, images: int = 1) -> PromptTokens:
    """Tokenize as the processor does (its tokenizer, default special tokens) and locate the placeholders."""
    ids = torch.as_tensor(processor.tokenizer(rendered)["input_ids"], dtype=torch.long).reshape(-1)
    token_id = processor.tokenizer.convert_tokens_to_ids(placeholder)
    where = (ids == token_id).nonzero().flatten()
    if len(where) != images:
        raise TpasInputError(
            f"the rendered prompt holds {len(where)} {placeholder!r} tokens; tpas needs exactly {images}"
        )
    return PromptTokens(ids, tuple(int(w) for w in where))


def assemble(
    prompt: PromptTokens, segments: Sequence[Features], axes: Mapping[str, int] | None = None
) -> tuple[Features, Features]:
    """(token tensors [L'], image tensors) of one row: each placeholder replaced by its image's segment. Several
    images' tensors are joined along `axes[key]` (0 by default: Qwen-style patch lists and LLaVA-style tiles; 1 for
    Idefics3's per-row stacks of sub-images, see `image_axes`)."""
    if len(segments) != len(prompt.image_at):
        raise ValueError(f"{len(segments)} images for {len(prompt.image_at)} placeholders")
    pieces: dict[str, list[torch.Tensor]] = {"input_ids": []}
    extra = [k for k in TOKEN_KEYS[2:] if k in segments[0]]
    for key in extra:
        pieces[key] = []
    last = 0
    bounds = [*prompt.image_at, len(prompt.ids)]
    for i, at in enumerate(bounds):
        text = prompt.ids[last:at]
        pieces["input_ids"].append(text)
        for key in extra:
            pieces[key].append(torch.zeros_like(text))
        if i < len(segments):
            pieces["input_ids"].append(segments[i]["input_ids"].reshape(-1))
            for key in extra:
                pieces[key].append(segments[i][key].reshape(-1).to(torch.long))
        last = at + 1
    tokens = {key: torch.cat(parts) for key, parts in pieces.items()}
    tokens["attention_mask"] = torch.ones_like(tokens["input_ids"])
    tokens = {k: tokens[k] for k in ("input_ids", "attention_mask", *extra)}
    axes = axes or {}
    image = {key: _join([s[key] for s in segments], axes.get(key, 0)) for key in segments[0] if key not in TOKEN_KEYS}
    return tokens, image


def _join(parts: list[torch.Tensor], axis: int) -> torch.Tensor:
    """Concatenate along `axis`, zero-padding the other axes to the largest."""
    if len(parts) == 1:
        return parts[0]
    shape = [max(p.shape[d] for p in parts) for d in range(parts[0].ndim)]
    padded = []
    for p in parts:
        want = [p.shape[d] if d == axis else shape[d] for d in range(p.ndim)]
        out = p if list(p.shape) == want else p.new_zeros(want)
        if out is not p:
            out[tuple(slice(0, n) for n in p.shape)] = p
        padded.append(out)
    return torch.cat(padded, dim=axis)


def image_axes(reference: Mapping[str, torch.Tensor], segments: Sequence[Features]) -> dict[str, int]:
    """Per image tensor, the axis along which the processor itself joins several images of one row (found by
    comparing its output for the row with the joined segments); a layout neither axis reproduces is refused."""
    axes: dict[str, int] = {}
    for key in segments[0]:
        if key in TOKEN_KEYS or len(segments) == 1:
            continue
        theirs = reference.get(key)
        for axis in range(min(2, segments[0][key].ndim)):
            ours = _join([s[key] for s in segments], axis)
            if theirs is not None and ours.shape == theirs.shape and torch.equal(ours, theirs.to(ours.dtype)):
                axes[key] = axis
                break
        else:
            raise TpasInputError(f"this processor joins the {key!r} of several images in a way tpas cannot batch")
    return axes


def reference_inputs(processor: Any, rendered: str, image_paths: Sequence[Path]) -> Features:
    """The processor's own output for one row (text + its images), for `image_axes` and `check_assembly`."""
    images = []
    for path in image_paths:
        with Image.open(path) as im:
            im.load()
            images.append(im)
    try:
        return processor(text=[rendered], images=images, return_tensors="pt")
    except (ValueError, TypeError, IndexError) as e:
        raise TpasInputError(
            f"the processor ({type(processor).__name__}) cannot take {len(images)} image(s) in one prompt "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


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


def check_assembly(processor: Any, reference: Mapping[str, torch.Tensor], assembled: tuple[Features, Features]) -> None:
    """Compare one assembled row with the processor's own output for the same text and images
    (`reference_inputs`); a processor that expands images in a way splicing does not reproduce is refused rather
    than scored wrongly."""
    tokens, image = assembled
    for key, ours in [*tokens.items(), *image.items()]:
        theirs = reference.get(key)
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
