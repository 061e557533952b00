"""vlm-embed: a tiny Qwen2-VL from a local folder, GME prompts, last-token pooling with left padding; checked against
the backbone's own forward on the processor's inputs one item at a time; batched == one at a time; flip TTA."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from encoder_kit import gallery_images, write_lossless_gallery, write_qwen2_vl_folder
from PIL import ImageOps
from typer.testing import CliRunner

from tpas.cli import app
from tpas.errors import TpasInputError
from tpas.models import load_model
from tpas.models.engine import infer
from tpas.models.vlm_embed import INSTRUCTIONS
from tpas.sims import SimsMatrix

if TYPE_CHECKING:
    from tests.models.conftest import TinyGallery

SMALL = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}


@pytest.fixture(scope="session")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen2_vl_folder(tmp_path_factory.mktemp("qwen2_vl") / "gme-tiny")


def _gme(instruction: str, content: str) -> str:
    return (
        f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
        "<|im_start|>assistant\n<|endoftext|>"
    )


def _reference(folder: Path, images: list, captions: list[str], query: str, flip: bool = False) -> torch.Tensor:
    """transformers' Qwen2-VL backbone on the processor's inputs, one item at a time, last hidden state of the last
    token (GME's recipe)."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(
        str(folder), size={"shortest_edge": SMALL["min_pixels"], "longest_edge": SMALL["max_pixels"]}
    )
    norm = torch.nn.functional.normalize

    def embed(text: str, image=None) -> torch.Tensor:
        inputs = proc(text=[text], images=None if image is None else [image], return_tensors="pt")
        return norm(model(**inputs).last_hidden_state[:, -1], dim=-1)

    image_prompt = _gme(INSTRUCTIONS["gme"][1], "<|vision_start|><|image_pad|><|vision_end|>")
    with torch.no_grad():
        img = [embed(image_prompt, im) for im in images]
        if flip:
            img = [
                norm(a + embed(image_prompt, ImageOps.mirror(im)), dim=-1) for a, im in zip(img, images, strict=True)
            ]
        txt = torch.cat([embed(_gme(query, c)) for c in captions])
    return txt @ torch.cat(img).T


