"""CMP: pose-aware Swin image encoder, BERT text encoder, BERT cross encoder with ITM and MLM heads.

Parameter names and shapes are those of the released `cmp.pth` (weights under `model`), so it loads with strict=True.

Training-facing API (the trainer in `tpas.train` codes against exactly these; all take batched tensors):

    encode_image_tokens(image, pose=None) -> [B, 1+P, Dv]   Swin tokens (mean CLS first) with the pose block applied
    image_feat(tokens)                    -> [B, E]         L2-normalised ITC feature (3-bin pooled patches -> proj)
    encode_text_tokens(input_ids, attention_mask) -> [B, L, Dt]  output of the text layers (the ITC text states)
    text_feat(text_states)                -> [B, E]         L2-normalised ITC feature ([CLS] + 3 bins incl. padding)
    cross_cls(text_states, attention_mask, image_tokens, image_mask=None) -> [B, Dt]  fusion layers' [CLS] output
    itm_logits(cls)                       -> [B, 2]         itm_head; the match score is logit[:, 1]
    mlm_logits(input_ids, attention_mask, image_tokens, masked_pos=None) -> [B, L, V] or [B, M, V]
                                                            text layers on the masked ids, fusion with the image,
                                                            MLM head (tied decoder); masked_pos gathers positions
    temp                                  nn.Parameter []   ITC temperature (unused at test time)
    config                                CMPConfig         every size; CMPConfig.tiny() trains on a CPU

Retrieval interface (`tpas.models.base.RetrievalModel`, run by the shared engine): `preprocess(image, pose)`,
`tokenize(captions)`, `encode_images`, `encode_texts`, `similarity` (cosine), `match` (ITM logit), and
`finalize_rerank` (the reference's global min-max combination).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...errors import TpasInputError
from ..base import TRUST_CHECKPOINT, VOCAB, Features, RetrievalModel
from ..tta import TTA_MATCH_OPTION, check_tta, encode_views, with_tta
from .bert import BertForMaskedLM, trim_trailing_padding
from .config import CMPConfig, infer_config, observed_image_size
from .swin import Size, SwinEncoder, adaptive_pool_tokens, as_hw
from .text import CMPTokenizer, find_vocab


@torch.no_grad()
def init_swin_bert_weights(model: nn.Module) -> None:
    """Random init of a Swin + BERT model for training (shared by CMP and X-VLM/APTM): truncated normal (std 0.02) for
    Linear weights and relative-position tables, normal (0.02) embeddings with a zero padding row, zero biases,
    LayerNorm 1/0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith("relative_position_bias_table"):
            nn.init.trunc_normal_(p, std=0.02)


