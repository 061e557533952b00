"""`loss.itm_weight` / `loss.mlm_weight`: 0 drops the term (an ITC-only run), 1 is the default recipe unchanged."""

from __future__ import annotations

import torch
from train_fixtures import random_batch, tiny_model

from tpas.train.losses import LossConfig, compute_losses


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
    assert float(itc_only["itm"]) == 0.0 and float(itc_only["mlm"]) == 0.0
    # The cross-encoder (ITM head, MLM head) gets no gradient: its passes were skipped.
    assert all(g is None for n, g in grads.items() if n.startswith("itm_head."))
    assert all(g is None for n, g in grads.items() if n.startswith("text_encoder.cls."))
    assert grads["vision_proj.0.weight"] is not None and grads["text_proj.0.weight"] is not None


def test_weights_scale_their_terms() -> None:
    base, _ = _grads(LossConfig(eda=False))
    half, _ = _grads(LossConfig(eda=False, itm_weight=0.5, mlm_weight=0.25))
    expected = base["itc"] + 0.5 * base["itm"] + 0.25 * base["mlm"]
    assert torch.allclose(half["total"], expected, atol=1e-6)
