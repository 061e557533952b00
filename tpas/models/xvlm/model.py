"""X-VLM and APTM: Swin image encoder, BERT text encoder + fusion layers, Linear ITC projections, ITM head.

Both are built from CMP's modules (`tpas.models.cmp.swin`, `tpas.models.cmp.bert`) under the checkpoints' own names:

    temp                      []            ITC temperature (unused at test time)
    vision_encoder.*          Swin v1       CMP's SwinEncoder (rectangular input for APTM)
    text_encoder.*            BertModel     X-VLM retrieval (`text_encoder.embeddings...`, no MLM head)
    text_encoder.bert.* / .cls.*            APTM (BertForMaskedLM: MLM head kept, decoder tied to the embeddings)
    vision_proj / text_proj   Linear        1024 -> 256 / 768 -> 256, on token 0 (the patch mean / [CLS])
    itm_head                  MLP           Linear(768, 1536) - LayerNorm - GELU - Linear(1536, 2)

Test time (X-VLM Retrieval.py `evaluation`, APTM reTools.py `evaluation`): ITC = cosine of the L2-normalised
projections; the ITM logit `itm_head(fusion CLS)[:, 1]` re-scores each query's top-k. X-VLM leaves every other cell at
-100; APTM fills them with the row minimum and adds 0.002 x the min-max-normalised ITC to the min-max-normalised
matrix (CMP's combination). The training-facing methods have CMP's names, so CMP's trainer drives X-VLM too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...errors import TpasInputError
from ..base import TRUST_CHECKPOINT, VOCAB, FamilyOption, Features, RetrievalModel
from ..cmp.bert import BertForMaskedLM, BertModel, trim_trailing_padding
from ..cmp.model import CMPPreprocess, cmp_final_scores, init_swin_bert_weights, load_state_dict_strict
from ..cmp.swin import SwinEncoder
from ..cmp.text import CMPTokenizer, find_vocab
from ..tta import TTA_MATCH_OPTION, check_tta, encode_views, with_tta
from .config import APTM_NORMS, ARCHITECTURE_FIELDS, XVLMConfig, infer_xvlm_config, observed_image_hw
from .text import clean_xvlm_caption

TRAINED_ON = FamilyOption(
    "trained_on",
    str,
    "Data set the APTM checkpoint was fine-tuned on: its image statistics (and, for icfg/rstp, its caption rule).",
    default="cuhk",
    choices=tuple(APTM_NORMS),
)
"""`tpas infer aptm --trained-on`: the checkpoint does not say which data set's statistics it was trained with."""

XVLM_FILL = -100.0
"""X-VLM's value for the cells of a re-ranked row outside its top-k (Retrieval.py: torch.full(..., -100.0))."""


