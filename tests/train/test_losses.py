"""CMP losses: every term finite, gradients exactly where each term should put them, ITC targets, ITM pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import random_batch, tiny_model

from tpas.train.losses import LossConfig, compute_losses, itc_loss, itm_loss, sample_negatives


def _grad_norms(model: torch.nn.Module) -> dict[str, float]:
    return {n: float(p.grad.abs().sum()) if p.grad is not None else 0.0 for n, p in model.named_parameters()}


def _touched(norms: dict[str, float], prefix: str) -> bool:
    return any(v > 0 for n, v in norms.items() if n.startswith(prefix))


@pytest.fixture(scope="module")
def per_term_grads() -> dict[str, dict[str, float]]:
    out = {}
    batch = random_batch(6)
    for term in ("itc", "itm", "mlm"):
        model = tiny_model()
        model.train()
        losses = compute_losses(model, batch, LossConfig())
        assert all(torch.isfinite(v).all() for k, v in losses.items() if not k.startswith("itm_acc"))
        losses[term].backward()
        out[term] = _grad_norms(model)
    return out


FUSION = "text_encoder.bert.encoder.layer.2."  # tiny: layers 0-1 text, 2-3 fusion
TEXT = "text_encoder.bert.encoder.layer.0."


def test_itc_reaches_both_encoders_projections_and_temperature_only(per_term_grads: dict) -> None:
    g = per_term_grads["itc"]
    for part in ("vision_encoder.", "pose_block.", "pose_conv.", "vision_proj.", "text_proj.", TEXT, "temp"):
        assert _touched(g, part), part
    for part in ("itm_head.", FUSION, "text_encoder.cls.predictions.transform."):
        assert not _touched(g, part), part


def test_itm_reaches_head_fusion_and_encoders_but_not_projections(per_term_grads: dict) -> None:
    g = per_term_grads["itm"]
    for part in ("itm_head.", FUSION + "crossattention.", "vision_encoder.", "pose_block.", TEXT):
        assert _touched(g, part), part
    # Negatives are sampled by ITC similarity without gradient; projections and temp get nothing from ITM.
    for part in ("vision_proj.", "text_proj.", "temp", "text_encoder.cls.predictions.transform."):
        assert not _touched(g, part), part


def test_mlm_reaches_head_fusion_and_image_but_not_itm_or_projections(per_term_grads: dict) -> None:
    g = per_term_grads["mlm"]
    for part in ("text_encoder.cls.predictions.", FUSION + "crossattention.", "vision_encoder.", TEXT):
        assert _touched(g, part), part
    for part in ("itm_head.", "vision_proj.", "text_proj.", "temp"):
        assert not _touched(g, part), part


def test_total_is_itc_plus_itm_plus_mlm_with_eda_weighted() -> None:
    model = tiny_model()
    torch.manual_seed(0)
    out = compute_losses(model.eval(), random_batch(6), LossConfig(eda_weight=0.8))
    assert torch.allclose(out["itc"], out["itc_main"] + 0.8 * out["itc_eda"])
    assert torch.allclose(out["itm"], out["itm_main"] + 0.8 * out["itm_eda"])
    assert torch.allclose(out["total"], out["itc"] + out["itm"] + out["mlm"])
    no_eda = compute_losses(model, random_batch(6), LossConfig(eda=False))
    assert "itc_eda" not in no_eda and torch.allclose(no_eda["itc"], no_eda["itc_main"])


def test_itc_with_unique_ids_is_label_smoothed_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    temp = torch.tensor(0.07)
    got = itc_loss(img, txt, torch.arange(5), temp, label_smoothing=0.2)
    logits = img @ txt.T / temp
    want = (F.cross_entropy(logits, torch.arange(5), label_smoothing=0.2)
            + F.cross_entropy(logits.T, torch.arange(5), label_smoothing=0.2)) / 2  # fmt: skip
    assert torch.allclose(got, want, atol=1e-6)


def test_itc_treats_images_sharing_an_id_as_positives() -> None:
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    temp = torch.tensor(0.1)
    idx = torch.tensor([0, 0, 1, 2])
    got = itc_loss(img, txt, idx, temp, label_smoothing=0.0)
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    i2t = -(targets * F.log_softmax(img @ txt.T / temp, 1)).sum(1).mean()
    t2i = -(targets * F.log_softmax(txt @ img.T / temp, 1)).sum(1).mean()
    assert torch.allclose(got, (i2t + t2i) / 2, atol=1e-6)


def test_in_batch_negatives_never_share_the_anchor_id() -> None:
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    idx = torch.tensor([0, 0, 1, 1, 2, 3])
    for seed in range(20):
        torch.manual_seed(seed)
        neg_img, ok_t, neg_txt, ok_i = sample_negatives(feats, feats, idx, torch.tensor(0.07))
        assert ok_t.all() and ok_i.all()
        assert (idx[neg_img] != idx).all() and (idx[neg_txt] != idx).all()
    _, ok_t, _, ok_i = sample_negatives(feats[:2], feats[:2], torch.tensor([5, 5]), torch.tensor(0.07))
    assert not ok_t.any() and not ok_i.any()


class _RecordingHead:
    """Stands in for the model in itm_loss: records what the cross encoder saw, returns fixed logits."""

    def __init__(self) -> None:
        self.temp = torch.tensor(0.07)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cross_cls(self, states: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        self.calls.append((states[:, 0, 0].clone(), image[:, 0, 0].clone()))
        return torch.zeros(states.shape[0], 2)

    def itm_logits(self, cls: torch.Tensor) -> torch.Tensor:
        return cls


def test_ihnm_pairs_are_both_cross_pairs_labelled_negative() -> None:
    b = 3
    # Row markers: text i has value 10+i, hard text 20+i, image i 30+i, hard image 40+i.
    text = torch.arange(10, 10 + b).float().view(b, 1, 1).expand(b, 4, 2).clone()
    hard_text = torch.arange(20, 20 + b).float().view(b, 1, 1).expand(b, 4, 2).clone()
    image = torch.arange(30, 30 + b).float().view(b, 1, 1).expand(b, 5, 2).clone()
    hard_image = torch.arange(40, 40 + b).float().view(b, 1, 1).expand(b, 5, 2).clone()
    mask = torch.ones(b, 4, dtype=torch.long)
    head = _RecordingHead()
    valid = torch.tensor([True, True, False])
    loss, _ = itm_loss(head, image, text, mask, torch.zeros(b, 4), torch.zeros(b, 4), torch.arange(b),
                       in_batch_negatives=False, hard=(hard_image, hard_text, mask, valid),
                       pooling="pooled")  # fmt: skip
    texts, images = head.calls[0]
    pairs = list(zip(texts.tolist(), images.tolist(), strict=True))
    assert pairs[:b] == [(10, 30), (11, 31), (12, 32)]  # positives
    assert pairs[b : 2 * b] == [(20, 30), (21, 31), (22, 32)]  # image with its hard caption
    assert pairs[2 * b :] == [(10, 40), (11, 41), (12, 42)]  # hard image with the caption
    # Zero logits: every kept row costs log 2; the invalid sample's two hard rows are dropped (3 + 2 + 2 = 7 rows).
    assert torch.allclose(loss, torch.tensor(7 * 0.6931471805599453) / 7)


def test_losses_are_finite_under_bf16_autocast() -> None:
    model = tiny_model()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = compute_losses(model, random_batch(4, seed=4), LossConfig())
    assert out["total"].dtype == torch.float32  # the loss heads compute in float32
    assert all(torch.isfinite(out[k]) for k in ("itc", "itm", "mlm", "total"))
    out["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
