"""BEiT-3 backend: reference layouts, torchscale behaviour, tokenizer ids, preprocessing, loading rules, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import tpas.models  # noqa: F401  (torchvision workaround before anything imports timm/torchvision)
from tpas.errors import TpasInputError
from tpas.models import load_model
from tpas.models.beit3 import (
    PRESETS_FILE,
    BEiT3Config,
    BEiT3ImageTransform,
    BEiT3Retrieval,
    BEiT3Tokenizer,
    infer_config,
    resolve_config,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SENTENCES = [
    f"A person in a {colour} jacket is {action} near the {place}."
    for colour in ("red", "blue", "green", "black", "white")
    for action in ("walking", "running", "falling down", "fighting", "standing")
    for place in ("door", "street")
]
TINY = BEiT3Config(
    img_size=32, patch_size=16, embed_dim=128, layers=2, heads=2, ffn_dim=256, vocab_size=64, max_source_positions=80
)


def train_spm(path: Path) -> Path:
    """A tiny sentencepiece model (nmt_nfkc like beit3.spm) trained on a few dozen captions."""
    import sentencepiece

    with open(path, "wb") as fh:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(SENTENCES),
            model_writer=fh,
            vocab_size=60,
            model_type="unigram",
            normalization_rule_name="nmt_nfkc",
            character_coverage=1.0,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    return path


def random_state(config: BEiT3Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the retrieval layout with every tensor random (LayerNorm gains near 1), so that any wrong
    expert, position row or missing LayerNorm changes the output."""
    torch.manual_seed(seed)
    model = BEiT3Retrieval(config)
    state = {}
    for key, value in model.state_dict().items():
        if "norm" in key or "_ln" in key:
            noise = 1.0 + 0.3 * torch.randn_like(value) if key.endswith("weight") else 0.3 * torch.randn_like(value)
        else:
            noise = torch.randn_like(value) * (0.5 / math.sqrt(value.shape[-1]) if value.dim() > 1 else 0.2)
        state[key] = noise
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, spm) in the official `{'model': state_dict}` layout, spm NOT next to the checkpoint."""
    root = tmp_path_factory.mktemp("beit3")
    (root / "ckpt").mkdir()
    spm = train_spm(root / "tiny.spm")
    ckpt = root / "ckpt" / "tiny.pth"
    torch.save({"model": random_state(TINY)}, ckpt)
    return ckpt, spm


@pytest.fixture(scope="module")
def model(tiny):
    ckpt, spm = tiny
    return load_model("beit3", ckpt, tokenizer=spm)


# ---------------------------------------------------------------- layouts (full size, meta device)


@pytest.mark.parametrize(
    ("fixture", "config", "name"),
    [
        (
            "beit3_base_patch16_224_retrieval_layout.json",
            BEiT3Config(224, 16, 3, 768, 12, 12, 3072),
            "beit3_base_patch16_224",
        ),
        ("beit3_large_patch16_384_retrieval_layout.json", BEiT3Config(), "beit3_large_patch16_384"),
    ],
)
def test_full_size_models_build_with_exactly_the_reference_layout(fixture, config, name):
    reference = json.loads((FIXTURES / fixture).read_text())["checkpoint"]["model"]
    with torch.device("meta"):
        built = BEiT3Retrieval(config)
    own = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in built.state_dict().items()}
    assert own == reference
    assert config.name == name
    # And the architecture is read back from those shapes alone.
    meta_state = {k: torch.empty(shape, device="meta") for k, (shape, _) in reference.items()}
    assert infer_config(meta_state) == config
    presets = yaml.safe_load(PRESETS_FILE.read_text())["presets"]
    assert BEiT3Config(**presets[name]) == config
    assert resolve_config(yaml.safe_load(PRESETS_FILE.read_text()), config) == config


# ---------------------------------------------------------------- torchscale on current timm / fairscale


def test_torchscale_runs_with_the_installed_timm_and_fairscale_despite_its_pins():
    from packaging.requirements import Requirement

    assert importlib.metadata.version("torchscale") == "0.3.0"
    timm_version = importlib.metadata.version("timm")
    pins = {Requirement(r).name: Requirement(r) for r in importlib.metadata.requires("torchscale") or []}
    # The pin that makes a plain `pip install torchscale` downgrade timm below open-clip-torch's floor ...
    assert "timm" in pins and not pins["timm"].specifier.contains(timm_version)
    # ... and the torchscale code paths that touch timm (drop_path) and fairscale (checkpoint_wrapper) still work.
    torch.manual_seed(0)
    net = BEiT3Retrieval(TINY, drop_path_rate=0.2, checkpoint_activations=True).train()
    out = net.beit3(textual_tokens=None, visual_tokens=torch.randn(2, 3, 32, 32))["encoder_out"]
    out.pow(2).mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert type(net.beit3.encoder.layers[1].drop_path).__module__ == "torchscale.component.droppath"


def _layer_norm(x, state, key, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], state[key + ".weight"], state[key + ".bias"], eps)


def _linear(x, state, key):
    return F.linear(x, state[key + ".weight"], state.get(key + ".bias"))


def reference_features(state, config, image=None, ids=None, pad=None):
    """docs/models/beit3.md written out in plain torch, independently of torchscale: expert A for images, B for text,
    CLS prepended then positions from row 2, padded positions zeroed and masked, sub-LN layers, final LN, head."""
    expert = "A" if image is not None else "B"
    p = "beit3.encoder"
    if image is not None:
        x = F.conv2d(image, state["beit3.vision_embed.proj.weight"], state["beit3.vision_embed.proj.bias"], stride=16)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([state["beit3.vision_embed.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
        pad = torch.zeros(x.shape[:2], dtype=torch.bool)
    else:
        x = state["beit3.text_embed.weight"][ids]
    x = x + state[f"{p}.embed_positions.{expert}.weight"][2 : 2 + x.shape[1]]
    x = x * (~pad).unsqueeze(-1)
    n, t, d = x.shape
    h = config.heads
    for i in range(config.layers):
        lk = f"{p}.layers.{i}"
        y = _layer_norm(x, state, f"{lk}.self_attn_layer_norm.{expert}")
        q = _linear(y, state, f"{lk}.self_attn.q_proj.{expert}") * (d // h) ** -0.5
        k = _linear(y, state, f"{lk}.self_attn.k_proj.{expert}")
        v = _linear(y, state, f"{lk}.self_attn.v_proj.{expert}")
        q, k, v = (z.view(n, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2)).masked_fill(pad[:, None, None, :], float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
        y = _layer_norm(y, state, f"{lk}.self_attn.inner_attn_ln.{expert}")
        x = x + _linear(y, state, f"{lk}.self_attn.out_proj.{expert}")
        y = _layer_norm(x, state, f"{lk}.final_layer_norm.{expert}")
        y = F.gelu(_linear(y, state, f"{lk}.ffn.{expert}.fc1"))
        y = _layer_norm(y, state, f"{lk}.ffn.{expert}.ffn_layernorm")
        x = x + _linear(y, state, f"{lk}.ffn.{expert}.fc2")
    x = _layer_norm(x, state, f"{p}.layer_norm.{expert}")
    head = "vision_head" if image is not None else "language_head"
    return F.normalize(x[:, 0] @ state[f"{head}.weight"].T, dim=-1)


def test_torchscale_flags_reproduce_the_reference_forward(model, tiny):
    state = torch.load(tiny[0], weights_only=True)["model"]
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    tokens = model.tokenize(["A person is falling down.", "", SENTENCES[7]])
    with torch.inference_mode():
        got_i = model.encode_images({"image": images})["embed"]
        got_t = model.encode_texts(tokens)["embed"]
    want_i = reference_features(state, TINY, image=images)
    want_t = reference_features(state, TINY, ids=tokens["input_ids"], pad=tokens["padding_mask"])
    torch.testing.assert_close(got_i, want_i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=1e-5)
    sims = model.similarity(got_t, got_i)
    torch.testing.assert_close(sims, want_t @ want_i.T, atol=1e-5, rtol=1e-5)


def _text_features_untrimmed(model, ids, pad):
    """The encoder run on exactly the given columns (no trimming), as the reference does with its 64 columns."""
    out = model.beit3(textual_tokens=ids, visual_tokens=None, text_padding_position=pad)["encoder_out"]
    return F.normalize(model.language_head(out[:, 0]), dim=-1)


def test_padding_mask_makes_features_independent_of_padding_length(model):
    tokens = model.tokenize(["A person in a red jacket is fighting.", "A person is walking."])
    ids, pad = tokens["input_ids"], tokens["padding_mask"]
    length = int((~pad[0]).sum())
    variants = {
        "trimmed": (ids[:, :length], pad[:, :length]),
        "pad78": (F.pad(ids, (0, 14), value=1), F.pad(pad, (0, 14), value=True)),
    }
    with torch.inference_mode():
        reference = _text_features_untrimmed(model, ids, pad)  # 64 columns, as the seed
        feats = {k: _text_features_untrimmed(model, i, m) for k, (i, m) in variants.items()}
        engine = model.encode_texts(tokens)["embed"]  # drops all-pad trailing columns
        unmasked = _text_features_untrimmed(model, ids, None)
    for name, got in {**feats, "encode_texts": engine}.items():
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=0, msg=name)
    assert (unmasked - reference).abs().max() > 1e-3


def test_batched_encoding_equals_one_at_a_time(model):
    torch.manual_seed(2)
    images = torch.randn(4, 3, 32, 32)
    captions = [SENTENCES[0], "a", SENTENCES[13] * 3, ""]
    with torch.inference_mode():
        batch_i = model.encode_images({"image": images})["embed"]
        single_i = torch.cat([model.encode_images({"image": images[i : i + 1]})["embed"] for i in range(4)])
        batch_t = model.encode_texts(model.tokenize(captions))["embed"]
        single_t = torch.cat([model.encode_texts(model.tokenize([c]))["embed"] for c in captions])
    torch.testing.assert_close(batch_i, single_i, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch_t, single_t, atol=1e-6, rtol=0)
    assert torch.allclose(batch_i.norm(dim=-1), torch.ones(4)) and torch.allclose(batch_t.norm(dim=-1), torch.ones(4))


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def sp_and_tok(tiny):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tiny[1])), BEiT3Tokenizer(tiny[1])


def test_tokenizer_uses_xlmr_ids_bos_eos_and_padding(sp_and_tok):
    sp, tok = sp_and_tok
    caption = "A person in a red jacket is falling down near the door."
    pieces = sp.encode(caption)
    assert 0 not in pieces  # all known: ids are piece id + 1
    out = tok([caption])
    ids, pad = out["input_ids"][0].tolist(), out["padding_mask"][0].tolist()
    n = len(pieces) + 2
    assert ids[:n] == [0, *[i + 1 for i in pieces], 2]
    assert ids[n:] == [1] * (64 - n)
    assert pad == [False] * n + [True] * (64 - n)
    assert out["input_ids"].dtype == torch.long and out["padding_mask"].dtype == torch.bool
    assert tok.mask_id == sp.get_piece_size() + 1


def test_tokenizer_empty_caption_is_bos_eos_then_pads(sp_and_tok):
    out = sp_and_tok[1](["", "   "])
    for row in range(2):
        assert out["input_ids"][row].tolist() == [0, 2] + [1] * 62
        assert out["padding_mask"][row].tolist() == [False, False] + [True] * 62


def test_tokenizer_truncates_a_500_word_caption_to_62_pieces(sp_and_tok):
    sp, tok = sp_and_tok
    words = " ".join(["person", "walking", "red", "door"] * 125)
    assert len(words.split()) == 500
    out = tok([words])
    ids = out["input_ids"][0].tolist()
    assert len(ids) == 64 and ids[0] == 0 and ids[-1] == 2
    assert ids[1:63] == [i + 1 for i in sp.encode(words)[:62]]
    assert not out["padding_mask"].any()


def test_tokenizer_non_ascii_keeps_case_and_maps_unknown_to_3(sp_and_tok):
    sp, tok = sp_and_tok
    ids = tok.encode("Person 中文 falls ÄÖ")
    assert 3 in ids and 1 not in ids and 0 not in ids  # sentencepiece's unk (0) becomes 3, never pad (1)
    assert ids == [3 if i == 0 else i + 1 for i in sp.encode("Person 中文 falls ÄÖ")]
    # nmt_nfkc folds full-width letters; case is kept (captions are not lower-cased or cleaned).
    assert tok.encode("Ｐerson") == tok.encode("Person")
    assert tok.encode("A person") != tok.encode("a person")


def test_worker_preprocessor_pickles_small_and_matches_preprocess(model):
    import pickle

    blob = pickle.dumps(model.image_preprocessor)
    assert len(blob) < 2000  # the transform only, never the weights
    image = Image.new("RGB", (30, 70), (200, 10, 90))
    assert torch.equal(pickle.loads(blob)(image)["image"], model.preprocess(image)["image"])


def test_tokenizer_pickles(sp_and_tok):
    import pickle

    tok = sp_and_tok[1]
    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again(SENTENCES[:3])["input_ids"], tok(SENTENCES[:3])["input_ids"])


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_image_transform_equals_the_reference_torchvision_pipeline(mode):
    from torchvision import transforms

    torch.manual_seed(3)
    pixels = (torch.rand(57, 41, 3) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels).convert(mode)
    reference = transforms.Compose(
        [
            transforms.Resize((32, 32), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        ]
    )
    want = reference(image.convert("RGB"))  # the reference's default_loader converts to RGB when reading
    got = BEiT3ImageTransform(32)(image)
    assert got.shape == (3, 32, 32)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- loading rules


def test_checkpoint_with_argparse_namespace_is_refused_unless_trusted(tiny, tmp_path, model):
    state = torch.load(tiny[0], weights_only=True)["model"]
    training = tmp_path / "lhp_like.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 3, "args": argparse.Namespace(model="beit3_tiny")}, training)
    with pytest.raises(TpasInputError, match="--trust-checkpoint") as err:
        load_model("beit3", training, tokenizer=tiny[1])
    assert str(training) in str(err.value)
    trusted = load_model("beit3", training, tokenizer=tiny[1], trust_checkpoint=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(
            trusted.encode_images({"image": images})["embed"], model.encode_images({"image": images})["embed"]
        )


def test_tokenizer_defaults_to_beit3_spm_next_to_the_checkpoint(tiny, tmp_path):
    ckpt = tmp_path / "model.pth"
    shutil.copy(tiny[0], ckpt)
    with pytest.raises(TpasInputError, match=r"beit3\.spm.*github\.com/addf400/files/releases/download/beit3"):
        load_model("beit3", ckpt)
    shutil.copy(tiny[1], tmp_path / "beit3.spm")
    loaded = load_model("beit3", ckpt)
    assert loaded.tokenizer.path == tmp_path / "beit3.spm"
    with pytest.raises(TpasInputError, match="tokenizer file not found"):
        load_model("beit3", ckpt, tokenizer=tmp_path / "missing.spm")


def test_architecture_is_inferred_and_a_disagreeing_config_is_refused(tiny, tmp_path):
    ckpt, spm = tiny
    loaded = load_model("beit3", ckpt, {"embed_dim": 128, "layers": 2, "img_size": 32}, tokenizer=spm)
    assert loaded.config == TINY and loaded.describe()["config"]["heads"] == 2
    with pytest.raises(TpasInputError, match="embed_dim=256 but the checkpoint has 128"):
        load_model("beit3", ckpt, {"embed_dim": 256}, tokenizer=spm)
    with pytest.raises(TpasInputError, match=r"preset 'beit3_large_patch16_384' disagrees.*img_size=384"):
        load_model("beit3", ckpt, {"name": "beit3_large_patch16_384"}, tokenizer=spm)
    with pytest.raises(TpasInputError, match="none of the config's presets"):
        load_model("beit3", ckpt, yaml.safe_load(PRESETS_FILE.read_text()), tokenizer=spm)
    # The catalog's `checkpoints:` pins a release file name to its preset.
    catalog = yaml.safe_load(PRESETS_FILE.read_text())
    catalog["presets"]["tiny"] = {"embed_dim": 128, "layers": 2}
    assert load_model("beit3", ckpt, catalog, tokenizer=spm).config == TINY
    renamed = tmp_path / "lhp_beit3.pth"
    shutil.copy(ckpt, renamed)
    with pytest.raises(TpasInputError, match=r"preset 'beit3_large_patch16_384' disagrees"):
        load_model("beit3", renamed, catalog, tokenizer=spm)
    with pytest.raises(TpasInputError, match="unknown BEiT-3 config key"):
        load_model("beit3", ckpt, {"depth": 2}, tokenizer=spm)
    with pytest.raises(TpasInputError, match="heads=4 but the checkpoint has 2"):
        load_model("beit3", ckpt, {"heads": 4}, tokenizer=spm)


def test_wrong_state_dicts_get_one_clear_error(tiny, tmp_path):
    state = torch.load(tiny[0], weights_only=True)["model"]
    cases = {
        "clip.pth": ({"model": {"visual.proj": torch.zeros(2, 2)}}, "not a BEiT-3 retrieval state dict"),
        "nohead.pth": ({"model": {k: v for k, v in state.items() if k != "vision_head.weight"}}, "missing key"),
        "extra.pth": ({"model": {**state, "itm_head.weight": torch.zeros(2, 128)}}, "unexpected key"),
        "ddp.pth": ({"module": {"module." + k: v for k, v in state.items()}}, None),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        if message is None:
            assert load_model("beit3", tmp_path / name, tokenizer=tiny[1]).config == TINY
        else:
            with pytest.raises(TpasInputError, match=message):
                load_model("beit3", tmp_path / name, tokenizer=tiny[1])
    small = tmp_path / "small_vocab.pth"
    torch.save({"model": random_state(dataclasses.replace(TINY, vocab_size=20))}, small)
    with pytest.raises(TpasInputError, match="text embedding has only 20 rows"):
        load_model("beit3", small, tokenizer=tiny[1])
    with pytest.raises(TpasInputError, match="needs --checkpoint"):
        load_model("beit3", None, tokenizer=tiny[1])


def test_loaded_model_is_float32_eval_with_every_tensor_materialised(tiny, tmp_path):
    half = tmp_path / "half.pth"
    torch.save({"model": {k: v.half() for k, v in torch.load(tiny[0], weights_only=True)["model"].items()}}, half)
    loaded = load_model("beit3", half, tokenizer=tiny[1])
    assert not loaded.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
    description = loaded.describe()
    json.dumps(description)
    assert description["model"] == "beit3_custom_patch16_32" and description["tokenizer"]["file"] == "tiny.spm"


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Four gallery images of different sizes/modes, and a name-masked query.json (JSON lines)."""
    root = tmp_path_factory.mktemp("beit3_gallery")
    images = root / "gallery"
    images.mkdir()
    torch.manual_seed(4)
    for i, (size, mode) in enumerate([((40, 80), "RGB"), ((32, 32), "L"), ((64, 48), "RGBA"), ((50, 90), "RGB")]):
        pixels = (torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).convert(mode).save(images / f"{i:03d}.png")
    queries = root / "query.json"
    captions = [SENTENCES[3], "", "Ａ person 中文 running.", " ".join(SENTENCES)]
    queries.write_text(
        "".join(json.dumps({"query_index": f"q{i}", "caption": c}) + "\n" for i, c in enumerate(captions))
    )
    return images, queries, captions


