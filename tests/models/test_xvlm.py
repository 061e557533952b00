"""X-VLM and APTM: layouts, architecture from the tensors, strict loading and refusals, the original test-time rules
(caption cleaning, preprocessing, ITC, ITM re-rank and fill), through the library and the shared engine."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tpas.models  # noqa: F401  (registry first)
from tests.models.conftest import make_tiny_gallery
from tests.models.test_cmp import write_vocab
from tpas.errors import TpasInputError
from tpas.models import load_model
from tpas.models.cmp import cmp_final_scores
from tpas.models.cmp.model import load_state_dict_strict
from tpas.models.engine import infer
from tpas.models.xvlm import (
    APTM,
    APTM_NORMS,
    XVLM,
    XVLMConfig,
    clean_xvlm_caption,
    config_from_mapping,
    infer_xvlm_config,
    observed_image_hw,
    xvlm_fill,
)
from tpas.sims import SimsMatrix

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"
FAMILIES = {"xvlm": XVLM, "aptm": APTM}


def tiny(family: str, seed: int = 0, **overrides) -> XVLM | APTM:
    """Tiny random model of `family` (eval mode), projections scaled up so features differ between inputs."""
    torch.manual_seed(seed)
    model = FAMILIES[family](XVLMConfig.tiny(family, **overrides))
    with torch.no_grad():
        for proj in (model.vision_proj, model.text_proj):
            proj.weight.normal_(std=0.2)
        model.itm_head[3].weight.normal_(std=0.5)
    return model.eval()


@pytest.fixture(scope="module", params=["xvlm", "aptm"])
def kit(request, tmp_path_factory) -> dict:
    """A tiny checkpoint of each family as its trainer saves it ({'model', 'config'}), its vocab and a gallery."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = tiny(family)
    torch.save({"model": model.state_dict(), "config": {"k_test": 128, "embed_dim": 32}}, root / "ckpt.pth")
    write_vocab(root / "vocab.txt")
    gallery = make_tiny_gallery(root / "data", n_images=7, n_queries=5)
    return {"family": family, "model": model, "ckpt": root / "ckpt.pth", "vocab": root / "vocab.txt", "g": gallery}


# ---------------------------------------------------------------- layouts and architecture
@pytest.mark.parametrize("family", ["xvlm", "aptm"])
def test_full_size_layout_fixture_loads_strictly_on_meta_device(family):
    ref = json.loads((FIXTURES / f"{family}_retrieval_layout.json").read_text())
    state = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (shape, dtype) in
             ref["keys"].items()}  # fmt: skip
    assert len(state) == ref["num_keys"]
    cfg = infer_xvlm_config(state, XVLMConfig.for_family(family))
    assert cfg == XVLMConfig.for_family(family)
    assert observed_image_hw(state) == tuple(ref["image_size"])
    with torch.device("meta"):
        model = FAMILIES[family](cfg, init=False)
    load_state_dict_strict(model, state, None, family)
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    if cfg.mlm_head:  # APTM: the MLM decoder is tied to the word embeddings, as in BERT
        assert model.text_encoder.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_released_sizes_read_from_the_tensors():
    xvlm = json.loads((FIXTURES / "xvlm_retrieval_layout.json").read_text())["keys"]
    aptm = json.loads((FIXTURES / "aptm_retrieval_layout.json").read_text())["keys"]
    # X-VLM: window 12 everywhere (23**2 rows), 384 x 384 from the 8 x 8 windows of stage 0; no `bert.` prefix.
    assert xvlm["vision_encoder.layers.3.blocks.0.attn.relative_position_bias_table"][0] == [529, 32]
    assert xvlm["vision_encoder.layers.0.blocks.1.attn_mask"][0] == [64, 144, 144]
    assert xvlm["vision_proj.weight"][0] == [256, 1024] and xvlm["text_proj.weight"][0] == [256, 768]
    assert "text_encoder.embeddings.word_embeddings.weight" in xvlm and not any(".cls." in k for k in xvlm)
    # APTM: window 8 (15**2 rows), stage 3's 12 x 4 grid shrinks it to 4 (7**2 rows), 12 x 4 windows at stage 0.
    assert aptm["vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"][0] == [225, 4]
    assert aptm["vision_encoder.layers.3.blocks.0.attn.relative_position_bias_table"][0] == [49, 32]
    assert aptm["vision_encoder.layers.0.blocks.1.attn_mask"][0] == [48, 64, 64]
    assert "vision_encoder.layers.2.blocks.1.attn_mask" not in aptm  # 24 x 8 grid: one window across, no shift
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in aptm and "text_encoder.cls.predictions.bias" in aptm


