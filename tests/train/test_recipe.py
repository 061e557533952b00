"""The `paper` recipe, point by point against the original CMP code (Shuyu-XJTU/CMP), on small tensors; and the
opt-in alternatives that keep tpas's earlier behaviour."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from train_fixtures import random_batch, tiny_model

from tpas.errors import TpasInputError
from tpas.train.config import DEFAULTS, load_train_config
from tpas.train.data import AugmentConfig, TrainTransform
from tpas.train.losses import LossConfig, compute_losses, itm_loss, sample_negatives
from tpas.train.masking import MaskingConfig, mask_tokens
from tpas.train.optim import decays, lr_factor, param_groups

CMP_YAML = Path(__file__).resolve().parents[2] / "configs" / "train" / "cmp.yaml"


def test_the_default_config_is_the_original_recipe() -> None:
    cfg = load_train_config(CMP_YAML)
    for section in ("augment", "masking", "loss", "optim"):
        assert cfg[section] == DEFAULTS[section], section  # the YAML spells the defaults out, nothing else
    optim, loss, augment = cfg["optim"], cfg["loss"], cfg["augment"]
    assert (optim["betas"], optim["eps"], optim["weight_decay"], optim["lr"]) == ([0.9, 0.98], 1e-8, 0.01, 1e-4)
    assert (optim["schedule"], optim["warmup_steps"], optim["lr_end"], optim["decay_rule"]) == (
        "step",
        500,
        0.0,
        "name",
    )
    assert (optim["lr_mult"], optim["grad_clip"]) == (2.0, None)
    assert (loss["itm_pooling"], loss["itc_gradient"], loss["temp_clamp"]) == ("paper", "paper", None)
    assert (augment["randaug_n"], augment["random_erasing"], augment["erasing_area"]) == (0, 0.6, [0.02, 0.4])
    assert (augment["erasing_aspect"], augment["pose"], augment["eda"]) == (0.3, "independent", True)
    assert cfg["masking"]["candidates"] == "padded"
    assert (cfg["train"]["batch_size"], cfg["train"]["epochs"], cfg["eval"]["rerank_k"]) == (22, 30, 128)
    assert cfg["eval"]["select_by"] == "R@1"


# ------------------------------------------------------------------------------------------------- 1. ITM + IHNM
class _MarkerHead:
    """Stands in for the model in itm_loss: the match logit of a pair is a known function of its row markers."""

    temp = torch.tensor(0.07)

    def cross_cls(self, states: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([states[:, 0, 0], image[:, 0, 0]], dim=1)

    def itm_logits(self, cls: torch.Tensor) -> torch.Tensor:
        text, image = cls[:, 0], cls[:, 1]
        return torch.stack([torch.zeros_like(text), 0.1 * text - 0.05 * image], dim=1)


def _marked(values: list[float], length: int) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1).expand(-1, length, 2).clone()


def test_itm_is_the_in_batch_mean_plus_the_separate_hard_negative_mean() -> None:
    # Two samples with different ids: each one's only in-batch negative is the other sample.
    text, hard_text = _marked([1.0, 2.0], 4), _marked([3.0, 4.0], 4)
    image, hard_image = _marked([5.0, 6.0], 5), _marked([7.0, 8.0], 5)
    mask = torch.ones(2, 4, dtype=torch.long)
    feats = torch.eye(2)
    hard = (hard_image, hard_text, mask, torch.tensor([True, True]))

    def ce(t: float, i: float, label: int) -> float:
        logit = 0.1 * t - 0.05 * i  # logits (0, logit): CE of label 1 = softplus(-logit), of label 0 = softplus(logit)
        return math.log1p(math.exp(-logit if label else logit))

    in_batch = [ce(1, 5, 1), ce(2, 6, 1), ce(1, 6, 0), ce(2, 5, 0), ce(2, 5, 0), ce(1, 6, 0)]
    hard_rows = [ce(3, 5, 0), ce(4, 6, 0), ce(1, 7, 0), ce(2, 8, 0)]
    paper, _ = itm_loss(_MarkerHead(), image, text, mask, feats, feats, torch.arange(2), hard=hard, pooling="paper")
    pooled, _ = itm_loss(_MarkerHead(), image, text, mask, feats, feats, torch.arange(2), hard=hard, pooling="pooled")
    assert float(paper) == pytest.approx(sum(in_batch) / 6 + sum(hard_rows) / 4, abs=1e-6)
    assert float(pooled) == pytest.approx((sum(in_batch) + sum(hard_rows)) / 10, abs=1e-6)


def test_in_batch_negative_weights_are_softmax_plus_floor_then_same_id_zeroed() -> None:
    # A temperature so small that softmax puts all weight on the (same-id) diagonal: without the 1e-5 floor every
    # other item would have weight 0; with it, each other-id item is drawable and equally likely.
    feats = torch.eye(3)
    idx = torch.tensor([0, 1, 2])
    counts = torch.zeros(3, 3)
    for seed in range(300):
        torch.manual_seed(seed)
        neg_img, ok_t, neg_txt, ok_i = sample_negatives(feats, feats, idx, torch.tensor(1e-4))
        assert ok_t.all() and ok_i.all() and (neg_img != idx).all() and (neg_txt != idx).all()
        counts[torch.arange(3), neg_img] += 1
    off = counts[~torch.eye(3, dtype=torch.bool)]
    assert off.min() > 100  # ~150 each


# ------------------------------------------------------------------------------------------------- 3. weight decay
class _Named(torch.nn.Module):
    """Parameters registered under dotted names, as a model's named_parameters() would show them."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            owner: torch.nn.Module = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))


