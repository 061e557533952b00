"""Ranking-file writer: order, format, atomicity, zip, and id checks against the query index and gallery."""

from __future__ import annotations

import zipfile

import pytest
import torch

import tpas.submit.ranking_file as rf
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix
from tpas.submit import top_gallery_ids, validate_answer, write_ranking_file


def matrix(q: int = 5, g: int = 14, seed: int = 0) -> SimsMatrix:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (q, g), generator=gen).float()  # many ties: the rule matters
    return SimsMatrix([f"Q{i}" for i in range(q)], [f"G{j:02d}" for j in range(g)], scores=scores)


def stable_top(s: SimsMatrix, qid: str, k: int = 10) -> list[str]:
    row = s.scores[s.query_ids.index(qid)].tolist()
    return [s.gallery_ids[c] for c in sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]]


def test_lines_follow_query_index_and_stable_order(tmp_path, monkeypatch):
    s = matrix()
    order = ["Q3", "Q0", "Q4", "Q1", "Q2"]
    monkeypatch.setattr(rf, "_TOPK_ROWS", 2)  # several chunks, rows gathered out of order
    (out,) = write_ranking_file(s, order, tmp_path / "pred" / "answer.txt")
    raw = out.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw and b"  " not in raw
    lines = raw.decode().splitlines()
    assert [line.split(" ") for line in lines] == [stable_top(s, q) for q in order]
    assert validate_answer(out, order, s.gallery_ids).ok
    assert list(tmp_path.joinpath("pred").iterdir()) == [out]  # no temp files left behind


def test_topk_matrix_writes_the_same_lines_as_its_dense_source():
    s = matrix(q=6, g=20, seed=3)
    top = s.top_k(12)
    # Scramble the kept slots: ties must still resolve by gallery order, not storage order.
    perm = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    scrambled = SimsMatrix(
        top.query_ids, top.gallery_ids, indices=top.indices.gather(1, perm), values=top.values.gather(1, perm)
    )
    assert top_gallery_ids(scrambled, s.query_ids) == top_gallery_ids(s, s.query_ids)
    assert scrambled.top_k(10).indices.tolist() == s.top_k(10).indices.tolist()
    with pytest.raises(TpasInputError, match="keeps only 5 cells per query"):
        top_gallery_ids(s.top_k(5), s.query_ids)


def test_zip_holds_answer_txt(tmp_path):
    s = matrix()
    txt, z = write_ranking_file(s, s.query_ids, tmp_path / "answer.txt", make_zip=True)
    assert z == tmp_path / "answer.zip"
    with zipfile.ZipFile(z) as zf:
        assert zf.namelist() == ["answer.txt"]
        assert zf.read("answer.txt") == txt.read_bytes()
    assert validate_answer(z, s.query_ids).ok
    (only,) = write_ranking_file(s, s.query_ids, tmp_path / "sub.zip")
    assert only.suffix == ".zip" and not (tmp_path / "sub.txt").exists()


@pytest.mark.parametrize(
    ("query_ids", "gallery", "expected"),
    [
        (
            ["Q0", "Q1", "QX", "Q2", "Q3", "Q4"],
            None,
            r"1 of 6 query ids have no row in the matrix, first 'QX' \(line 3\)",
        ),
        (["Q0", "Q1", "Q2", "Q3"], None, "the matrix has 1 rows that are not in the query index, first 'Q4'"),
        (["Q0", "Q1", "Q2", "Q3", "Q4"], [f"G{j:02d}" for j in range(13)] + ["H"], "only in the first: 'G13'.*'H'"),
    ],
)
def test_id_mismatches_are_refused_and_nothing_is_written(tmp_path, query_ids, gallery, expected):
    out = tmp_path / "answer.txt"
    with pytest.raises(TpasInputError, match=expected):
        write_ranking_file(matrix(), query_ids, out, gallery_ids=gallery)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gallery_smaller_than_k_is_refused():
    with pytest.raises(TpasInputError, match="the gallery has 4 images"):
        top_gallery_ids(matrix(g=4), ["Q0"])