def run_cli(capsys, *args) -> tuple[int, str]:
    """`tpas ARGS` through the console entry point (one-line errors, exit 2): (exit code, stdout + stderr)."""
    from tpas.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code or 0, captured.out + captured.err


def test_cli_infer_beit3_writes_the_same_matrix_as_the_library(tiny, gallery, model, tmp_path, capsys):
    from tpas.sims import SimsMatrix

    ckpt, spm = tiny
    images, queries, captions = gallery
    out = tmp_path / "sims" / "beit3.pt"
    args = ["infer", "beit3", "--images", str(images), "--queries", str(queries), "--checkpoint", str(ckpt)]
    args += ["--tokenizer", str(spm), "--out", str(out), "--workers", "1", "--batch-size", "3"]
    code, output = run_cli(capsys, *args, "--cache-dir", tmp_path / "cache")
    assert code == 0, output
    sims = SimsMatrix.load(out)
    assert sims.query_ids == ["q0", "q1", "q2", "q3"] and sims.gallery_ids == ["000", "001", "002", "003"]
    assert sims.source == "beit3"
    with torch.inference_mode():
        pics = []
        for i in range(4):
            with Image.open(images / f"{i:03d}.png") as im:
                pics.append(model.preprocess(im)["image"])
        image_embed = model.encode_images({"image": torch.stack(pics)})["embed"]
        text_embed = model.encode_texts(model.tokenize(captions))["embed"]
    torch.testing.assert_close(sims.to_dense(), text_embed @ image_embed.T, atol=1e-5, rtol=0)


