"""Fuzz the PAB readers (annotations, queries, query index, gallery id lists, ground truth) with broken files."""

from __future__ import annotations

import json

import pytest
from fuzzlib import dumps, fuzz_settings, json_objects_with, json_values, text_variants, valid_or_refused
from hypothesis import given
from hypothesis import strategies as st

from tpas.data import pab

TEST_RECORD = {"image": st.text(max_size=8), "image_id": st.text(max_size=4) | st.integers(), "caption": json_values}
TRAIN_RECORD = {
    "image": st.text(max_size=8),
    "caption": st.text(max_size=8),
    "image_id": st.text(max_size=4) | st.integers(),
    "normal": st.text(max_size=4),
    "anomaly": st.text(max_size=4),
    "hard_i_id": st.integers(),
    "scene": json_values,
}
QUERY = {"query_index": st.text(max_size=4) | st.integers(), "caption": json_values}

VALID_TEST = json.dumps([{"image": "test/0.jpg", "image_id": "p0", "caption": ["a man", "a woman"], "normal": "x"}])
VALID_QUERIES = '{"query_index": "001", "caption": "a man"}\n{"query_index": "002", "caption": "a woman"}\n'
VALID_IDS = "001\n002\n003\n"

READERS = {
    "test_annotation": pab.read_test_annotation,
    "train_annotation": pab.read_train_annotation,
    "queries": pab.read_queries,
    "ground_truth": pab.load_ground_truth,
}


def _files(records: dict) -> st.SearchStrategy[bytes]:
    """JSON lists of half-right records, JSON lines of them, or a valid file mutated."""
    rec = json_objects_with(records)
    return (
        st.lists(rec, max_size=4).map(dumps)
        | st.lists(rec, max_size=4).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode())
        | text_variants(VALID_TEST)
        | text_variants(VALID_QUERIES)
    )


@pytest.mark.parametrize("reader", sorted(READERS))
@fuzz_settings(150)
@given(data=st.data())
def test_json_readers_return_records_or_name_the_file(reader, data, tmp_path_factory):
    records = {"queries": QUERY, "train_annotation": TRAIN_RECORD}.get(reader, TEST_RECORD)
    suffix = data.draw(st.sampled_from([".json", ".txt"]))
    path = tmp_path_factory.getbasetemp() / f"fuzz-{reader}{suffix}"
    path.write_bytes(data.draw(_files(records)))
    valid_or_refused(READERS[reader], path)


@pytest.mark.parametrize("reader", ["query_index", "gallery_ids"])
@fuzz_settings(150)
@given(content=text_variants(VALID_IDS))
def test_id_list_readers_return_ids_or_name_the_file(reader, content, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / f"fuzz-{reader}.txt"
    path.write_bytes(content)
    read = pab.read_query_index if reader == "query_index" else pab.read_gallery_ids
    ids = valid_or_refused(read, path)
    if ids is not None:
        assert ids and len(set(ids)) == len(ids) and all(isinstance(i, str) and i for i in ids)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_deeply_nested_json_is_refused(reader, tmp_path):
    """json.loads raises RecursionError (not a JSONDecodeError) past ~1000 levels."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert valid_or_refused(READERS[reader], path) is None
