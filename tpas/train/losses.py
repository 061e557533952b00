"""CMP training losses: ITC (identity-aware, label-smoothed, over the all-gathered batch), IHNM-enhanced ITM with
in-batch hard negatives, MLM, and the EDA caption view. Total = ITC + ITM + MLM.

X-VLM's retrieval fine-tuning (models/xvlm.py `get_contrastive_loss`, `get_matching_loss`) is the same loss with
CMP's additions off: `LossConfig(itc_label_smoothing=0, eda=False, ihnm=False, mlm=False)` gives ITC with
identity-aware targets + ITM over the B positives and 2B in-batch hard negatives, one mean. Total = ITC + ITM.

Normalisation is chosen so that, under DDP (which averages gradients over ranks), the gradient equals that of one
process holding the whole global batch: per-row means over equal local batch sizes for ITC, and for ITM/MLM (whose
row/token counts can differ per rank) the local sum divided by the global count / world size. The `paper` switches
(defaults) reproduce the original code where it differs from that (docs: README "Training CMP"):

- `itm_pooling: paper`: the in-batch matching loss is a mean over its 3B pairs and the identity hard-negative loss a
  separate mean over its 2B pairs, added (`pooled`: one mean over all 5B rows).
- `itc_gradient: paper`: the original's all-gather passes back only the gradient of this rank's own copy of the loss,
  so after DDP's average the ITC gradient reaching the features (not the temperature) is 1/world_size of the global
  batch's (`global`: exactly the global batch's). No difference on one process.
- `temp_clamp: null`: the temperature is never clamped (`[0.001, 0.5]`: clamped before every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TpasInputError
from . import distributed as dist_utils

ITM_POOLINGS = ("paper", "pooled")
ITC_GRADIENTS = ("paper", "global")
# Added to the in-batch negatives' sampling weights before same-id pairs are zeroed (the original's constant).
NEGATIVE_WEIGHT_FLOOR = 1e-5


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and switches (defaults = the CMP recipe of the original code)."""

    itc_label_smoothing: float = 0.2
    eda_weight: float = 0.8  # weight of the EDA caption view's ITC and ITM terms
    eda: bool = True
    ihnm: bool = True  # the (image, hard_c) and (hard_i, caption) pairs as ITM negatives
    itm_in_batch_negatives: bool = True  # negatives sampled by ITC similarity within the local batch
    itm_pooling: str = "paper"  # paper | pooled (see the module docstring)
    itc_gradient: str = "paper"  # paper | global
    temp_clamp: tuple[float, float] | None = None  # (min, max) applied to the temperature before every step
    mlm: bool = True  # the masked-language-modelling term (X-VLM's retrieval fine-tuning has none)
    # Weights of the ITM and MLM terms in the total; 0 leaves the term out and skips its cross-encoder passes
    # (an ITC-only run trains the dual encoder several times faster per sample).
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    # Also put each record's identity hard-negative pair (hard_i, hard_c: the same person in the other behaviour)
    # into the ITC batch, so the contrastive loss itself must tell the two behaviours apart (needs `ihnm`).
    itc_hard_pairs: bool = False

    def __post_init__(self) -> None:
        if self.itm_pooling not in ITM_POOLINGS:
            raise TpasInputError(f"loss.itm_pooling {self.itm_pooling!r}; expected one of {', '.join(ITM_POOLINGS)}")
        if self.itc_gradient not in ITC_GRADIENTS:
            raise TpasInputError(f"loss.itc_gradient {self.itc_gradient!r}; expected one of {', '.join(ITC_GRADIENTS)}")
        if self.temp_clamp is not None:
            if len(self.temp_clamp) != 2 or not 0 < float(self.temp_clamp[0]) < float(self.temp_clamp[1]):
                raise TpasInputError(f"loss.temp_clamp must be null or [min, max] with 0 < min < max, not "
                                     f"{list(self.temp_clamp)!r}")  # fmt: skip
            object.__setattr__(self, "temp_clamp", (float(self.temp_clamp[0]), float(self.temp_clamp[1])))


