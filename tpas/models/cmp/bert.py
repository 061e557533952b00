"""BERT text encoder + cross encoder + MLM head with the parameter names of CMP's `text_encoder` (ALBEF/X-VLM style).

Layers [0, text_layers) are plain BERT layers (text mode); the next `fusion_layers` layers add a `crossattention`
block whose key/value read the image tokens (width vision_width -> text_width). transformers' BertLayer cannot take a
different key/value width for cross-attention, so the layers are written here with the exact checkpoint names.
Masks follow the reference: (1 - mask) * -10000 added to the attention scores; LayerNorm eps 1e-12; exact GELU.
X-VLM and APTM (`tpas.models.xvlm`) build the same modules from their own config (any object with these fields).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class TextConfig(Protocol):
    """The sizes the BERT modules read (CMPConfig and XVLMConfig both have them)."""

    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    text_intermediate: int
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int
    text_layer_norm_eps: float
    hidden_dropout: float
    attention_dropout: float

    @property
    def vision_width(self) -> int: ...

    @property
    def num_text_layers_total(self) -> int: ...


def trim_trailing_padding(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the positions after the batch's last real token from text states [N, L, D] and their mask [N, L].

    Those [PAD]s are masked with -10000 (exp underflows to exactly 0), so nothing the fusion layers compute for the
    real tokens depends on them: the same computation on fewer tokens.
    """
    used = mask.bool().any(dim=0).nonzero()
    n = int(used.max()) + 1 if used.numel() else mask.shape[1]
    return states[:, :n], mask[:, :n]


def extended_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 1/0 mask -> [B, 1, 1, L] additive mask (0 keep, -10000 drop), as the reference BertModel builds it."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * -10000.0


class BertEmbeddings(nn.Module):
    """word + position + token-type (always 0) embeddings -> LayerNorm -> dropout."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.text_width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        # Persistent in cmp.pth ([1, 512] int64); only its arange values are used.
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)).clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        x = x + self.token_type_embeddings(torch.zeros_like(input_ids))
        x = x + self.position_embeddings(self.position_ids[:, :n])
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """query from the hidden states; key/value from the hidden states or (cross) the image tokens."""

    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = cfg.text_heads
        self.query = nn.Linear(cfg.text_width, cfg.text_width)
        self.key = nn.Linear(kv_width, cfg.text_width)
        self.value = nn.Linear(kv_width, cfg.text_width)
        self.dropout_p = cfg.attention_dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        if mask is not None:
            mask = mask.to(q.dtype)
        p = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


class BertSelfOutput(nn.Module):
    """dense -> dropout -> residual -> LayerNorm."""

    def __init__(self, cfg: TextConfig, in_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """`self` (attention) + `output` (projection, residual, LayerNorm): the checkpoint's nesting."""

    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertSelfOutput(cfg, cfg.text_width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(x, mask, kv), x)


class BertIntermediate(nn.Module):
    """dense -> exact GELU."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention, (fusion layers only) cross-attention to the image tokens, feed-forward."""

    def __init__(self, cfg: TextConfig, cross: bool) -> None:
        super().__init__()
        self.attention = BertAttention(cfg, cfg.text_width)
        if cross:
            self.crossattention = BertAttention(cfg, cfg.vision_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.text_intermediate)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.attention(x, mask)
        if hasattr(self, "crossattention"):
            if image is None:
                raise ValueError("fusion layers need image tokens")
            x = self.crossattention(x, image_mask, image)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """`layer.0 ... layer.{n-1}`; text mode runs [0, text_layers), fusion mode the rest."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.text_layers = cfg.text_layers
        self.layer = nn.ModuleList(BertLayer(cfg, i >= cfg.text_layers) for i in range(cfg.num_text_layers_total))


class BertModel(nn.Module):
    """Embeddings + encoder (no pooler, as in the release)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Output of the text layers [B, L, D] (the reference's mode='text')."""
        x = self.embeddings(input_ids)
        mask = extended_mask(attention_mask, x.dtype)
        for layer in self.encoder.layer[: self.encoder.text_layers]:
            x = layer(x, mask)
        return x

    def fusion(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fusion layers over text states with cross-attention to `image` [B, N, Dv] (mode='fusion').

        `image_mask` ([B, N] 1/0) defaults to all ones, which adds nothing to the scores, as in the reference.
        """
        mask = extended_mask(attention_mask, text_states.dtype)
        img_mask = None if image_mask is None else extended_mask(image_mask, text_states.dtype)
        x = text_states
        for layer in self.encoder.layer[self.encoder.text_layers :]:
            x = layer(x, mask, image, img_mask)
        return x


class BertPredictionHeadTransform(nn.Module):
    """dense -> GELU -> LayerNorm."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """transform -> decoder (weight tied to the word embeddings, bias tied to `bias`)."""

    def __init__(self, cfg: TextConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.text_width, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # Both `decoder.bias` and `bias` are keys of cmp.pth: one tensor under two names.
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    """`cls.predictions`."""

    def __init__(self, cfg: TextConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class BertForMaskedLM(nn.Module):
    """`text_encoder`: `bert` (text + fusion layers) and `cls` (MLM head)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.bert = BertModel(cfg)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)