@pytest.mark.parametrize("family", ["xvlm", "aptm"])
@pytest.mark.parametrize(
    "overrides", [{}, {"text_layers": 1, "fusion_layers": 3, "embed_dim": 16}, {"mlm_head": True}, {"mlm_head": False}]
)
def test_config_inferred_from_the_state_dict_is_the_one_that_built_it(family, overrides):
    cfg = XVLMConfig.tiny(family, **overrides)
    assert infer_xvlm_config(FAMILIES[family](cfg).state_dict(), XVLMConfig.for_family(family)) == cfg


def test_yaml_configs_are_the_released_architectures():
    import yaml

    assert config_from_mapping(yaml.safe_load((CONFIGS / "xvlm.yaml").read_text()), "xvlm") == XVLMConfig()
    aptm = config_from_mapping(yaml.safe_load((CONFIGS / "aptm.yaml").read_text()), "aptm")
    assert aptm == XVLMConfig.for_family("aptm")
    assert aptm.image_size == (384, 128) and aptm.window_size == 8 and aptm.image_mean == APTM_NORMS["cuhk"][0]
    with pytest.raises(TpasInputError, match="not xvlm"):
        config_from_mapping({"family": "aptm"}, "xvlm")
    with pytest.raises(TpasInputError, match="unknown X-VLM config key"):
        config_from_mapping({"nope": 1}, "xvlm")


# ---------------------------------------------------------------- loading rules and refusals
def test_strict_load_round_trip_wrappers_and_config_agreement(kit, tmp_path):
    family, model, vocab = kit["family"], kit["model"], kit["vocab"]
    loaded = load_model(family, kit["ckpt"], vocab=vocab)
    assert loaded.config == model.config and loaded.family == family
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # DDP prefix and recomputable buffers dropped (X-VLM's own fine-tuning loader deletes them).
    sd = {"module." + k: v for k, v in model.state_dict().items() if not k.endswith(("attn_mask", "position_index"))}
    torch.save(sd, tmp_path / "bare.pth")
    assert observed_image_hw({k[7:]: v for k, v in sd.items()}) is None
    if family == "xvlm":
        # Without the masks the weights fit any resolution: the family default (384 x 384) is taken.
        assert load_model(family, tmp_path / "bare.pth", vocab=vocab).config.image_size == (384, 384)
    else:
        # APTM's shrunk last-stage window does not fit the default 384 x 128 built from a window of 2.
        with pytest.raises(TpasInputError, match=r"layers\.3\.blocks\.0\.attn\.relative_position_bias_table"):
            load_model(family, tmp_path / "bare.pth", vocab=vocab)
    again = load_model(family, tmp_path / "bare.pth", dataclasses.asdict(model.config), vocab=vocab)
    assert torch.equal(again.state_dict()["vision_encoder.layers.0.blocks.0.attn.relative_position_index"],
                       model.state_dict()["vision_encoder.layers.0.blocks.0.attn.relative_position_index"])  # fmt: skip
    bad = dict(dataclasses.asdict(model.config), text_layers=1, fusion_layers=3)
    with pytest.raises(TpasInputError, match=r"disagrees.*text_layers: config 1 vs checkpoint 2"):
        load_model(family, kit["ckpt"], bad, vocab=vocab)
    with pytest.raises(TpasInputError, match=r"disagrees.*window_size"):
        load_model(family, kit["ckpt"], dict(dataclasses.asdict(model.config), window_size=4), vocab=vocab)


