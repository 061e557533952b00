"""BEiT-3 retrieval (Microsoft unilm `BEiT3ForRetrieval`) on torchscale's multiway encoder.

The module below has exactly the parameter names of the official retrieval checkpoints
(`beit3_{base,large}_patch16_384_{coco,f30k}_retrieval.pth`, weights under `model`) and of fine-tunes saved by
the original trainer (e.g. `lhp_beit3.pth`), so they load with `strict=True`. Test-time behaviour follows the
reference code: the encoder is torchscale's `BEiT3` (vision inputs routed through the `.A.` experts, text through the
`.B.` experts), token 0 after the final multiway LayerNorm goes through `vision_head` / `language_head` and is
L2-normalised, and the score is the dot product of those features.

Text goes through the sentencepiece model `beit3.spm` with the XLM-R id convention (bos 0, pad 1, eos 2, unk 3,
sentencepiece id + 1), `[bos] + ids[:62] + [eos]` padded to 64, and the padding mask is passed to the encoder
(without it, padded positions would be attended to and the features would change). Images are squashed to a square of
the model's resolution with PIL bicubic resampling and normalised with mean = std = 0.5; there is no crop.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import TpasInputError
from ..io import configs_root, read_yaml
from .base import TRUST_CHECKPOINT, FamilyOption, Features, RetrievalModel, register
from .checkpoint import extract_state_dict, load_checkpoint, sha256_file, strip_prefix
from .tta import TTA_OPTION, check_tta, encode_views, with_tta

TOKENIZER_FILE = "beit3.spm"
TOKENIZER_URL = "https://github.com/addf400/files/releases/download/beit3/beit3.spm"
RELEASE_PAGE = "https://github.com/microsoft/unilm/tree/master/beit3"
PRESETS_FILE = configs_root() / "models" / "beit3.yaml"  # the packaged preset `beit3` (tpas.configs)

# The reference normalises with timm's IMAGENET_INCEPTION_MEAN / _STD, which are both (0.5, 0.5, 0.5).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# Architecture fields a state dict determines (heads through the head_dim-64 convention of every BEiT-3 release).
INFERRED_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "layers",
    "heads",
    "ffn_dim",
    "vocab_size",
    "max_source_positions",
)
HEAD_DIM = 64
# torchscale's position tables start at row 2 (fairseq convention), so the vision table has 1 + patches + 2 rows.
POSITION_OFFSET = 2
_PREFIX = "beit3."


@dataclass(frozen=True)
class BEiT3Config:
    """Architecture of a BEiT-3 retrieval model plus the two test-time constants that change features.

    Defaults are BEiT-3 large at 384 px (the challenge checkpoints); `layernorm_eps` and `text_max_len` are not
    stored in a checkpoint, so they come from here (reference values: 1e-5 and 64).
    """

    img_size: int = 384
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    layers: int = 24
    heads: int = 16
    ffn_dim: int = 4096
    vocab_size: int = 64010
    max_source_positions: int = 1024
    layernorm_eps: float = 1e-5
    text_max_len: int = 64

    @property
    def num_patches(self) -> int:
        """Patches per image (a square grid)."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def vision_pos_rows(self) -> int:
        """Rows of the vision position table: CLS + patches + the two unused leading rows."""
        return 1 + self.num_patches + POSITION_OFFSET

    @property
    def name(self) -> str:
        """Reference-style model name, e.g. `beit3_large_patch16_384` (`custom` size for other widths/depths)."""
        size = {(768, 12): "base", (1024, 24): "large"}.get((self.embed_dim, self.layers), "custom")
        return f"beit3_{size}_patch{self.patch_size}_{self.img_size}"

    def validate(self, path: Path | None = None) -> BEiT3Config:
        """Raise TpasInputError for an architecture torchscale cannot build or the tokenizer cannot feed."""
        problems = []
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.heads < 1 or self.embed_dim % self.heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if self.text_max_len < 2:
            problems.append(f"text_max_len {self.text_max_len} leaves no room for bos and eos")
        if self.max_source_positions < self.text_max_len + POSITION_OFFSET:
            problems.append(
                f"max_source_positions {self.max_source_positions} < text_max_len {self.text_max_len} + "
                f"{POSITION_OFFSET} (text positions start at {POSITION_OFFSET})"
            )
        if problems:
            raise TpasInputError("invalid BEiT-3 architecture: " + "; ".join(problems), path)
        return self

    def encoder_config(self, **overrides: Any) -> Any:
        """The torchscale `EncoderConfig` the reference builds (`modeling_utils._get_{base,large}_config`).

        Every flag that shapes test-time behaviour is spelled out instead of relying on torchscale's defaults:
        sub-LN layers (pre-LN plus `inner_attn_ln` / `ffn_layernorm`), final multiway LayerNorm, no embedding
        scale, no embedding LayerNorm, no relative-position bias, no output projection, exact GELU, no dropout.
        `overrides` (e.g. `drop_path_rate`) are for training-style checks only.
        """
        EncoderConfig = _torchscale()[1]
        kwargs: dict[str, Any] = {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "vocab_size": self.vocab_size,
            "multiway": True,
            "encoder_embed_dim": self.embed_dim,
            "encoder_attention_heads": self.heads,
            "encoder_ffn_embed_dim": self.ffn_dim,
            "encoder_layers": self.layers,
            "max_source_positions": self.max_source_positions,
            "layernorm_eps": self.layernorm_eps,
            "subln": True,
            "deepnorm": False,
            "encoder_normalize_before": True,
            "normalize_output": True,
            "no_scale_embedding": True,
            "layernorm_embedding": False,
            "no_output_layer": True,
            "share_encoder_input_output_embed": False,
            "rel_pos_buckets": 0,
            "max_rel_pos": 0,
            "xpos_rel_pos": False,
            "activation_fn": "gelu",
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "drop_path_rate": 0.0,
            "moe_freq": 0,
            "bert_init": False,
        }
        kwargs.update(overrides)
        return EncoderConfig(**kwargs)