def _global_mean_denominator(count: torch.Tensor) -> torch.Tensor:
    """Divide a local sum by this so that DDP's average over ranks gives the sum over all ranks / global count."""
    total = dist_utils.all_reduce_sum(count.detach().float())
    return (total / dist_utils.world_size()).clamp(min=1.0)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    idx: torch.Tensor,
    temp: torch.Tensor,
    label_smoothing: float = 0.2,
) -> torch.Tensor:
    """Image-text contrastive loss over the all-gathered batch with identity-aware soft targets.

    Rows are this rank's images (texts); columns are every rank's texts (images). Targets: uniform over the columns
    that share the row's id (same `image_id` = positive), mixed with label smoothing: (1 - eps) * that + eps / N.
    Loss = (i2t + t2i) / 2, each the mean over rows of the cross-entropy with the soft targets.
    """
    image_all = dist_utils.all_gather_with_grad(image_feat)
    text_all = dist_utils.all_gather_with_grad(text_feat)
    idx_all = dist_utils.all_gather_no_grad(idx)
    pos = (idx.view(-1, 1) == idx_all.view(1, -1)).float()
    targets = pos / pos.sum(1, keepdim=True)
    if label_smoothing:
        targets = (1 - label_smoothing) * targets + label_smoothing / targets.shape[1]
    logits_i2t = image_feat.float() @ text_all.float().T / temp
    logits_t2i = text_feat.float() @ image_all.float().T / temp
    loss_i2t = -(targets * F.log_softmax(logits_i2t, dim=1)).sum(1).mean()
    loss_t2i = -(targets * F.log_softmax(logits_t2i, dim=1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def sample_negatives(
    image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor, temp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-batch hard negatives drawn with weights softmax(ITC similarity) + 1e-5, never sharing the anchor's id.

    Returns (image index for each text, its validity, text index for each image, its validity): a row whose every
    other item shares its id has no negative and is marked invalid.
    """
    sim = image_feat.float() @ text_feat.float().T / temp
    same = idx.view(-1, 1) == idx.view(1, -1)
    # The floor keeps every other-id item drawable even where softmax underflows (as the original code).
    w_i2t = (F.softmax(sim, dim=1) + NEGATIVE_WEIGHT_FLOOR).masked_fill(same, 0)
    w_t2i = (F.softmax(sim.T, dim=1) + NEGATIVE_WEIGHT_FLOOR).masked_fill(same, 0)
    valid_i2t = w_i2t.sum(1) > 0
    valid_t2i = w_t2i.sum(1) > 0
    # Rows without any candidate get uniform weights so multinomial is defined; they are dropped by the caller.
    w_i2t[~valid_i2t] = 1.0
    w_t2i[~valid_t2i] = 1.0
    neg_text_for_image = torch.multinomial(w_i2t, 1).squeeze(1)
    neg_image_for_text = torch.multinomial(w_t2i, 1).squeeze(1)
    return neg_image_for_text, valid_t2i, neg_text_for_image, valid_i2t


def itm_loss(
    model: Any,
    image_tokens: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor,
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    idx: torch.Tensor,
    *,
    in_batch_negatives: bool = True,
    hard: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    pooling: str = "paper",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image-text matching: positives (label 1), in-batch hard negatives (label 0) and, with `hard` =
    (hard image tokens, hard text states, hard text mask, valid [B] bool), the IHNM pairs (image, hard caption) and
    (hard image, caption), both labelled 0. One batched cross-encoder pass over all pairs.

    `pooling="paper"`: mean cross-entropy over the in-batch rows (positives + negatives) plus a separate mean over
    the IHNM rows; `"pooled"`: one mean over all rows. Rows without a valid pair are dropped from their mean.
    Returns the loss and detached statistics (accuracy on positives / negatives).
    """
    b = image_tokens.shape[0]
    texts = [text_states]
    masks = [text_mask]
    images = [image_tokens]
    labels = [torch.ones(b, dtype=torch.long, device=image_tokens.device)]
    keep = [torch.ones(b, dtype=torch.bool, device=image_tokens.device)]
    if in_batch_negatives and b > 1:
        neg_img, ok_t, neg_txt, ok_i = sample_negatives(image_feat, text_feat, idx, model.temp)
        texts += [text_states, text_states[neg_txt]]
        masks += [text_mask, text_mask[neg_txt]]
        images += [image_tokens[neg_img], image_tokens]
        labels += [torch.zeros_like(labels[0])] * 2
        keep += [ok_t, ok_i]
    in_batch_rows = sum(len(k) for k in keep)
    if hard is not None:
        hard_tokens, hard_states, hard_mask, valid = hard
        texts += [hard_states, text_states]
        masks += [hard_mask, text_mask]
        images += [image_tokens, hard_tokens]
        labels += [torch.zeros_like(labels[0])] * 2
        keep += [valid, valid]
    cls = model.cross_cls(torch.cat(texts), torch.cat(masks), torch.cat(images))
    logits = model.itm_logits(cls).float()
    y = torch.cat(labels)
    k = torch.cat(keep).float()
    per_row = F.cross_entropy(logits, y, reduction="none") * k
    if pooling == "pooled" or hard is None:
        loss = per_row.sum() / _global_mean_denominator(k.sum())
    else:
        parts = (slice(0, in_batch_rows), slice(in_batch_rows, None))
        loss = sum(per_row[p].sum() / _global_mean_denominator(k[p].sum()) for p in parts)
    with torch.no_grad():
        pred = logits.argmax(1)
        pos = (y == 1) & k.bool()
        neg = (y == 0) & k.bool()
        stats = {
            "itm_acc_pos": (pred[pos] == 1).float().mean() if pos.any() else torch.tensor(float("nan")),
            "itm_acc_neg": (pred[neg] == 0).float().mean() if neg.any() else torch.tensor(float("nan")),
        }
    return loss, stats


def mlm_loss(
    model: Any,
    mlm_ids: torch.Tensor,
    text_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    masked_pos: torch.Tensor,
    masked_labels: torch.Tensor,
) -> torch.Tensor:
    """Masked language modelling conditioned on the image: cross-entropy at the masked positions (-100 = padding)."""
    logits = model.mlm_logits(mlm_ids, text_mask, image_tokens, masked_pos=masked_pos).float()
    labels = masked_labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=-100, reduction="sum")
    return total / _global_mean_denominator((labels != -100).sum())


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` unchanged in value, with its gradient multiplied by `scale` on the way back."""
    if scale == 1.0:
        return x
    return x * scale + x.detach() * (1.0 - scale)


def _weighted(term: torch.Tensor, weight: float) -> torch.Tensor:
    """`weight * term`, and exactly `term` at weight 1 (the default recipe's total stays bit-identical)."""
    return term if weight == 1.0 else weight * term


def _itc_with_hard_pairs(
    model: Any,
    batch: dict[str, torch.Tensor],
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    itc_scale: float,
    cfg: LossConfig,
) -> torch.Tensor:
    """ITC over the batch plus each record's valid hard pair (hard image + its caption, ids `hard_idx`): the same
    person in the other behaviour sits in the batch as a negative of the record's own pair."""
    valid = batch["has_hard"].bool() & (batch["hard_idx"] >= 0)
    pose = batch.get("hard_pose") if getattr(model.config, "pose", False) else None
    hard_image = model.image_feat(model.encode_image_tokens(batch["hard_image"][valid],
                                                            None if pose is None else pose[valid]))  # fmt: skip
    hard_text = model.text_feat(model.encode_text_tokens(batch["hard_ids"][valid], batch["hard_mask"][valid]))
    images = scale_gradient(torch.cat([image_feat, hard_image]), itc_scale)
    texts = scale_gradient(torch.cat([text_feat, hard_text]), itc_scale)
    ids = torch.cat([batch["idx"], batch["hard_idx"][valid]])
    return itc_loss(images, texts, ids, model.temp, cfg.itc_label_smoothing)


def compute_losses(model: Any, batch: dict[str, torch.Tensor], cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Every loss term for one batch. Keys: total, itc, itm, mlm (each including the EDA view's share; mlm only with
    `cfg.mlm` and a non-zero `mlm_weight`, itm 0 at `itm_weight` 0), plus the parts (itc_main, itc_eda, itm_main,
    itm_eda) and ITM accuracies, the latter detached for logging. Models without a pose branch (X-VLM: no
    `config.pose`) get no pose maps."""
    if cfg.temp_clamp is not None:
        with torch.no_grad():
            model.temp.clamp_(*cfg.temp_clamp)
    pose_aware = bool(getattr(model.config, "pose", False))
    image_tokens = model.encode_image_tokens(batch["image"], batch.get("pose") if pose_aware else None)
    image_feat = model.image_feat(image_tokens)
    text_states = model.encode_text_tokens(batch["text_ids"], batch["text_mask"])
    text_feat = model.text_feat(text_states)
    idx = batch["idx"]

    out: dict[str, torch.Tensor] = {}
    itc_scale = 1.0 / dist_utils.world_size() if cfg.itc_gradient == "paper" else 1.0
    itc_image = scale_gradient(image_feat, itc_scale)
    if cfg.itc_hard_pairs and cfg.ihnm and bool((batch["has_hard"].bool() & (batch["hard_idx"] >= 0)).any()):
        out["itc_main"] = _itc_with_hard_pairs(model, batch, image_feat, text_feat, itc_scale, cfg)
    else:
        out["itc_main"] = itc_loss(
            itc_image, scale_gradient(text_feat, itc_scale), idx, model.temp, cfg.itc_label_smoothing
        )

    if cfg.itm_weight:
        hard = None
        if cfg.ihnm:
            hard_tokens = model.encode_image_tokens(batch["hard_image"], batch.get("hard_pose") if pose_aware else None)
            hard_states = model.encode_text_tokens(batch["hard_ids"], batch["hard_mask"])
            valid = batch["has_hard"].bool() & (batch["hard_idx"] != idx)
            hard = (hard_tokens, hard_states, batch["hard_mask"], valid)
        out["itm_main"], stats = itm_loss(model, image_tokens, text_states, batch["text_mask"], image_feat, text_feat,
                                          idx, in_batch_negatives=cfg.itm_in_batch_negatives, hard=hard,
                                          pooling=cfg.itm_pooling)  # fmt: skip
        out.update(stats)
    else:
        out["itm_main"] = image_feat.new_zeros(()).float()
    if cfg.mlm and cfg.mlm_weight:
        out["mlm"] = mlm_loss(
            model, batch["mlm_ids"], batch["text_mask"], image_tokens, batch["mlm_pos"], batch["mlm_labels"]
        )
    itc, itm = out["itc_main"], out["itm_main"]
    if cfg.eda:
        eda_states = model.encode_text_tokens(batch["eda_ids"], batch["eda_mask"])
        eda_feat = model.text_feat(eda_states)
        eda_itc_feat = scale_gradient(eda_feat, itc_scale)
        out["itc_eda"] = itc_loss(itc_image, eda_itc_feat, idx, model.temp, cfg.itc_label_smoothing)
        itc = itc + cfg.eda_weight * out["itc_eda"]
        if cfg.itm_weight:
            out["itm_eda"], _ = itm_loss(model, image_tokens, eda_states, batch["eda_mask"], image_feat, eda_feat, idx,
                                         in_batch_negatives=cfg.itm_in_batch_negatives)  # fmt: skip
            itm = itm + cfg.eda_weight * out["itm_eda"]
    out["itc"], out["itm"] = itc, itm
    out["total"] = itc + _weighted(itm, cfg.itm_weight)
    if "mlm" in out:
        out["total"] = out["total"] + _weighted(out["mlm"], cfg.mlm_weight)
    return out


class CMPLossModule(nn.Module):
    """Wraps the model so DDP sees one `forward(batch) -> losses` call (DDP syncs gradients through forward)."""

    def __init__(self, model: nn.Module, cfg: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return compute_losses(self.model, batch, self.cfg)