class PoseAttention(nn.Module):
    """Multi-head attention with the pose tokens as query and the image tokens as key/value (`pose_block.attn`)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, image: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        b, n, c = image.shape
        h = self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, n, h, c // h).transpose(1, 2)

        q, k, v = split(self.q(pose)), split(self.k(image)), split(self.v(image))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class PoseBlock(nn.Module):
    """image + attn(LN(image) as key/value, LN(pose) as query); one LayerNorm (eps 1e-5) for both, no MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = PoseAttention(dim, heads)

    def forward(self, image: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        return image + self.attn(self.norm(image), self.norm(pose))


class PoseConv(nn.Module):
    """Conv3x3(3->W) + BN + ReLU, Conv3x3(W->3) + BN + ReLU applied to the pose map before the Swin encoder."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.reduce = nn.Sequential(nn.Conv2d(width, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.expand(x))


def feature_mapping(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """BatchNorm1d -> Dropout -> Linear (`vision_proj` / `text_proj`)."""
    return nn.Sequential(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, out_dim))


@dataclass(frozen=True)
class CMPPreprocess:
    """Test-time image transform of the reference: RGB, resize to size x size bicubic (aspect not kept), [0, 1],
    normalise with the CLIP mean/std. Pose maps get the same transform. Picklable (runs in DataLoader workers).
    `size` may be (height, width) (X-VLM and APTM share this transform)."""

    size: Size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def image_tensor(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> normalised float tensor [3, height, width]."""
        h, w = as_hw(self.size)
        img = image.convert("RGB").resize((w, h), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return x.sub(mean).div(std)

    def __call__(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        out = {"image": self.image_tensor(image)}
        if pose is not None:
            out["pose"] = self.image_tensor(pose)
        return out


class CMP(RetrievalModel):
    """The CMP model (see the module docstring for the training API). Build with `CMP(CMPConfig())` or
    `CMP.from_checkpoint(path)`; `tokenizer` is set by `from_checkpoint` or `set_tokenizer(vocab_path)`.
    `init=False` skips the random initialisation (for callers that load every tensor right after)."""

    has_match_head = True
    options = (VOCAB, TRUST_CHECKPOINT, TTA_MATCH_OPTION)

    def __init__(self, config: CMPConfig | None = None, *, init: bool = True) -> None:
        super().__init__()
        cfg = config or CMPConfig()
        self.config = cfg
        # Registration order follows cmp.pth's key order: temp, vision, text, projections, itm, pose.
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
        self.text_encoder = BertForMaskedLM(cfg)
        self.vision_proj = feature_mapping(cfg.vision_proj_in, cfg.embed_dim, cfg.itc_dropout)
        self.text_proj = feature_mapping(cfg.text_proj_in, cfg.embed_dim, cfg.itc_dropout)
        d = cfg.text_width
        self.itm_head = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, 2))
        if cfg.pose:
            self.pose_block = PoseBlock(cfg.vision_width, cfg.pose_heads)
            if cfg.pose_conv:
                self.pose_conv = PoseConv(cfg.pose_conv_width)
        self.tokenizer: CMPTokenizer | None = None
        self.checkpoint_sha256: str | None = None
        self._preprocess = CMPPreprocess(cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))
        self.tta = "none"  # test-time flip of gallery images (`--tta`, tpas.models.tta)
        if init:
            # Skipped when a strict load overwrites every tensor anyway (17 s of truncated-normal draws at full size).
            self.init_weights()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init for training from scratch: truncated normal (std 0.02) for Linear/Embedding/bias tables,
        LayerNorm 1/0, projection Linear std 1e-5 (as the reference's feature_mapping), temp = config.temp."""
        init_swin_bert_weights(self)
        for proj in (self.vision_proj, self.text_proj):
            nn.init.normal_(proj[2].weight, std=1e-5)
            nn.init.zeros_(proj[2].bias)
        self.text_encoder.cls.predictions.bias.zero_()
        self.temp.fill_(float(self.config.temp))

    # ------------------------------------------------------------------ training-facing API
    def encode_image_tokens(self, image: torch.Tensor, pose: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens [B, 1+P, Dv]: Swin output (mean CLS first); for pose-aware configs the pose map goes through
        pose_conv (if configured) and the same Swin, and pose_block adds its cross-attention to the image tokens."""
        tokens = self.vision_encoder(image)
        if self.config.pose:
            if pose is None:
                raise ValueError("this CMP model is pose-aware: encode_image_tokens needs the pose maps")
            if self.config.pose_conv:
                pose = self.pose_conv(pose)
            tokens = self.pose_block(tokens, self.vision_encoder(pose))
        return tokens

    def image_feat(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image feature [B, E]: patch tokens (CLS dropped) in pool_bins adaptive bins, concatenated,
        vision_proj (BatchNorm1d, Dropout, Linear), L2-normalised."""
        pooled = adaptive_pool_tokens(tokens[:, 1:], self.config.pool_bins).flatten(1)
        return F.normalize(self.vision_proj(pooled), dim=-1)

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text states [B, L, Dt]: BERT embeddings + the text layers [0, text_layers) (layer 5's output in the
        release, not layer 11) with the padding mask."""
        return self.text_encoder.bert.text(input_ids, attention_mask)

    def text_feat(self, text_states: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text feature [B, E]: [CLS] + pool_bins adaptive bins over tokens 1..L-1 INCLUDING [SEP]
        and [PAD] positions (the reference does not mask them), concatenated, text_proj, L2-normalised."""
        pooled = adaptive_pool_tokens(text_states[:, 1:], self.config.pool_bins).flatten(1)
        x = torch.cat([text_states[:, 0], pooled], dim=1)
        return F.normalize(self.text_proj(x), dim=-1)

    def cross_cls(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[CLS] output [B, Dt] of the fusion layers run on `text_states` with cross-attention to `image_tokens`
        (all image tokens attended unless `image_mask` [B, N] says otherwise)."""
        return self.text_encoder.bert.fusion(text_states, attention_mask, image_tokens, image_mask)[:, 0]

    def itm_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """itm_head logits [B, 2] (Linear, LayerNorm eps 1e-5, exact GELU, Linear); index 1 = match."""
        return self.itm_head(cls)

    def mlm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        masked_pos: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits: text layers on the (masked) ids, fusion layers with the image, MLM head (decoder tied to the
        word embeddings). [B, L, V], or [B, M, V] at the positions `masked_pos` [B, M] when given (as the
        reference's gather before the head)."""
        states = self.text_encoder.bert.text(input_ids, attention_mask)
        fused = self.text_encoder.bert.fusion(states, attention_mask, image_tokens, image_mask)
        if masked_pos is not None:
            fused = torch.gather(fused, 1, masked_pos.unsqueeze(-1).expand(-1, -1, fused.shape[-1]))
        return self.text_encoder.cls(fused)

    # ------------------------------------------------------------------ retrieval interface
    def set_tokenizer(self, vocab_path: str | Path) -> CMPTokenizer:
        """Attach the WordPiece tokenizer; its vocabulary must have config.vocab_size tokens."""
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
    def from_checkpoint(
        cls, path: Path | None, config: dict[str, Any] | CMPConfig | None = None, **options: Any
    ) -> CMP:
        """Load `path` ({'model': sd}, {'model': sd, 'config': ...}, or a bare state dict) with strict key matching.

        The architecture comes from the tensors (`infer_config`); a given `config` must agree on every architecture
        field or TpasInputError lists the differences. Options: `vocab` (default: vocab.txt beside the checkpoint),
        `trust_checkpoint` (allow full unpickling).
        """
        from ..checkpoint import extract_state_dict, load_checkpoint, sha256_file, strip_prefix

        if path is None:
            raise TpasInputError("CMP needs --checkpoint (the released cmp.pth or a tpas-trained checkpoint)")
        path = Path(path)
        obj = load_checkpoint(path, trust=bool(options.get("trust_checkpoint")))
        state = strip_prefix(extract_state_dict(obj, path), "module.")
        try:
            inferred = infer_config(state)
        except ValueError as e:
            raise TpasInputError(str(e), path) from None
        cfg = inferred
        if config is not None:
            given = config if isinstance(config, CMPConfig) else config_from_mapping(config)
            arch = architecture_fields()
            if observed_image_size(state) is None:
                # The weights fit any resolution (no saved masks): the given config decides it.
                arch.remove("image_size")
            diff = [f for f in arch if getattr(given, f) != getattr(inferred, f)]
            if diff:
                detail = "; ".join(
                    f"{f}: config {getattr(given, f)!r} vs checkpoint {getattr(inferred, f)!r}" for f in diff
                )
                raise TpasInputError(f"the config disagrees with the checkpoint ({detail})", path)
            cfg = given
        model = cls(cfg, init=False)
        model.load_cmp_state_dict(state, path)
        model.set_tokenizer(find_vocab(options.get("vocab"), path))
        model.checkpoint_sha256 = sha256_file(path)
        model.tta = check_tta(options.get("tta"))
        return model

    def load_cmp_state_dict(self, state: dict[str, torch.Tensor], path: str | Path | None = None) -> None:
        """Strict load (`load_state_dict_strict`): a missing/unexpected key or shape mismatch raises TpasInputError."""
        load_state_dict_strict(self, state, path, "CMP")

    def describe(self) -> dict[str, Any]:
        """Architecture, preprocessing and checkpoint identity (SimsMatrix meta and feature-cache key)."""
        return {
            "family": "cmp",
            "config": self.config.to_dict(),
            "checkpoint_sha256": self.checkpoint_sha256,
            "vocab": str(self.tokenizer.vocab_path) if self.tokenizer else None,
            "preprocess": {
                "resize": [self.config.image_size, self.config.image_size],
                "interpolation": "bicubic",
                "mean": list(self.config.image_mean),
                "std": list(self.config.image_std),
                "pose": self.config.pose,
                "caption_cleaning": "pre_caption",
                "max_tokens": self.config.max_tokens,
                "padding": "max_length",
            },
            "tta": self.tta,
            "itc": "cosine of normalised projections",
            "match": "itm_head logit[:, 1]",
            "final": "minmax(itm filled with row min) + 0.002 * minmax(itc), global",
        }

    @property
    def needs_pose(self) -> bool:
        """True when images must come with pose maps (`tpas infer cmp --pose DIR`)."""
        return self.config.pose

    @property
    def image_preprocessor(self) -> Callable[[Image.Image, Image.Image | None], Features]:
        """The picklable transform `preprocess` delegates to (hand this to DataLoader workers, not the model), with
        the mirror view for TTA."""
        return with_tta(self._preprocess, self.tta)

    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        """{'image': [3, S, S]} plus {'pose': [3, S, S]} when a pose map is given (same transform)."""
        if self.config.pose and pose is None:
            raise TpasInputError(
                "CMP is pose-aware: every image needs its pose map (pass --pose DIR; `tpas pose` renders them)"
            )
        return self.image_preprocessor(image, pose)

    def tokenize(self, texts: Sequence[str]) -> Features:
        """Clean + tokenize captions -> input_ids, attention_mask [N, max_tokens]."""
        if self.tokenizer is None:
            raise TpasInputError("CMP has no tokenizer: pass --vocab PATH (bert-base-uncased vocab.txt)")
        try:
            return self.tokenizer(texts)
        except ValueError as e:
            raise TpasInputError(str(e)) from None

    def encode_images(self, batch: Features) -> Features:
        """{'embed': [B, E] ITC feature, 'tokens': [B, 1+P, Dv] image tokens for the ITM cross encoder}; with TTA,
        `embed` averages the two views and `tokens` are the plain view's."""

        def encode(b: Features) -> Features:
            tokens = self.encode_image_tokens(b["image"], b.get("pose"))
            return {"embed": self.image_feat(tokens), "tokens": tokens}

        return encode_views(encode, batch, self.tta)

    def encode_texts(self, tokens: Features) -> Features:
        """{'embed': [N, E] ITC feature, 'states': [N, L, Dt] text-layer output, 'attention_mask': [N, L]}."""
        states = self.encode_text_tokens(tokens["input_ids"], tokens["attention_mask"])
        return {"embed": self.text_feat(states), "states": states, "attention_mask": tokens["attention_mask"]}

    def match(self, text: Features, image: Features) -> torch.Tensor:
        """ITM match logits [N] for paired rows: itm_head(fusion CLS)[:, 1] (raw logit, as the reference)."""
        tokens = image["tokens"]
        states, mask = trim_trailing_padding(text["states"], text["attention_mask"])
        cls = self.cross_cls(states.to(tokens.dtype), mask, tokens)
        return self.itm_logits(cls)[:, 1]

    def finalize_rerank(self, reranked: torch.Tensor, itc: torch.Tensor) -> torch.Tensor:
        """The reference's final score: global min-max of the filled ITM matrix + 0.002 x global min-max of ITC."""
        return cmp_final_scores(reranked, itc)


def load_state_dict_strict(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | Path | None = None, layout: str = "CMP"
) -> None:
    """Strict load into `model`. Recomputable buffers (shifted-window attn_mask, relative_position_index,
    position_ids) are accepted when present and filled from the model when absent; any other missing/unexpected key
    or shape mismatch raises TpasInputError naming the first keys and the `layout` expected."""
    own = model.state_dict()
    recomputable = ("attn_mask", "relative_position_index", "position_ids")
    state = dict(state)
    for k, v in own.items():
        if k not in state and k.rsplit(".", 1)[-1] in recomputable:
            state[k] = v
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {', '.join(unexpected[:3])}")
        raise TpasInputError(f"state dict does not match the {layout} layout: {'; '.join(parts)}", path)
    bad = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in own.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise TpasInputError(f"state dict shapes differ from the {layout} layout: {'; '.join(bad[:3])}", path)
    model.load_state_dict(state, strict=True)


def minmax_global(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over the whole matrix; a constant matrix maps to zeros (the reference would NaN)."""
    x = x.float()
    lo, hi = x.min(), x.max()
    span = hi - lo
    return (x - lo) / span if span > 0 else torch.zeros_like(x)


def cmp_final_scores(reranked: torch.Tensor, itc: torch.Tensor, itc_weight: float = 0.002) -> torch.Tensor:
    """NOTES step 10: minmax(filled ITM matrix) + itc_weight * minmax(ITC), both min-max over the whole Q x G."""
    if reranked.shape != itc.shape:
        raise ValueError(f"re-ranked {tuple(reranked.shape)} and ITC {tuple(itc.shape)} shapes differ")
    return minmax_global(reranked) + itc_weight * minmax_global(itc)


def architecture_fields() -> list[str]:
    """CMPConfig fields a checkpoint determines (a given config must agree with the checkpoint on these)."""
    return [
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
        "pool_bins",
        "pose",
        "pose_conv",
        "pose_conv_width",
    ]


def config_from_mapping(data: dict[str, Any]) -> CMPConfig:
    """CMPConfig from a YAML/dict config (`configs/models/cmp.yaml`): optional `family: cmp`, other keys = fields."""
    data = dict(data)
    family = data.pop("family", data.pop("model", "cmp"))
    if family != "cmp":
        raise TpasInputError(f"config is for model family {family!r}, not cmp")
    try:
        return CMPConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise TpasInputError(f"invalid CMP config: {e}") from None


__all__ = [
    "CMP",
    "CMPConfig",
    "CMPPreprocess",
    "cmp_final_scores",
    "config_from_mapping",
    "infer_config",
    "minmax_global",
]
