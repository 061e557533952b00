"""A third-party-style model family that lives outside tpas: it declares its own options and registers itself.

`tpas infer toy` is built from these declarations alone. The tests import this module (in-process) or point a
`tpas.families` entry point of a fake distribution at it (subprocess); no tpas file names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tpas.models import FamilyOption, RetrievalModel, register
from tpas.models.base import Features

_WIDTH = 8


@register("toy")
class ToyFamily(RetrievalModel):
    """A colour-histogram toy: images by mean RGB, captions by letter counts, sims scaled by --toy-scale."""

    options = (
        FamilyOption("toy_scale", float, "Multiply every similarity by this.", default=1.0),
        FamilyOption("toy_norm", str, "Embedding normalisation.", default="l2", choices=("l2", "none")),
    )

    def __init__(self, scale: float, norm: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.img = torch.nn.Parameter(torch.randn(3, _WIDTH, generator=g), requires_grad=False)
        self.txt = torch.nn.Parameter(torch.randn(26, _WIDTH, generator=g), requires_grad=False)
        self.scale, self.norm = scale, norm

    @classmethod
    def from_checkpoint(cls, path: Path | None, config: dict[str, Any] | None = None, **options: Any) -> ToyFamily:
        # load_model passes every declared option, its default when the user gave none.
        return cls(options["toy_scale"], options["toy_norm"])

    def describe(self) -> dict[str, Any]:
        return {"family": "toy", "scale": self.scale, "norm": self.norm}

    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        data = list(image.convert("RGB").resize((2, 2)).get_flattened_data())
        return {"rgb": torch.tensor(data, dtype=torch.float32).mean(0) / 255}

    def tokenize(self, texts: Sequence[str]) -> Features:
        counts = torch.zeros(len(texts), 26)
        for i, t in enumerate(texts):
            for c in t.lower():
                if "a" <= c <= "z":
                    counts[i, ord(c) - ord("a")] += 1
        return {"counts": counts}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x, dim=-1) if self.norm == "l2" else x

    def encode_images(self, batch: Features) -> Features:
        return {"embed": self._embed(batch["rgb"] @ self.img)}

    def encode_texts(self, tokens: Features) -> Features:
        return {"embed": self._embed(tokens["counts"] @ self.txt)}

    def similarity(self, text_embed: torch.Tensor, image_embed: torch.Tensor) -> torch.Tensor:
        return self.scale * (text_embed.float() @ image_embed.float().T)


class UnregisteredToy(ToyFamily):
    """The same toy, registered by nothing here: an entry point that names this class registers it."""
