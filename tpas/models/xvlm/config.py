"""X-VLM / APTM architecture and test-time rules: every size is a field; `for_family` gives the released defaults.

`infer_xvlm_config(state_dict, base)` reads the architecture back from a checkpoint's tensors: Swin depths, widths,
heads and window from the relative-position tables, the input size from the shifted-window masks (and, for APTM's
384 x 128 input, from the last stage's shrunk window), BERT width, text/fusion split, vocabulary, whether the MLM
head is kept (APTM's `text_encoder.bert.*` + `text_encoder.cls.*` layout), projection and ITM widths.
Sources: zengyan-97/X-VLM configs/Retrieval_*.yaml, configs/config_swinB_384.json; Shuyu-XJTU/APTM
configs/Retrieval_*.yaml, configs/config_swinB_384.json, dataset/__init__.py (docs/models/xvlm.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cmp.config import CLIP_MEAN, CLIP_STD, typed_fields, window_from_table

# APTM normalises with the statistics of the data set it was fine-tuned on (APTM dataset/__init__.py, test_norm);
# the MALS pre-trained model is evaluated on CUHK-PEDES with CUHK's statistics.
APTM_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cuhk": ((0.38901278, 0.3651612, 0.34836376), (0.24344306, 0.23738699, 0.23368555)),
    "icfg": ((0.30941582, 0.28956893, 0.30347288), (0.25849792, 0.24547698, 0.2366199)),
    "rstp": ((0.27722597, 0.26065794, 0.3036557), (0.2609547, 0.2508087, 0.25293276)),
    "pa100k": ((0.46485138, 0.45038012, 0.4632019), (0.25088054, 0.24609283, 0.24240193)),
    "mals": ((0.38901278, 0.3651612, 0.34836376), (0.24344306, 0.23738699, 0.23368555)),
}
# ICFG-PEDES and RSTPReid configs set icfg_rstp: True, which switches APTM's caption cleaning to alphanumerics only.
APTM_ALNUM_DATASETS = ("icfg", "rstp")
CAPTION_RULES = ("pre_caption", "words", "alnum")


@dataclass(frozen=True)
class XVLMConfig:
    """Sizes of an X-VLM-style model (Swin image encoder, BERT text + fusion encoder, Linear ITC projections, ITM
    head) and its test-time input rules. The defaults are X-VLM's released retrieval models (16M, COCO/Flickr).

    `image_size` is (height, width). `mlm_head` keeps BERT's MLM head (`text_encoder.bert.*`, `text_encoder.cls.*`,
    APTM's layout); without it the text encoder is a bare BertModel (`text_encoder.embeddings.*`, X-VLM's layout).
    `caption_cleaning`: "pre_caption" (X-VLM: CMP's rule, words split on spaces), "words" (APTM on CUHK-PEDES: only
    truncation to max_words), "alnum" (APTM on ICFG/RSTP: lower-case, runs of non-alphanumerics become one space).
    """

    image_size: tuple[int, int] = (384, 384)
    patch_size: int = 4
    swin_embed_dim: int = 128
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    swin_mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    vocab_size: int = 30522
    text_width: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    text_heads: int = 12
    text_intermediate: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    text_layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    embed_dim: int = 256
    temp: float = 0.07
    mlm_head: bool = False
    max_tokens: int = 40
    max_words: int = 30
    caption_cleaning: str = "pre_caption"
    image_mean: tuple[float, float, float] = field(default=CLIP_MEAN)
    image_std: tuple[float, float, float] = field(default=CLIP_STD)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be [height, width], got {self.image_size}")
        if len(self.swin_depths) != len(self.swin_heads):
            raise ValueError(f"swin_depths {self.swin_depths} and swin_heads {self.swin_heads} differ in length")
        step = self.patch_size * 2 ** (len(self.swin_depths) - 1)
        if any(s % step for s in self.image_size):
            raise ValueError(
                f"image_size {list(self.image_size)} must be divisible by patch_size * 2**(stages-1) = {step}"
            )
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not a multiple of text_heads {self.text_heads}")
        if self.caption_cleaning not in CAPTION_RULES:
            raise ValueError(f"caption_cleaning {self.caption_cleaning!r}; expected one of {', '.join(CAPTION_RULES)}")

    @property
    def vision_width(self) -> int:
        """Width of the final Swin stage (1024 for Swin-B): image tokens, vision_proj input, cross-attention keys."""
        return self.swin_embed_dim * 2 ** (len(self.swin_depths) - 1)

    @property
    def num_text_layers_total(self) -> int:
        """All BERT layers (text + fusion)."""
        return self.text_layers + self.fusion_layers

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: XVLMConfig | None = None) -> XVLMConfig:
        """`base` (default: X-VLM's release) with the fields in `data` (a dict or YAML mapping) replaced."""
        return dataclasses.replace(base or cls(), **typed_fields(cls, data, "X-VLM"))

    @classmethod
    def for_family(cls, family: str, trained_on: str = "cuhk") -> XVLMConfig:
        """The released architecture and test rules of `family`: "xvlm" (Retrieval_coco/flickr.yaml: 384 x 384,
        window 12, 40 tokens, 30 words, CLIP statistics) or "aptm" (Retrieval_cuhk/icfg/rstp.yaml: 384 x 128,
        window 8, MLM head kept, 56 tokens and words, the statistics of `trained_on`)."""
        if family == "xvlm":
            return cls()
        if family != "aptm":
            raise ValueError(f"unknown family {family!r}")
        if trained_on not in APTM_NORMS:
            raise ValueError(f"trained_on {trained_on!r}; expected one of {', '.join(APTM_NORMS)}")
        mean, std = APTM_NORMS[trained_on]
        return cls(
            image_size=(384, 128),
            window_size=8,
            mlm_head=True,
            max_tokens=56,
            max_words=56,
            caption_cleaning="alnum" if trained_on in APTM_ALNUM_DATASETS else "words",
            image_mean=mean,
            image_std=std,
        )

    @classmethod
    def tiny(cls, family: str = "xvlm", **overrides: Any) -> XVLMConfig:
        """A CPU-sized model with the released key names: Swin embed 16, depths (1, 1, 2, 1), heads (1, 2, 2, 4),
        BERT width 128 (2 heads of 64, the rule `infer_xvlm_config` reads heads back with), 2 text + 2 fusion layers,
        128-token vocabulary, projections to 32. X-VLM: 64 x 64, window 2 (stage 2 has a shifted-window mask);
        APTM: 64 x 32, depths (2, 1, 2, 1) so stage 0 has the mask, and stage 3's 2 x 1 grid shrinks its window to 1
        (as APTM's 12 x 4 stage 3 does): both tensors together pin the input size, as in the release."""
        base = dataclasses.replace(
            cls.for_family(family),
            image_size=(64, 64) if family == "xvlm" else (64, 32),
            swin_embed_dim=16,
            swin_depths=(1, 1, 2, 1) if family == "xvlm" else (2, 1, 2, 1),
            swin_heads=(1, 2, 2, 4),
            window_size=2,
            vocab_size=128,
            text_width=128,
            text_layers=2,
            fusion_layers=2,
            text_heads=2,
            text_intermediate=256,
            max_position_embeddings=64,
            embed_dim=32,
        )
        return dataclasses.replace(base, **overrides)


ARCHITECTURE_FIELDS = (
    "image_size",
    "patch_size",
    "swin_embed_dim",
    "swin_depths",
    "swin_heads",
    "window_size",
    "vocab_size",
    "text_width",
    "text_layers",
    "fusion_layers",
    "text_intermediate",
    "max_position_embeddings",
    "type_vocab_size",
    "embed_dim",
    "mlm_head",
)
"""XVLMConfig fields a checkpoint determines (a given config must agree with the checkpoint on these)."""


def _stage_windows(sd: dict[str, torch.Tensor]) -> dict[int, int]:
    out = {}
    for k, v in sd.items():
        m = re.match(r"vision_encoder\.layers\.(\d+)\.blocks\.0\.attn\.relative_position_bias_table$", k)
        if m:
            out[int(m.group(1))] = window_from_table(v.shape[0])
    return out


def observed_image_hw(sd: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(height, width) in pixels that a Swin state dict pins down, or None when its tensors leave it open.

    A shifted-window mask [nW, N, N] at stage i gives that stage's grid area nW * window_i**2; a stage whose window
    shrank below the widest has its shorter side equal to that window. Both together give a rectangle, taken upright
    (height >= width: person crops); a mask alone is read as a square; without a mask the input size is open.
    """
    patch = sd["vision_encoder.patch_embed.proj.weight"].shape[-1]
    windows = _stage_windows(sd)
    widest = max(windows.values(), default=0)
    shrunk = [(s, w) for s, w in sorted(windows.items()) if w < widest]
    for k in sorted(sd):
        m = re.match(r"vision_encoder\.layers\.(\d+)\.blocks\.\d+\.attn_mask$", k)
        if not m or int(m.group(1)) not in windows:
            continue
        stage = int(m.group(1))
        area = sd[k].shape[0] * windows[stage] ** 2
        if shrunk:
            short = shrunk[0][1] * 2 ** (shrunk[0][0] - stage)
            long = area // short
        else:
            long = short = math.isqrt(area)
            if short * short != area:
                return None
        scale = patch * 2**stage
        return long * scale, short * scale
    return None


def infer_xvlm_config(state_dict: dict[str, torch.Tensor], base: XVLMConfig) -> XVLMConfig:
    """The architecture an X-VLM/APTM state dict was built with; `base` supplies what the tensors leave open.

    Raises ValueError when a required key is missing or shapes contradict each other.
    """
    sd = state_dict

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"not an X-VLM/APTM state dict: key {key!r} is missing")
        return tuple(sd[key].shape)

    embed, in_ch, patch, _ = shape("vision_encoder.patch_embed.proj.weight")
    if in_ch != 3:
        raise ValueError(f"vision_encoder.patch_embed expects {in_ch} input channels; X-VLM uses RGB (3)")
    blocks: dict[int, set[int]] = {}
    for k in sd:
        if m := re.match(r"vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", k):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks:
        raise ValueError("not an X-VLM/APTM state dict: no vision_encoder.layers.*.blocks.* keys")
    n_stages = max(blocks) + 1
    heads = tuple(
        shape(f"vision_encoder.layers.{i}.blocks.0.attn.relative_position_bias_table")[1] for i in range(n_stages)
    )
    windows = _stage_windows(sd)
    mlm = "text_encoder.cls.predictions.bias" in sd
    bert = "text_encoder.bert." if mlm else "text_encoder."
    vocab, width = shape(bert + "embeddings.word_embeddings.weight")
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(bert) + r"encoder\.layer\.(\d+)\.", k))}
    fusion = sorted(i for i in layer_ids if bert + f"encoder.layer.{i}.crossattention.self.query.weight" in sd)
    if not fusion:
        raise ValueError(f"not an X-VLM/APTM state dict: no {bert}encoder.layer.*.crossattention keys")
    embed_dim, vision_width = shape("vision_proj.weight")
    if vision_width != embed * 2 ** (n_stages - 1):
        raise ValueError(
            f"vision_proj takes {vision_width} features but the Swin's last stage is {embed * 2 ** (n_stages - 1)} wide"
        )
    if shape("text_proj.weight") != (embed_dim, width):
        raise ValueError(f"text_proj.weight is {shape('text_proj.weight')}, expected {(embed_dim, width)}")
    return dataclasses.replace(
        base,
        image_size=observed_image_hw(sd) or base.image_size,
        patch_size=patch,
        swin_embed_dim=embed,
        swin_depths=tuple(max(blocks.get(i, {-1})) + 1 for i in range(n_stages)),
        swin_heads=heads,
        window_size=max(windows.values()),
        swin_mlp_ratio=shape("vision_encoder.layers.0.blocks.0.mlp.fc1.weight")[0] / embed,
        vocab_size=vocab,
        text_width=width,
        text_layers=fusion[0],
        fusion_layers=max(layer_ids) + 1 - fusion[0],
        # Head counts leave no trace in the weights: BERT-base uses head size 64 (12 heads).
        text_heads=width // 64 if width % 64 == 0 else base.text_heads,
        text_intermediate=shape(bert + "encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=shape(bert + "embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape(bert + "embeddings.token_type_embeddings.weight")[0],
        embed_dim=embed_dim,
        mlm_head=mlm,
    )
