"""Test-time augmentation of gallery images, shared by every image encoder family.

`--tta hflip`: each image is encoded together with its left-right mirror; its feature is the mean of the two
L2-normalised features, normalised again (per token for token-level features such as BLIP-2's query outputs). The
mirror is made in the DataLoader worker (the preprocessor returns both views stacked on a new axis 1), so the engine
sees an ordinary batch and a cache entry made with TTA can never be mistaken for one without: the family's
`describe()` records the mode, and `describe()` keys the feature cache. Families with a matching head (CMP, X-VLM,
APTM, BLIP-2) average the ITC embedding only: the states that ITM re-ranking cross-attends to are the plain view's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image, ImageOps

from ..errors import TpasInputError
from .base import FamilyOption, Features

TTA_MODES = ("none", "hflip")
_TTA_HELP = (
    "Test-time augmentation of gallery images: hflip = mean of the image's and its mirror's features, re-normalised."
)
TTA_OPTION = FamilyOption("tta", str, _TTA_HELP, "none", TTA_MODES)
TTA_MATCH_OPTION = FamilyOption(
    "tta",
    str,
    _TTA_HELP[:-1] + " (the ITC embedding only: --rerank-k's ITM cross-attends to the plain image's tokens).",
    "none",
    TTA_MODES,
)
"""`--tta` of the families with a matching head: the help says what the mirror does not change."""


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


def encode_views(encode: Callable[[Features], torch.Tensor | Features], batch: Features, mode: str) -> Features:
    """The features of a batch: `encode` gives the L2-normalised [n, ...] `embed` (a tensor, or Features holding it
    and the states a matching head uses). With hflip, the batch holds two views per item ([N, 2, ...]); `embed` is
    their re-normalised mean (over the last axis) and every other feature is the plain view's."""
    if mode != "hflip":
        out = encode(batch)
        return out if isinstance(out, dict) else {"embed": out}
    n = next(iter(batch.values())).shape[0]
    flat = {k: v.reshape(n * 2, *v.shape[2:]) for k, v in batch.items()}
    out = encode(flat)
    feats = out if isinstance(out, dict) else {"embed": out}
    views = {k: v.reshape(n, 2, *v.shape[1:]) for k, v in feats.items()}
    mean = torch.nn.functional.normalize(views.pop("embed").float().mean(dim=1), dim=-1)
    return {"embed": mean, **{k: v[:, 0].contiguous() for k, v in views.items()}}  # not the mirror's storage
