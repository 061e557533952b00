"""The vlm family: batched scores equal one-pair-at-a-time scores, score modes, templates, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.models.vlm_models import make_vlm_gallery, random_candidates
from tpas.errors import TpasInputError
from tpas.models.engine import infer
from tpas.models.vlm import VLMReranker
from tpas.models.vlm.prompts import DEFAULT_PROMPT
from tpas.sims import SimsMatrix

K = 4


@pytest.fixture
def gallery(tmp_path: Path):
    g = make_vlm_gallery(tmp_path / "data")
    random_candidates(g, tmp_path / "cand.pt")
    return g


def _run(folder: Path, g, tmp_path: Path, out: str = "vlm.pt", batch_size: int = 8, **options) -> SimsMatrix:
    model = VLMReranker.from_checkpoint(folder, **options)
    return infer(model, g.images, g.queries, tmp_path / out, rerank_k=K, candidates=tmp_path / "cand.pt",
                 batch_size=batch_size, num_workers=0, use_cache=False)  # fmt: skip


def _one_pair_logits(folder: Path, messages: list, image: Path) -> torch.Tensor:
    """The public scripts' way: processor + forward for one pair; last-position logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with Image.open(image) as im:
        inputs = processor(text=[text], images=[im], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, -1].float()


def _pointwise(caption: str) -> list:
    text = DEFAULT_PROMPT.replace("{caption}", caption)
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _image_paths(g) -> dict[str, Path]:
    return {p.stem: p for p in g.images.rglob("*.jpg")}


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl", "idefics3"])
def test_batched_scores_equal_one_pair_at_a_time(arch: str, vlm_dirs: dict, gallery, tmp_path: Path) -> None:
    folder = vlm_dirs[arch]
    model = VLMReranker.from_checkpoint(folder)
    # The batch really mixes lengths: the gallery's images expand to different numbers of visual tokens.
    seg = model.image_preprocessor
    lengths = {seg(Image.open(p))["input_ids"].shape[1] for p in _image_paths(gallery).values()}
    assert len(lengths) >= 3, lengths
    got = _run(folder, gallery, tmp_path, batch_size=8)
    cand = SimsMatrix.load(tmp_path / "cand.pt")
    assert got.k == K and got.source == "vlm"
    assert torch.equal(got.indices, cand.top_k(K).indices)  # the candidates' top-k, in their order
    yes, no = model.answers.yes_ids, model.answers.no_ids
    paths = _image_paths(gallery)
    for r, caption in enumerate(gallery.captions):
        for j, col in enumerate(got.indices[r].tolist()):
            logits = _one_pair_logits(folder, _pointwise(caption), paths[gallery.gallery_ids[col]])
            want = logits[list(yes)].max() - logits[list(no)].max()
            assert abs(float(got.values[r, j]) - float(want)) <= 1e-4, (arch, r, j)


def test_yes_no_variants_are_the_single_token_spellings(vlm_dirs: dict) -> None:
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"])
    tok = model.processor.tokenizer
    a = model.answers
    # "yes" and " yes" are different single tokens, both kept; "YES" is three tokens here and dropped.
    assert {"yes", " yes", "Yes", " Yes"} <= set(a.yes_tokens) and "YES" not in a.yes_tokens
    assert {"no", " no", "No", " No"} <= set(a.no_tokens)
    assert len(tok("YES", add_special_tokens=False)["input_ids"]) > 1
    for spelled, i in zip(a.yes_tokens, a.yes_ids, strict=True):
        assert tok(spelled, add_special_tokens=False)["input_ids"] == [i]
    custom = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], yes="yes, YES", no="no")
    assert custom.answers.yes_tokens == ("yes", " yes") and custom.answers.no_tokens == ("no", " no")
    with pytest.raises(TpasInputError, match=r"--yes 'YES'.*no variant"):
        VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], yes="YES")
    with pytest.raises(TpasInputError, match="--no"):
        VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], no="zqxj")


