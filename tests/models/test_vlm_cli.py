"""`tpas infer vlm` through the CLI: options reach the family, the output equals the library run, bad input is one
line and exit 2, and `tpas ensemble` + `tpas evaluate` consume the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.models.test_vlm_runs import _lora
from tests.models.vlm_models import make_vlm_gallery, random_candidates
from tpas.models.engine import infer
from tpas.models.vlm import VLMReranker
from tpas.sims import SimsMatrix

K = 4


@pytest.fixture
def gallery(tmp_path: Path):
    g = make_vlm_gallery(tmp_path / "data")
    random_candidates(g, tmp_path / "cand.pt")
    return g


def _infer_vlm(cli, folder: Path, g, tmp_path: Path, out: str, *extra: object) -> tuple[int, str, str]:
    return cli("infer", "vlm", "--checkpoint", folder, "--images", g.images, "--queries", g.queries,
                "--candidates", tmp_path / "cand.pt", "--rerank-k", K, "--batch-size", 8, "--workers", 0,
                "--no-cache", "--out", tmp_path / out, *extra)  # fmt: skip


def test_help_lists_the_vlm_options(cli) -> None:
    code, out, _ = cli("infer", "vlm", "--help")
    assert code == 0
    for flag in ("vlm options", "--prompt", "--prompt-file", "--system", "--score", "--yes", "--no", "--instruction",
                 "--adapter", "--merge-adapter", "--attn-implementation", "--min-pixels", "--max-pixels",
                 "--candidates", "--rerank-k"):  # fmt: skip
        assert flag in out, flag


def test_cli_run_equals_the_library_run(cli, vlm_dirs, gallery, tmp_path) -> None:
    folder = vlm_dirs["qwen2_vl"]
    code, out, err = _infer_vlm(cli, folder, gallery, tmp_path, "cli.pt", "--score", "p-yes", "--yes", "yes,YES")
    assert code == 0, err
    assert "5 queries x 8 gallery images (vlm)" in out
    got = SimsMatrix.load(tmp_path / "cli.pt")
    model = VLMReranker.from_checkpoint(folder, score="p-yes", yes="yes,YES")
    want = infer(model, gallery.images, gallery.queries, tmp_path / "lib.pt", rerank_k=K,
                 candidates=tmp_path / "cand.pt", batch_size=8, num_workers=0, use_cache=False)  # fmt: skip
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    assert got.meta["model"]["yes_tokens"] == ["yes", " yes"] and 0 <= float(got.values.min()) <= 1


def test_cli_reranker_and_adapter_options_reach_the_model(cli, vlm_dirs, gallery, tmp_path) -> None:
    folder = vlm_dirs["qwen3_vl"]
    reranker = ("--score", "qwen3-vl-reranker", "--instruction", "Find the person.")
    code, _, err = _infer_vlm(cli, folder, gallery, tmp_path, "rr.pt", *reranker, "--max-pixels", 8192)
    assert code == 0, err
    meta = SimsMatrix.load(tmp_path / "rr.pt").meta
    assert meta["model"]["instruction"] == "Find the person." and meta["score"] == "qwen3-vl-reranker"
    assert meta["model"]["image_processor"]["size"]["longest_edge"] == 8192
    lora = _lora(folder, tmp_path / "lora", 0.5)
    code, _, err = _infer_vlm(cli, folder, gallery, tmp_path, "a.pt", "--adapter", lora, "--merge-adapter")
    assert code == 0, err
    code, _, err = _infer_vlm(cli, folder, gallery, tmp_path, "p.pt")
    assert code == 0, err
    tuned, plain = SimsMatrix.load(tmp_path / "a.pt"), SimsMatrix.load(tmp_path / "p.pt")
    assert tuned.meta["adapter"] == str(lora) and (tuned.values - plain.values).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--prompt", "Is this a person?"), "{caption}"),
        (("--yes", "QQQQ"), "--yes"),
        (("--score", "logprob"), "--score"),
        (("--rerank-k", 9), "larger than the gallery"),
        (("--arch", "x"), "--arch"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(cli, vlm_dirs, gallery, tmp_path, extra, needle) -> None:
    code, _, err = _infer_vlm(cli, vlm_dirs["idefics3"], gallery, tmp_path, "bad.pt", *extra)
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.pt").exists()


def test_cli_ensemble_and_evaluate_consume_the_output(cli, vlm_dirs, gallery, tmp_path) -> None:
    from tpas.data.pab import read_queries

    records = [{"image": f"test/{gid}.jpg", "image_id": f"p{i}", "caption": [c]}
               for i, (gid, c) in enumerate(zip(gallery.gallery_ids, gallery.captions, strict=False))]  # fmt: skip
    ann = tmp_path / "attr.json"
    ann.write_text(json.dumps(records))
    qids = [q.id for q in read_queries(ann)]
    gen = torch.Generator().manual_seed(2)
    SimsMatrix(qids, gallery.gallery_ids, scores=torch.rand(len(qids), 8, generator=gen), source="pool").save(
        tmp_path / "cand.pt"
    )
    code, _, err = cli("infer", "vlm", "--checkpoint", vlm_dirs["qwen2_vl"], "--images", gallery.images,
                        "--queries", ann, "--candidates", tmp_path / "cand.pt", "--rerank-k", K, "--workers", 0,
                        "--out", tmp_path / "qwen.pt")  # fmt: skip
    assert code == 0, err
    (tmp_path / "fuse.yaml").write_text(
        "inputs: {pool: cand.pt, qwen: {path: qwen.pt, fill: row-min}}\n"
        "normalize: {method: zmuv, scope: query}\n"
        "fuse: {method: wsum, order: [pool, qwen], weights: {pool: 0.3, qwen: 1.0}}\n"
    )
    code, _, err = cli("ensemble", "--config", tmp_path / "fuse.yaml", "--out", tmp_path / "fused.pt")
    assert code == 0, err
    code, _, err = cli("evaluate", tmp_path / "fused.pt", "--gt", ann, "--json", tmp_path / "m.json")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"R@1", "R@5", "R@10", "mAP", "mINP"}
