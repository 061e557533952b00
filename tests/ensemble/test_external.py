"""External scores: TREC run files and CSV read into top-K matrices, with errors naming the line."""

from __future__ import annotations

import pytest
import torch
from ens_helpers import ids, save, write_config

from tpas.ensemble.config import load_config
from tpas.ensemble.external import detect_format, import_run, parse_run, read_run
from tpas.ensemble.pipeline import run_ensemble
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix
from tpas.submit import write_ranking_file

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


def test_format_is_detected_from_suffix_and_txt_content(tmp_path):
    trec = tmp_path / "a.txt"
    trec.write_text("# header\nq0 Q0 a 1 0.9 tag\n")
    ranking = tmp_path / "answer.txt"
    ranking.write_text("a b c d e f\n")
    assert [detect_format(p) for p in (trec, ranking)] == ["trec", "ranking"]
    assert [detect_format(tmp_path / n) for n in ("x.csv", "x.run", "x.tsv", "x.pt", "missing.txt")] == [
        "csv", "trec", "trec", "sims", "trec"
    ]  # fmt: skip


def test_ranking_file_scores_are_reciprocal_ranks_in_query_index_order(tmp_path):
    p = tmp_path / "answer.txt"
    p.write_text("c a\nd b\n")
    m = read_run(p, ["q1", "q0"], G, fmt="ranking")  # line 1 is query q1
    assert m.query_ids == ["q1", "q0"] and m.meta["scores_from_ranks"].startswith("1 / rank")
    assert torch.equal(m.to_dense(fill=0.0), torch.tensor([[0.5, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, 1.0]]))
    with pytest.raises(TpasInputError, match=r"answer.txt: has 2 lines but the query index has 3"):
        read_run(p, ["q0", "q1", "q2"], G, fmt="ranking")
    with pytest.raises(TpasInputError, match=r"give the query index"):
        parse_run(p, "ranking")
    p.write_text("c a\n\nd b\n")
    with pytest.raises(TpasInputError, match=r"line 2: blank line"):
        read_run(p, ["q0", "q1", "q2"], G, fmt="ranking")
    p.write_text("c c\nd b\n")
    with pytest.raises(TpasInputError, match=r"line 1: pair \('q0', 'c'\) is listed twice"):
        read_run(p, ["q0", "q1"], G, fmt="ranking")


def test_imported_ranking_file_writes_back_the_same_file(tmp_path):
    qids, gids = ids("Q", 5), ids("G", 40)
    gen = torch.Generator().manual_seed(1)
    lines = [" ".join(gids[c] for c in torch.randperm(40, generator=gen)[:10].tolist()) for _ in qids]
    answer = tmp_path / "answer.txt"
    answer.write_text("\n".join(lines) + "\n")
    m = import_run(answer, qids, gids)
    assert m.k == 10 and m.meta["ids_from"] == {"query_ids": "given", "gallery_ids": "given"}
    (back,) = write_ranking_file(SimsMatrix.load(m.save(tmp_path / "m.pt")), qids, tmp_path / "back.txt")
    assert back.read_bytes() == answer.read_bytes()
    union = import_run(answer, qids)  # gallery: the ids the file lists, sorted
    assert union.gallery_ids == sorted({g for line in lines for g in line.split()})
    assert union.meta["ids_from"]["gallery_ids"].startswith("union of the run's")
    assert write_ranking_file(union, qids, tmp_path / "u.txt")[0].read_bytes() == answer.read_bytes()


def test_import_run_reads_trec_and_csv_into_topk(tmp_path):
    (tmp_path / "r.run").write_text("q0 Q0 c 1 0.9 t\nq0 Q0 a 2 0.4 t\nq1 Q0 d 1 2.5 t\n")
    m = import_run(tmp_path / "r.run", Q, G)
    assert m.k == 2 and m.meta["rows_padded_with_row_min"] == 1 and m.meta["run_format"] == "trec"
    (tmp_path / "r.csv").write_text("query_id,gallery_id,score\nq0,b,3\nq1,a,5\n")
    u = import_run(tmp_path / "r.csv", Q)
    assert u.gallery_ids == ["a", "b"] and u.to_dense().tolist() == [[3.0, 3.0], [5.0, 5.0]]


