"""External scores: TREC run files and CSV read into top-K matrices, with errors naming the line."""

from __future__ import annotations

import pytest
import torch
from ens_helpers import ids, save, write_config

from tpas.ensemble.config import load_config
from tpas.ensemble.external import read_run
from tpas.ensemble.pipeline import run_ensemble
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix

Q, G = ids("q", 2), ["a", "b", "c", "d"]


def test_trec_run_reads_into_topk(tmp_path):
    p = tmp_path / "vlm.run"
    p.write_text("q0 Q0 c 1 0.9 vlm\nq0 Q0 a 2 0.4 vlm\n# comment\nq1 Q0 d 1 2.5 vlm\nq1 Q0 b 2 -1 vlm\n")
    m = read_run(p, Q, G)
    assert m.k == 2
    assert torch.equal(m.to_dense("row-min"), torch.tensor([[0.4, 0.4, 0.9, 0.4], [-1.0, -1.0, -1.0, 2.5]]))


def test_csv_reads_and_pads_short_rows_at_row_min(tmp_path):
    p = tmp_path / "scores.csv"
    p.write_text("query_id,gallery_id,score\nq0,b,3\nq0,c,1\nq0,d,2\nq1,a,5\n")
    m = read_run(p, Q, G)
    assert m.k == 3 and m.meta["rows_padded_with_row_min"] == 1
    assert torch.equal(m.to_dense("row-min")[1], torch.tensor([5.0, 5.0, 5.0, 5.0]))
    assert torch.equal(m.to_dense("row-min")[0], torch.tensor([1.0, 3.0, 1.0, 2.0]))


@pytest.mark.parametrize(
    "text,match",
    [
        ("q0 Q0 zz 1 0.9 t\nq1 Q0 a 1 1 t\n", r"line 1: gallery id 'zz'"),
        ("q0 Q0 a 1 0.9 t\nq9 Q0 a 1 1 t\n", r"line 2: query id 'q9'"),
        ("q0 Q0 a 1 high t\nq1 Q0 a 1 1 t\n", r"line 1: score 'high' is not a number"),
        ("q0 Q0 a 1 nan t\nq1 Q0 a 1 1 t\n", r"line 1: score 'nan' is not finite"),
        ("q0 Q0 a 1 0.9\n", r"line 1: expected 6 fields"),
        ("q0 Q0 a 1 0.9 t\nq0 Q0 a 2 0.8 t\n", r"line 2: pair \('q0', 'a'\) is listed twice"),
        ("q0 Q0 a 1 0.9 t\n", r"query id 'q1' has no entries"),
    ],
)
def test_trec_errors_name_file_and_line(tmp_path, text, match):
    p = tmp_path / "bad.run"
    p.write_text(text)
    with pytest.raises(TpasInputError, match=match) as e:
        read_run(p, Q, G)
    assert "bad.run" in str(e.value)


def test_csv_header_is_checked(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("qid,docid,score\nq0,a,1\n")
    with pytest.raises(TpasInputError, match="header lacks query_id, gallery_id"):
        read_run(p, Q, G)


def test_run_file_joins_a_fusion(tmp_path):
    base = SimsMatrix(Q, G, scores=torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]]))
    save(base, tmp_path / "base.pt")
    (tmp_path / "vlm.csv").write_text("query_id,gallery_id,score\nq0,a,10\nq1,d,10\nq1,c,0\nq0,b,0\n")
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "inputs": {"base": "base.pt", "vlm": "vlm.csv"},
            "fuse": {"method": "wsum", "order": ["base", "vlm"], "weights": {"base": 0.5, "vlm": 0.5}},
        },
    )
    fused, steps = run_ensemble(load_config(cfg))
    # base min-max: row0 [0, 1/3, 2/3, 1]; vlm top-K with row-min fill: row0 [10, 0, 0, 0] -> [1, 0, 0, 0]
    assert torch.allclose(
        fused.scores[0], 0.5 * torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]) + 0.5 * torch.tensor([1.0, 0.0, 0.0, 0.0])
    )
    assert any(s.get("form", "").startswith("top-2") for s in steps)
