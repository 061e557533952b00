"""CMP: released layout, config inference, loading rules, reference test-time facts, ITM re-rank, library + CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import tpas.models  # noqa: F401  (torchvision workaround first)
from tpas.cli import app
from tpas.errors import TpasInputError
from tpas.models import load_model
from tpas.models.cmp import CMP, CMPConfig, clean_caption, cmp_final_scores, config_from_mapping, infer_config
from tpas.pose.render import render_pose_map
from tpas.sims import SimsMatrix

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WORDS = [
    *[
        "a",
        "man",
        "woman",
        "person",
        "in",
        "red",
        "blue",
        "green",
        "black",
        "white",
        "shirt",
        "jacket",
        "is",
        "walking",
        "running",
        "falling",
        "lying",
    ],
    *["on", "the", "ground", "street", "near", "door", "with", "bag", "and", "hat", "fighting", "standing", "sitting"],
]
CAPTIONS = [
    "A man in a red shirt is walking near the door.",
    "A woman in a blue jacket is lying on the ground!",
    "The person, with a black bag, is running.",
    "A man in white is fighting near the street",
    "A woman is sitting on the ground with a hat",
]


def write_vocab(path: Path, size: int = 128) -> Path:
    """A WordPiece vocab of exactly `size` tokens: specials, the test words, letters and ##letters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
    toks += [w for w in dict.fromkeys(WORDS) if w not in toks]
    toks += [f"[unused{i}]" for i in range(size - len(toks))]
    toks = toks[:size]
    path.write_text("\n".join(toks) + "\n")
    return path


def tiny_model(seed: int = 0, **overrides) -> CMP:
    """Tiny CMP with random weights and non-trivial BatchNorm statistics (eval mode)."""
    torch.manual_seed(seed)
    model = CMP(CMPConfig.tiny(**overrides))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        # Larger projection weights than the reference init so features differ between inputs.
        for proj in (model.vision_proj, model.text_proj):
            proj[2].weight.normal_(std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> dict:
    """A tiny checkpoint in the released `{'model': sd}` layout + vocab + gallery with pose maps + queries."""
    root = tmp_path_factory.mktemp("cmp")
    model = tiny_model()
    torch.save({"model": model.state_dict()}, root / "tiny.pth")
    write_vocab(root / "vocab.txt")
    images, poses = root / "gallery", root / "pose"
    images.mkdir()
    poses.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        arr = rng.integers(0, 256, size=(50, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"g{i:02d}.png")
        kp = np.concatenate([rng.uniform(5, 35, (18, 1)), rng.uniform(5, 45, (18, 1)), np.ones((18, 1))], axis=1)
        render_pose_map(kp, (40, 50)).save(poses / f"g{i:02d}.png")
    (root / "queries.json").write_text(json.dumps(CAPTIONS))
    return {"root": root, "ckpt": root / "tiny.pth", "vocab": root / "vocab.txt", "images": images, "pose": poses,
            "queries": root / "queries.json", "model": model}  # fmt: skip


# ---------------------------------------------------------------- layout and config
def test_full_size_layout_matches_released_checkpoint_on_meta_device():
    ref = json.loads((FIXTURES / "cmp_checkpoint_layout.json").read_text())
    with torch.device("meta"):
        model = CMP(CMPConfig())
    sd = model.state_dict()
    expected = ref["checkpoint"]["model"]
    assert len(sd) == len(expected) == ref["num_keys"] == 672
    assert set(sd) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert list(sd[k].shape) == shape, k
        assert str(sd[k].dtype).removeprefix("torch.") == dtype, k
    assert sum(p.numel() for p in model.parameters()) == ref["param_counts"]["total_params_as_Search.py_prints"]
    # Tied MLM decoder: one tensor under both names.
    tp = model.text_encoder.cls.predictions
    assert tp.decoder.weight is model.text_encoder.bert.embeddings.word_embeddings.weight
    assert tp.decoder.bias is tp.bias
    assert infer_config(sd) == CMPConfig()


def test_parity_variant_depths_inferred():
    ref = json.loads((FIXTURES / "cmp_checkpoint_layout.json").read_text())
    with torch.device("meta"):
        model = CMP(CMPConfig(swin_depths=(2, 2, 2, 2)))
    assert len(model.state_dict()) == ref["parity_variant"]["num_keys"]
    assert infer_config(model.state_dict()).swin_depths == (2, 2, 2, 2)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"pose_conv": False}, {"pose": False, "pose_conv": False}, {"swin_depths": (2, 2, 2, 2)},
     {"text_layers": 1, "fusion_layers": 3, "embed_dim": 32, "pool_bins": 2}],
)  # fmt: skip
def test_config_inferred_from_tiny_checkpoint_equals_the_config_that_built_it(overrides):
    cfg = CMPConfig.tiny(**overrides)
    if not cfg.pose_conv:
        # Without pose_conv its width leaves no trace; the inferred config keeps the default.
        cfg = dataclasses.replace(cfg, pose_conv_width=CMPConfig().pose_conv_width)
    assert infer_config(CMP(cfg).state_dict()) == cfg