def _runs(tmp_path, qids, gids, n_runs=3, k=10):
    """Top-k CSV runs of random scores, and the dense matrices they come from."""
    gen = torch.Generator().manual_seed(0)
    paths, dense = [], []
    for r in range(n_runs):
        s = torch.rand(len(qids), len(gids), generator=gen)
        top = SimsMatrix(qids, gids, scores=s).top_k(k)
        rows = ["query_id,gallery_id,score"]
        for i, q in enumerate(qids):
            cells = zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True)
            rows += [f"{q},{gids[c]},{v!r}" for c, v in cells]
        (tmp_path / f"run{r}.csv").write_text("\n".join(rows) + "\n")
        paths.append(f"run{r}.csv")
        dense.append(top)
    return paths, dense


def test_run_only_ensemble_takes_ids_from_the_config_and_equals_the_sims_ensemble(tmp_path):
    qids, gids = ids("q", 6), ids("g", 30)
    paths, tops = _runs(tmp_path, qids, gids)
    (tmp_path / "qi.txt").write_text("\n".join(qids) + "\n")
    (tmp_path / "gallery.txt").write_text("\n".join(gids) + "\n")
    fuse = {"method": "wsum", "order": ["a", "b", "c"], "weights": {"a": 0.5, "b": 0.3, "c": 0.2}}
    runs_cfg = write_config(tmp_path / "runs.yaml", {
        "inputs": dict(zip("abc", paths, strict=True)), "ids": {"query_index": "qi.txt", "gallery": "gallery.txt"},
        "fuse": fuse})  # fmt: skip
    fused, _ = run_ensemble(load_config(runs_cfg))
    assert fused.query_ids == qids and fused.gallery_ids == gids
    assert fused.meta["ids_from"]["gallery_ids"].startswith("ids.gallery")
    for name, t in zip("abc", tops, strict=True):
        save(t, tmp_path / f"{name}.pt")
    sims_cfg = write_config(tmp_path / "sims.yaml", {"inputs": {n: f"{n}.pt" for n in "abc"}, "fuse": fuse})
    ref, _ = run_ensemble(load_config(sims_cfg))
    assert torch.allclose(fused.scores, ref.scores, atol=1e-6)
    given, _ = run_ensemble(load_config(runs_cfg), query_ids=list(reversed(qids)), gallery_ids=list(reversed(gids)))
    assert given.query_ids == list(reversed(qids)) and given.meta["ids_from"]["query_ids"] == "given (query index)"


def test_run_only_ensemble_without_ids_uses_the_union_of_the_runs(tmp_path):
    qids, gids = ids("q", 4), ids("g", 50)
    paths, tops = _runs(tmp_path, qids, gids, n_runs=2, k=5)
    cfg = write_config(tmp_path / "c.yaml", {"inputs": {"a": paths[0], "b": paths[1]}, "fuse": {"method": "rrf"}})
    fused, _ = run_ensemble(load_config(cfg))
    listed = {gids[c] for t in tops for c in t.indices.flatten().tolist()}
    assert fused.query_ids == qids and fused.gallery_ids == sorted(listed)
    n = len(fused.gallery_ids)
    assert fused.meta["ids_from"] == {"query_ids": "union of the runs (4 queries)",
                                      "gallery_ids": f"union of the runs ({n} gallery ids)"}  # fmt: skip


def test_ranking_input_needs_the_query_index(tmp_path):
    (tmp_path / "answer.txt").write_text("a b\nc d\n")
    cfg = write_config(tmp_path / "c.yaml", {"inputs": {"sub": "answer.txt"}, "fuse": {"method": "rrf"}})
    with pytest.raises(TpasInputError, match=r"answer.txt: a ranking file has no query ids"):
        run_ensemble(load_config(cfg))
    fused, _ = run_ensemble(load_config(cfg), query_ids=["x", "y"])
    assert fused.query_ids == ["x", "y"] and fused.gallery_ids == ["a", "b", "c", "d"]
    with pytest.raises(TpasInputError, match=r"ids.nope: unknown key"):
        load_config(cfg, ["ids.nope=x"])
