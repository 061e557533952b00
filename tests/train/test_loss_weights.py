"""`loss.itm_weight` / `loss.mlm_weight`: 0 drops the term (an ITC-only run), 1 is the default recipe unchanged."""

from __future__ import annotations

import torch
from train_fixtures import random_batch, tiny_model

from tpas.train.losses import LossConfig, compute_losses, itc_loss


def _grads(cfg: LossConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    model = tiny_model(pose=True)
    torch.manual_seed(0)  # the in-batch ITM negatives are drawn with torch's generator
    out = compute_losses(model, random_batch(6), cfg)
    out["total"].backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def test_unit_weights_are_the_default_recipe() -> None:
    base, g_base = _grads(LossConfig())
    same, g_same = _grads(LossConfig(itm_weight=1.0, mlm_weight=1.0))
    assert torch.equal(base["total"], same["total"])
    assert all(torch.equal(g_base[n], g_same[n]) for n in g_base if g_base[n] is not None)


def test_zero_weights_train_itc_only() -> None:
    full, _ = _grads(LossConfig(eda=False, itm_pooling="pooled"))
    itc_only, grads = _grads(LossConfig(eda=False, itm_weight=0.0, mlm_weight=0.0))
    assert torch.allclose(itc_only["total"], full["itc_main"])  # same ITC term: the same forward before it
    assert float(itc_only["itm"]) == 0.0 and "mlm" not in itc_only
    # The cross-encoder (ITM head, MLM head) gets no gradient: its passes were skipped.
    assert all(g is None for n, g in grads.items() if n.startswith("itm_head."))
    assert all(g is None for n, g in grads.items() if n.startswith("text_encoder.cls."))
    assert grads["vision_proj.0.weight"] is not None and grads["text_proj.0.weight"] is not None


def test_weights_scale_their_terms() -> None:
    base, _ = _grads(LossConfig(eda=False))
    half, _ = _grads(LossConfig(eda=False, itm_weight=0.5, mlm_weight=0.25))
    expected = base["itc"] + 0.5 * base["itm"] + 0.25 * base["mlm"]
    assert torch.allclose(half["total"], expected, atol=1e-6)


def test_hard_pairs_join_the_itc_batch() -> None:
    batch = random_batch(6)
    batch["hard_idx"] = batch["idx"] + 100  # the other behaviour of each record's person: a distinct image id
    batch["has_hard"][0] = False
    model = tiny_model(pose=True).eval()  # no dropout: the two forwards below must see the same features
    cfg = LossConfig(eda=False, itm_weight=0.0, mlm_weight=0.0, itc_hard_pairs=True)
    got = compute_losses(model, batch, cfg)["itc_main"]
    valid = batch["has_hard"].bool()
    with torch.no_grad():
        image = model.image_feat(
            model.encode_image_tokens(
                torch.cat([batch["image"], batch["hard_image"][valid]]),
                torch.cat([batch["pose"], batch["hard_pose"][valid]]),
            )
        )
        ids = torch.cat([batch["text_ids"], batch["hard_ids"][valid]])
        text = model.text_feat(
            model.encode_text_tokens(ids, torch.cat([batch["text_mask"], batch["hard_mask"][valid]]))
        )
        want = itc_loss(image, text, torch.cat([batch["idx"], batch["hard_idx"][valid]]), model.temp, 0.2)
    assert torch.allclose(got, want, atol=1e-5)
    # Without the switch (or without IHNM records) the ITC batch is the records' own pairs only.
    plain = compute_losses(model, batch, LossConfig(eda=False, itm_weight=0.0, mlm_weight=0.0))["itc_main"]
    assert not torch.allclose(plain, got)