def test_yaml_config_is_the_released_architecture():
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/models/cmp.yaml").read_text())
    assert config_from_mapping(data) == CMPConfig()
    with pytest.raises(TpasInputError, match="family"):
        config_from_mapping({"family": "clip"})
    with pytest.raises(TpasInputError, match="unknown CMP config key"):
        config_from_mapping({"nope": 1})
    # YAML 1.1 reads 1e-12 as a string: numbers are coerced, wrong types named.
    assert config_from_mapping({"text_layer_norm_eps": "1e-12"}).text_layer_norm_eps == 1e-12
    with pytest.raises(TpasInputError, match="text_layers must be int"):
        config_from_mapping({"text_layers": "6"})


# ---------------------------------------------------------------- loading rules
def test_strict_load_round_trip_and_wrappers(tiny_ckpt, tmp_path):
    model = tiny_ckpt["model"]
    vocab = tiny_ckpt["vocab"]
    loaded = CMP.from_checkpoint(tiny_ckpt["ckpt"], vocab=vocab)
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # The original trainer's {'model', 'config'} wrapper, a DDP 'module.' prefix, and dropped recomputable buffers.
    sd = {"module." + k: v for k, v in model.state_dict().items() if not k.endswith("attn_mask")}
    torch.save({"model": sd, "config": {"embed_dim": 64, "k_test": 128}}, tmp_path / "wrapped.pth")
    # Without mask buffers the tensors do not fix the resolution: the given config does.
    assert infer_config({k[7:]: v for k, v in sd.items()}).image_size == CMPConfig().image_size
    again = CMP.from_checkpoint(tmp_path / "wrapped.pth", CMPConfig.tiny(), vocab=vocab)
    assert torch.equal(
        again.vision_encoder.layers[2].blocks[1].attn_mask, model.vision_encoder.layers[2].blocks[1].attn_mask
    )
    # A given config must agree with the checkpoint.
    with pytest.raises(TpasInputError, match=r"disagrees.*text_layers"):
        CMP.from_checkpoint(tiny_ckpt["ckpt"], dataclasses.asdict(CMPConfig.tiny(text_layers=1, fusion_layers=3)),
                            vocab=vocab)  # fmt: skip


def test_bad_checkpoints_are_refused(tiny_ckpt, tmp_path):
    sd = tiny_ckpt["model"].state_dict()
    broken = {k: v for k, v in sd.items() if k != "itm_head.3.weight"}
    broken["extra.weight"] = torch.zeros(1)
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(TpasInputError, match=r"1 missing key.*itm_head\.3\.weight.*1 unexpected key.*extra\.weight"):
        CMP.from_checkpoint(tmp_path / "broken.pth", vocab=tiny_ckpt["vocab"])
    # A pickled Namespace needs --trust-checkpoint.
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "pickled.pth")
    with pytest.raises(TpasInputError, match="--trust-checkpoint"):
        CMP.from_checkpoint(tmp_path / "pickled.pth", vocab=tiny_ckpt["vocab"])
    assert CMP.from_checkpoint(tmp_path / "pickled.pth", vocab=tiny_ckpt["vocab"], trust_checkpoint=True)
    # Vocab: default beside the checkpoint, wrong size refused, missing file named.
    (tmp_path / "vocab.txt").write_text((tiny_ckpt["vocab"]).read_text())
    assert CMP.from_checkpoint(tmp_path / "pickled.pth", trust_checkpoint=True).tokenizer is not None
    write_vocab(tmp_path / "v64.txt", 64)
    with pytest.raises(TpasInputError, match="vocab has 64 tokens"):
        CMP.from_checkpoint(tiny_ckpt["ckpt"], vocab=tmp_path / "v64.txt")


def test_missing_vocab_beside_checkpoint_is_named(tiny_ckpt, tmp_path):
    torch.save({"model": tiny_ckpt["model"].state_dict()}, tmp_path / "c.pth")
    with pytest.raises(TpasInputError, match=r"no vocab\.txt beside the checkpoint"):
        CMP.from_checkpoint(tmp_path / "c.pth")