def test_weight_decay_by_name_as_the_original_and_by_ndim_as_opt_in() -> None:
    toy = _Named({
        "temp": (),
        "itm_head.0.weight": (8, 4),
        "itm_head.0.bias": (8,),
        "itm_head.1.weight": (8,),  # a LayerNorm named by position: the original decays it
        "vision_proj.0.weight": (6,),  # BatchNorm1d: decayed by the original
        "vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table": (9, 2),  # its name contains "bias"
        "vision_encoder.layers.0.blocks.0.norm1.weight": (4,),
        "vision_encoder.layers.0.downsample.norm.weight": (4,),
        "text_encoder.bert.encoder.layer.0.attention.output.LayerNorm.weight": (4,),
    })  # fmt: skip
    by_name = {n for n, p in toy.named_parameters() if decays(n, p, "name")}
    by_ndim = {n for n, p in toy.named_parameters() if decays(n, p, "ndim")}
    assert by_name == {"temp", "itm_head.0.weight", "itm_head.1.weight", "vision_proj.0.weight"}
    assert by_ndim == {"itm_head.0.weight", "vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"}
    groups = param_groups(toy, {**DEFAULTS["optim"], "new_param_patterns": [r"^itm_head\."]})
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(toy.named_parameters())
    assert decay_of[id(named["temp"])] == 0.01 and decay_of[id(named["itm_head.0.bias"])] == 0.0
    with pytest.raises(TpasInputError, match="decay_rule"):
        param_groups(toy, {**DEFAULTS["optim"], "decay_rule": "shape"})


def test_on_the_cmp_model_the_rules_differ_exactly_where_the_issue_found() -> None:
    model = tiny_model()
    differ = {n for n, p in model.named_parameters() if decays(n, p, "name") != decays(n, p, "ndim")}
    tables = {n for n in differ if n.endswith("relative_position_bias_table")}
    assert tables and len(tables) == sum(1 for n, _ in model.named_parameters() if "relative_position" in n)
    assert differ - tables == {"temp", "itm_head.1.weight", "vision_proj.0.weight", "text_proj.0.weight",
                               "pose_conv.expand.1.weight", "pose_conv.reduce.1.weight"}  # fmt: skip


