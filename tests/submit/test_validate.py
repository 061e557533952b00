"""Validator: accepts the official AICity'26 example, rejects corrupted copies naming the line."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

from tpas.errors import TpasInputError
from tpas.submit import validate_answer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "aicity26"
ANSWER = FIXTURES / "answer_example.txt"
QUERY_INDEX = FIXTURES / "query_index.txt"


def example_lines() -> list[str]:
    return ANSWER.read_bytes().decode().split("\r\n")[:-1]


def write_lines(path: Path, lines: list[str], end: str = "\r\n") -> Path:
    path.write_bytes("".join(line + end for line in lines).encode())
    return path


def test_official_example_is_valid_with_its_query_index():
    report = validate_answer(ANSWER, QUERY_INDEX)
    assert report.ok, report.problems
    assert (report.n_lines, report.n_queries, report.line_ending) == (1978, 1978, "CRLF")


def test_official_example_against_a_gallery_ids_file(tmp_path):
    ids = sorted({i for line in example_lines() for i in line.split(" ")})
    gallery = tmp_path / "gallery_ids.txt"
    gallery.write_text("\n".join(ids) + "\n")
    assert validate_answer(ANSWER, QUERY_INDEX, gallery).ok
    gallery.write_text("\n".join(i for i in ids if i != "OT6C4QNNMQFAF0J") + "\n")
    report = validate_answer(ANSWER, QUERY_INDEX, gallery)
    assert str(report.problems[0]) == "line 1: gallery id 'OT6C4QNNMQFAF0J' is not in the gallery"


def test_lf_copy_is_valid_too(tmp_path):
    assert validate_answer(write_lines(tmp_path / "a.txt", example_lines(), "\n"), QUERY_INDEX).ok


def corrupt(lines: list[str], how: str) -> tuple[list[str], str]:
    """Apply one corruption; returns the lines and the expected first problem."""
    ids = lines[16].split(" ")
    if how == "nine ids on line 17":
        lines[16] = " ".join(ids[:9])
        return lines, "line 17: expected 10 gallery ids, found 9"
    if how == "duplicate id":
        lines[16] = " ".join([*ids[:9], ids[0]])
        return lines, f"line 17: gallery id '{ids[0]}' appears more than once"
    if how == "double space":
        lines[16] = lines[16].replace(" ", "  ", 1)
        return lines, "line 17: more than one space between ids (column 16)"
    if how == "trailing space":
        lines[16] += " "
        return lines, "line 17: leading or trailing whitespace"
    if how == "tab":
        lines[16] = lines[16].replace(" ", "\t", 1)
        return lines, "line 17: tab character"
    if how == "missing line":
        del lines[16]
        return lines, "1977 ranking lines, but the query index has 1978 queries"
    if how == "query id first":
        lines[16] = "4AB9D3Y3OXW7AC6 " + lines[16]  # line 17 of query_index.txt
        return lines, "line 17: starts with its query id '4AB9D3Y3OXW7AC6'"
    if how == "blank line inside":
        lines.insert(16, "")
        return lines, "line 17: blank line; expected 10 gallery ids"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "nine ids on line 17",
        "duplicate id",
        "double space",
        "trailing space",
        "tab",
        "missing line",
        "query id first",
        "blank line inside",
    ],
)
def test_corrupted_copies_name_the_line(tmp_path, how):
    assert QUERY_INDEX.read_text().splitlines()[16] == "4AB9D3Y3OXW7AC6"
    lines, expected = corrupt(example_lines(), how)
    report = validate_answer(write_lines(tmp_path / "answer.txt", lines), QUERY_INDEX)
    assert not report.ok
    assert str(report.problems[0]).startswith(expected), report.problems
    with pytest.raises(TpasInputError, match=re.escape(f"answer.txt{', line 17' if 'line 17' in expected else ''}: ")):
        report.raise_first()


def test_byte_level_corruptions(tmp_path):
    raw = ANSWER.read_bytes()
    cases = {
        b"\xef\xbb\xbf" + raw: "line 1: the file starts with a UTF-8 byte-order mark",
        raw.replace(b"\r\n", b"\n", 5): "line 6: line ends with CRLF but line 1 ends with LF",
        raw + b"\r\n\r\n": "line 1979: blank line after the last ranking line",
        raw.replace(b"\r\n", b"\r", 1): "line 1: bare carriage return",
        b"": "the file is empty",
    }
    for data, expected in cases.items():
        f = tmp_path / "answer.txt"
        f.write_bytes(data)
        report = validate_answer(f, QUERY_INDEX)
        assert str(report.problems[0]).startswith(expected), (expected, report.problems[:2])


def test_no_final_newline_is_accepted(tmp_path):
    f = tmp_path / "answer.txt"
    f.write_bytes(ANSWER.read_bytes().removesuffix(b"\r\n"))
    assert validate_answer(f, QUERY_INDEX).ok


def test_problems_are_capped(tmp_path):
    lines = [" ".join(line.split(" ")[:9]) for line in example_lines()]
    report = validate_answer(write_lines(tmp_path / "a.txt", lines), QUERY_INDEX, max_problems=5)
    assert len(report.problems) == 5 and report.truncated


def test_bad_zip_and_missing_files(tmp_path):
    z = tmp_path / "sub.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("predictions.txt", "x")
    with pytest.raises(TpasInputError, match=r"must hold exactly 'answer\.txt'"):
        validate_answer(z, QUERY_INDEX)
    with pytest.raises(TpasInputError, match="file not found"):
        validate_answer(tmp_path / "nope.txt", QUERY_INDEX)
    with pytest.raises(TpasInputError, match="file not found"):
        validate_answer(ANSWER, tmp_path / "nope.txt")