# ---------------------------------------------------------------- reference test-time facts (docs/models/cmp.md)
def test_caption_cleaning_follows_the_reference():
    assert (
        clean_caption('A Man, in "red" (shirt)! is: walking; #1 *now*~ ok?') == "a man in red shirt is walking 1 now ok"
    )
    assert clean_caption("t-shirt and/or jeans") == "t shirt and or jeans"
    assert clean_caption("the <person> is here") == "the person is here"
    assert clean_caption("  many    spaces\n\n") == "many spaces"
    assert clean_caption("don't") == "dont"
    assert clean_caption(" ".join(f"w{i}" for i in range(80))) == " ".join(f"w{i}" for i in range(56))
    with pytest.raises(ValueError):
        clean_caption("?!...")


def test_tokenizer_pads_to_56_and_matches_wordpiece(tiny_ckpt):
    model = CMP.from_checkpoint(tiny_ckpt["ckpt"], vocab=tiny_ckpt["vocab"])
    tok = model.tokenize(["A man, walking!", "a woman"])
    assert tok["input_ids"].shape == (2, 56) and tok["attention_mask"].shape == (2, 56)
    vocab = tiny_ckpt["vocab"].read_text().splitlines()
    ids = tok["input_ids"][0].tolist()
    assert [vocab[i] for i in ids[:5]] == ["[CLS]", "a", "man", "walking", "[SEP]"]
    assert ids[5:] == [0] * 51 and tok["attention_mask"][0].tolist() == [1] * 5 + [0] * 51
    with pytest.raises(TpasInputError, match="empty after cleaning"):
        model.tokenize(["..."])


def test_text_feature_pools_over_padding_with_overlapping_bins():
    model = tiny_model()
    states = torch.randn(2, 56, model.config.text_width)
    bins = [(0, 19), (18, 37), (36, 55)]  # PyTorch's adaptive bins for 55 tokens (tokens 1..55, [SEP]/[PAD] incl.)
    body = states[:, 1:]
    x = torch.cat([states[:, 0]] + [body[:, a:b].mean(1) for a, b in bins], dim=1)
    assert torch.allclose(model.text_feat(states), F.normalize(model.text_proj(x), dim=-1), atol=1e-6)
    # Changing only padding positions changes the feature (the reference does not mask them).
    changed = states.clone()
    changed[:, 50:] += 1.0
    assert not torch.allclose(model.text_feat(changed), model.text_feat(states))
    tokens = torch.randn(2, 50, model.config.vision_width)
    ibins = [(0, 17), (16, 33), (32, 49)]  # 49 patch tokens (released size)
    xi = torch.cat([tokens[:, 1:][:, a:b].mean(1) for a, b in ibins], dim=1)
    assert torch.allclose(model.image_feat(tokens), F.normalize(model.vision_proj(xi), dim=-1), atol=1e-6)


def test_text_states_come_from_the_text_layers_only():
    model = tiny_model()
    ids = torch.randint(5, 128, (2, 56))
    mask = torch.ones(2, 56, dtype=torch.long)
    before = model.encode_text_tokens(ids, mask)
    with torch.no_grad():
        for p in model.text_encoder.bert.encoder.layer[model.config.text_layers :].parameters():
            p.add_(1.0)
    assert torch.equal(model.encode_text_tokens(ids, mask), before)


