"""hf-dual: SiglipModel, Siglip2Model (NaFlex) and CLIPModel from local transformers folders, checked against the
models' own feature functions on the same inputs; config disagreement, hub names, NaFlex patches, flip TTA."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
from encoder_kit import gallery_images, write_hf_dual_folder, write_lossless_gallery
from PIL import ImageOps
from typer.testing import CliRunner

from tpas.cli import app
from tpas.errors import TpasInputError
from tpas.models import load_model
from tpas.models.engine import infer
from tpas.sims import SimsMatrix

if TYPE_CHECKING:
    from tests.models.conftest import TinyGallery


@pytest.fixture(scope="session")
def dual(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("hf_dual")
    return SimpleNamespace(**{t: write_hf_dual_folder(root / t, t) for t in ("siglip", "siglip2", "clip")})


def _reference(folder: Path, images: list, captions: list[str], patches: int | None = None, flip: bool = False):
    """AutoModel + AutoProcessor straight from transformers, one image at a time, the model's feature functions."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(folder))
    extra = {"max_num_patches": patches} if patches else {}
    norm = torch.nn.functional.normalize

    def image_feat(im):
        out = proc.image_processor(images=[im], return_tensors="pt", **extra)
        return norm(model.get_image_features(**out).pooler_output, dim=-1)

    with torch.no_grad():
        feats = [
            norm(image_feat(im) + image_feat(ImageOps.mirror(im)), dim=-1) if flip else image_feat(im) for im in images
        ]
        proc.tokenizer.padding_side = "right"  # as trained (transformers' Siglip2Tokenizer defaults to "left")
        tok = proc.tokenizer(captions, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        if model.config.model_type == "clip":
            txt = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        else:  # SigLIP text towers run on the ids alone, as trained
            txt = model.get_text_features(input_ids=tok.input_ids)
    return norm(txt.pooler_output, dim=-1) @ torch.cat(feats).T


@pytest.mark.parametrize("kind", ["siglip", "siglip2", "clip"])
def test_cli_matches_the_models_own_feature_functions(
    kind: str, dual: SimpleNamespace, tiny_gallery: TinyGallery, tmp_path: Path
) -> None:
    out = tmp_path / f"{kind}.pt"
    r = CliRunner().invoke(
        app,
        [
            "infer",
            "hf-dual",
            "--checkpoint",
            str(getattr(dual, kind)),
            "--images",
            str(tiny_gallery.images),
            "--queries",
            str(tiny_gallery.queries),
            "--out",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "3",
            "--no-cache",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    m = SimsMatrix.load(out)
    assert m.source == "hf-dual" and m.gallery_ids == tiny_gallery.gallery_ids
    ref = _reference(getattr(dual, kind), gallery_images(tiny_gallery.images, m.gallery_ids), tiny_gallery.captions)
    torch.testing.assert_close(m.scores, ref, atol=2e-6, rtol=0)
    d = m.meta["model"]
    assert d["model_type"] == kind and d["tokenizer"]["max_length"] == 64 and d["tta"] == "none"
    assert ("sigmoid" in d) == (kind != "clip")
    assert d["max_num_patches"] == (16 if kind == "siglip2" else None)


def test_siglip2_text_is_right_padded_whatever_the_tokenizer_class_default(dual: SimpleNamespace) -> None:
    model = load_model("hf-dual", dual.siglip2)
    tok = model.processor.tokenizer
    assert tok.padding_side == "left"  # transformers 5.24's Siglip2Tokenizer default, which tpas must not follow
    ids = model.tokenize(["a man"])["input_ids"]
    assert ids[0, 0] != tok.pad_token_id and ids[0, -1] == tok.pad_token_id and tok.padding_side == "left"
    left = tok(["a man"], padding="max_length", max_length=64, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = model.encode_texts({"input_ids": ids})["embed"] - model.encode_texts({"input_ids": left})["embed"]
    assert diff.abs().max() > 1e-2


def test_siglip_text_padding_is_pinned(dual: SimpleNamespace) -> None:
    model = load_model("hf-dual", dual.siglip)
    tokens = model.tokenize(["a man falling", "a woman in a red shirt is running"])
    assert list(tokens) == ["input_ids"] and tokens["input_ids"].shape == (2, 64)
    assert tokens["input_ids"][0, 3:].eq(1).all()  # right-padded with </s>
    ids = tokens["input_ids"]
    with torch.no_grad():
        full = model.encode_texts(tokens)["embed"]
        short = model.encode_texts({"input_ids": ids[:, :8]})["embed"]
    assert (full - short).abs().max() > 1e-2  # dynamic padding would change the embedding


def test_naflex_patches_option_and_tta(dual: SimpleNamespace, tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    images = write_lossless_gallery(tiny_gallery.images, tmp_path / "png")
    cache = tmp_path / "cache"
    runs = {}
    for name, opts in {"default": {}, "p4": {"max_num_patches": 4}, "flip": {"tta": "hflip"}}.items():
        model = load_model("hf-dual", dual.siglip2, **opts)
        runs[name] = infer(
            model, images, tiny_gallery.queries, tmp_path / f"{name}.pt", num_workers=0, batch_size=3, cache_dir=cache
        )
    pil = gallery_images(images, runs["default"].gallery_ids)
    torch.testing.assert_close(
        runs["p4"].scores, _reference(dual.siglip2, pil, tiny_gallery.captions, patches=4), atol=2e-6, rtol=0
    )
    assert runs["p4"].meta["model"]["max_num_patches"] == 4
    assert (runs["p4"].scores - runs["default"].scores).abs().max() > 1e-4  # fewer patches: other features
    torch.testing.assert_close(
        runs["flip"].scores, _reference(dual.siglip2, pil, tiny_gallery.captions, flip=True), atol=2e-6, rtol=0
    )
    assert runs["flip"].meta["model"]["tta"] == "hflip"


def test_refusals(dual: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(TpasInputError, match=r"text_config\.hidden_size: folder 32, config 768"):
        load_model("hf-dual", dual.siglip, {"model_type": "siglip", "text_config": {"hidden_size": 768}})
    with pytest.raises(TpasInputError, match="model_type: folder 'siglip', config 'siglip2'"):
        load_model("hf-dual", dual.siglip, {"family": "hf-dual", "model_type": "siglip2"})
    assert load_model("hf-dual", dual.siglip, {"model_type": "siglip"}).model_type == "siglip"
    with pytest.raises(TpasInputError, match="applies to Siglip2"):
        load_model("hf-dual", dual.siglip, max_num_patches=64)
    with pytest.raises(TpasInputError, match=r"hub name.*huggingface-cli download google/siglip2-x --local-dir"):
        load_model("hf-dual", Path("google/siglip2-x"))
    with pytest.raises(TpasInputError, match="hf-dual needs --checkpoint DIR"):
        load_model("hf-dual", None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((dual.siglip / "config.json").read_text())
    with pytest.raises(TpasInputError, match="holds no weights"):
        load_model("hf-dual", broken)
    from safetensors.torch import load_file, save_file

    state = load_file(str(dual.siglip / "model.safetensors"))
    state.pop("logit_bias")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(TpasInputError, match=r"1 missing.*logit_bias"):
        load_model("hf-dual", broken)


def test_family_options_through_the_cli(dual: SimpleNamespace, tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    images = write_lossless_gallery(tiny_gallery.images, tmp_path / "png")
    out = tmp_path / "p4flip.pt"
    args = ["infer", "hf-dual", "--checkpoint", str(dual.siglip2), "--images", str(images), "--queries",
            str(tiny_gallery.queries), "--out", str(out), "--workers", "0", "--no-cache",
            "--max-num-patches", "4", "--tta", "hflip"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    m = SimsMatrix.load(out)
    assert m.meta["model"]["max_num_patches"] == 4 and m.meta["model"]["tta"] == "hflip"
    lib = infer(load_model("hf-dual", dual.siglip2, max_num_patches=4, tta="hflip"), images, tiny_gallery.queries,
                tmp_path / "lib.pt", num_workers=0, use_cache=False)  # fmt: skip
    torch.testing.assert_close(m.scores, lib.scores, atol=0, rtol=0)
    r = CliRunner().invoke(app, [*args[:-2], "--tta", "vflip"])
    assert isinstance(r.exception, TpasInputError) and "--tta must be one of" in str(r.exception)  # main(): exit 2


@pytest.mark.parametrize("kind", ["siglip", "siglip2", "clip"])
def test_cpu_bf16_runs_bf16_weights_and_restores_fp32(
    kind: str, dual: SimpleNamespace, tiny_gallery: TinyGallery, tmp_path: Path
) -> None:
    from encoder_kit import check_cpu_bf16

    check_cpu_bf16(load_model("hf-dual", getattr(dual, kind)), tiny_gallery.images, tiny_gallery.queries, tmp_path)