def test_cli_refuses_an_untrusted_training_checkpoint_with_one_line(tiny, gallery, tmp_path, capsys):
    ckpt, spm = tiny
    images, queries, _ = gallery
    training = tmp_path / "train.pth"
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"], "args": argparse.Namespace(lr=1e-5)}, training)
    out = tmp_path / "beit3.pt"
    base = ["infer", "beit3", "--images", str(images), "--queries", str(queries), "--out", str(out)]
    base += ["--workers", "0", "--no-cache"]
    code, output = run_cli(capsys, *base, "--checkpoint", training, "--tokenizer", spm)
    assert code == 2 and "--trust-checkpoint" in output and str(training) in output
    assert "Traceback" not in output and not out.exists()
    code, output = run_cli(capsys, *base, "--checkpoint", ckpt)  # no --tokenizer, no beit3.spm beside the checkpoint
    assert code == 2 and "beit3.spm" in output and not out.exists()
    code, output = run_cli(capsys, *base, "--checkpoint", ckpt, "--tokenizer", spm, "--config", PRESETS_FILE)
    assert code == 2 and "none of the config's presets" in output and not out.exists()
    code, output = run_cli(capsys, *base, "--checkpoint", training, "--tokenizer", spm, "--trust-checkpoint")
    assert code == 0, output
    assert out.exists()


def test_tta_hflip_is_the_mean_of_plain_and_mirrored_runs(tiny, gallery, tmp_path, capsys):
    from encoder_kit import check_tta_hflip

    from tpas.sims import SimsMatrix

    ckpt, spm = tiny
    images, queries, _ = gallery
    flip = check_tta_hflip(lambda **o: load_model("beit3", ckpt, tokenizer=spm, **o), images, queries, tmp_path)
    out = tmp_path / "cli.pt"
    args = ["infer", "beit3", "--images", tmp_path / "plain", "--queries", queries, "--checkpoint", ckpt]
    code, output = run_cli(capsys, *args, "--tokenizer", spm, "--tta", "hflip", "--out", out, "--no-cache")
    assert code == 0, output
    torch.testing.assert_close(SimsMatrix.load(out).scores, flip.scores, atol=1e-5, rtol=0)


def test_cpu_bf16_runs_bf16_weights_and_restores_fp32(tiny, gallery, tmp_path):
    from encoder_kit import check_cpu_bf16

    ckpt, spm = tiny
    images, queries, _ = gallery
    check_cpu_bf16(load_model("beit3", ckpt, tokenizer=spm), images, queries, tmp_path)
