"""`--score cloze` on the tiny models: batched generation == one pair at a time, scoring and the tie-break, captions
without blanks, the lexicon option, and a CLI run that is deterministic and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.models.vlm_models import make_vlm_gallery, random_candidates
from tpas.errors import TpasInputError
from tpas.models.engine import infer
from tpas.models.vlm import VLMReranker, cloze_run
from tpas.models.vlm.cloze import Lexicon, make_cloze
from tpas.sims import SimsMatrix

K = 4


@pytest.fixture
def gallery(tmp_path: Path):
    g = make_vlm_gallery(tmp_path / "data")
    random_candidates(g, tmp_path / "cand.pt")
    return g


def _run(model: VLMReranker, g, tmp_path: Path, out: str = "cz.pt", **kw) -> SimsMatrix:
    args = {"rerank_k": K, "candidates": tmp_path / "cand.pt", "batch_size": 8, "num_workers": 0, "use_cache": False}
    return infer(model, g.images, g.queries, tmp_path / out, **{**args, **kw})


def _record_replies(monkeypatch: pytest.MonkeyPatch) -> list:
    replies: list = []
    real = cloze_run.generate_step

    def wrapped(run, n):
        step = real(run, n)

        def recording(inputs):
            out = step(inputs)
            replies.extend(out["reply"].tolist())
            return out

        return recording

    monkeypatch.setattr(cloze_run, "generate_step", wrapped)
    return replies


def _first_stage_term() -> torch.Tensor:
    return cloze_run.TIE_BREAK * (K - torch.arange(K, dtype=torch.float64)) / K


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_batched_generation_equals_one_pair_at_a_time(arch, vlm_dirs, gallery, tmp_path, monkeypatch) -> None:
    model = VLMReranker.from_checkpoint(vlm_dirs[arch], score="cloze", max_new_tokens=6)
    replies = _record_replies(monkeypatch)
    batched = _run(model, gallery, tmp_path, "b.pt", batch_size=8)
    in_batches = list(replies)
    replies.clear()
    one = _run(model, gallery, tmp_path, "one.pt", batch_size=1)
    assert replies == in_batches and len(replies) == 5 * K
    assert torch.equal(batched.values, one.values) and torch.equal(batched.indices, one.indices)
    assert any(t >= 0 for reply in replies for t in reply)  # something was generated


def test_scores_are_the_matched_fraction_with_first_stage_tie_break(vlm_dirs, gallery, tmp_path, monkeypatch) -> None:
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], score="cloze")
    cloze = make_cloze(gallery.captions[0], Lexicon.load())
    answer = "\n".join(f"{b.number}: {b.word}" for b in cloze.blanks)  # query 0's masked words, in order
    ids = model.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]

    def scripted(run, n):
        def step(inputs):
            reply = torch.full((inputs["input_ids"].shape[0], n), -1, dtype=torch.long)
            reply[:, : len(ids)] = torch.tensor(ids[:n])
            return {"reply": reply}

        return step

    monkeypatch.setattr(cloze_run, "generate_step", scripted)
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], score="cloze", max_new_tokens=len(ids))
    got = _run(model, gallery, tmp_path)
    first = SimsMatrix.load(tmp_path / "cand.pt").top_k(K).indices
    assert torch.equal(got.indices, first)
    torch.testing.assert_close(got.values[0].double(), 1.0 + _first_stage_term(), atol=1e-6, rtol=0)
    assert got.meta["cloze"]["generations"] == 5 * K and got.meta["cloze"]["mean_fraction"] > 0


def test_captions_without_blanks_keep_their_first_stage_order(vlm_dirs, gallery, tmp_path, monkeypatch) -> None:
    lines = gallery.queries.read_text().splitlines()
    first = json.loads(lines[2])
    lines[2] = json.dumps({**first, "caption": "A person near a wall."})
    gallery.queries.write_text("\n".join(lines) + "\n")
    replies = _record_replies(monkeypatch)
    got = _run(VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], score="cloze", max_new_tokens=4), gallery, tmp_path)
    assert got.meta["cloze"]["queries_without_blanks"] == 1
    assert len(replies) == got.meta["cloze"]["generations"] == 4 * K  # nothing asked for the caption without blanks
    torch.testing.assert_close(got.values[2].double(), _first_stage_term(), atol=1e-7, rtol=0)
    assert torch.equal(got.indices[2], SimsMatrix.load(tmp_path / "cand.pt").top_k(K).indices[2])


def test_lexicon_extension_and_option_checks(vlm_dirs, tmp_path) -> None:
    extra = tmp_path / "lex.json"
    extra.write_text(json.dumps({"behaviour": {"juggle": ["juggling", "juggles"]}}))
    folder = vlm_dirs["qwen2_vl"]
    plain = VLMReranker.from_checkpoint(folder, score="cloze")
    more = VLMReranker.from_checkpoint(folder, score="cloze", cloze_lexicon=extra)
    assert not make_cloze("a man juggling", plain.mode.lexicon).blanks
    assert [b.word for b in make_cloze("a man juggling", more.mode.lexicon).blanks] == ["juggling"]
    assert plain.describe()["lexicon_sha256"] != more.describe()["lexicon_sha256"]  # another cache key
    for options, needle in [({"max_new_tokens": 4}, "--max-new-tokens applies"),
                            ({"score": "cloze", "max_new_tokens": 0}, ">= 1"),
                            ({"score": "cloze", "prompt": "{caption}"}, "--prompt"),
                            ({"score": "cloze", "cloze_lexicon": tmp_path / "none.json"}, "none.json")]:  # fmt: skip
        with pytest.raises(TpasInputError, match=needle):
            VLMReranker.from_checkpoint(folder, **options)


def test_cli_cloze_run_is_deterministic_and_resumes(cli, vlm_dirs, gallery, tmp_path) -> None:
    def run(out: str, *extra: object):
        return cli("infer", "vlm", "--checkpoint", vlm_dirs["qwen3_vl"], "--images", gallery.images,
                    "--queries", gallery.queries, "--candidates", tmp_path / "cand.pt", "--rerank-k", K,
                    "--batch-size", 6, "--workers", 0, "--score", "cloze", "--max-new-tokens", 5,
                    "--cache-dir", tmp_path / "cache", "--out", tmp_path / out, *extra)  # fmt: skip

    code, out, err = run("a.pt")
    assert code == 0, err
    assert "top-4 scores of the candidates" in out
    a = SimsMatrix.load(tmp_path / "a.pt")
    assert a.meta["score"] == "cloze" and a.meta["cloze"]["generated_here"] == 5 * K
    code, _, err = run("b.pt")
    b = SimsMatrix.load(tmp_path / "b.pt")
    assert code == 0 and b.meta["cloze"]["generated_here"] == 0  # everything from the cache
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    # Drop half of the cached answers (as a kill would leave them): only those are generated again.
    chunks = sorted((tmp_path / "cache").rglob("chunk-*.safetensors"))
    for c in chunks[: len(chunks) // 2]:
        c.unlink()
    code, _, err = run("c.pt")
    c = SimsMatrix.load(tmp_path / "c.pt")
    assert code == 0 and 0 < c.meta["cloze"]["generated_here"] < 5 * K
    assert torch.equal(a.values, c.values)
    code, _, err = run("d.pt", "--margin", 0.5)
    assert code == 2 and "--margin applies to --score pairwise" in err