def test_missing_unexpected_and_misshapen_keys_are_named(kit, tmp_path):
    family, model, vocab = kit["family"], kit["model"], kit["vocab"]
    sd = dict(model.state_dict())
    del sd["itm_head.3.weight"]
    sd["bbox_head.0.weight"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(TpasInputError, match=r"1 missing key.*itm_head\.3\.weight.*1 unexpected key.*bbox_head"):
        load_model(family, tmp_path / "broken.pth", vocab=vocab)
    sd = dict(model.state_dict(), **{"itm_head.0.bias": torch.zeros(7)})
    torch.save({"model": sd}, tmp_path / "shape.pth")
    with pytest.raises(TpasInputError, match=r"itm_head\.0\.bias \(7,\) \(expected \(256,\)\)"):
        load_model(family, tmp_path / "shape.pth", vocab=vocab)
    # A CMP checkpoint is no X-VLM checkpoint: its BatchNorm projections are named.
    from tests.models.test_cmp import tiny_model

    torch.save({"model": tiny_model().state_dict()}, tmp_path / "cmp.pth")
    with pytest.raises(TpasInputError, match=r"vision_proj\.weight.*missing"):
        load_model(family, tmp_path / "cmp.pth", vocab=vocab)
    with pytest.raises(TpasInputError, match="do not apply"):
        load_model("xvlm", kit["ckpt"], vocab=vocab, trained_on="icfg")
    if family == "aptm":
        with pytest.raises(TpasInputError, match=r"--trained-on must be one of cuhk.*'market'"):
            load_model(family, kit["ckpt"], vocab=vocab, trained_on="market")


# ---------------------------------------------------------------- the original test-time rules
def test_caption_cleaning_rules():
    # X-VLM: CMP's pre_caption, words counted on spaces only (a single newline stays inside a word).
    assert clean_xvlm_caption('A Man, in "red"! t-shirt/jeans', "pre_caption", 30) == "a man in red t shirt jeans"
    assert clean_xvlm_caption("a\nb c d", "pre_caption", 2) == "a\nb c"
    # APTM on CUHK-PEDES: only truncation; on ICFG/RSTP: alphanumerics only.
    assert clean_xvlm_caption("A Man, in RED!", "words", 56) == "A Man, in RED!"
    assert clean_xvlm_caption("one two three", "words", 2) == "one two"
    assert clean_xvlm_caption("A Man, in RED!  (t-shirt)", "alnum", 56) == "a man in red t shirt"
    for rule in ("pre_caption", "alnum"):
        with pytest.raises(ValueError, match="empty"):
            clean_xvlm_caption("?!", rule, 30)
    icfg = XVLMConfig.for_family("aptm", "icfg")
    assert icfg.caption_cleaning == "alnum" and icfg.image_mean == APTM_NORMS["icfg"][0]


def test_preprocess_is_bicubic_resize_to_height_by_width_and_normalise():
    model = tiny("aptm")
    img = Image.new("RGB", (40, 90), (200, 100, 50))
    x = model.preprocess(img)["image"]
    assert x.shape == (3, 64, 32)
    mean, std = APTM_NORMS["cuhk"]
    expect = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(x[:, 10, 10], expect, atol=1e-5)


def test_itc_uses_token_zero_and_cls_through_linear_projections():
    model = tiny("xvlm")
    tokens = torch.randn(3, 5, model.config.vision_width)
    states = torch.randn(3, 40, model.config.text_width)
    assert torch.allclose(model.image_feat(tokens), F.normalize(model.vision_proj(tokens[:, 0]), dim=-1))
    assert torch.allclose(model.text_feat(states), F.normalize(model.text_proj(states[:, 0]), dim=-1))
    changed = states.clone()
    changed[:, 1:] += 1.0
    assert torch.equal(model.text_feat(changed), model.text_feat(states))


def test_xvlm_fill_keeps_the_scored_minimum_and_puts_minus_100_elsewhere():
    itc = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.2], [0.3, 0.3, 0.3, 0.3, 0.3]])
    # Row 0: top-3 by ITC = columns 0, 3, 2 with logits 2, 5, -1; the engine fills the rest with -1.
    # Row 1: equal ITC, so the top-2 are columns 0, 1 (lower column first); logits 1, 4.
    filled = torch.tensor([[2.0, -1.0, -1.0, 5.0, -1.0], [1.0, 4.0, 1.0, 1.0, 1.0]])
    out = xvlm_fill(filled, itc)
    assert out.tolist() == [[2.0, -100.0, -1.0, 5.0, -100.0], [1.0, 4.0, -100.0, -100.0, -100.0]]