def test_cli_matches_the_backbone_one_item_at_a_time(qwen: Path, tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    out = tmp_path / "gme.pt"
    r = CliRunner().invoke(
        app,
        [
            "infer",
            "vlm-embed",
            "--checkpoint",
            str(qwen),
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
    assert m.source == "vlm-embed" and m.gallery_ids == tiny_gallery.gallery_ids
    d = m.meta["model"]
    assert d["prompt_style"] == "gme" and d["query_instruction"] == INSTRUCTIONS["gme"][0]
    assert d["max_pixels"] == 1280 * 28 * 28 and d["image_prompt"].endswith("<|endoftext|>")


def test_batched_equals_one_at_a_time_and_the_reference(qwen: Path, tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    query = "Find the person the text describes."
    model = load_model("vlm-embed", qwen, query_instruction=query, **SMALL)
    runs = [
        infer(
            model,
            tiny_gallery.images,
            tiny_gallery.queries,
            tmp_path / f"b{b}.pt",
            batch_size=b,
            num_workers=0,
            use_cache=False,
        )
        for b in (1, 4)
    ]
    torch.testing.assert_close(runs[1].scores, runs[0].scores, atol=1e-4, rtol=0)
    ref = _reference(qwen, gallery_images(tiny_gallery.images, runs[0].gallery_ids), tiny_gallery.captions, query)
    torch.testing.assert_close(runs[1].scores, ref, atol=1e-4, rtol=0)
    assert runs[1].meta["model"]["query_instruction"] == query
    default = infer(
        load_model("vlm-embed", qwen, **SMALL),
        tiny_gallery.images,
        tiny_gallery.queries,
        tmp_path / "default.pt",
        batch_size=4,
        num_workers=0,
        use_cache=False,
    )
    assert (default.scores - runs[1].scores).abs().max() > 1e-4  # the instruction is part of the embedding


def test_tta_hflip(qwen: Path, tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    images = write_lossless_gallery(tiny_gallery.images, tmp_path / "png")
    m = infer(
        load_model("vlm-embed", qwen, tta="hflip", **SMALL),
        images,
        tiny_gallery.queries,
        tmp_path / "f.pt",
        batch_size=4,
        num_workers=0,
        use_cache=False,
    )
    ref = _reference(
        qwen, gallery_images(images, m.gallery_ids), tiny_gallery.captions, INSTRUCTIONS["gme"][0], flip=True
    )
    torch.testing.assert_close(m.scores, ref, atol=1e-4, rtol=0)
    assert m.meta["model"]["tta"] == "hflip"


def test_refusals(qwen: Path) -> None:
    with pytest.raises(TpasInputError, match="model_type: folder 'qwen2_vl', config 'qwen3_vl'"):
        load_model("vlm-embed", qwen, {"model_type": "qwen3_vl"})
    with pytest.raises(TpasInputError, match="no chat template"):
        load_model("vlm-embed", qwen, prompt_style="chat-template")
    with pytest.raises(TpasInputError, match="--min-pixels"):
        load_model("vlm-embed", qwen, min_pixels=10)
    with pytest.raises(TpasInputError, match="gme-Qwen2-VL-2B-Instruct --local-dir"):
        load_model("vlm-embed", Path("Alibaba-NLP/gme-Qwen2-VL-2B-Instruct"))
    with pytest.raises(TpasInputError, match="model_type 'qwen2_vl'; hf-dual runs"):
        load_model("hf-dual", qwen)


# ------------------------------------------------------------------------------------------- Qwen3-VL, collation
QWEN3_SMALL = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 16}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlm_models import build_qwen3_vl

    return build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl") / "qwen3-vl-tiny")


def _chat(processor, instruction: str, content: dict) -> str:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": instruction}]},
        {"role": "user", "content": [content]},
    ]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_qwen3_vl_batched_equals_one_at_a_time_and_the_backbone(
    qwen3: Path, tiny_gallery: TinyGallery, tmp_path: Path
) -> None:
    from transformers import AutoModel, AutoProcessor

    model = load_model("vlm-embed", qwen3, **QWEN3_SMALL)
    assert model.settings["prompt_style"] == "chat-template" and model.settings["model_type"] == "qwen3_vl"
    runs = [
        infer(
            model,
            tiny_gallery.images,
            tiny_gallery.queries,
            tmp_path / f"b{b}.pt",
            batch_size=b,
            num_workers=0,
            use_cache=False,
        )
        for b in (1, 4)
    ]
    torch.testing.assert_close(runs[1].scores, runs[0].scores, atol=1e-4, rtol=0)
    # transformers' Qwen3-VL backbone on the processor's inputs, one item at a time, last token's final state.
    net = AutoModel.from_pretrained(str(qwen3), dtype=torch.float32).eval()
    size = {"shortest_edge": QWEN3_SMALL["min_pixels"], "longest_edge": QWEN3_SMALL["max_pixels"]}
    proc = AutoProcessor.from_pretrained(str(qwen3), size=size)
    query, corpus = INSTRUCTIONS["chat-template"]

    def embed(text: str, image=None) -> torch.Tensor:
        inputs = proc(text=[text], images=None if image is None else [image], return_tensors="pt")
        return torch.nn.functional.normalize(net(**inputs).last_hidden_state[:, -1], dim=-1)

    with torch.no_grad():
        image_prompt = _chat(proc, corpus, {"type": "image"})
        img = torch.cat([embed(image_prompt, im) for im in gallery_images(tiny_gallery.images, runs[0].gallery_ids)])
        txt = torch.cat([embed(_chat(proc, query, {"type": "text", "text": c})) for c in tiny_gallery.captions])
    torch.testing.assert_close(runs[1].scores, txt @ img.T, atol=1e-4, rtol=0)


def test_a_batch_is_padded_only_as_far_as_its_own_items_need(qwen: Path, tiny_gallery: TinyGallery) -> None:
    model = load_model("vlm-embed", qwen, **SMALL)
    items = [model.preprocess(im) for im in gallery_images(tiny_gallery.images, tiny_gallery.gallery_ids)]
    sizes = {(it["input_ids"].shape[0], it["pixel_values"].shape[0]) for it in items}
    assert len(sizes) > 1  # the gallery mixes image grids
    for group in (items[:1], items[:4], items):
        batch = model.image_collate(group)
        longest = max(it["input_ids"].shape[0] for it in group)
        most = max(it["pixel_values"].shape[0] for it in group)
        assert batch["input_ids"].shape == (len(group), longest)
        assert batch["pixel_values"].shape == (len(group), most, items[0]["pixel_values"].shape[1])
        for row, it in zip(batch["input_ids"], group, strict=True):  # left padding: each prompt ends the row
            torch.testing.assert_close(row[longest - it["input_ids"].shape[0] :], it["input_ids"])


def test_cpu_bf16_runs_bf16_weights_and_restores_fp32(qwen: Path, tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    from encoder_kit import check_cpu_bf16

    check_cpu_bf16(load_model("vlm-embed", qwen, **SMALL), tiny_gallery.images, tiny_gallery.queries, tmp_path)
