"""The 2026 recipe end to end on a tiny `tpas synth` set, every step the `tpas` command the README lists: two
encoders -> best-rank pool -> three VLM re-rankers -> the packaged recipe_2026 fusion (z-score, SCA, greedy
assignment) -> submit -> validate."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.models.conftest import openai_release_state, tiny_clip_state
from tpas.sims import SimsMatrix

K = 3


def test_recipe_2026_runs_end_to_end(cli, vlm_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the packaged preset reads ./sims_score/ (no configs/ folder needed here)
    code, _, err = cli("synth", "--out", "pab", "--identities", 2, "--val-identities", 1, "--test-identities", 3,
                        "--distractors", 6, "--train-files", 1)  # fmt: skip
    assert code == 0, err
    masked = Path("pab/name-masked_test-set")
    images, queries = masked / "gallery", masked / "query.json"
    common = ("--images", images, "--queries", queries, "--workers", 0, "--batch-size", 4, "--no-cache")
    encoders = []
    for seed in (0, 1):  # two tiny CLIPs stand in for the N encoders
        ckpt = tmp_path / f"clip{seed}.pt"
        torch.save(openai_release_state(tiny_clip_state(seed)), ckpt)
        out = Path(f"sims_score/clip{seed}.pt")
        code, _, err = cli("infer", "clip", "--checkpoint", ckpt, *common, "--out", out)
        assert code == 0, err
        encoders.append(out.resolve())
    inputs = "{" + ", ".join(f"clip{i}: {p}" for i, p in enumerate(encoders)) + "}"
    code, _, err = cli("ensemble", "--config", "candidate_pool", "--set", f"inputs={inputs}",
                        "--set", "fuse.order=[clip0, clip1]", "--set", "fuse.depth=6",
                        "--out", "sims_score/pool.pt")  # fmt: skip
    assert code == 0, err
    vlm = ("infer", "vlm", "--checkpoint", vlm_dirs["qwen2_vl"], "--candidates", "sims_score/pool.pt",
           "--rerank-k", K, *common)  # fmt: skip
    for name, extra in (("pointwise", ()), ("pairwise", ("--score", "pairwise")),
                        ("cloze", ("--score", "cloze", "--max-new-tokens", 4))):  # fmt: skip
        code, _, err = cli(*vlm, *extra, "--out", f"sims_score/vlm_{name}.pt")
        assert code == 0, (name, err)
    pairwise = SimsMatrix.load("sims_score/vlm_pairwise.pt")
    n_queries = len(pairwise.query_ids)
    assert pairwise.meta["pairwise"]["calls"] == 2 * (K - 1) * n_queries
    code, _, err = cli("ensemble", "--config", "recipe_2026", "--out", "sims_score/recipe.pt")
    assert code == 0, err
    fused = SimsMatrix.load("sims_score/recipe.pt")
    assert fused.shape == (n_queries, len(list(images.glob("*.jpg"))))
    top1 = fused.top_k(1).indices.flatten().tolist()
    assert len(set(top1)) == n_queries  # the injective assignment: no two queries share a top-1
    index = masked / "query_index.txt"
    code, _, err = cli("submit", "sims_score/recipe.pt", "--query-index", index, "--out", "answer.txt")
    assert code == 0, err
    code, out, err = cli("validate", "answer.txt", "--query-index", index, "--gallery", images)
    assert code == 0, err + out
    assert len(Path("answer.txt").read_text().splitlines()) == n_queries
    assert json.loads(json.dumps(fused.meta, default=str))  # meta stays JSON-able through the chain