def _torchscale() -> tuple[type[nn.Module], type]:
    """Import torchscale's BEiT3 and EncoderConfig, with a one-line error when the package is missing."""
    try:
        with warnings.catch_warnings():
            # torchscale 0.3.0 imports `drop_path` from the deprecated `timm.models.layers` alias (still present in
            # timm 1.0.x); the FutureWarning it triggers says nothing a tpas user can act on.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")
            from torchscale.architecture.config import EncoderConfig
            from torchscale.model.BEiT3 import BEiT3
    except ModuleNotFoundError as e:
        raise TpasInputError(
            f"BEiT-3 needs torchscale ({e.name} is missing): install it without its old pins with "
            "`pip install --no-deps torchscale==0.3.0` (`make setup` does this)"
        ) from None
    return BEiT3, EncoderConfig


class BEiT3Tokenizer:
    """`beit3.spm` read with sentencepiece, giving the ids XLMRobertaTokenizer gives in the reference.

    XLM-R's fairseq convention: bos 0, pad 1, eos 2, unk 3, and every other piece's sentencepiece id + 1
    (sentencepiece's own unk, id 0, maps to 3). Captions are used as they are: the sentencepiece normaliser
    (nmt_nfkc for beit3.spm) is the only text processing, so case and punctuation are kept.
    """

    BOS: ClassVar[int] = 0
    PAD: ClassVar[int] = 1
    EOS: ClassVar[int] = 2
    UNK: ClassVar[int] = 3
    OFFSET: ClassVar[int] = 1

    def __init__(self, path: str | Path, max_len: int = 64):
        import sentencepiece

        self.path = Path(path)
        self.max_len = max_len
        if not self.path.is_file():
            raise TpasInputError(f"sentencepiece model not found (get {TOKENIZER_FILE} from {TOKENIZER_URL})", path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TpasInputError(f"not a sentencepiece model ({str(e).splitlines()[0]})", path) from None

    @property
    def mask_id(self) -> int:
        """XLM-R `<mask>` id (64001 for beit3.spm); never produced from captions, reported for completeness."""
        return self._sp.get_piece_size() + self.OFFSET

    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of the sentencepiece model file (features depend on it, so it goes into the cache key)."""
        return sha256_file(self.path)

    def encode(self, text: str) -> list[int]:
        """Model ids of one caption's pieces, without bos/eos and without truncation."""
        if not isinstance(text, str):
            raise TpasInputError(f"caption must be a string, got {type(text).__name__}: {text!r}")
        return [i + self.OFFSET if i != self._sp.unk_id() else self.UNK for i in self._sp.encode(text)]

    def __call__(self, texts: Sequence[str]) -> Features:
        """`input_ids` [N, max_len] long and `padding_mask` [N, max_len] bool (True on pads), reference layout."""
        body = self.max_len - 2
        ids = torch.full((len(texts), self.max_len), self.PAD, dtype=torch.long)
        mask = torch.ones((len(texts), self.max_len), dtype=torch.bool)
        for row, text in enumerate(texts):
            tokens = [self.BOS, *self.encode(text)[:body], self.EOS]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = False
        return {"input_ids": ids, "padding_mask": mask}

    # sentencepiece processors do not pickle on every version; carry the serialized model instead.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sp"] = self._sp.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import sentencepiece

        proto = state.pop("_sp")
        self.__dict__.update(state)
        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.load_from_serialized_proto(proto)


@dataclass(frozen=True)
class BEiT3ImageTransform:
    """Reference test transform: RGB, resize to size x size (aspect squashed), PIL bicubic, ToTensor, (x-0.5)/0.5.

    Plain PIL + numpy, equal to torchvision's `Resize((s, s), interpolation=3)`, `ToTensor`, `Normalize` on PIL input
    (torchvision resizes PIL images with PIL itself, whose bicubic filter is antialiased when shrinking).
    """

    size: int

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(3, 1, 1)
        return x.sub(mean).div(std)


@dataclass(frozen=True)
class BEiT3Preprocess:
    """Per-image work for DataLoader workers: `{"image": transform(image)}`; small and picklable (no weights)."""

    transform: BEiT3ImageTransform

    def __call__(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        return {"image": self.transform(image)}


def infer_config(state: Mapping[str, torch.Tensor], path: Path | None = None) -> BEiT3Config:
    """The architecture a BEiT3ForRetrieval state dict determines (shapes only; works on meta tensors).

    Width from the text embedding, depth from the layer indices, heads = width / 64, FFN width from `fc1`, patch
    size and channels from the patch projection, resolution from the vision position table
    (rows = 1 + (img/patch)^2 + 2), text positions from the language position table.
    """
    # The keys the sizes are read from, with their number of dimensions.
    needed = {
        "beit3.text_embed.weight": 2,
        "beit3.vision_embed.proj.weight": 4,
        "beit3.encoder.embed_positions.A.weight": 2,
        "beit3.encoder.embed_positions.B.weight": 2,
        "beit3.encoder.layers.0.ffn.A.fc1.weight": 2,
    }
    missing = [k for k in needed if k not in state]
    if missing:
        raise TpasInputError(
            f"not a BEiT-3 retrieval state dict (no {missing[0]}; expected the layout of Microsoft's "
            "beit3_*_retrieval.pth under 'model')",
            path,
        )
    for key, ndim in needed.items():
        if state[key].dim() != ndim:
            raise TpasInputError(f"tensor {key!r} has shape {list(state[key].shape)}; expected {ndim} dimensions", path)
    layer_keys = [k for k in state if k.startswith("beit3.encoder.layers.")]
    odd = next((k for k in layer_keys if not k.split(".")[3].isdigit()), None)
    if odd is not None:
        raise TpasInputError(f"unexpected key {odd!r} (encoder layers are numbered)", path)
    vocab_size, embed_dim = state["beit3.text_embed.weight"].shape
    proj = state["beit3.vision_embed.proj.weight"].shape  # [D, C, P, P]
    patch_size, in_chans = int(proj[-1]), int(proj[1])
    rows = int(state["beit3.encoder.embed_positions.A.weight"].shape[0])
    grid = math.isqrt(max(rows - 1 - POSITION_OFFSET, 0))
    if grid * grid != rows - 1 - POSITION_OFFSET or grid == 0:
        raise TpasInputError(
            f"vision position table has {rows} rows; expected 1 + (img_size/patch_size)^2 + {POSITION_OFFSET}", path
        )
    layer_ids = {int(k.split(".")[3]) for k in layer_keys}
    layers = max(layer_ids) + 1
    if layer_ids != set(range(layers)):
        gaps = sorted(set(range(layers)) - layer_ids)
        raise TpasInputError(f"encoder layer(s) {gaps} missing from the state dict", path)
    if embed_dim % HEAD_DIM:
        raise TpasInputError(f"width {embed_dim} is not a multiple of the BEiT-3 head size {HEAD_DIM}", path)
    return BEiT3Config(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=int(embed_dim),
        layers=layers,
        heads=int(embed_dim) // HEAD_DIM,
        ffn_dim=int(state["beit3.encoder.layers.0.ffn.A.fc1.weight"].shape[0]),
        vocab_size=int(vocab_size),
        max_source_positions=int(state["beit3.encoder.embed_positions.B.weight"].shape[0]),
    )


def load_presets(path: Path = PRESETS_FILE) -> dict[str, dict[str, Any]]:
    """Named architectures from the packaged `configs/models/beit3.yaml` (`presets:` name -> fields)."""
    presets = read_yaml(path, expected="a 'presets:' mapping of name -> architecture").get("presets")
    if not isinstance(presets, dict):
        raise TpasInputError("expected a 'presets:' mapping of name -> architecture", path)
    return presets


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(BEiT3Config)}
_SELECTOR_KEYS = ("name", "model")


def _disagreements(wanted: Mapping[str, Any], inferred: BEiT3Config) -> list[str]:
    return [
        f"{key}={wanted[key]!r} but the checkpoint has {getattr(inferred, key)!r}"
        for key in INFERRED_FIELDS
        if key in wanted and wanted[key] != getattr(inferred, key)
    ]


def resolve_config(config: Mapping[str, Any] | None, inferred: BEiT3Config, path: Path | None = None) -> BEiT3Config:
    """Check a user config against the checkpoint's architecture; refuse (TpasInputError) when they disagree.

    Accepted forms: None (use the checkpoint's); architecture fields (`embed_dim: 1024`, ...); `name:` one of the
    presets in configs/models/beit3.yaml; or a preset catalog (`presets:`, as that file), optionally with `name:`
    choosing one (or its `checkpoints:` naming the checkpoint's file); otherwise the checkpoint must match one of
    the catalog's architectures.
    `layernorm_eps` and `text_max_len`, which a checkpoint cannot show, are taken from the config.
    """
    if not config:
        return inferred
    cfg = dict(config)
    family = cfg.pop("family", "beit3")
    if family != "beit3":
        raise TpasInputError(f"config is for model family {family!r}, not beit3")
    name = next((cfg.pop(k) for k in _SELECTOR_KEYS if k in cfg), None)
    catalog = cfg.pop("presets", None)
    if catalog is not None and not isinstance(catalog, dict):
        raise TpasInputError("config 'presets' must map preset names to architectures")
    # A catalog's `checkpoints:` (release file name -> preset) pins the known files to their architecture.
    released = cfg.pop("checkpoints", None) or {}
    if name is None and catalog is not None and path is not None and Path(path).name in released:
        name = released[Path(path).name]
    if name is not None:
        presets = catalog if catalog is not None else load_presets()
        if name not in presets:
            raise TpasInputError(f"unknown BEiT-3 preset {name!r}; expected one of {', '.join(sorted(presets))}")
        cfg = {**presets[name], **cfg}
    elif catalog is not None:
        matching = [n for n, p in catalog.items() if not _disagreements(p, inferred)]
        if not matching:
            raise TpasInputError(
                f"the checkpoint's architecture ({inferred.name}, width {inferred.embed_dim}, depth {inferred.layers})"
                f" is none of the config's presets ({', '.join(catalog)})",
                path,
            )
        cfg = {**catalog[matching[0]], **cfg}
    unknown = sorted(set(cfg) - _CONFIG_FIELDS)
    if unknown:
        raise TpasInputError(
            f"unknown BEiT-3 config key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(_CONFIG_FIELDS))}"
        )
    problems = _disagreements(cfg, inferred)
    if problems:
        label = f"preset {name!r}" if name is not None else "the config"
        raise TpasInputError(f"{label} disagrees with the checkpoint: " + "; ".join(problems), path)
    extra = {k: cfg[k] for k in ("layernorm_eps", "text_max_len") if k in cfg}
    return dataclasses.replace(inferred, **extra).validate(path)


def find_tokenizer(checkpoint: Path | None, tokenizer: str | Path | None) -> Path:
    """The sentencepiece model to use: `tokenizer` when given, else `beit3.spm` next to the checkpoint."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_file():
            raise TpasInputError(f"tokenizer file not found (get {TOKENIZER_FILE} from {TOKENIZER_URL})", path)
        return path
    if checkpoint is not None and (Path(checkpoint).parent / TOKENIZER_FILE).is_file():
        return Path(checkpoint).parent / TOKENIZER_FILE
    where = f" next to the checkpoint ({Path(checkpoint).parent})" if checkpoint is not None else ""
    raise TpasInputError(
        f"BEiT-3 needs its sentencepiece model {TOKENIZER_FILE}: download it from {TOKENIZER_URL} and put it{where}, "
        "or pass --tokenizer FILE"
    )


@register("beit3")
class BEiT3Retrieval(RetrievalModel):
    """BEiT3ForRetrieval: torchscale `BEiT3` + `vision_head` / `language_head` (Linear, no bias) + `logit_scale`.

    `state_dict()` keys and shapes are those of the official checkpoints (`logit_scale`, `beit3.*`, `*_head.weight`).
    `logit_scale` and `beit3.vision_embed.mask_token` exist only so those files load strictly; inference ignores them.
    """

    has_match_head: ClassVar[bool] = False
    options = (
        FamilyOption("tokenizer", Path, "sentencepiece model (beit3.spm; default: the one beside the checkpoint)."),
        TRUST_CHECKPOINT,
        TTA_OPTION,
    )

    def __init__(self, config: BEiT3Config, tokenizer: BEiT3Tokenizer | None = None, **encoder_overrides: Any):
        super().__init__()
        config.validate()
        BEiT3 = _torchscale()[0]
        self.config = config
        self.beit3 = BEiT3(config.encoder_config(**encoder_overrides))
        self.vision_head = nn.Linear(config.embed_dim, config.embed_dim, bias=False)
        self.language_head = nn.Linear(config.embed_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.tokenizer = tokenizer
        self.image_transform = BEiT3ImageTransform(config.img_size)
        self._preprocess = BEiT3Preprocess(self.image_transform)
        self.tta = "none"  # test-time flip of gallery images (`--tta`, tpas.models.tta)

    @classmethod
    def from_checkpoint(
        cls,
        path: Path | None,
        config: dict[str, Any] | None = None,
        *,
        tokenizer: str | Path | None = None,
        trust_checkpoint: bool = False,
        tta: str | None = None,
    ) -> BEiT3Retrieval:
        """Load an official or fine-tuned BEiT-3 retrieval checkpoint (weights under `model`), strictly.

        Args:
            path: the `.pth` file. Training checkpoints holding an argparse Namespace need `trust_checkpoint`.
            config: optional architecture/preset that must agree with the checkpoint (see `resolve_config`).
            tokenizer: `beit3.spm`; default: `beit3.spm` next to the checkpoint.
            trust_checkpoint: allow full unpickling (only for files from a trusted source).
            tta: test-time augmentation of gallery images ("none" | "hflip", `tpas.models.tta`).
        """
        if path is None:
            raise TpasInputError(
                "beit3 needs --checkpoint: one of Microsoft's beit3_{base,large}_patch16_384_{coco,f30k}"
                f"_retrieval.pth ({RELEASE_PAGE}) or a fine-tune of them such as lhp_beit3.pth"
            )
        path = Path(path)
        state = strip_prefix(extract_state_dict(load_checkpoint(path, trust=trust_checkpoint), path), "module.")
        cfg = resolve_config(config, infer_config(state, path), path)
        tok = BEiT3Tokenizer(find_tokenizer(path, tokenizer), max_len=cfg.text_max_len)
        if tok.mask_id >= cfg.vocab_size:
            raise TpasInputError(
                f"has {tok.mask_id - 1} pieces (ids up to {tok.mask_id}) but the checkpoint's text embedding has only "
                f"{cfg.vocab_size} rows; BEiT-3 checkpoints go with {TOKENIZER_FILE} ({TOKENIZER_URL})",
                tok.path,
            )
        # Build on the meta device and adopt the checkpoint's tensors: no random init of ~700M parameters, no copy.
        with torch.device("meta"):
            model = cls(cfg, tok)
        model.check_layout(state, path)
        model.load_state_dict(state, strict=True, assign=True)
        model.float()
        model.checkpoint_path = path
        model.tta = check_tta(tta)
        return model.eval()

    def check_layout(self, state: Mapping[str, torch.Tensor], path: Path | None = None) -> None:
        """TpasInputError naming the first missing/unexpected key or wrong shape versus this architecture."""
        mine = self.state_dict()
        own = {k: tuple(v.shape) for k, v in mine.items()}
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [
            f"{k} {tuple(state[k].shape)} (expected {own[k]})"
            for k in own
            if k in state and tuple(state[k].shape) != own[k]
        ]
        # load_state_dict(assign=True) adopts the tensors as they are: an integer tensor cannot become a parameter.
        wrong += [
            f"{k} {state[k].dtype} (expected floating point)"
            for k, v in mine.items()
            if k in state and v.is_floating_point() and not state[k].is_floating_point()
        ]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s), first {missing[0]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]}")
        if wrong:
            problems.append(f"{len(wrong)} wrong shape(s), first {wrong[0]}")
        if problems:
            raise TpasInputError(
                f"does not match the {self.config.name} retrieval layout: " + "; ".join(problems), path
            )

    def describe(self) -> dict[str, Any]:
        """Architecture, preprocessing and tokenizer identity (goes into SimsMatrix meta and the cache key)."""
        out: dict[str, Any] = {
            "family": self.family,
            "model": self.config.name,
            "config": dataclasses.asdict(self.config),
            "preprocess": {
                "resize": [self.config.img_size, self.config.img_size],
                "interpolation": "PIL bicubic",
                "crop": None,
                "mean": list(IMAGE_MEAN),
                "std": list(IMAGE_STD),
            },
            "text": {"max_len": self.config.text_max_len, "ids": "xlm-r (bos 0, pad 1, eos 2, unk 3, spm id + 1)"},
            "tta": self.tta,
        }
        if self.tokenizer is not None:
            out["tokenizer"] = {"file": self.tokenizer.path.name, "sha256": self.tokenizer.sha256}
        return out

    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        """{"image": [3, S, S]} exactly as the reference's test transform; with TTA, the image and its mirror."""
        return self.image_preprocessor(image, None)

    @property
    def image_preprocessor(self) -> Callable[[Image.Image, Image.Image | None], Features]:
        """`preprocess` as a standalone picklable object, so spawned DataLoader workers never copy the weights."""
        return with_tta(self._preprocess, self.tta)

    def tokenize(self, texts: Sequence[str]) -> Features:
        """{"input_ids", "padding_mask"} [N, 64]; captions are not cleaned (the reference does not clean them)."""
        if self.tokenizer is None:
            raise TpasInputError(f"no tokenizer loaded: BEiT-3 needs {TOKENIZER_FILE} ({TOKENIZER_URL})")
        return self.tokenizer(texts)

    def _param(self) -> torch.Tensor:
        return self.vision_head.weight

    def encode_images(self, batch: Features) -> Features:
        """Vision-expert pass; `embed` = L2-normalised `vision_head(CLS)` [N, D] (with TTA, of both views)."""
        p = self._param()

        def encode(b: Features) -> torch.Tensor:
            images = b["image"].to(device=p.device, dtype=p.dtype)
            out = self.beit3(textual_tokens=None, visual_tokens=images, text_padding_position=None)
            return F.normalize(self.vision_head(out["encoder_out"][:, 0, :]), dim=-1)

        return encode_views(encode, batch, self.tta)

    def encode_texts(self, tokens: Features) -> Features:
        """Language-expert pass with the padding mask; `embed` = L2-normalised `language_head(CLS)` [N, D]."""
        device = self._param().device
        ids = tokens["input_ids"].to(device)
        mask = tokens["padding_mask"].to(device=device, dtype=torch.bool)
        # Drop trailing columns that are padding in every row: positions are absolute and padded keys are masked, so
        # this changes only float rounding (tests pin <= 1e-6) while a batch of short captions costs far less than 64.
        used = (~mask).any(dim=0).nonzero()
        keep = int(used[-1].item()) + 1 if len(used) else 1
        ids, mask = ids[:, :keep], mask[:, :keep]
        out = self.beit3(textual_tokens=ids, visual_tokens=None, text_padding_position=mask)
        cls = self.language_head(out["encoder_out"][:, 0, :])
        return {"embed": F.normalize(cls, dim=-1)}
