"""Test-time augmentation of gallery images, shared by the single-vector image encoders (clip, hf-dual, vlm-embed).

`--tta hflip`: each image is encoded together with its left-right mirror; its feature is the mean of the two
L2-normalised features, normalised again. The mirror is made in the DataLoader worker (the preprocessor returns both
views stacked on a new axis 1), so the engine sees an ordinary batch and a cache entry made with TTA can never be
mistaken for one without: the family's `describe()` records the mode, and `describe()` keys the feature cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image, ImageOps

from ..errors import TpasInputError
from .base import FamilyOption, Features

TTA_MODES = ("none", "hflip")
TTA_OPTION = FamilyOption(
    "tta",
    str,
    "Test-time augmentation of gallery images: hflip = mean of the image's and its mirror's features, re-normalised.",
    "none",
    TTA_MODES,
)


def check_tta(mode: str | None) -> str:
    """The validated mode ("none" when not given); TpasInputError naming the choices otherwise."""
    mode = mode or "none"
    if mode not in TTA_MODES:
        raise TpasInputError(f"--tta {mode!r}; expected one of {', '.join(TTA_MODES)}")
    return mode


class FlipViews:
    """Picklable preprocessor wrapper: every feature of the image and of its mirror, stacked on axis 0 ([2, ...])."""

    def __init__(self, inner: Callable[[Image.Image, Image.Image | None], Features]):
        self.inner = inner

    def __call__(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        plain = self.inner(image, pose)
        mirror = self.inner(ImageOps.mirror(image), None if pose is None else ImageOps.mirror(pose))
        return {k: torch.stack([plain[k], mirror[k]]) for k in plain}


def with_tta(
    preprocessor: Callable[[Image.Image, Image.Image | None], Features], mode: str
) -> Callable[[Image.Image, Image.Image | None], Features]:
    """`preprocessor` itself, or wrapped so that it also returns the mirror view (mode "hflip")."""
    return FlipViews(preprocessor) if mode == "hflip" else preprocessor


def encode_views(encode: Callable[[Features], torch.Tensor], batch: Features, mode: str) -> Features:
    """{"embed": [N, D]} from `encode` (a batch -> L2-normalised [n, D] features); with hflip, the batch holds two
    views per item ([N, 2, ...]) and the result is their re-normalised mean."""
    if mode != "hflip":
        return {"embed": encode(batch)}
    n = next(iter(batch.values())).shape[0]
    flat = {k: v.reshape(n * 2, *v.shape[2:]) for k, v in batch.items()}
    both = encode(flat).float().view(n, 2, -1)
    return {"embed": torch.nn.functional.normalize(both.mean(dim=1), dim=-1)}