def itm_mlp(width: int) -> nn.Sequential:
    """X-VLM's `build_mlp(width, 2)`: Linear(w, 2w) - LayerNorm(2w) - GELU (exact) - Linear(2w, 2)."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, 2))


class XVLMFamily(RetrievalModel):
    """The shared X-VLM/APTM model; the registered families `XVLM` and `APTM` differ in defaults and final scores.

    Build with `XVLM(XVLMConfig())` or `XVLM.from_checkpoint(path)`; `init=False` skips the random initialisation
    (for callers that load every tensor right after).
    """

    has_match_head = True
    options: ClassVar[tuple[FamilyOption, ...]] = (VOCAB, TRUST_CHECKPOINT, TTA_MATCH_OPTION)
    # How `finalize_rerank` combines the scores (goes into describe()).
    final_rule: ClassVar[str] = ""

    def __init__(self, config: XVLMConfig | None = None, *, init: bool = True) -> None:
        super().__init__()
        cfg = config or XVLMConfig.for_family(self.family)
        self.config = cfg
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self.vision_encoder = SwinEncoder(
            cfg.image_size,
            cfg.patch_size,
            cfg.swin_embed_dim,
            cfg.swin_depths,
            cfg.swin_heads,
            cfg.window_size,
            cfg.swin_mlp_ratio,
            cfg.drop_path_rate,
        )
        self.text_encoder: nn.Module = BertForMaskedLM(cfg) if cfg.mlm_head else BertModel(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = itm_mlp(cfg.text_width)
        self.tokenizer: CMPTokenizer | None = None
        self.checkpoint_sha256: str | None = None
        self._preprocess = CMPPreprocess(cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))
        self.tta = "none"  # test-time flip of gallery images (`--tta`, tpas.models.tta)
        if init:
            self.init_weights()

    @property
    def bert(self) -> BertModel:
        """The BERT embeddings + layers (inside the MLM wrapper for APTM's layout)."""
        return self.text_encoder.bert if self.config.mlm_head else self.text_encoder

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init for training: truncated normal (std 0.02) for Linear weights and relative-position tables,
        normal (0.02) embeddings, zero biases, LayerNorm 1/0, temp = config.temp."""
        init_swin_bert_weights(self)
        if self.config.mlm_head:
            self.text_encoder.cls.predictions.bias.zero_()
        self.temp.fill_(float(self.config.temp))

    # ------------------------------------------------------------------ training-facing API (CMP's names)
    def encode_image_tokens(self, image: torch.Tensor, pose: torch.Tensor | None = None) -> torch.Tensor:
        """Swin tokens [B, 1+P, Dv] (patch mean first). X-VLM has no pose branch: `pose` must be None."""
        if pose is not None:
            raise ValueError(f"{self.family} does not use pose maps")
        return self.vision_encoder(image)

    def image_feat(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image feature [B, E]: vision_proj of token 0 (the patch mean), L2-normalised."""
        return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text states [B, L, Dt]: embeddings + the text layers [0, text_layers) with the padding mask."""
        return self.bert.text(input_ids, attention_mask)

    def text_feat(self, text_states: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text feature [B, E]: text_proj of [CLS], L2-normalised."""
        return F.normalize(self.text_proj(text_states[:, 0]), dim=-1)

    def cross_cls(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[CLS] output [B, Dt] of the fusion layers over `text_states` with cross-attention to `image_tokens`."""
        return self.bert.fusion(text_states, attention_mask, image_tokens, image_mask)[:, 0]

    def itm_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """itm_head logits [B, 2]; index 1 = match."""
        return self.itm_head(cls)

    # ------------------------------------------------------------------ retrieval interface
    def set_tokenizer(self, vocab_path: str | Path) -> CMPTokenizer:
        """Attach the WordPiece tokenizer (cleaning is done by `tokenize`); its size must be config.vocab_size."""
        tok = CMPTokenizer(vocab_path, self.config.max_tokens, self.config.max_words)
        if tok.vocab_size != self.config.vocab_size:
            raise TpasInputError(
                f"vocab has {tok.vocab_size} tokens but the model's word embeddings have {self.config.vocab_size}; "
                "use the vocab the checkpoint was trained with (bert-base-uncased: 30,522)",
                vocab_path,
            )
        self.tokenizer = tok
        return tok

    @classmethod
    def base_config(cls, options: dict[str, Any]) -> XVLMConfig:
        """The family's released defaults before the checkpoint's tensors are read."""
        return XVLMConfig.for_family(cls.family)

    @classmethod
    def from_checkpoint(
        cls, path: Path | None, config: dict[str, Any] | XVLMConfig | None = None, **options: Any
    ) -> XVLMFamily:
        """Load `path` ({'model': sd, 'config': ...} as the original trainers save, or a bare state dict) strictly.

        The architecture comes from the tensors (`infer_xvlm_config`); a given config must agree on every
        architecture field or TpasInputError lists the differences. Options: `vocab` (default: vocab.txt beside the
        checkpoint), `trust_checkpoint`, and for APTM `trained_on` (normalisation and caption rule).
        """
        from ..checkpoint import extract_state_dict, load_checkpoint, sha256_file, strip_prefix

        if path is None:
            raise TpasInputError(f"{cls.family} needs --checkpoint (a released retrieval checkpoint)")
        path = Path(path)
        obj = load_checkpoint(path, trust=bool(options.get("trust_checkpoint")))
        state = strip_prefix(extract_state_dict(obj, path), "module.")
        base = cls.base_config(options)
        try:
            inferred = infer_xvlm_config(state, base)
        except ValueError as e:
            raise TpasInputError(str(e), path) from None
        cfg = inferred
        if config is not None:
            given = config if isinstance(config, XVLMConfig) else config_from_mapping(config, cls.family, base)
            fields = [f for f in ARCHITECTURE_FIELDS if f != "image_size" or observed_image_hw(state) is not None]
            diff = [f for f in fields if getattr(given, f) != getattr(inferred, f)]
            if diff:
                detail = "; ".join(
                    f"{f}: config {getattr(given, f)!r} vs checkpoint {getattr(inferred, f)!r}" for f in diff
                )
                raise TpasInputError(f"the config disagrees with the checkpoint ({detail})", path)
            cfg = given
        model = cls(cfg, init=False)
        load_state_dict_strict(model, state, path, f"{cls.family} ({'APTM' if cfg.mlm_head else 'X-VLM'} keys)")
        model.set_tokenizer(find_vocab(options.get("vocab"), path))
        model.checkpoint_sha256 = sha256_file(path)
        model.tta = check_tta(options.get("tta"))
        return model

    def describe(self) -> dict[str, Any]:
        """Architecture, preprocessing and checkpoint identity (SimsMatrix meta and feature-cache key)."""
        h, w = self.config.image_size
        return {
            "family": self.family,
            "config": self.config.to_dict(),
            "checkpoint_sha256": self.checkpoint_sha256,
            "vocab": str(self.tokenizer.vocab_path) if self.tokenizer else None,
            "preprocess": {
                "resize": [h, w],
                "interpolation": "bicubic",
                "mean": list(self.config.image_mean),
                "std": list(self.config.image_std),
                "caption_cleaning": self.config.caption_cleaning,
                "max_words": self.config.max_words,
                "max_tokens": self.config.max_tokens,
                "padding": "max_length",
            },
            "tta": self.tta,
            "itc": "cosine of normalised Linear projections of token 0",
            "match": "itm_head logit[:, 1]",
            "final": self.final_rule,
        }

    @property
    def image_preprocessor(self) -> Callable[[Image.Image, Image.Image | None], Features]:
        """The picklable transform `preprocess` delegates to (hand this to DataLoader workers, not the model), with
        the mirror view for TTA."""
        return with_tta(self._preprocess, self.tta)

    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        """{'image': [3, H, W]}: bicubic resize to the model's input size, [0, 1], mean/std normalisation; with TTA,
        the image and its mirror."""
        return self.image_preprocessor(image, None)

    def tokenize(self, texts: Sequence[str]) -> Features:
        """Clean (config.caption_cleaning) + tokenize captions -> input_ids, attention_mask [N, max_tokens]."""
        if self.tokenizer is None:
            raise TpasInputError(f"{self.family} has no tokenizer: pass --vocab PATH (bert-base-uncased vocab.txt)")
        try:
            cleaned = [clean_xvlm_caption(t, self.config.caption_cleaning, self.config.max_words) for t in texts]
        except ValueError as e:
            raise TpasInputError(str(e)) from None
        return self.tokenizer(cleaned, clean=False)

    def encode_images(self, batch: Features) -> Features:
        """{'embed': [B, E] ITC feature, 'tokens': [B, 1+P, Dv] image tokens for the ITM cross encoder}; with TTA,
        `embed` averages the two views and `tokens` are the plain view's."""

        def encode(b: Features) -> Features:
            tokens = self.encode_image_tokens(b["image"])
            return {"embed": self.image_feat(tokens), "tokens": tokens}

        return encode_views(encode, batch, self.tta)

    def encode_texts(self, tokens: Features) -> Features:
        """{'embed': [N, E] ITC feature, 'states': [N, L, Dt] text-layer output, 'attention_mask': [N, L]}."""
        states = self.encode_text_tokens(tokens["input_ids"], tokens["attention_mask"])
        return {"embed": self.text_feat(states), "states": states, "attention_mask": tokens["attention_mask"]}

    def match(self, text: Features, image: Features) -> torch.Tensor:
        """ITM match logits [N] for paired rows: itm_head(fusion CLS)[:, 1], all image tokens attended."""
        tokens = image["tokens"]
        states, mask = trim_trailing_padding(text["states"], text["attention_mask"])
        return self.itm_logits(self.cross_cls(states.to(tokens.dtype), mask, tokens))[:, 1]


class XVLM(XVLMFamily):
    """X-VLM retrieval (zengyan-97/X-VLM, 16M COCO/Flickr fine-tuned): re-ranked rows keep raw ITM logits."""

    final_rule = "itm logits on each row's top-k, -100 elsewhere"

    def finalize_rerank(self, reranked: torch.Tensor, itc: torch.Tensor) -> torch.Tensor:
        """X-VLM's matrix: raw ITM logits in each row's top-k, -100 in every other cell (`xvlm_fill`)."""
        return xvlm_fill(reranked, itc)


class APTM(XVLMFamily):
    """APTM (Shuyu-XJTU/APTM): X-VLM's design at 384 x 128 with window 8; CMP's final combination."""

    options: ClassVar[tuple[FamilyOption, ...]] = (VOCAB, TRUST_CHECKPOINT, TRAINED_ON, TTA_MATCH_OPTION)
    final_rule = "minmax(itm filled with row min) + 0.002 * minmax(itc), global"

    @classmethod
    def base_config(cls, options: dict[str, Any]) -> XVLMConfig:
        """APTM's release defaults for the data set it was fine-tuned on (`trained_on`, default cuhk)."""
        trained_on = options.get("trained_on") or "cuhk"
        if trained_on not in APTM_NORMS:
            raise TpasInputError(f"--trained-on {trained_on!r}; expected one of {', '.join(APTM_NORMS)}")
        return XVLMConfig.for_family("aptm", trained_on)

    def finalize_rerank(self, reranked: torch.Tensor, itc: torch.Tensor) -> torch.Tensor:
        """APTM's reTools.evaluation: global min-max of the row-min-filled ITM matrix + 0.002 x min-max ITC."""
        return cmp_final_scores(reranked, itc)


def xvlm_fill(reranked: torch.Tensor, itc: torch.Tensor, fill: float = XVLM_FILL) -> torch.Tensor:
    """Turn the engine's re-rank matrix (unscored cells at the row minimum) into X-VLM's (unscored cells at `fill`).

    The engine re-ranks each row's ITC top-k, so of the cells at the row minimum the scored one is the one with the
    highest ITC (lower column first on equal ITC, the engine's top-k rule): it keeps its logit and every other cell
    at the minimum becomes `fill`. (Exact unless two top-k logits tie at the minimum, or the candidates came from
    another model's matrix, where the raw top-k file `<out>.itm.pt` holds the scored cells.)
    """
    low = reranked.min(dim=1, keepdim=True).values
    at_low = reranked == low
    kept = itc.float().masked_fill(~at_low, float("-inf")).argmax(dim=1, keepdim=True)
    out = reranked.float().masked_fill(at_low, fill)
    return out.scatter(1, kept, low.float())


def config_from_mapping(data: dict[str, Any], family: str, base: XVLMConfig | None = None) -> XVLMConfig:
    """XVLMConfig from a YAML/dict config (`configs/models/xvlm.yaml`): optional `family:`, other keys = fields."""
    data = dict(data)
    named = data.pop("family", data.pop("model", family))
    if named != family:
        raise TpasInputError(f"config is for model family {named!r}, not {family}")
    try:
        return XVLMConfig.from_dict(data, base or XVLMConfig.for_family(family))
    except (TypeError, ValueError) as e:
        raise TpasInputError(f"invalid {family} config: {e}") from None
