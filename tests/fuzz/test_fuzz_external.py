"""Fuzz the external run readers (TREC run files, query_id,gallery_id,score CSV) with broken files."""

from __future__ import annotations

import pytest
from fuzzlib import fuzz_settings, text_variants, valid_or_refused
from hypothesis import given
from hypothesis import strategies as st

from tpas.ensemble.external import read_run

QUERY_IDS = ["q1", "q2"]
GALLERY_IDS = ["g1", "g2", "g3"]
VALID = {
    ".trec": "q1 Q0 g1 1 0.9 run\nq1 Q0 g2 2 0.5 run\nq2 Q0 g3 1 0.7 run\n",
    ".csv": "query_id,gallery_id,score\nq1,g1,0.9\nq1,g2,0.5\nq2,g3,0.7\n",
}
_tokens = st.sampled_from(["q1", "q2", "g1", "g2", "g3", "Q0", "1", "0.5", "nan", "-inf", "1e999", "", "run", "#"])
_lines = st.lists(st.lists(_tokens, max_size=7), max_size=6)


def _join(rows: list[list[str]], sep: str) -> bytes:
    return "\n".join(sep.join(r) for r in rows).encode()


@pytest.mark.parametrize("suffix", sorted(VALID))
@fuzz_settings(200)
@given(data=st.data())
def test_run_files_give_a_matrix_or_name_the_file(suffix, data, tmp_path_factory):
    sep = " " if suffix == ".trec" else ","
    header = b"" if suffix == ".trec" else b"query_id,gallery_id,score\n"
    content = data.draw(text_variants(VALID[suffix]) | _lines.map(lambda rows: header + _join(rows, sep)))
    path = tmp_path_factory.getbasetemp() / f"fuzz-run{suffix}"
    path.write_bytes(content)
    sims = valid_or_refused(lambda p: read_run(p, QUERY_IDS, GALLERY_IDS), path)
    if sims is not None:
        assert sims.query_ids == QUERY_IDS and sims.gallery_ids == GALLERY_IDS


def test_a_csv_field_over_the_csv_module_limit_is_refused(tmp_path):
    """csv raises csv.Error past 131072 characters in one field (a file with an unclosed quote, say)."""
    path = tmp_path / "run.csv"
    path.write_text('query_id,gallery_id,score\nq1,"' + "g" * 200_000 + "\n")
    assert valid_or_refused(lambda p: read_run(p, QUERY_IDS, GALLERY_IDS), path) is None
