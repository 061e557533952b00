"""CLI: tpas evaluate / submit / validate / import-legacy, and every bad input -> one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpas.cli import main
from tpas.data.pab import read_query_index
from tpas.scoring import evaluate
from tpas.sims import FORMAT, SimsMatrix

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "aicity26"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the console entry point in-process; returns (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def write_ids(path: Path, ids: list[str]) -> Path:
    path.write_text("\n".join(ids) + "\n")
    return path


# ------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_json_per_query_and_breakdowns(tiny_gt, tmp_path, capsys):
    t = tiny_gt(n_images=6, distractors=4)
    code, out, err = run(capsys, "evaluate", t.sims_path, "--gt", t.annotation, "--by", "normal/anomaly,scene",
                         "--json", tmp_path / "m.json", "--per-query", tmp_path / "pq.csv")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics) == ["R@1", "R@5", "R@10", "mAP", "mINP"]
    want = evaluate(t.sims, t.gt).metrics()
    assert metrics == pytest.approx(want)
    csv = (tmp_path / "pq.csv").read_text().splitlines()
    assert csv[0].startswith("query_id,rank,") and len(csv) == 1 + len(t.gt.query_ids)
    assert "by behaviour" in out and "by scene" in out and "anomaly" in out and "street" in out


def test_evaluate_tie_rules(tiny_gt, tmp_path, capsys):
    t = tiny_gt(n_images=3, distractors=2)
    flat = SimsMatrix(t.sims.query_ids, t.gallery_ids, scores=torch.zeros(t.sims.shape)).save(tmp_path / "flat.pt")
    r1 = {}
    for ties in ("optimistic", "stable", "pessimistic"):
        code, _, err = run(capsys, "evaluate", flat, "--gt", t.annotation, "--ties", ties, "--json", tmp_path / "j")
        assert code == 0, err
        r1[ties] = json.loads((tmp_path / "j").read_text())["R@1"]
    assert r1["optimistic"] == 100.0 and r1["pessimistic"] == 0.0
    assert r1["stable"] == pytest.approx(100 / 3)  # only image "0" comes first in gallery order
    code, _, err = run(capsys, "evaluate", flat, "--gt", t.annotation, "--ties", "random")
    assert_one_line_error(code, err, "--ties must be one of stable, optimistic, pessimistic")


def test_evaluate_matrix_missing_a_query_writes_nothing(tiny_gt, tmp_path, capsys):
    t = tiny_gt(n_images=3)
    fewer = t.sims.select(query_ids=t.sims.query_ids[:-1]).save(tmp_path / "fewer.pt")
    code, _, err = run(capsys, "evaluate", fewer, "--gt", t.annotation, "--json", tmp_path / "m.json",
                       "--per-query", tmp_path / "pq.csv")  # fmt: skip
    assert_one_line_error(code, err, "ground-truth query 'p2:1' is not a row of the matrix")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "pq.csv").exists()


def test_missing_files_and_bad_by_column(tiny_gt, tmp_path, capsys):
    t = tiny_gt(n_images=2)
    code, _, err = run(capsys, "evaluate", tmp_path / "nope.pt", "--gt", t.annotation)
    assert_one_line_error(code, err, "nope.pt: file not found")
    code, _, err = run(capsys, "evaluate", t.sims_path, "--gt", tmp_path / "nope.json")
    assert_one_line_error(code, err, "nope.json: file not found")
    code, _, err = run(capsys, "evaluate", t.sims_path, "--gt", t.annotation, "--by", "colour")
    assert_one_line_error(code, err, "no ground-truth column 'colour'")
    code, _, err = run(capsys, "submit", t.sims_path, "--query-index", tmp_path / "qi.txt", "--out", tmp_path / "a")
    assert_one_line_error(code, err, "qi.txt: file not found")


def test_invalid_json_annotation_names_the_line(tiny_gt, tmp_path, capsys):
    t = tiny_gt(n_images=2)
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"image": "test/0.jpg",\n   "image_id": "p0" "caption": ["x"]}\n]')
    code, _, err = run(capsys, "evaluate", t.sims_path, "--gt", bad)
    assert_one_line_error(code, err, "bad.json, line 3: invalid JSON")


# ------------------------------------------------------------------------------------------------- bad matrices
def raw_matrix(path: Path, **override) -> Path:
    d = {"format": FORMAT, "query_ids": ["a", "b"], "gallery_ids": ["x", "y", "z"],
         "scores": torch.zeros(2, 3), "source": "t", "meta": {}}  # fmt: skip
    d.update(override)
    torch.save(d, path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "submit"])
def test_nan_and_duplicate_ids_are_refused(tmp_path, capsys, command):
    ann = tmp_path / "attr.json"
    ann.write_text(json.dumps([{"image": "t/x.jpg", "image_id": "a", "caption": ["c"]}]))
    qi = write_ids(tmp_path / "qi.txt", ["a", "b"])
    nan = torch.zeros(2, 3)
    nan[1, 2] = float("nan")
    cases = {
        raw_matrix(tmp_path / "nan.pt", scores=nan): "non-finite score nan at query 'b', gallery id 'z'",
        raw_matrix(tmp_path / "dupq.pt", query_ids=["a", "a"]): "duplicate query id 'a'",
        raw_matrix(tmp_path / "dupg.pt", gallery_ids=["x", "y", "x"]): "duplicate gallery id 'x'",
    }
    for path, message in cases.items():
        extra = ["--gt", ann] if command == "evaluate" else ["--query-index", qi, "--out", tmp_path / "out.txt"]
        code, _, err = run(capsys, command, path, *extra)
        assert_one_line_error(code, err, path.name, message)
    assert not (tmp_path / "out.txt").exists()


class _Marker:
    """Unpickling this object creates a marker file: proof that a load executed code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_object_file_is_refused_not_executed(tmp_path, capsys):
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "scores": _Marker(marker)}, evil)
    assert not marker.exists()
    qi = write_ids(tmp_path / "qi.txt", ["a"])
    ann = tmp_path / "attr.json"
    ann.write_text(json.dumps([{"image": "t/x.jpg", "image_id": "a", "caption": ["c"]}]))
    for argv in (
        ["evaluate", evil, "--gt", ann],
        ["submit", evil, "--query-index", qi, "--out", tmp_path / "a.txt"],
        ["import-legacy", evil, "--query-ids", qi, "--gallery-ids", qi, "--out", tmp_path / "x.pt"],
    ):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, "evil.pt", "pickled Python objects")
        assert not marker.exists()
    assert not (tmp_path / "a.txt").exists() and not (tmp_path / "x.pt").exists()
    # The file really is dangerous: a plain unpickle runs the payload (so the checks above can fail).
    with evil.open("rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------------- submit
def test_submit_writes_valid_file_and_zip(tiny_gt, tmp_path, capsys):
    t = tiny_gt(n_images=6, distractors=5)
    order = list(reversed(t.gt.query_ids))
    qi = write_ids(tmp_path / "query_index.txt", order)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for g in t.gallery_ids:
        (gallery / f"{g}.jpg").write_bytes(b"")
    out = tmp_path / "predictions" / "answer.txt"
    code, stdout, err = run(capsys, "submit", t.sims_path, "--query-index", qi, "--out", out, "--zip",
                            "--gallery", gallery)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "predictions" / "answer.zip").is_file()
    lines = out.read_text().splitlines()
    assert len(lines) == len(order)
    first = t.sims.scores[t.sims.query_ids.index(order[0])]
    assert lines[0].split(" ") == [t.gallery_ids[c] for c in first.sort(descending=True, stable=True).indices[:10]]
    code, stdout, err = run(capsys, "validate", out, "--query-index", qi, "--gallery", gallery)
    assert code == 0 and stdout.startswith("OK: ") and "ids checked against the gallery" in stdout


