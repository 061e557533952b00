"""One-process submission: the fused matrix in memory -> the same ranking file and zip as save + `tpas submit`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import tpas.submit.submission as sub
from tpas.ensemble.config import load_config
from tpas.ensemble.pipeline import run_ensemble
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix
from tpas.submit import write_ranking_file, write_submission


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _inputs(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    qids, gids = ids("q", 6), ids("g", 30)
    dense = SimsMatrix(qids, gids, scores=torch.randint(0, 5, (6, 30), generator=gen).float(), source="a")
    other = SimsMatrix(qids, gids, scores=torch.rand(6, 30, generator=gen), source="b")
    dense.save(tmp_path / "a.pt")
    other.top_k(12).save(tmp_path / "b.pt")
    cfg = {"inputs": {"a": "a.pt", "b": "b.pt"}, "fuse": {"method": "iterative", "order": ["a", "b"], "weights": [0.5]},
           "post": [{"sca": {"depth": 10}}]}  # fmt: skip
    (tmp_path / "ens.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "ens.yaml"


def test_fused_result_is_submitted_without_a_matrix_file_and_matches_the_two_step_path(tmp_path):
    cfg = load_config(_inputs(tmp_path))
    fused, _ = run_ensemble(cfg)
    order = list(reversed(fused.query_ids))
    one = write_submission(fused, order, tmp_path / "one" / "answer.txt", make_zip=True)
    assert [p.name for p in one] == ["answer.txt", "answer.zip"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["answer.txt", "answer.zip"]
    fused.save(tmp_path / "fused.pt")
    (two,) = write_ranking_file(SimsMatrix.load(tmp_path / "fused.pt"), order, tmp_path / "two" / "answer.txt")
    assert one[0].read_bytes() == two.read_bytes()
    with zipfile.ZipFile(one[1]) as z:
        assert z.read("answer.txt") == two.read_bytes()


def test_submission_validates_what_it_wrote(tmp_path, monkeypatch):
    m = SimsMatrix(["a", "b"], ids("g", 12), scores=torch.rand(2, 12))

    def broken(sims, query_ids, out, **kw):
        Path(out).write_text("g0 g1\n")
        return [Path(out)]

    monkeypatch.setattr(sub, "write_ranking_file", broken)
    with pytest.raises(TpasInputError, match=r"answer.txt, line 1: expected 10 gallery ids, found 2"):
        write_submission(m, ["a", "b"], tmp_path / "answer.txt")
