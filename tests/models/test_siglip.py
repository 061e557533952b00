"""open_clip beyond OpenAI's CLIP, offline: SigLIP (HF tokenizer folder or sentencepiece model), an EVA02-style timm
tower, text padding as trained, preprocessing from the weights' config, hub names, and `--tta hflip`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
from encoder_kit import (
    SIGLIP_PREPROCESS,
    gallery_images,
    hf_word_tokenizer,
    open_clip_eva02_cfg,
    open_clip_siglip_cfg,
    register_tiny_timm_towers,
    train_sentencepiece,
    word_vocab,
    write_lossless_gallery,
    write_open_clip_folder,
)
from PIL import ImageOps
from typer.testing import CliRunner

from tpas.cli import app
from tpas.errors import TpasInputError
from tpas.models import load_model
from tpas.models.clip import _arch_preprocess
from tpas.models.engine import infer
from tpas.sims import SimsMatrix

if TYPE_CHECKING:
    from tests.models.conftest import TinyGallery


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Tiny SigLIP (with and without tokenizer files) and EVA02 open_clip folders."""
    register_tiny_timm_towers()
    root = tmp_path_factory.mktemp("open_clip")
    siglip = write_open_clip_folder(root / "siglip", open_clip_siglip_cfg(len(word_vocab())), SIGLIP_PREPROCESS)
    hf_word_tokenizer().save_pretrained(siglip)
    bare = write_open_clip_folder(root / "siglip_no_tok", open_clip_siglip_cfg(40), SIGLIP_PREPROCESS)
    eva = write_open_clip_folder(root / "eva02", open_clip_eva02_cfg(), None)
    return SimpleNamespace(
        siglip=siglip,
        bare=bare,
        eva=eva,
        spm=train_sentencepiece(root / "t5_spm"),
        gemma_spm=train_sentencepiece(root / "gemma_spm", gemma=True),
    )


def _oc():
    import open_clip

    return open_clip


def _reference(folder: Path, images: list, captions: list[str], flip: bool = False) -> torch.Tensor:
    """open_clip's own local-dir loader, transform and tokenizer; one image at a time; cosine."""
    oc = _oc()
    model, _, transform = oc.create_model_and_transforms(f"local-dir:{folder}")
    tok = oc.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        feats = []
        for im in images:
            f = model.encode_image(transform(im)[None], normalize=True)
            if flip:
                g = model.encode_image(transform(ImageOps.mirror(im))[None], normalize=True)
                f = torch.nn.functional.normalize(f + g, dim=-1)
            feats.append(f)
        txt = model.encode_text(tok(captions), normalize=True)
    return txt @ torch.cat(feats).T


def _cli(g: TinyGallery, out: Path, *args: str):
    return CliRunner().invoke(
        app,
        [
            "infer",
            "clip",
            "--images",
            str(g.images),
            "--queries",
            str(g.queries),
            "--out",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "3",
            "--no-cache",
            *args,
        ],
    )


def test_siglip_folder_runs_offline_and_matches_open_clip(
    tiny_gallery: TinyGallery, folders: SimpleNamespace, tmp_path: Path
) -> None:
    out = tmp_path / "siglip.pt"
    r = _cli(tiny_gallery, out, "--checkpoint", str(folders.siglip))
    assert r.exit_code == 0, (r.output, r.exception)
    m = SimsMatrix.load(out)
    assert m.gallery_ids == tiny_gallery.gallery_ids and m.query_ids == tiny_gallery.query_ids
    ref = _reference(folders.siglip, gallery_images(tiny_gallery.images, m.gallery_ids), tiny_gallery.captions)
    torch.testing.assert_close(m.scores, ref, atol=2e-6, rtol=0)
    d = m.meta["model"]
    assert d["preprocess"]["resize_mode"] == "squash" and d["preprocess"]["mean"] == [0.5] * 3
    assert d["tokenizer"]["context_length"] == 64 and d["tokenizer"]["type"] == "HFTokenizer"
    assert d["sigmoid"]["logit_bias"] == pytest.approx(-7.5) and d["sigmoid"]["logit_scale"] == pytest.approx(1 / 0.07)
    assert d["tta"] == "none"


def test_siglip_text_is_padded_to_max_length_as_trained(folders: SimpleNamespace) -> None:
    model = load_model("clip", folders.siglip)
    caps = ["A man, falling!", "a woman in a red shirt is running near the car with a black bag"]
    ids = model.tokenize(caps)["input_ids"]
    assert ids.shape == (2, 64) and torch.equal(ids, _oc().get_tokenizer(f"local-dir:{folders.siglip}")(caps))
    v = word_vocab()
    assert ids[0, :4].tolist() == [v["a"], v["man"], v["falling"], 1]  # canonicalised: lower case, no punctuation
    assert (ids[0, 4:] == 1).all()  # padded with </s>, as SigLIP was trained
    with torch.no_grad():
        full = model.encode_texts({"input_ids": ids})["embed"]
        dynamic = model.encode_texts({"input_ids": ids[:, : int((ids != 1).sum(1).max()) + 1]})["embed"]
    # The text tower pools the last position without a padding mask: dynamic padding is a different embedding.
    assert (full - dynamic).abs().max() > 1e-2


