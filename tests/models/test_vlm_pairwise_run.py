"""`--score pairwise` on the tiny models: the pairs visited, batched == one comparison at a time, position bias
cancelled, promotion by scripted margins, resume after a kill, single-image models refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.models.vlm_models import make_vlm_gallery, random_candidates
from tpas.errors import TpasInputError
from tpas.models.engine import InferProgress, infer
from tpas.models.vlm import VLMReranker
from tpas.models.vlm.pairwise_run import PairComparer
from tpas.models.vlm.prompts import DEFAULT_PAIRWISE_PROMPT
from tpas.sims import SimsMatrix

K = 4


@pytest.fixture
def gallery(tmp_path: Path):
    g = make_vlm_gallery(tmp_path / "data")
    random_candidates(g, tmp_path / "cand.pt")
    return g


def _run(model: VLMReranker, g, tmp_path: Path, out: str = "pw.pt", **kw) -> SimsMatrix:
    args = {"rerank_k": K, "candidates": tmp_path / "cand.pt", "batch_size": 4, "num_workers": 0, "use_cache": False}
    return infer(model, g.images, g.queries, tmp_path / out, **{**args, **kw})


def _log_comparisons(monkeypatch: pytest.MonkeyPatch, shift: float = 0.0) -> list:
    """Record every comparison the model scores (and add `shift` to its margins: a preference for slot 1)."""
    log: list = []
    real = PairComparer.forward

    def forward(self, comps, inputs):
        log.extend(comps)
        return real(self, comps, inputs) + shift

    monkeypatch.setattr(PairComparer, "forward", forward)
    return log


def _image_paths(g) -> dict[str, Path]:
    return {p.stem: p for p in g.images.rglob("*.jpg")}


def test_visits_each_challenger_against_its_pivot_in_both_orders(vlm_dirs, gallery, tmp_path, monkeypatch) -> None:
    log = _log_comparisons(monkeypatch)
    got = _run(VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], score="pairwise"), gallery, tmp_path)
    q = len(gallery.query_ids)
    assert len(log) == 2 * q * (K - 1) == got.meta["pairwise"]["calls"]
    assert got.meta["pairwise"]["calls_per_query"] == 2 * (K - 1) and got.meta["score"] == "pairwise"
    first = SimsMatrix.load(tmp_path / "cand.pt").top_k(K).indices
    for r in range(q):
        mine = [(a, b) for row, a, b in log if row == r]
        # Every first-stage challenger is met once in each order, always against some earlier candidate.
        for slot in range(1, K):
            c = int(first[r, slot])
            vs = [b for a, b in mine if a == c and b in first[r, :slot].tolist()]
            assert len(vs) == 1 and (vs[0], c) in mine
    assert sorted(got.indices[0].tolist()) == sorted(first[0].tolist())
    assert got.values.tolist() == [[4.0, 3.0, 2.0, 1.0]] * q


def _one_comparison(folder: Path, caption: str, first: Path, second: Path) -> float:
    """The public way: the processor on the rendered two-image prompt, one forward, "1" minus "2" logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    lm = AutoModelForImageTextToText.from_pretrained(folder).eval()
    text = DEFAULT_PAIRWISE_PROMPT.replace("{caption}", caption)
    content = [{"type": "text", "text": "Image 1:"}, {"type": "image"}, {"type": "text", "text": "Image 2:"},
               {"type": "image"}, {"type": "text", "text": text}]  # fmt: skip
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    with Image.open(first) as a, Image.open(second) as b:
        inputs = processor(text=[rendered], images=[a, b], return_tensors="pt")
    with torch.no_grad():
        logits = lm(**inputs).logits[0, -1]
    ones = VLMReranker.from_checkpoint(folder, score="pairwise").answers
    return float(logits[list(ones.yes_ids)].max() - logits[list(ones.no_ids)].max())


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl", "idefics3"])
def test_batched_margins_equal_one_comparison_at_a_time(arch, vlm_dirs, gallery, tmp_path, monkeypatch) -> None:
    folder = vlm_dirs[arch]
    margins: dict = {}
    real = PairComparer.forward

    def forward(self, comps, inputs):
        out = real(self, comps, inputs)
        margins.update(zip(comps, out.tolist(), strict=True))
        return out

    monkeypatch.setattr(PairComparer, "forward", forward)
    model = VLMReranker.from_checkpoint(folder, score="pairwise")
    batched = _run(model, gallery, tmp_path, "b.pt", batch_size=8)
    one = _run(model, gallery, tmp_path, "one.pt", batch_size=1)
    assert torch.equal(batched.indices, one.indices)
    paths = _image_paths(gallery)
    for r, a, b in list(margins)[:: max(1, len(margins) // 6)]:  # a few comparisons, each order
        want = _one_comparison(folder, gallery.captions[r], paths[gallery.gallery_ids[a]],
                               paths[gallery.gallery_ids[b]])  # fmt: skip
        assert abs(margins[(r, a, b)] - want) <= 1e-4, (arch, r, a, b)


def test_a_preference_for_slot_one_does_not_change_the_order(vlm_dirs, gallery, tmp_path, monkeypatch) -> None:
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen3_vl"], score="pairwise")
    plain = _run(model, gallery, tmp_path, "plain.pt")
    for shift in (7.0, -7.0):
        with monkeypatch.context() as m:
            _log_comparisons(m, shift)
            biased = _run(model, gallery, tmp_path, f"biased{shift}.pt")
        assert torch.equal(biased.indices, plain.indices), shift


def test_promotion_follows_scripted_margins(vlm_dirs, gallery, tmp_path, monkeypatch) -> None:
    # A scripted comparator: the image whose column is larger wins by (difference) -> the best is the largest column.
    def forward(self, comps, inputs):
        assert inputs["input_ids"].shape[0] == len(comps)
        return torch.tensor([float(a - b) for _, a, b in comps])

    monkeypatch.setattr(PairComparer, "forward", forward)
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], score="pairwise")
    got = _run(model, gallery, tmp_path)
    first = SimsMatrix.load(tmp_path / "cand.pt").top_k(K).indices
    for r in range(len(gallery.query_ids)):
        cols = first[r].tolist()
        pivots = [cols[0]]
        for c in cols[1:]:
            if c > pivots[-1]:
                pivots.append(c)
        assert got.indices[r].tolist() == pivots[::-1] + [c for c in cols if c not in pivots]
    # With a margin above every difference, nothing is promoted: the first-stage order stays.
    held = _run(VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], score="pairwise", margin=100.0), gallery, tmp_path)
    assert torch.equal(held.indices, first) and held.meta["pairwise"]["promotions"] == 0