def _by_hand(model, g, k: int):
    """ITC and re-ranked matrices recomputed one image and one caption at a time."""
    gids = sorted(p.stem for p in g.images.rglob("*.jpg"))
    paths = {p.stem: p for p in g.images.rglob("*.jpg")}
    with torch.no_grad():
        imgs = [model.encode_images({"image": model.preprocess(Image.open(paths[i]))["image"][None]}) for i in gids]
        txts = [model.encode_texts(model.tokenize([c])) for c in g.captions]
        itc = torch.stack([torch.cat([t["embed"] @ im["embed"].T for im in imgs], dim=1)[0] for t in txts])
        filled = torch.empty_like(itc)
        for q, t in enumerate(txts):
            top = torch.argsort(-itc[q], stable=True)[:k]
            s = torch.cat([model.match(t, imgs[int(j)]) for j in top])
            filled[q] = s.min()
            filled[q, top] = s
    return gids, itc, filled


def test_engine_itc_and_rerank_equal_one_at_a_time(kit, tmp_path):
    family, g = kit["family"], kit["g"]
    model = load_model(family, kit["ckpt"], vocab=kit["vocab"])
    out = tmp_path / f"{family}.pt"
    sims = infer(model, g.images, g.queries, out, rerank_k=3, batch_size=4, num_workers=0, device="cpu",
                 use_cache=False)  # fmt: skip
    gids, itc, filled = _by_hand(model, g, 3)
    got_itc = SimsMatrix.load(tmp_path / f"{family}.itc.pt")
    assert got_itc.gallery_ids == sims.gallery_ids == gids and sims.query_ids == g.query_ids
    assert got_itc.source == f"{family}-itc" and sims.source == f"{family}-itm"
    assert torch.allclose(got_itc.scores, itc, atol=1e-4)
    if family == "xvlm":
        expect = xvlm_fill(filled, itc)
        # X-VLM's matrix: each row has exactly k raw logits, the rest -100.
        assert ((sims.scores != -100.0).sum(dim=1) == 3).all()
    else:
        expect = cmp_final_scores(filled, itc)
    assert torch.allclose(sims.scores, expect, atol=1e-4)
    raw = SimsMatrix.load(tmp_path / f"{family}.itm.pt")
    assert torch.allclose(raw.to_dense(fill=-100.0), xvlm_fill(filled, itc), atol=1e-4)


def test_match_trims_padding_without_changing_scores():
    model = tiny("aptm")
    ids = torch.randint(5, 128, (4, 56))
    mask = (torch.arange(56)[None] < torch.tensor([5, 9, 3, 12])[:, None]).long()
    tokens = torch.randn(4, 3, 128)
    with torch.no_grad():
        states = model.encode_text_tokens(ids * mask, mask)
        full = model.itm_logits(model.cross_cls(states, mask, tokens))[:, 1]
        got = model.match({"states": states, "attention_mask": mask}, {"tokens": tokens})
    assert torch.allclose(got, full, atol=1e-5)