def test_sentencepiece_tokenizer_file(folders: SimpleNamespace, tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    import sentencepiece

    model = load_model("clip", folders.bare, tokenizer=folders.spm)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folders.spm))
    ids = model.tokenize(["A man, falling!"])["input_ids"]
    pieces = sp.encode("a man falling")
    assert ids.shape == (1, 64) and ids[0, : len(pieces)].tolist() == pieces
    assert (ids[0, len(pieces) :] == 1).all()  # </s> ends the text and pads it (T5 vocabulary: pad = EOS)
    gemma = load_model("clip", folders.bare, tokenizer=folders.gemma_spm).tokenize(["a man"])["input_ids"]
    n = len(sentencepiece.SentencePieceProcessor(model_file=str(folders.gemma_spm)).encode("a man"))
    assert gemma[0, n] == 1 and (gemma[0, n + 1 :] == 0).all()  # Gemma vocabulary: <eos> 1, then <pad> 0
    out = tmp_path / "spm.pt"
    r = _cli(tiny_gallery, out, "--checkpoint", str(folders.bare), "--tokenizer", str(folders.spm))
    assert r.exit_code == 0, (r.output, r.exception)
    assert SimsMatrix.load(out).meta["model"]["tokenizer"]["source"] == f"sentencepiece:{folders.spm}"


def test_missing_tokenizer_and_hub_names_say_which_files_to_put_where(folders: SimpleNamespace) -> None:
    with pytest.raises(TpasInputError, match=r"timm/ViT-B-16-SigLIP tokenizer.*tokenizer\.json.*--tokenizer"):
        load_model("clip", folders.bare)
    for name in ("timm/ViT-B-16-SigLIP", "hf-hub:timm/ViT-B-16-SigLIP"):
        with pytest.raises(
            TpasInputError,
            match=r"never downloads.*open_clip_config\.json.*tokenizer\.json.*"
            r"huggingface\.co/timm/ViT-B-16-SigLIP into checkpoints/ViT-B-16-SigLIP/",
        ):
            load_model("clip", Path(name))
    with pytest.raises(TpasInputError, match=r"clip needs --checkpoint.*tokenizer\.json.*timm/ViT-B-16-SigLIP2 into"):
        load_model("clip", None, arch="ViT-B-16-SigLIP2")
    with pytest.raises(TpasInputError, match="checkpoint not found"):
        load_model("clip", Path("checkpoints/missing.pt"))
    with pytest.raises(TpasInputError, match="BPE tokenizer"):
        load_model("clip", folders.eva, tokenizer=folders.spm)


def test_preprocessing_for_an_arch_comes_from_open_clips_pretrained_table() -> None:
    assert _arch_preprocess("ViT-SO400M-14-SigLIP-384") == SIGLIP_PREPROCESS
    eva = _arch_preprocess("EVA02-L-14")
    assert eva["resize_mode"] == "shortest" and eva["mean"] == [0.48145466, 0.4578275, 0.40821073]


def test_eva02_style_timm_tower(tiny_gallery: TinyGallery, folders: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "eva.pt"
    r = _cli(tiny_gallery, out, "--checkpoint", str(folders.eva))
    assert r.exit_code == 0, (r.output, r.exception)
    m = SimsMatrix.load(out)
    ref = _reference(folders.eva, gallery_images(tiny_gallery.images, m.gallery_ids), tiny_gallery.captions)
    torch.testing.assert_close(m.scores, ref, atol=2e-6, rtol=0)
    assert m.meta["model"]["tokenizer"]["source"] == "open_clip-bpe" and "sigmoid" not in m.meta["model"]


def test_tta_hflip_is_the_mean_of_the_image_and_its_mirror(
    tiny_gallery: TinyGallery, folders: SimpleNamespace, tmp_path: Path
) -> None:
    images = write_lossless_gallery(tiny_gallery.images, tmp_path / "png")
    cache = tmp_path / "cache"
    plain = infer(
        load_model("clip", folders.siglip),
        images,
        tiny_gallery.queries,
        tmp_path / "a.pt",
        num_workers=0,
        cache_dir=cache,
    )
    flip = infer(
        load_model("clip", folders.siglip, tta="hflip"),
        images,
        tiny_gallery.queries,
        tmp_path / "b.pt",
        num_workers=0,
        cache_dir=cache,
    )
    ref = _reference(folders.siglip, gallery_images(images, flip.gallery_ids), tiny_gallery.captions, flip=True)
    torch.testing.assert_close(flip.scores, ref, atol=2e-6, rtol=0)
    assert flip.meta["model"]["tta"] == "hflip"
    assert (flip.scores - plain.scores).abs().max() > 1e-4  # the shared cache did not hand back un-flipped features
    # The mirror half alone: a run on mirrored copies of the images; their mean is what hflip scored.
    mirrored = write_lossless_gallery(tiny_gallery.images, tmp_path / "mirror", mirror=True)
    model = load_model("clip", folders.siglip)
    one = [
        model.encode_images({"pixels": model.preprocess(im)["pixels"][None]})["embed"]
        for d in (images, mirrored)
        for im in gallery_images(d, flip.gallery_ids)
    ]
    a, b = torch.cat(one).chunk(2)
    txt = model.encode_texts(model.tokenize(tiny_gallery.captions))["embed"]
    torch.testing.assert_close(flip.scores, txt @ torch.nn.functional.normalize(a + b, dim=-1).T, atol=2e-6, rtol=0)
    with pytest.raises(TpasInputError, match=r"--tta must be one of .*'vflip'"):
        load_model("clip", folders.siglip, tta="vflip")
    assert json.dumps(flip.meta["model"])  # JSON-able


@pytest.mark.parametrize("kind", ["siglip", "eva"])
def test_cpu_bf16_runs_bf16_weights_and_restores_fp32(
    kind: str, tiny_gallery: TinyGallery, folders: SimpleNamespace, tmp_path: Path
) -> None:
    from encoder_kit import check_cpu_bf16

    model = load_model("clip", getattr(folders, kind))
    check_cpu_bf16(model, tiny_gallery.images, tiny_gallery.queries, tmp_path)