def test_p_yes_is_a_probability_and_matches_the_softmax(vlm_dirs: dict, gallery, tmp_path: Path) -> None:
    folder = vlm_dirs["qwen3_vl"]
    got = _run(folder, gallery, tmp_path, score="p-yes")
    assert got.meta["score"] == "p-yes"
    assert float(got.values.min()) >= 0.0 and float(got.values.max()) <= 1.0
    yes = VLMReranker.from_checkpoint(folder).answers.yes_ids
    col = int(got.indices[1, 0])
    logits = _one_pair_logits(folder, _pointwise(gallery.captions[1]), _image_paths(gallery)[gallery.gallery_ids[col]])
    want = torch.softmax(logits, dim=0)[list(yes)].sum()
    assert abs(float(got.values[1, 0]) - float(want)) <= 1e-5


# The message layout of Qwen3-VL-Reranker's scoring script (scripts/qwen3_vl_reranker.py in its model snapshot):
# system judge text; user: "<Instruct>: " + instruction, "<Query>:", the query text, "\n<Document>:", the image.
_RERANKER_RENDERED = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: Find the person.<Query>:{caption}\n<Document>:"
    "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
)


def test_qwen3_vl_reranker_template_and_sigmoid_score(vlm_dirs: dict, gallery, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tpas.models.vlm.prompts import render

    folder = vlm_dirs["qwen3_vl"]
    model = VLMReranker.from_checkpoint(folder, score="qwen3-vl-reranker", instruction="Find the person.")
    caption = gallery.captions[0]
    messages = model.prompt.messages(caption)
    assert render(model.processor, messages) == _RERANKER_RENDERED.format(caption=caption)
    default = VLMReranker.from_checkpoint(folder, score="qwen3-vl-reranker")
    assert "<Instruct>: Given a search query, retrieve relevant candidates that answer the query." in render(
        default.processor, default.prompt.messages(caption)
    )
    got = _run(folder, gallery, tmp_path, score="qwen3-vl-reranker", instruction="Find the person.")
    assert got.meta["model"]["instruction"] == "Find the person."
    # The script's score: sigmoid of (lm_head[yes] - lm_head[no]) . last hidden state, "yes"/"no" from the vocab.
    processor = AutoProcessor.from_pretrained(folder)
    lm = AutoModelForImageTextToText.from_pretrained(folder).eval()
    vocab = processor.tokenizer.get_vocab()
    w = lm.lm_head.weight[vocab["yes"]] - lm.lm_head.weight[vocab["no"]]
    col = int(got.indices[0, 2])
    with Image.open(_image_paths(gallery)[gallery.gallery_ids[col]]) as im:
        inputs = processor(text=[_RERANKER_RENDERED.format(caption=caption)], images=[im], return_tensors="pt")
    with torch.no_grad():
        hidden = lm.model(**inputs).last_hidden_state[0, -1]
    assert abs(float(got.values[0, 2]) - float(torch.sigmoid(hidden @ w).detach())) <= 1e-5
    assert got.meta["model"]["yes_ids"] == [vocab["yes"]] and got.meta["model"]["no_ids"] == [vocab["no"]]


def test_meta_records_what_scored_the_pairs(vlm_dirs: dict, gallery, tmp_path: Path) -> None:
    got = _run(vlm_dirs["qwen2_vl"], gallery, tmp_path, prompt="Is this {caption}? Answer yes or no.",
               system="Be brief.", min_pixels=28 * 28 * 3, max_pixels=28 * 28 * 6)  # fmt: skip
    saved = SimsMatrix.load(tmp_path / "vlm.pt")
    meta = saved.meta
    assert meta["family"] == "vlm" and len(meta["checkpoint_sha256"]) == 64 and meta["adapter"] is None
    assert meta["model"]["prompt"] == "Is this {caption}? Answer yes or no." and meta["model"]["system"] == "Be brief."
    assert meta["model"]["image_processor"]["size"]["shortest_edge"] == 28 * 28 * 3
    assert meta["model"]["image_processor"]["size"]["longest_edge"] == 28 * 28 * 6
    assert meta["candidates"] == str(tmp_path / "cand.pt") and meta["rerank_k"] == K
    assert meta["precision"] == "fp32" and meta["score"] == "yes-no"
    assert torch.equal(saved.values, got.values)


def test_top_k_candidates_and_stable_ties(vlm_dirs: dict, gallery, tmp_path: Path) -> None:
    """A top-K candidates file works; equal candidate scores keep gallery order."""
    ids = gallery.gallery_ids
    tied = SimsMatrix(gallery.query_ids, ids, scores=torch.zeros(len(gallery.query_ids), len(ids)), source="flat")
    tied.top_k(6).save(tmp_path / "cand.pt")
    got = _run(vlm_dirs["idefics3"], gallery, tmp_path)
    assert got.indices.tolist() == [list(range(K))] * len(gallery.query_ids)


# ---------------------------------------------------------------------------------------------- bad input
def _no_output(tmp_path: Path) -> None:
    assert not (tmp_path / "vlm.pt").exists() and not list(tmp_path.glob(".vlm.pt*"))


def test_bad_options_are_refused_naming_them(vlm_dirs: dict, tmp_path: Path) -> None:
    folder = vlm_dirs["qwen2_vl"]
    cases = [
        ({"prompt": "Is this a person?"}, "{caption}"),
        ({"yes": "QQQQ"}, "--yes"),
        ({"score": "logprob"}, "--score"),
        ({"instruction": "x"}, "--instruction"),
        ({"score": "qwen3-vl-reranker", "prompt": "{caption}"}, "--prompt"),
        ({"merge_adapter": True}, "--adapter"),
        ({"adapter": tmp_path}, "adapter_config.json"),
        ({"attn_implementation": "flash"}, "--attn-implementation"),
        ({"min_pixels": 100, "max_pixels": 50}, "--min-pixels"),
        ({"prompt_file": tmp_path / "missing.txt"}, "missing.txt"),
    ]
    for options, needle in cases:
        with pytest.raises(TpasInputError) as e:
            VLMReranker.from_checkpoint(folder, **options)
        assert needle in str(e.value), (options, str(e.value))
    with pytest.raises(TpasInputError, match="apply to Qwen-style"):
        VLMReranker.from_checkpoint(vlm_dirs["idefics3"], max_pixels=4096)


def test_bad_folders_are_refused_naming_what_is_missing(vlm_dirs: dict, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(TpasInputError, match="checkpoint folder not found"):
        VLMReranker.from_checkpoint(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(vlm_dirs["qwen2_vl"], broken)
    (broken / "chat_template.jinja").unlink()
    with pytest.raises(TpasInputError, match="no chat template"):
        VLMReranker.from_checkpoint(broken)
    (broken / "processor_config.json").unlink()
    with pytest.raises(TpasInputError, match="no image processor"):
        VLMReranker.from_checkpoint(broken)
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TpasInputError, match="not an image-text-to-text model"):
        VLMReranker.from_checkpoint(text_only)


def test_bad_run_inputs_write_nothing(vlm_dirs: dict, gallery, tmp_path: Path) -> None:
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"])
    out = tmp_path / "vlm.pt"
    args = {"num_workers": 0, "use_cache": False}

    def refused(needle: str, **kw) -> None:
        with pytest.raises(TpasInputError) as e:
            infer(model, gallery.images, gallery.queries, out, **{**args, **kw})
        assert needle in str(e.value), str(e.value)
        _no_output(tmp_path)

    cand = tmp_path / "cand.pt"
    refused("larger than the gallery", rerank_k=9, candidates=cand)
    refused("--candidates", rerank_k=K)
    SimsMatrix.load(cand).select(query_ids=gallery.query_ids[1:]).save(tmp_path / "short.pt")
    refused(repr(gallery.query_ids[0]), rerank_k=K, candidates=tmp_path / "short.pt")
    SimsMatrix.load(cand).select(gallery_ids=gallery.gallery_ids[:-1]).save(tmp_path / "narrow.pt")
    refused(repr(gallery.gallery_ids[-1]), rerank_k=K, candidates=tmp_path / "narrow.pt")
    SimsMatrix.load(cand).top_k(2).save(tmp_path / "top2.pt")
    refused("top-2", rerank_k=K, candidates=tmp_path / "top2.pt")
    refused("--skip-bad-images", rerank_k=K, candidates=cand, skip_bad_images=True)
    # An unreadable candidate image: named, nothing written.
    first = SimsMatrix.load(cand).top_k(K).indices[0, 0]
    bad = _image_paths(gallery)[gallery.gallery_ids[int(first)]]
    bad.write_bytes(b"not a jpeg")
    refused(bad.name, rerank_k=K, candidates=cand)
