"""BLIP-2 backend: tiny converted checkpoints of both LAVIS model types, checked against independent computations.

- The ViT output is recomputed from the *LAVIS* tensors with a plain re-implementation (EVA: q/v bias, GELU, eps 1e-6;
  CLIP: ln_pre, QuickGELU, eps 1e-5; then ln_vision with eps 1e-5), so the conversion and the ln_pre hook are pinned.
- ITC and ITM are compared with transformers' own `Blip2ForImageTextRetrieval.forward` and with hand-written einsums.
- `tpas infer blip2 --rerank-k` runs end to end on a tiny gallery.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_blip2_convert import TINY_VIT_BLOCKS, run_cli, save_tiny_lavis, tiny_lavis_state

from tpas.errors import TpasInputError
from tpas.models import load_model
from tpas.models.blip2 import Blip2Preprocess, clean_caption
from tpas.models.blip2_convert import convert_lavis

MODEL_TYPES = ("pretrain", "pretrain_vitL")
CAPTIONS = [
    "A man in a red coat (walking) fast!",
    "Woman; running: towards the camera ~ with a blue bag.",
    "a child's yellow-hat? sits",
    " ".join(["person"] * 45) + ".",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Both model types converted once (the CLI conversion itself is covered in test_blip2_convert.py)."""
    root = tmp_path_factory.mktemp("blip2")
    dirs = {}
    for model_type in MODEL_TYPES:
        q_path, v_path = save_tiny_lavis(root, model_type, seed=1)
        dirs[model_type] = convert_lavis(q_path, v_path, root / model_type, vit_layers=TINY_VIT_BLOCKS).out
    return dirs


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(37, 53), (28, 28), (64, 30), (45, 45), (20, 70)]
    return [
        Image.fromarray((torch.rand(*sizes[i % len(sizes)], 3, generator=gen) * 255).to(torch.uint8).numpy())
        for i in range(n)
    ]