# ---------------------------------------------------------------- X-VLM 16M pre-training as an initialisation
def fake_pretraining_state(seed: int = 1, **overrides) -> dict[str, torch.Tensor]:
    """A tiny X-VLM pre-training state dict: BertForMaskedLM text side, Linear projections, itm_head, bbox_head."""
    model = tiny("xvlm", seed=seed, mlm_head=True, **overrides)
    from tpas.models.xvlm.model import itm_mlp

    bbox = itm_mlp(model.config.text_width)
    bbox[3] = torch.nn.Linear(2 * model.config.text_width, 4)
    state = dict(model.state_dict())
    state.update({f"bbox_head.{k}": v for k, v in bbox.state_dict().items()})
    return state


def test_pretraining_checkpoint_initialises_cmp_key_by_key(tmp_path):
    from tests.models.test_cmp import tiny_model
    from tpas.models.xvlm import load_xvlm_pretrained

    state = fake_pretraining_state()
    torch.save({"model": state, "config": {"embed_dim": 32}}, tmp_path / "16m.th")
    cmp = tiny_model()
    before = {k: v.clone() for k, v in cmp.state_dict().items()}
    report = load_xvlm_pretrained(cmp, tmp_path / "16m.th")
    after = cmp.state_dict()
    # Swin, BERT (text, fusion, MLM head), temp and itm_head carry over; X-VLM's Linear projections and bbox_head
    # have no place in CMP; CMP's BatchNorm projections and pose branch keep their initialisation.
    assert set(report.unexpected) == {k for k in state if k.startswith(("vision_proj.", "text_proj.", "bbox_head."))}
    assert set(report.missing) == {k for k in after if k.startswith(("vision_proj.", "text_proj.", "pose_"))}
    assert set(report.loaded) == set(after) - set(report.missing) and not report.reinitialised
    assert "temp" in report.loaded and "itm_head.3.weight" in report.loaded
    for k in report.loaded:
        assert torch.equal(after[k], state[k]), k
    for k in report.missing:
        assert torch.equal(after[k], before[k]), k
    assert report.lines()[0].startswith("loaded ") and report.summary().startswith(f"{len(report.loaded)} loaded")
    # The tied MLM decoder still is the word embedding matrix.
    assert cmp.text_encoder.cls.predictions.decoder.weight is cmp.text_encoder.bert.embeddings.word_embeddings.weight


def test_pretraining_checkpoint_renames_for_xvlm_and_refuses_misfits(tmp_path):
    from tpas.models.xvlm import load_xvlm_pretrained

    state = fake_pretraining_state()
    torch.save(state, tmp_path / "16m.th")
    target = tiny("xvlm", seed=3)
    report = load_xvlm_pretrained(target, tmp_path / "16m.th")
    # X-VLM's fine-tuning loader drops the `bert.` level; the MLM head and bbox_head are left out.
    assert report.renamed["text_encoder.bert.embeddings.word_embeddings.weight"] == (
        "text_encoder.embeddings.word_embeddings.weight"
    )
    assert not report.missing and all(k.startswith(("text_encoder.cls.", "bbox_head.")) for k in report.unexpected)
    assert torch.equal(target.vision_proj.weight, state["vision_proj.weight"])
    # A checkpoint for another input size: its shifted-window masks are recomputed, not copied.
    other = fake_pretraining_state(image_size=(128, 128))
    torch.save(other, tmp_path / "128px.th")
    report = load_xvlm_pretrained(tiny("xvlm"), tmp_path / "128px.th")
    assert report.reinitialised == [k for k in other if k.endswith("attn_mask")]
    # A learnable tensor of another shape stops the load, naming it.
    torch.save(fake_pretraining_state(window_size=4), tmp_path / "w4.th")
    with pytest.raises(TpasInputError, match=r"relative_position_bias_table \(49, 1\) \(model \(9, 1\)\)"):
        load_xvlm_pretrained(tiny("xvlm"), tmp_path / "w4.th")