# ------------------------------------------------------------------------------------------------- 4. schedule
def test_step_schedule_factors_at_the_phase_boundaries() -> None:
    def f(step: int) -> float:
        return lr_factor(step, 6000, 500, 1e-4, 0.0, "step")

    def decay(step: int) -> float:
        return (6000 - step) / 5500

    assert f(0) == 0.0 and f(250) == pytest.approx(0.5) and f(500) == pytest.approx(1.0)
    assert f(1999) == pytest.approx(decay(1999))  # x1 until 4 x warm-up
    assert f(2000) == pytest.approx(0.5 * decay(2000)) == pytest.approx(0.3636, abs=1e-4)  # the issue's example
    assert f(3499) == pytest.approx(0.5 * decay(3499))
    assert f(3500) == pytest.approx(0.2 * decay(3500))  # x0.2 from 7 x warm-up
    assert f(6000) == 0.0  # decays to 0 at the last step
    assert lr_factor(2000, 6000, 500, 1e-4, 1e-5, "linear") == pytest.approx(0.1 + 0.9 * decay(2000))
    with pytest.raises(TpasInputError, match=r"optim\.schedule"):
        lr_factor(0, 10, 1, 1e-4, 0.0, "cosine")


# ------------------------------------------------------------------------------------------------- 5./6. augmentation
def _transform(**cfg: object) -> TrainTransform:
    return TrainTransform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), AugmentConfig(**cfg))  # type: ignore[arg-type]


def _half_white(size: tuple[int, int] = (32, 32)) -> Image.Image:
    a = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    a[:, : size[0] // 2] = 255
    return Image.fromarray(a)


def test_random_erasing_area_and_aspect_ranges_and_value_zero() -> None:
    t = TrainTransform(100, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), AugmentConfig())
    rng = random.Random(0)
    areas, aspects = [], []
    for _ in range(2000):
        x = t.erase(torch.ones(3, 100, 100), rng)
        zero = x[0] == 0
        assert torch.equal(zero, x[1] == 0) and torch.equal(zero, x[2] == 0)
        rows, cols = zero.any(1).sum().item(), zero.any(0).sum().item()
        assert rows * cols == zero.sum().item()  # one rectangle
        areas.append(zero.float().mean().item())
        aspects.append(rows / cols)
    assert 0.018 <= min(areas) < 0.03 and 0.37 < max(areas) <= 0.41
    assert 0.28 <= min(aspects) < 0.4 and 2.6 < max(aspects) <= 3.6  # [0.3, 3.33], sides rounded to pixels
    # Aspect uniform in [0.3, 3.33] (not log-uniform): its median is near the middle, ~1.8.
    assert 1.5 < float(np.median(aspects)) < 2.1


def test_paper_transform_has_no_randaugment_and_erases_with_p_06() -> None:
    t = _transform(hflip=0.0)
    plain = _transform(hflip=0.0, random_erasing=0.0)
    image = _half_white()
    want, _ = plain(image, None, random.Random(0))
    erased = 0
    for seed in range(500):
        x, _ = t(image, None, random.Random(seed))
        changed = ~torch.isclose(x, want)
        assert not changed.any() or bool((x[changed] == 0).all())  # only erasing (value 0) ever changes pixels
        erased += bool(changed.any())
    assert abs(erased / 500 - 0.6) < 0.07


def _flipped(x: torch.Tensor) -> bool:
    return bool(x[0, :, -4:].mean() > x[0, :, :4].mean())  # the white half moved to the right


