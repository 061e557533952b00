"""The interface every model family implements, and the registry that `tpas infer NAME` reads.

One shared engine (`tpas.models.engine`) runs any registered family: it decodes images in DataLoader workers with
the family's own `preprocess`, encodes them in batches, caches features on disk, computes `similarity`, and, for
families with a matching head, re-scores each query's top-k with `match`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from ..errors import TpasInputError

Features = dict[str, torch.Tensor]
"""Per-item tensors, all with the item axis first. `embed` is what `similarity` consumes ([N, D] or [N, T, D]);
any other key holds states that `match` needs (e.g. image tokens for a cross encoder)."""


@dataclass(frozen=True)
class FamilyOption:
    """One `tpas infer FAMILY` option that a family declares in its own module.

    `name` is the Python keyword `from_checkpoint` receives (`max_pixels`), shown as `--max-pixels`; `type` is one
    of str, int, float, bool (a flag) or Path; `choices`, when given, are the only accepted values.
    """

    name: str
    type: type = str
    help: str = ""
    default: Any = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The command-line spelling: `--max-pixels`."""
        return "--" + self.name.replace("_", "-")


class RetrievalModel(torch.nn.Module):
    """A text-to-image retrieval model with test-time preprocessing exactly as its reference code.

    Subclasses set `family`, implement the abstract methods, and register with `@register("name")`.
    """

    family: ClassVar[str] = ""
    has_match_head: ClassVar[bool] = False
    # Extra `tpas infer` options this family understands (e.g. {"vocab", "pose"}); anything else is refused.
    options: ClassVar[frozenset[str]] = frozenset()
    # Pose-aware models set this (class- or instance-level, e.g. from the checkpoint): the engine then requires
    # `--pose DIR` and passes each image's pose map to `preprocess`; other models refuse `--pose`.
    needs_pose: bool = False
    # The file the weights came from (set by `load_model`); its sha256 keys the feature cache and goes into meta.
    checkpoint_path: Path | None = None

    @classmethod
    def from_checkpoint(cls, path: Path | None, config: dict[str, Any] | None = None, **options: Any) -> RetrievalModel:
        """Build the model, inferring the architecture from the checkpoint when `config` is None.

        A given config (or model name inside it) that disagrees with the checkpoint raises TpasInputError.
        `options` carries the family's extra CLI options (tokenizer files, scoring variants, trust flags).
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description of architecture and preprocessing; goes into SimsMatrix meta and the cache key."""
        raise NotImplementedError

    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        """Turn one decoded PIL image (and its pose map, for pose-aware models) into per-item tensors (no batch axis).

        Runs inside DataLoader workers, so it must be picklable and must not touch the model's weights.
        """
        raise NotImplementedError

    @property
    def image_preprocessor(self) -> Callable[[Image.Image, Image.Image | None], Features]:
        """What DataLoader workers call per image: `preprocess` by default. Families override it with a standalone
        picklable object, so workers started by spawn (macOS, Windows) never pickle the model's weights."""
        return self.preprocess

    def tokenize(self, texts: Sequence[str]) -> Features:
        """Clean and tokenize captions exactly as the reference does; returns batched tensors [N, ...]."""
        raise NotImplementedError

    def encode_images(self, batch: Features) -> Features:
        """Encode a collated batch from `preprocess`; returns at least `embed`."""
        raise NotImplementedError

    def encode_texts(self, tokens: Features) -> Features:
        """Encode a batch from `tokenize`; returns at least `embed`."""
        raise NotImplementedError

    def similarity(self, text_embed: torch.Tensor, image_embed: torch.Tensor) -> torch.Tensor:
        """[Q, G] first-stage scores. Default: dot product of (already L2-normalised) embeddings."""
        return text_embed.float() @ image_embed.float().T

    def match(self, text: Features, image: Features) -> torch.Tensor:
        """Match scores [N] for paired rows (text item i with image item i). Only families with an ITM head."""
        raise NotImplementedError(f"{self.family} has no matching head")

    def finalize_rerank(self, reranked: torch.Tensor, itc: torch.Tensor) -> torch.Tensor:
        """Final [Q, G] scores from the filled re-rank matrix and the ITC matrix. Default: the re-rank matrix."""
        return reranked


_REGISTRY: dict[str, type[RetrievalModel]] = {}


def register(name: str) -> Callable[[type[RetrievalModel]], type[RetrievalModel]]:
    """Class decorator: make a family available as `tpas infer NAME`."""

    def wrap(cls: type[RetrievalModel]) -> type[RetrievalModel]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model family {name!r} registered twice")
        cls.family = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_models() -> list[str]:
    """Names of every registered family, sorted."""
    from . import _load_families

    _load_families()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[RetrievalModel]:
    """The registered class for `name`; TpasInputError naming the known families otherwise."""
    if name not in _REGISTRY:
        # Import just this family's module first: `tpas infer clip` need not import transformers or torchscale.
        import importlib

        from . import _FAMILY_MODULES

        module = name.replace("-", "_")  # `tpas infer hf-dual` lives in hf_dual.py
        if module in _FAMILY_MODULES:
            importlib.import_module(f"{__package__}.{module}")
    if name not in _REGISTRY:
        known = list_models()
        if name not in _REGISTRY:
            raise TpasInputError(f"unknown model family {name!r}; expected one of {', '.join(known)}")
    return _REGISTRY[name]


def load_model(
    family: str, checkpoint: Path | None, config: dict[str, Any] | None = None, **options: Any
) -> RetrievalModel:
    """The one way to build a model: `load_model("clip", Path("ViT-L-14-336px.pt"))`."""
    cls = get_model_class(family)
    # `options` is a set of names or (the declared form) a tuple of FamilyOption.
    known = {o.name if isinstance(o, FamilyOption) else o for o in cls.options}
    unknown = {k for k, v in options.items() if v is not None} - known
    if unknown:
        raise TpasInputError(
            f"option(s) {', '.join('--' + u.replace('_', '-') for u in sorted(unknown))} do not apply to {family}"
        )
    model = cls.from_checkpoint(checkpoint, config, **{k: v for k, v in options.items() if v is not None})
    if checkpoint is not None and model.checkpoint_path is None:
        model.checkpoint_path = Path(checkpoint)
    return model.eval()