# ---------------------------------------------------------------- CLI
def run_cli(argv: list[str]) -> int:
    """Exit code of `tpas ARGV` (0 when the app returns without raising SystemExit)."""
    from tpas.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_cli_infer_xvlm_rerank_and_refusal(tmp_path):
    root = tmp_path / "kit"
    root.mkdir()
    torch.save({"model": tiny("xvlm").state_dict()}, root / "xvlm.pth")
    write_vocab(root / "vocab.txt")
    g = make_tiny_gallery(root / "data", n_images=6, n_queries=4)
    out = tmp_path / "xvlm.pt"
    args = ["infer", "xvlm", "--images", str(g.images), "--queries", str(g.queries), "--checkpoint",
            str(root / "xvlm.pth"), "--workers", "0", "--no-cache", "--device", "cpu"]  # fmt: skip
    assert run_cli([*args, "--rerank-k", "2", "--out", str(out)]) == 0
    final, itc = SimsMatrix.load(out), SimsMatrix.load(tmp_path / "xvlm.itc.pt")
    assert final.shape == itc.shape == (4, 6) and ((final.scores != -100.0).sum(dim=1) == 2).all()
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: xvlm\nwindow_size: 7\n")
    assert run_cli([*args, "--config", str(bad), "--out", str(tmp_path / "y.pt")]) == 2
    assert not (tmp_path / "y.pt").exists()


def test_cli_infer_aptm_trained_on_selects_statistics_and_caption_rule(tmp_path):
    root = tmp_path / "kit"
    root.mkdir()
    torch.save({"model": tiny("aptm").state_dict()}, root / "aptm.pth")
    write_vocab(root / "vocab.txt")
    g = make_tiny_gallery(root / "data", n_images=5, n_queries=3)
    args = ["infer", "aptm", "--images", str(g.images), "--queries", str(g.queries), "--checkpoint",
            str(root / "aptm.pth"), "--workers", "0", "--no-cache", "--device", "cpu"]  # fmt: skip
    assert run_cli([*args, "--trained-on", "rstp", "--rerank-k", "2", "--out", str(tmp_path / "a.pt")]) == 0
    pre = SimsMatrix.load(tmp_path / "a.pt").meta["model"]["preprocess"]
    assert pre["mean"] == list(APTM_NORMS["rstp"][0]) and pre["caption_cleaning"] == "alnum"
    assert run_cli([*args, "--trained-on", "market", "--out", str(tmp_path / "b.pt")]) == 2
    assert not (tmp_path / "b.pt").exists()


def test_tta_hflip_is_the_mean_of_plain_and_mirrored_runs_and_keeps_plain_itm(kit, tmp_path):
    from encoder_kit import check_tta_hflip

    family, g = kit["family"], kit["g"]

    def load(**opts):
        return load_model(family, kit["ckpt"], vocab=kit["vocab"], **opts)

    flip = check_tta_hflip(load, g.images, g.queries, tmp_path, rerank=True)
    out = tmp_path / "cli.pt"
    args = ["infer", family, "--images", str(tmp_path / "plain"), "--queries", str(g.queries), "--checkpoint",
            str(kit["ckpt"]), "--vocab", str(kit["vocab"]), "--rerank-k", str(len(g.gallery_ids)), "--tta", "hflip",
            "--out", str(out), "--workers", "0", "--no-cache", "--device", "cpu"]  # fmt: skip
    assert run_cli(args) == 0
    cli = SimsMatrix.load(out)
    torch.testing.assert_close(cli.scores, flip.scores, atol=1e-5, rtol=0)
    assert cli.meta["model"]["tta"] == "hflip"


def test_cpu_bf16_runs_bf16_weights_and_restores_fp32(kit, tmp_path):
    from encoder_kit import check_cpu_bf16

    model = load_model(kit["family"], kit["ckpt"], vocab=kit["vocab"])
    check_cpu_bf16(model, kit["g"].images, kit["g"].queries, tmp_path, rerank=True)
