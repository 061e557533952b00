"""The interface every model family implements, and the registry that `tpas infer NAME` reads.

One shared engine (`tpas.models.engine`) runs any registered family: it decodes images in DataLoader workers with
the family's own `preprocess`, encodes them in batches, caches features on disk, computes `similarity`, and, for
families with a matching head, re-scores each query's top-k with `match`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from ..errors import TpasError, TpasInputError

Features = dict[str, torch.Tensor]
"""Per-item tensors, all with the item axis first. `embed` is what `similarity` consumes ([N, D] or [N, T, D]);
any other key holds states that `match` needs (e.g. image tokens for a cross encoder)."""


OPTION_TYPES = (str, int, float, bool, Path)


@dataclass(frozen=True)
class FamilyOption:
    """One `tpas infer FAMILY` option that a family declares in its own module.

    `name` is the Python keyword `from_checkpoint` receives (`max_pixels`), shown as `--max-pixels`; `type` is one
    of str, int, float, bool (a flag) or Path; `choices`, when given, are the only accepted values. `load_model`
    passes every declared option to `from_checkpoint`: the user's value, else `default` (omitted when None).
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

    def check(self, value: Any) -> None:
        """TpasInputError unless `value` is one of `choices` (when the option has choices)."""
        if self.choices and value not in self.choices:
            raise TpasInputError(f"{self.flag} must be one of {', '.join(self.choices)}, got {value!r}")


# Options more than one family takes: declared once, listed in each family's `options`.
TRUST_CHECKPOINT = FamilyOption(
    "trust_checkpoint", bool, "Allow full unpickling of the checkpoint (trusted files only).", default=False
)
VOCAB = FamilyOption("vocab", Path, "BERT vocab.txt (default: the one that comes with the checkpoint).")


class RetrievalModel(torch.nn.Module):
    """A text-to-image retrieval model with test-time preprocessing exactly as its reference code.

    Subclasses set `family`, implement the abstract methods, and register with `@register("name")`.
    """

    family: ClassVar[str] = ""
    has_match_head: ClassVar[bool] = False
    # The `tpas infer FAMILY` options of this family beyond the engine's own; `load_model` refuses any other.
    options: ClassVar[tuple[FamilyOption, ...]] = ()
    # Pose-aware models set this (class- or instance-level, e.g. from the checkpoint): the engine then requires
    # `--pose DIR` and passes each image's pose map to `preprocess`; other models refuse `--pose`.
    needs_pose: bool = False
    # The file the weights came from (set by `load_model`); its sha256 keys the feature cache and goes into meta.
    checkpoint_path: Path | None = None
    # The submodules whose weights a CPU bf16 run casts to bf16 (`tpas.runtime.Precision.cast_weights`); "" is the
    # whole model. A family whose reference keeps parts in fp32 (BLIP-2's Q-Former) names the others.
    bf16_modules: ClassVar[tuple[str, ...]] = ("",)

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

    @property
    def image_collate(self) -> Callable[[list[Features]], Features] | None:
        """How DataLoader workers batch `preprocess` outputs: None stacks each key (items of one shape). Families with
        variable-size items return a picklable callable that pads them only as far as each batch needs."""
        return None

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

    def finalize_rerank(
        self, reranked: torch.Tensor, itc: torch.Tensor, top: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final [Q, G] scores from the filled re-rank matrix, the ITC matrix and (when known) the re-ranked columns
        `top` [Q, k] of each row. Default: the re-rank matrix."""
        return reranked


_REGISTRY: dict[str, type[RetrievalModel]] = {}
ENTRY_POINT_GROUP = "tpas.families"


def register(name: str) -> Callable[[type[RetrievalModel]], type[RetrievalModel]]:
    """Class decorator: make a family available as `tpas infer NAME` (with the options it declares)."""

    def wrap(cls: type[RetrievalModel]) -> type[RetrievalModel]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model family {name!r} registered twice")
        _check_options(name, cls.options)
        cls.family = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _check_options(family: str, options: Sequence[FamilyOption]) -> None:
    # A family author's mistake shows at import, not when a user first types the option.
    for o in options:
        if not isinstance(o, FamilyOption) or o.type not in OPTION_TYPES or not o.name.isidentifier():
            raise ValueError(f"model family {family!r}: options must be FamilyOption(name, type in {OPTION_TYPES})")
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise ValueError(f"model family {family!r} declares an option twice: {names}")


def list_models() -> list[str]:
    """Names of every registered family (built-in and `tpas.families` entry points), sorted."""
    _load_all_families()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[RetrievalModel]:
    """The registered class for `name`; TpasInputError naming the known families otherwise.

    Imports as little as it can: a registered name costs nothing, `tpas.models.<name>` is tried next (so `tpas infer
    clip` never imports transformers or torchscale), then an entry point of that name, and only then everything.
    """
    module = name.replace("-", "_")  # `tpas infer hf-dual` lives in hf_dual.py
    if name not in _REGISTRY and module.isidentifier() and importlib.util.find_spec(f"{__package__}.{module}"):
        importlib.import_module(f"{__package__}.{module}")
    if name not in _REGISTRY:
        for ep in _entry_points():
            if ep.name == name:
                _load_entry_point(ep)
    if name not in _REGISTRY:
        known = list_models()
        if name not in _REGISTRY:
            raise TpasInputError(f"unknown model family {name!r}; expected one of {', '.join(known)}")
    return _REGISTRY[name]


def _load_all_families() -> None:
    """Import every module of this package (family modules register on import) and every entry point."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")
    for ep in _entry_points():
        _load_entry_point(ep)


def _entry_points() -> Sequence[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> None:
    """Load a third-party family: the entry point names a module that registers `ep.name`, or the class itself."""
    if ep.name in _REGISTRY:
        return
    where = f"entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP})"
    try:
        obj = ep.load()
    except Exception as e:  # a broken plugin must not read as a tpas bug: name it and what it raised
        raise TpasError(f"{where} failed to load: {type(e).__name__}: {e}") from e
    if isinstance(obj, type) and issubclass(obj, RetrievalModel) and ep.name not in _REGISTRY:
        register(ep.name)(obj)
    if ep.name not in _REGISTRY:
        raise TpasError(f"{where} registered no model family named {ep.name!r}")


def load_model(
    family: str, checkpoint: Path | None, config: dict[str, Any] | None = None, **options: Any
) -> RetrievalModel:
    """The one way to build a model: `load_model("clip", Path("ViT-L-14-336px.pt"))`.

    `options` are the family's declared options (None = not given); any other option is refused.
    """
    cls = get_model_class(family)
    declared = {o.name: o for o in cls.options}
    unknown = sorted(k for k, v in options.items() if v is not None and k not in declared)
    if unknown:
        raise TpasInputError(
            f"option(s) {', '.join('--' + u.replace('_', '-') for u in unknown)} do not apply to {family}"
        )
    given = {}
    for name, o in declared.items():
        value = options.get(name)
        value = o.default if value is None else value
        if value is not None:
            o.check(value)
            given[name] = value
    model = cls.from_checkpoint(checkpoint, config, **given)
    if checkpoint is not None and model.checkpoint_path is None:
        model.checkpoint_path = Path(checkpoint)
    return model.eval()