def _pixels(model, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([model.preprocess(im)["pixel_values"] for im in images])


# ------------------------------------------------------------------------------------------- reference ViT
def _attention(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, proj_w, proj_b, heads: int) -> torch.Tensor:
    n, t, d = x.shape
    q, k, v = F.linear(x, w, b).view(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(n, t, d), proj_w, proj_b)


def reference_vision(model_type: str, vit: dict, qformer: dict, pixels: torch.Tensor) -> torch.Tensor:
    """LAVIS ViT + ln_vision, written from the LAVIS tensors without transformers."""
    n = pixels.shape[0]
    if model_type == "pretrain":
        x = F.conv2d(pixels, vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], stride=14)
        x = torch.cat([vit["cls_token"].expand(n, -1, -1), x.flatten(2).transpose(1, 2)], 1) + vit["pos_embed"]
        width, heads, eps = x.shape[-1], x.shape[-1] // 88, 1e-6
        for i in range(TINY_VIT_BLOCKS):
            p = f"blocks.{i}."
            q_bias, v_bias = vit[p + "attn.q_bias"], vit[p + "attn.v_bias"]
            h = F.layer_norm(x, (width,), vit[p + "norm1.weight"], vit[p + "norm1.bias"], eps)
            bias = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
            x = x + _attention(h, vit[p + "attn.qkv.weight"], bias, vit[p + "attn.proj.weight"],
                               vit[p + "attn.proj.bias"], heads)  # fmt: skip
            h = F.layer_norm(x, (width,), vit[p + "norm2.weight"], vit[p + "norm2.bias"], eps)
            h = F.gelu(F.linear(h, vit[p + "mlp.fc1.weight"], vit[p + "mlp.fc1.bias"]))
            x = x + F.linear(h, vit[p + "mlp.fc2.weight"], vit[p + "mlp.fc2.bias"])
    else:
        x = F.conv2d(pixels, vit["conv1.weight"], None, stride=14).flatten(2).transpose(1, 2)
        width, heads, eps = x.shape[-1], x.shape[-1] // 64, 1e-5
        x = torch.cat([vit["class_embedding"].expand(n, 1, -1), x], 1) + vit["positional_embedding"]
        x = F.layer_norm(x, (width,), vit["ln_pre.weight"], vit["ln_pre.bias"], eps)
        for i in range(TINY_VIT_BLOCKS):
            p = f"transformer.resblocks.{i}."
            h = F.layer_norm(x, (width,), vit[p + "ln_1.weight"], vit[p + "ln_1.bias"], eps)
            x = x + _attention(h, vit[p + "attn.in_proj_weight"], vit[p + "attn.in_proj_bias"],
                               vit[p + "attn.out_proj.weight"], vit[p + "attn.out_proj.bias"], heads)  # fmt: skip
            h = F.layer_norm(x, (width,), vit[p + "ln_2.weight"], vit[p + "ln_2.bias"], eps)
            h = F.linear(h, vit[p + "mlp.c_fc.weight"], vit[p + "mlp.c_fc.bias"])
            h = h * torch.sigmoid(1.702 * h)  # QuickGELU
            x = x + F.linear(h, vit[p + "mlp.c_proj.weight"], vit[p + "mlp.c_proj.bias"])
    return F.layer_norm(x, (width,), qformer["ln_vision.weight"], qformer["ln_vision.bias"], 1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_vision_output_equals_lavis_vit_recomputed_from_the_lavis_tensors(converted, model_type):
    model = load_model("blip2", converted[model_type])
    qformer, vit = tiny_lavis_state(model_type, seed=1)
    pixels = _pixels(model, _images(3))
    with torch.inference_mode():
        got = model.encode_images({"pixel_values": pixels})["vision"]
    torch.testing.assert_close(got, reference_vision(model_type, vit, qformer, pixels), rtol=1e-5, atol=2e-5)
    # LAVIS ln_vision eps is 1e-5 for both towers (HF's post_layernorm would take the EVA block eps, 1e-6)
    assert model.hf.vision_model.post_layernorm.eps == 1e-5 == model.describe()["ln_vision_eps"]


# ---------------------------------------------------------------------------------------------- ITC / ITM
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_itc_is_max_over_query_tokens_and_agrees_with_transformers_forward(converted, model_type):
    model = load_model("blip2", converted[model_type])
    pixels = _pixels(model, _images(4))
    with torch.inference_mode():
        image = model.encode_images({"pixel_values": pixels})
        tokens = model.tokenize(CAPTIONS)
        text = model.encode_texts(tokens)
        sims = model.similarity(text["embed"], image["embed"])
        hf = model.hf(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    assert image["embed"].shape == (4, 32, 16) and text["embed"].shape == (4, 16)
    torch.testing.assert_close(image["embed"].norm(dim=-1), torch.ones(4, 32))
    torch.testing.assert_close(text["embed"].norm(dim=-1), torch.ones(4))
    by_hand = torch.einsum("qd,gkd->qgk", text["embed"], image["embed"]).amax(-1)
    torch.testing.assert_close(sims, by_hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(sims, hf.logits_per_text, rtol=1e-5, atol=1e-6)


def test_first_token_itc_uses_query_token_zero_only(converted):
    model = load_model("blip2", converted["pretrain_vitL"], itc_score="first-token")
    assert model.describe()["itc_score"] == "first-token"
    with torch.inference_mode():
        image = model.encode_images({"pixel_values": _pixels(model, _images(3))})
        text = model.encode_texts(model.tokenize(CAPTIONS))
        sims = model.similarity(text["embed"], image["embed"])
    torch.testing.assert_close(sims, text["embed"] @ image["embed"][:, 0, :].T, rtol=0, atol=1e-6)
    assert not torch.allclose(sims, torch.einsum("qd,gkd->qgk", text["embed"], image["embed"]).amax(-1))
    with pytest.raises(TpasInputError, match="itc-score"):
        load_model("blip2", converted["pretrain_vitL"], itc_score="mean")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_itm_is_softmax_of_query_averaged_logits(converted, model_type):
    model = load_model("blip2", converted[model_type])
    pixels = _pixels(model, _images(4, seed=3))
    with torch.inference_mode():
        image = model.encode_images({"pixel_values": pixels})
        tokens = model.tokenize(CAPTIONS)
        text = {**tokens, **model.encode_texts(tokens)}
        probs = model.match(text, image)
        # transformers' own ITM path on the same (image i, caption i) pairs, 32-token text
        hf = model.hf(
            pixel_values=pixels,
            input_ids=tokens["itm_input_ids"],
            attention_mask=tokens["itm_attention_mask"],
            use_image_text_matching_head=True,
        )
        # by hand: itm_head on each of the 32 query outputs of the joint pass, then the mean over queries
        queries = model.hf.query_tokens.expand(4, -1, -1)
        joint = model.hf.qformer(
            query_embeds=model.hf.embeddings(input_ids=tokens["itm_input_ids"], query_embeds=queries),
            query_length=32,
            attention_mask=torch.cat([torch.ones(4, 32, dtype=torch.long), tokens["itm_attention_mask"]], 1),
            encoder_hidden_states=image["vision"],
        ).last_hidden_state
        per_query = model.hf.itm_head(joint[:, :32])
    assert probs.shape == (4,) and bool(((probs >= 0) & (probs <= 1)).all())
    torch.testing.assert_close(probs, hf.logits_per_image.softmax(-1)[:, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, per_query.mean(1).softmax(-1)[:, 1], rtol=1e-5, atol=1e-6)
    assert per_query.shape == (4, 32, 2)


def test_qformer_stays_fp32_under_autocast(converted):
    """As LAVIS: only the ViT runs in reduced precision; Q-Former, projections and ITM head compute in fp32."""
    model = load_model("blip2", converted["pretrain_vitL"])
    pixels = _pixels(model, _images(2))
    tokens = model.tokenize(CAPTIONS[:2])
    with torch.inference_mode():
        text32 = model.encode_texts(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image = model.encode_images({"pixel_values": pixels})
            text = model.encode_texts(tokens)
            probs = model.match({**tokens, **text}, image)
        # outside autocast, from the same (bf16-computed) ViT output
        expected = F.normalize(model.hf.vision_projection(model.query_outputs(image["vision"])), dim=-1)
        expected_probs = model.match({**tokens, **text32}, image)
    assert image["embed"].dtype == text["embed"].dtype == probs.dtype == torch.float32
    torch.testing.assert_close(image["embed"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(text["embed"], text32["embed"], rtol=0, atol=1e-6)
    torch.testing.assert_close(probs, expected_probs, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- text and images
def test_caption_cleaning_follows_lavis_blip_caption():
    assert clean_caption("A Man (walking)  fast!") == "a man walking fast"
    assert clean_caption('She said: "hi"; ok~ #1 * 2.') == "she said hi ok 1 2"
    assert clean_caption("a child's yellow-hat? sits, then") == "a child's yellow-hat? sits, then"
    assert clean_caption("x\ty") == "x\ty"  # a single tab is not a run of 2+ whitespace characters
    assert clean_caption("  padded \n") == "padded"
    assert clean_caption(" ".join(str(i) for i in range(60))) == " ".join(str(i) for i in range(50))


def test_tokenizer_is_bert_uncased_plus_dec_with_itm_cut_at_32(converted):
    model = load_model("blip2", converted["pretrain"])
    tok = model.tokenizer
    assert len(tok) == 30523 and tok.convert_tokens_to_ids("[DEC]") == 30522 and tok.bos_token == "[DEC]"
    tokens = model.tokenize(CAPTIONS)
    assert bool((tokens["input_ids"][:, 0] == 101).all()) and bool((tokens["itm_input_ids"][:, 0] == 101).all())
    assert tokens["itm_input_ids"].shape == (4, 32)
    assert int(tokens["itm_input_ids"][3, -1]) == 102  # truncated to 32 with [SEP] last, as Blip2ITM does
    assert int(tokens["attention_mask"][3].sum()) == 47  # ITC: the 45 words are not cut ([CLS] + 45 + [SEP])
    assert tok.convert_ids_to_tokens(tokens["input_ids"][0, 1:7].tolist()) == ["a", "man", "in", "a", "red", "coat"]


def test_preprocess_equals_the_lavis_torchvision_eval_transform():
    from torchvision import transforms  # tpas.models (imported above) made torchvision importable

    lavis = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])  # fmt: skip
    ours = Blip2Preprocess(224)
    for image in [*_images(3, seed=5), _images(1)[0].convert("L")]:
        torch.testing.assert_close(ours(image), lavis(image.convert("RGB")), rtol=0, atol=0)


# -------------------------------------------------------------------------------------- config and errors
def test_config_must_agree_with_the_checkpoint(converted):
    d = converted["pretrain_vitL"]
    model = load_model(
        "blip2", d, {"family": "blip2", "model_type": "pretrain_vitL", "vision": {"num_hidden_layers": 2}}
    )
    assert model.describe()["ln_pre"] is True and model.itc_score == "max"
    assert load_model("blip2", d, {"itc_score": "first-token"}).itc_score == "first-token"
    assert load_model("blip2", d, {"itc_score": "first-token"}, itc_score="max").itc_score == "max"
    with pytest.raises(TpasInputError, match="model_type"):
        load_model("blip2", d, {"model_type": "pretrain"})
    with pytest.raises(TpasInputError, match=r"vision\.hidden_act"):
        load_model("blip2", d, {"vision": {"hidden_act": "gelu"}})
    with pytest.raises(TpasInputError, match="unknown BLIP-2 config key"):
        load_model("blip2", d, {"vit_depth": 23})


def test_loading_errors_name_the_fix(converted, tmp_path):
    with pytest.raises(TpasInputError, match="tpas convert blip2-lavis"):
        load_model("blip2", None)
    lavis_file = tmp_path / "blip2_pretrained_vitL.pth"
    torch.save({"model": {}}, lavis_file)
    with pytest.raises(TpasInputError, match="tpas convert blip2-lavis"):
        load_model("blip2", lavis_file)
    broken = tmp_path / "no-ln-pre"
    shutil.copytree(converted["pretrain_vitL"], broken)
    (broken / "lavis_ln_pre.safetensors").unlink()
    with pytest.raises(TpasInputError, match=r"lavis_ln_pre\.safetensors"):
        load_model("blip2", broken)
    # a CLIP tower whose config forgot ln_pre would silently compute something else: refused
    config = json.loads((broken / "config.json").read_text())
    config["lavis"]["ln_pre"] = False
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(TpasInputError, match="ln_pre"):
        load_model("blip2", broken)
    with pytest.raises(TpasInputError, match="--pose"):
        load_model("blip2", converted["pretrain"], pose=tmp_path)


# ---------------------------------------------------------------------------------------------- tpas infer
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tpas_infer_blip2_rerank_matches_library_scores(converted, model_type, tmp_path, capsys):
    from tpas.sims import SimsMatrix

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    images = _images(5, seed=7)
    names = ["g3", "a1", "b2", "z0", "c9"]  # sorted ids: a1 b2 c9 g3 z0
    for name, image in zip(names, images, strict=True):
        image.save(gallery / f"{name}.png")
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "sims" / "blip2.pt"
    code, output = run_cli(
        capsys, "infer", "blip2", "--images", str(gallery), "--queries", str(queries), "--checkpoint",
        str(converted[model_type]), "--rerank-k", "4", "--out", str(out), "--no-cache", "--workers", "0",
        "--device", "cpu", "--batch-size", "3",
    )  # fmt: skip
    assert code == 0, output

    final, itc = SimsMatrix.load(out), SimsMatrix.load(out.with_name("blip2.itc.pt"))
    assert final.gallery_ids == sorted(names) and final.query_ids == ["0", "1", "2", "3"]
    model = load_model("blip2", converted[model_type])
    ordered = [images[names.index(g)] for g in sorted(names)]
    with torch.inference_mode():
        image = model.encode_images({"pixel_values": _pixels(model, ordered)})
        tokens = model.tokenize(CAPTIONS)
        text = {**tokens, **model.encode_texts(tokens)}
        expected_itc = model.similarity(text["embed"], image["embed"])
    torch.testing.assert_close(itc.to_dense(), expected_itc, rtol=1e-5, atol=1e-5)

    scores = final.to_dense()
    for q in range(4):
        top = torch.argsort(expected_itc[q], descending=True, stable=True)[:4]
        with torch.inference_mode():
            probs = model.match({k: v[[q] * 4] for k, v in text.items()}, {k: v[top] for k, v in image.items()})
        torch.testing.assert_close(scores[q, top], probs, rtol=1e-5, atol=1e-5)
        rest = [g for g in range(5) if g not in top.tolist()]
        torch.testing.assert_close(scores[q, rest], probs.min().expand(len(rest)), rtol=1e-5, atol=1e-5)


def test_sharded_safetensors_directory_loads_the_same_weights(converted, tmp_path):
    """Hub-style directories split the weights into shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded"
    shutil.copytree(converted["pretrain"], sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(sharded / name))
        weight_map |= dict.fromkeys(part, name)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model("blip2", converted["pretrain"]), load_model("blip2", sharded)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    (sharded / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(TpasInputError, match=r"model-00001-of-00002\.safetensors: checkpoint file not found"):
        load_model("blip2", sharded)


def test_shipped_config_describes_the_released_pretrain_vitL_model():
    """configs/models/blip2.yaml states the seed's model; every architecture value matches the full-size layout."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "configs" / "models" / "blip2.yaml").read_text())
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    hf_ref = json.loads((fixtures / "blip2_hf_itm_layout.json").read_text())["models"]["pretrain_vitL"]
    assert config["family"] == "blip2" and config["model_type"] == "pretrain_vitL" and config["ln_pre"] is True
    for section, hf_section in (("vision", "vision_config"), ("qformer", "qformer_config")):
        for key, value in config[section].items():
            assert hf_ref["config"][hf_section][key] == value, (section, key)
    layout = hf_ref["layout"]
    assert layout["query_tokens"][0] == [1, config["num_query_tokens"], config["qformer"]["hidden_size"]]
    assert layout["vision_projection.weight"][0][0] == config["embed_dim"]
    assert layout["vision_model.embeddings.patch_embedding.weight"][0][-1] == config["patch_size"]
    assert layout["vision_model.embeddings.position_embedding"][0][1] == (224 // 14) ** 2 + 1


# ---------------------------------------------------------------------------------------------- test-time flip
def _gallery_and_queries(root: Path) -> tuple[Path, Path]:
    """Four PNG images (lossless, so re-runs see the same pixels) and the CAPTIONS as a plain query file."""
    gallery = root / "gallery"
    gallery.mkdir()
    for i, image in enumerate(_images(4, seed=3)):
        image.save(gallery / f"g{i}.png")
    queries = root / "queries.txt"
    queries.write_text("\n".join(CAPTIONS) + "\n")
    return gallery, queries


def test_tta_hflip_is_the_mean_of_plain_and_mirrored_runs_and_keeps_plain_itm(converted, tmp_path, capsys):
    from encoder_kit import check_tta_hflip

    from tpas.sims import SimsMatrix

    gallery, queries = _gallery_and_queries(tmp_path)
    folder = converted["pretrain_vitL"]
    flip = check_tta_hflip(
        lambda **o: load_model("blip2", folder, **o), gallery, queries, tmp_path / "run", rerank=True
    )
    out = tmp_path / "cli.pt"
    code, output = run_cli(
        capsys, "infer", "blip2", "--images", str(tmp_path / "run" / "plain"), "--queries", str(queries),
        "--checkpoint", str(folder), "--rerank-k", "4", "--tta", "hflip", "--out", str(out), "--no-cache",
        "--workers", "0", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    torch.testing.assert_close(SimsMatrix.load(out).scores, flip.scores, atol=1e-5, rtol=0)


def test_cpu_bf16_casts_the_vit_only_and_restores_fp32(converted, tmp_path):
    from encoder_kit import check_cpu_bf16

    gallery, queries = _gallery_and_queries(tmp_path)
    model = load_model("blip2", converted["pretrain_vitL"])
    dtypes = {}
    hook = model.hf.qformer.register_forward_pre_hook(lambda m, a, kw: dtypes.update(qformer=m.dtype), with_kwargs=True)
    check_cpu_bf16(model, gallery, queries, tmp_path, rerank=True)
    hook.remove()
    assert dtypes["qformer"] == torch.float32  # as under GPU autocast, the Q-Former stays fp32