def test_pose_maps_are_flipped_and_erased_independently_in_paper_mode() -> None:
    image, pose = _half_white(), _half_white()
    joint = {(a, b): 0 for a in (False, True) for b in (False, True)}
    pose_erased = 0
    for seed in range(600):
        x, p = _transform(random_erasing=0.6)(image, pose, random.Random(seed))
        joint[(_flipped(x), _flipped(p))] += 1
        pose_erased += bool((p == 0).all(0).any())
    assert all(abs(n / 600 - 0.25) < 0.06 for n in joint.values()), joint  # independent halves
    assert abs(pose_erased / 600 - 0.6) < 0.08
    for seed in range(100):
        x, p = _transform(random_erasing=0.6, pose="follow-image")(image, pose, random.Random(seed))
        assert _flipped(x) == _flipped(p) and not (p == 0).all(0).any()


def test_augment_switches_are_checked() -> None:
    with pytest.raises(TpasInputError, match=r"augment\.pose"):
        AugmentConfig(pose="mirror")
    with pytest.raises(TpasInputError, match="erasing_area"):
        AugmentConfig(erasing_area=(0.5, 0.1))


# ------------------------------------------------------------------------------------------------- 7. temperature
def test_temperature_is_never_clamped_unless_asked() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.temp.fill_(0.8)
    compute_losses(model, random_batch(4), LossConfig())
    assert float(model.temp.detach()) == pytest.approx(0.8)
    compute_losses(model, random_batch(4), LossConfig(temp_clamp=(0.001, 0.5)))
    assert float(model.temp.detach()) == pytest.approx(0.5)
    with pytest.raises(TpasInputError, match="temp_clamp"):
        LossConfig(temp_clamp=(0.5, 0.1))


# ------------------------------------------------------------------------------------------------- masking
def _padded_caption(n_real: int, length: int = 56) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    tokens = ["[CLS]"] + [f"w{i}" if i % 3 else f"##p{i}" for i in range(1, n_real - 1)] + ["[SEP]"]
    tokens[1] = "w1"
    tokens += ["[PAD]"] * (length - len(tokens))
    ids = torch.tensor([2] + list(range(5, 5 + n_real - 2)) + [3] + [0] * (length - n_real))
    att = (torch.arange(length) < n_real).long()
    return ids, att, tokens


def test_padded_masking_is_the_original_generator() -> None:
    on_padding = 0
    for seed in range(300):
        ids, att, tokens = _padded_caption(random.Random(seed).randint(6, 30))
        out = mask_tokens(ids, att, tokens, random.Random(seed), MaskingConfig(), mask_token_id=4,
                          special_ids=[0, 1, 2, 3, 4], vocab_size=50)  # fmt: skip
        chosen = out.masked_pos.tolist()
        assert len(chosen) == 10 and -100 not in out.masked_ids.tolist()  # round(56 x 0.25) = 14 -> at most 10
        assert 0 not in chosen and all(p < 56 for p in chosen)  # never [CLS]; [SEP]/[PAD] allowed
        assert out.masked_ids.tolist() == [int(ids[p]) for p in chosen]
        on_padding += sum(1 for p in chosen if att[p] == 0)
    assert on_padding > 300  # padding positions are real candidates, as in the original


def test_mask_and_loss_switches_are_checked() -> None:
    with pytest.raises(TpasInputError, match=r"masking\.candidates"):
        MaskingConfig(candidates="words")
    with pytest.raises(TpasInputError, match="itm_pooling"):
        LossConfig(itm_pooling="mean")
    with pytest.raises(TpasInputError, match="itc_gradient"):
        LossConfig(itc_gradient="local")


def test_itc_gradient_switch_changes_nothing_on_one_process() -> None:
    grads = []
    for mode in ("paper", "global"):
        model = tiny_model(seed=3, hidden_dropout=0.0, attention_dropout=0.0, itc_dropout=0.0, drop_path_rate=0.0)
        torch.manual_seed(0)
        compute_losses(model, random_batch(4), LossConfig(itc_gradient=mode))["itc"].backward()
        grads.append(model.vision_proj[2].weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and float(F.normalize(grads[0].flatten(), dim=0).abs().sum()) > 0