def test_submit_refuses_query_and_gallery_mismatches(tiny_gt, tmp_path, capsys):
    t = tiny_gt(n_images=6, distractors=5)
    out = tmp_path / "answer.txt"
    qi = write_ids(tmp_path / "qi.txt", [*t.gt.query_ids[:3], "ZZZ", *t.gt.query_ids[3:]])
    code, _, err = run(capsys, "submit", t.sims_path, "--query-index", qi, "--out", out)
    assert_one_line_error(code, err, "qi.txt: 1 of 13 query ids have no row in the matrix, first 'ZZZ' (line 4)")
    qi = write_ids(tmp_path / "qi.txt", t.gt.query_ids)
    gallery = write_ids(tmp_path / "gallery_ids.txt", [*t.gallery_ids[:-1], "other"])
    code, _, err = run(capsys, "submit", t.sims_path, "--query-index", qi, "--out", out, "--gallery", gallery)
    assert_one_line_error(code, err, "gallery_ids.txt: matrix gallery (11 ids) does not match the gallery (11 ids)",
                          "'d4'", "'other'")  # fmt: skip
    dup = write_ids(tmp_path / "dup.txt", [*t.gt.query_ids, t.gt.query_ids[0]])
    code, _, err = run(capsys, "submit", t.sims_path, "--query-index", dup, "--out", out)
    assert_one_line_error(code, err, "dup.txt, line 13: duplicate query id 'p0:0' (first on line 1)")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- validate
