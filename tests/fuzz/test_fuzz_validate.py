"""Fuzz the answer validator with broken ranking files and submission zips."""

from __future__ import annotations

import io
import warnings
import zipfile

import pytest
from fuzzlib import fuzz_settings, mutate, text_variants, valid_or_refused
from hypothesis import given
from hypothesis import strategies as st

from tpas.errors import TpasInputError
from tpas.submit import validate
from tpas.submit.validate import validate_answer

QUERY_IDS = ["q1", "q2", "q3"]
GALLERY = [f"g{i}" for i in range(12)]
VALID_ANSWER = "".join(" ".join(GALLERY[i : i + 10]) + "\n" for i in range(3))


def _zip(members: list[tuple[str, bytes]], method: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression=method) as z:
        warnings.simplefilter("ignore")  # duplicate member names are one of the broken cases
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


VALID_ZIP = _zip([("answer.txt", VALID_ANSWER.encode())], zipfile.ZIP_DEFLATED)
_members = st.lists(
    st.tuples(
        st.sampled_from(["answer.txt", "answer.txt", "other.txt", "dir/", "../answer.txt"]), text_variants(VALID_ANSWER)
    ),
    max_size=3,
)
_zips = st.builds(_zip, _members, st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2]))


def _validate(path):
    report = validate_answer(path, list(QUERY_IDS), list(GALLERY), k=10, max_problems=5)
    assert report.ok == (not report.problems)
    return report


@fuzz_settings(200)
@given(content=text_variants(VALID_ANSWER))
def test_text_answers_give_a_report_or_name_the_file(content, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-answer.txt"
    path.write_bytes(content)
    valid_or_refused(_validate, path)


@fuzz_settings(200)
@given(content=_zips | mutate(VALID_ZIP))
def test_zip_answers_give_a_report_or_name_the_file(content, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-answer.zip"
    path.write_bytes(content)
    valid_or_refused(_validate, path)


def test_a_zip_bomb_is_refused_without_inflating_it(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "MAX_ANSWER_BYTES", 1 << 10)
    path = tmp_path / "answer.zip"
    path.write_bytes(_zip([("answer.txt", b"0" * (1 << 20))], zipfile.ZIP_DEFLATED))
    with pytest.raises(TpasInputError, match="inflates to more than"):
        _validate(path)


def test_an_encrypted_or_unsupported_member_is_refused(tmp_path):
    data = bytearray(VALID_ZIP)
    # Set the "encrypted" flag bit in the local and central headers; zipfile then asks for a password.
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = data.index(sig) + (6 if sig == b"PK\x03\x04" else 8)
        data[at] |= 1
    path = tmp_path / "answer.zip"
    path.write_bytes(bytes(data))
    assert valid_or_refused(_validate, path) is None