class _Kill(Exception):
    pass


def test_killed_run_resumes_from_the_cache(vlm_dirs, gallery, tmp_path, monkeypatch) -> None:
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], score="pairwise")
    reference = _run(model, gallery, tmp_path, "ref.pt")
    cache = tmp_path / "cache"

    def die(ev: InferProgress) -> None:
        if ev.done >= 14:  # inside the second round
            raise _Kill

    with pytest.raises(_Kill):
        _run(model, gallery, tmp_path, use_cache=True, cache_dir=cache, progress=die)
    assert not (tmp_path / "pw.pt").exists()
    log = _log_comparisons(monkeypatch)
    resumed = _run(model, gallery, tmp_path, use_cache=True, cache_dir=cache)
    assert len(log) == 30 - 14 == resumed.meta["pairwise"]["scored_here"]
    assert torch.equal(resumed.indices, reference.indices)
    log.clear()
    _run(model, gallery, tmp_path, use_cache=True, cache_dir=cache)
    assert log == []


def test_single_image_models_and_stray_options_are_refused(vlm_dirs, tmp_path) -> None:
    one = tmp_path / "one_image"
    shutil.copytree(vlm_dirs["qwen2_vl"], one)
    template = (one / "chat_template.jinja").read_text()
    # A template that shows only the first image of a turn, as single-image models do.
    template = template.replace("{% for m in messages %}", "{% for m in messages %}{% set ns = namespace(n=0) %}")
    template = template.replace(
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>",
        "{% if c['type'] == 'image' %}{% set ns.n = ns.n + 1 %}{% if ns.n == 1 %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% endif %}",
    )
    (one / "chat_template.jinja").write_text(template)
    VLMReranker.from_checkpoint(one)  # pointwise still works
    with pytest.raises(TpasInputError, match="single-image model"):
        VLMReranker.from_checkpoint(one, score="pairwise")
    with pytest.raises(TpasInputError, match="--margin applies to --score pairwise"):
        VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], margin=0.5)
    with pytest.raises(TpasInputError, match="--yes/--no do not apply"):
        VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], score="pairwise", yes="yes")
    with pytest.raises(TpasInputError, match="caption"):
        VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], score="pairwise", prompt="Which one? Answer 1 or 2.")