def test_validate_official_example_and_nine_ids_on_line_17(tmp_path, capsys):
    qi = FIXTURES / "query_index.txt"
    code, out, err = run(capsys, "validate", FIXTURES / "answer_example.txt", "--query-index", qi)
    assert code == 0, err
    assert "1978 lines x 10 ids, CRLF line ends" in out
    lines = (FIXTURES / "answer_example.txt").read_text().splitlines()
    lines[16] = " ".join(lines[16].split(" ")[:9])
    bad = tmp_path / "answer.txt"
    bad.write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "validate", bad, "--query-index", qi)
    assert_one_line_error(code, err, "answer.txt, line 17: expected 10 gallery ids, found 9")


def test_validate_as_a_real_process_has_no_traceback(tmp_path):
    lines = (FIXTURES / "answer_example.txt").read_text().splitlines()
    lines[16] = " ".join(lines[16].split(" ")[:9])
    bad = tmp_path / "answer.txt"
    bad.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-m", "tpas", "validate", str(bad), "--query-index",
                           str(FIXTURES / "query_index.txt")], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}, line 17: expected 10 gallery ids, found 9"]


# ------------------------------------------------------------------------------------------------- import-legacy
def test_import_legacy_round_trip_and_transpose(tmp_path, capsys):
    scores = torch.rand(3, 4)
    qi = write_ids(tmp_path / "qi.txt", ["q0", "q1", "q2"])
    gi = write_ids(tmp_path / "g.txt", ["g0", "g1", "g2", "g3"])
    torch.save(scores, tmp_path / "legacy.pt")
    torch.save(scores.T.clone(), tmp_path / "legacy_t.pt")
    code, _, err = run(capsys, "import-legacy", tmp_path / "legacy.pt", "--query-ids", qi, "--gallery-ids", gi,
                       "--out", tmp_path / "m.pt")  # fmt: skip
    assert code == 0, err
    m = SimsMatrix.load(tmp_path / "m.pt")
    assert m.query_ids == read_query_index(qi) and m.gallery_ids == ["g0", "g1", "g2", "g3"]
    assert torch.equal(m.scores, scores)
    code, _, err = run(capsys, "import-legacy", tmp_path / "legacy_t.pt", "--query-ids", qi, "--gallery-ids", gi,
                       "--out", tmp_path / "t.pt", "--transpose")  # fmt: skip
    assert code == 0 and torch.equal(SimsMatrix.load(tmp_path / "t.pt").scores, scores)
    code, _, err = run(capsys, "import-legacy", tmp_path / "legacy_t.pt", "--query-ids", qi, "--gallery-ids", gi,
                       "--out", tmp_path / "bad.pt")  # fmt: skip
    assert_one_line_error(code, err, "legacy_t.pt: scores have shape (4, 3) but there are 3 query ids and 4 gallery")
    assert not (tmp_path / "bad.pt").exists()


def test_import_legacy_gallery_folder_orders(tmp_path, capsys):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for g in ("b", "a", "c"):
        (gallery / f"{g}.jpg").write_bytes(b"")
    qi = write_ids(tmp_path / "qi.txt", ["q"])
    torch.save(torch.tensor([[1.0, 2.0, 3.0]]), tmp_path / "l.pt")
    for order, want in (("sorted", ["a", "b", "c"]), ("listdir", [Path(n).stem for n in os.listdir(gallery)])):
        code, _, err = run(capsys, "import-legacy", tmp_path / "l.pt", "--query-ids", qi, "--gallery-ids", gallery,
                           "--gallery-order", order, "--out", tmp_path / f"{order}.pt")  # fmt: skip
        assert code == 0, err
        assert SimsMatrix.load(tmp_path / f"{order}.pt").gallery_ids == want


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("tpas ")