def test_pose_block_uses_pose_as_query_and_image_as_key_value():
    model = tiny_model()
    block = model.pose_block
    img, pose = torch.randn(2, 5, 128), torch.randn(2, 5, 128)
    h, n = block.attn.heads, block.norm
    q = block.attn.q(n(pose)).view(2, 5, h, -1).transpose(1, 2)
    k = block.attn.k(n(img)).view(2, 5, h, -1).transpose(1, 2)
    v = block.attn.v(n(img)).view(2, 5, h, -1).transpose(1, 2)
    att = ((q @ k.transpose(-2, -1)) / (128 // h) ** 0.5).softmax(-1)
    expect = img + block.attn.proj((att @ v).transpose(1, 2).reshape(2, 5, 128))
    assert torch.allclose(block(img, pose), expect, atol=1e-5)
    assert not torch.allclose(block(img, pose), block(pose, img))
    with pytest.raises(ValueError, match="pose"):
        model.encode_image_tokens(torch.randn(1, 3, 64, 64))


def test_itm_head_matches_reference_structure():
    model = tiny_model()
    head = model.itm_head
    assert isinstance(head[1], torch.nn.LayerNorm) and head[1].eps == 1e-5
    assert isinstance(head[2], torch.nn.GELU) and head[2].approximate == "none"
    assert model.text_encoder.bert.embeddings.LayerNorm.eps == 1e-12


def test_training_api_shapes_and_gradients():
    model = tiny_model().train()
    img, pose = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    ids = torch.randint(5, 128, (3, 56))
    mask = torch.ones(3, 56, dtype=torch.long)
    tokens = model.encode_image_tokens(img, pose)
    assert tokens.shape == (3, 1 + 4, 128)
    states = model.encode_text_tokens(ids, mask)
    assert model.image_feat(tokens).shape == model.text_feat(states).shape == (3, 64)
    cls = model.cross_cls(states, mask, tokens)
    assert cls.shape == (3, 128) and model.itm_logits(cls).shape == (3, 2)
    logits = model.mlm_logits(ids, mask, tokens)
    assert logits.shape == (3, 56, 128)
    picked = model.mlm_logits(ids, mask, tokens, masked_pos=torch.tensor([[1, 2]] * 3))
    assert picked.shape == (3, 2, 128)
    loss = model.itm_logits(cls).sum() + logits.sum() + model.image_feat(tokens).sum() / model.temp
    loss.backward()
    assert model.pose_conv.expand[0].weight.grad is not None and model.temp.grad is not None
    model.eval()
    with torch.no_grad():
        full = model.mlm_logits(ids, mask, tokens.detach())
        at = model.mlm_logits(ids, mask, tokens.detach(), masked_pos=torch.tensor([[1, 2]] * 3))
    assert torch.allclose(at, full[:, 1:3], atol=1e-5)


# ---------------------------------------------------------------- re-rank and final score
def test_match_skips_trailing_padding_without_changing_scores():
    model = tiny_model()
    ids = torch.randint(5, 128, (6, 56))
    mask = (torch.arange(56)[None] < torch.tensor([5, 9, 12, 7, 30, 3])[:, None]).long()
    tokens = torch.randn(6, 5, 128)
    with torch.no_grad():
        states = model.encode_text_tokens(ids * mask, mask)
        full = model.itm_logits(model.cross_cls(states, mask, tokens))[:, 1]
        got = model.match({"states": states, "attention_mask": mask}, {"tokens": tokens})
    assert torch.allclose(got, full, atol=1e-5)


def test_final_score_is_global_minmax_plus_small_itc_term():
    itm = torch.tensor([[3.0, 1.0, 1.0], [1.0, -2.0, 5.0]])
    itc = torch.tensor([[0.2, 0.1, 0.0], [0.4, 0.3, 0.1]])
    out = cmp_final_scores(itm, itc)
    expect = (itm - (-2.0)) / 7.0 + 0.002 * (itc - 0.0) / 0.4
    assert torch.allclose(out, expect)


def test_rerank_through_engine_library_path(tiny_ckpt, tmp_path):
    from tpas.models.engine import infer

    model = load_model("cmp", tiny_ckpt["ckpt"], vocab=tiny_ckpt["vocab"])
    out = tmp_path / "cmp.pt"
    sims = infer(model, tiny_ckpt["images"], tiny_ckpt["queries"], out, pose_dir=tiny_ckpt["pose"], rerank_k=4,
                 batch_size=4, num_workers=0, device="cpu", use_cache=False)  # fmt: skip
    itc = SimsMatrix.load(tmp_path / "cmp.itc.pt").scores
    # Recompute every step by hand: features, top-4 by ITC, ITM logits, row-min fill, final combination.
    gids = sorted(p.stem for p in tiny_ckpt["images"].iterdir())
    batch = [model.preprocess(Image.open(tiny_ckpt["images"] / f"{g}.png"), Image.open(tiny_ckpt["pose"] / f"{g}.png"))
             for g in gids]  # fmt: skip
    with torch.no_grad():
        imgs = model.encode_images({k: torch.stack([b[k] for b in batch]) for k in ("image", "pose")})
        txt = model.encode_texts(model.tokenize(CAPTIONS))
        my_itc = txt["embed"] @ imgs["embed"].T
        assert torch.allclose(itc, my_itc, atol=1e-5)
        filled = torch.empty_like(my_itc)
        for q in range(len(CAPTIONS)):
            top = torch.argsort(-my_itc[q], stable=True)[:4]
            n = len(top)
            scores = model.match({"states": txt["states"][q].expand(n, -1, -1),
                                  "attention_mask": txt["attention_mask"][q].expand(n, -1)},
                                 {"tokens": imgs["tokens"][top]})  # fmt: skip
            filled[q] = scores.min()
            filled[q, top] = scores
    expect = (filled - filled.min()) / (filled.max() - filled.min()) + 0.002 * (my_itc - my_itc.min()) / (
        my_itc.max() - my_itc.min()
    )
    assert sims.gallery_ids == gids and sims.query_ids == [str(i) for i in range(len(CAPTIONS))]
    assert torch.allclose(sims.scores, expect, atol=1e-5)
    # Outside each row's top-4 every filled cell is that row's minimum ITM score.
    for q in range(len(CAPTIONS)):
        rest = torch.argsort(-my_itc[q], stable=True)[4:]
        assert torch.all(filled[q, rest] == filled[q].min())


# ---------------------------------------------------------------- CLI
def test_cli_infer_cmp_with_pose_and_rerank(tiny_ckpt, tmp_path):
    runner = CliRunner()
    out = tmp_path / "x.pt"
    args = ["infer", "cmp", "--images", str(tiny_ckpt["images"]), "--pose", str(tiny_ckpt["pose"]), "--queries",
            str(tiny_ckpt["queries"]), "--checkpoint", str(tiny_ckpt["ckpt"]), "--vocab", str(tiny_ckpt["vocab"]),
            "--rerank-k", "4", "--out", str(out), "--workers", "0", "--no-cache", "--device", "cpu"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    final, itc = SimsMatrix.load(out), SimsMatrix.load(tmp_path / "x.itc.pt")
    assert final.shape == itc.shape == (len(CAPTIONS), 6)
    assert float(final.scores.min()) >= 0.0 and float(final.scores.max()) <= 1.002 + 1e-6
    # Removing the small ITC term leaves the normalised ITM part: constant (the row minimum) outside each top-4.
    i = itc.scores
    itm_part = final.scores - 0.002 * (i - i.min()) / (i.max() - i.min())
    for q in range(len(CAPTIONS)):
        rest = torch.argsort(-i[q], stable=True)[4:]
        assert torch.allclose(itm_part[q, rest], itm_part[q, rest[0]].expand(len(rest)), atol=1e-6)
        assert torch.isclose(itm_part[q, rest[0]], itm_part[q].min(), atol=1e-6)
    # The config file must agree with the checkpoint.
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("family: cmp\ntext_layers: 3\n")
    res = runner.invoke(app, [*args[:-7], "--out", str(tmp_path / "y.pt"), "--config", str(bad_cfg), "--workers", "0",
                              "--no-cache"])  # fmt: skip
    assert isinstance(res.exception, TpasInputError) and "text_layers" in str(res.exception)
    assert not (tmp_path / "y.pt").exists()


def test_cli_infer_cmp_without_pose_exits_2(tiny_ckpt, tmp_path):
    from tpas.cli import main

    with pytest.raises(SystemExit) as e:
        main(["infer", "cmp", "--images", str(tiny_ckpt["images"]), "--queries", str(tiny_ckpt["queries"]),
              "--checkpoint", str(tiny_ckpt["ckpt"]), "--vocab", str(tiny_ckpt["vocab"]), "--out",
              str(tmp_path / "z.pt"), "--workers", "0", "--no-cache"])  # fmt: skip
    assert e.value.code == 2 and not (tmp_path / "z.pt").exists()


# ---------------------------------------------------------------- test-time flip
def test_tta_hflip_is_the_mean_of_plain_and_mirrored_runs_and_keeps_plain_itm(tiny_ckpt, tmp_path):
    from encoder_kit import check_tta_hflip

    def load(**opts):
        return load_model("cmp", tiny_ckpt["ckpt"], vocab=tiny_ckpt["vocab"], **opts)

    flip = check_tta_hflip(load, tiny_ckpt["images"], tiny_ckpt["queries"], tmp_path, tiny_ckpt["pose"], rerank=True)
    out = tmp_path / "cli.pt"
    args = ["infer", "cmp", "--images", str(tmp_path / "plain"), "--pose", str(tiny_ckpt["pose"]), "--queries",
            str(tiny_ckpt["queries"]), "--checkpoint", str(tiny_ckpt["ckpt"]), "--vocab", str(tiny_ckpt["vocab"]),
            "--rerank-k", "6", "--tta", "hflip", "--out", str(out), "--workers", "0", "--no-cache"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cli = SimsMatrix.load(out)
    torch.testing.assert_close(cli.scores, flip.scores, atol=1e-5, rtol=0)
    assert cli.meta["model"]["tta"] == "hflip"


def test_cpu_bf16_runs_bf16_weights_and_restores_fp32(tiny_ckpt, tmp_path):
    from encoder_kit import check_cpu_bf16

    model = load_model("cmp", tiny_ckpt["ckpt"], vocab=tiny_ckpt["vocab"])
    check_cpu_bf16(model, tiny_ckpt["images"], tiny_ckpt["queries"], tmp_path, tiny_ckpt["pose"], rerank=True)
