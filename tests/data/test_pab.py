"""PAB readers: every format, the id rules of DESIGN.md, and one clear error per malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpas.data.pab import (
    GalleryImage,
    Query,
    TestRecord,
    TrainRecord,
    list_gallery,
    load_ground_truth,
    read_gallery_ids,
    read_queries,
    read_query_index,
    read_test_annotation,
    read_train_annotation,
)
from tpas.errors import TpasInputError

TEST_RECORDS = [
    {
        "image": "test/0.jpg",
        "image_id": "p0",
        "caption": ["a man falls", "a man slips"],
        "anomaly": "Falling",
        "scene": "street",
    },
    {"image": "test/1.jpg", "image_id": "p1", "caption": ["a woman walks"], "normal": "Walking", "scene": "park"},
]

TRAIN_RECORD = {
    "image": "train/imgs_0/goal/0.jpg",
    "caption": "The image shows a man",
    "image_id": "0_0",
    "hard_i": "imgs_0/full/0.jpg",
    "hard_c": "The image shows a man falling",
    "hard_i_id": "0_8954",
    "source_id": "1_0",
    "source_caption": "band was performing under a big tent",
    "normal": "Performing",
    "scene": "outdoor concert",
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def raises(match: str):
    return pytest.raises(TpasInputError, match=match)


# ------------------------------------------------------------------------------------------- test annotation
def test_test_annotation_records_and_attrs(tmp_path):
    recs = read_test_annotation(write(tmp_path / "attr.json", json.dumps(TEST_RECORDS)))
    assert recs[0] == TestRecord(
        "test/0.jpg", "p0", ["a man falls", "a man slips"], {"anomaly": "Falling", "scene": "street"}
    )
    assert recs[1].gallery_id == "1"
    assert recs[1].attrs == {"normal": "Walking", "scene": "park"}


def test_test_annotation_single_caption_string_and_int_image_id(tmp_path):
    recs = read_test_annotation(
        write(tmp_path / "a.json", json.dumps([{"image": "x/7.png", "image_id": 7, "caption": "one"}]))
    )
    assert recs == [TestRecord("x/7.png", "7", ["one"], {})]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"image_id": "a", "caption": ["c"]}, "record 1 \\(0-based\\): expected field 'image'"),
        ({"image": "t/1.jpg", "caption": ["c"]}, "record 1 \\(0-based\\): expected field 'image_id'"),
        ({"image": "t/1.jpg", "image_id": "a", "caption": []}, "record 1 \\(0-based\\): expected field 'caption'"),
        ({"image": "t/1.jpg", "image_id": "a", "caption": [3]}, "expected field 'caption'"),
        ("oops", "record 1 \\(0-based\\): expected an object"),
    ],
)
def test_test_annotation_malformed_record_names_record_and_field(tmp_path, record, expected):
    f = write(tmp_path / "attr.json", json.dumps([TEST_RECORDS[0], record]))
    with raises(expected) as e:
        read_test_annotation(f)
    assert e.value.path == f


def test_invalid_json_reports_line(tmp_path):
    f = write(tmp_path / "attr.json", '[\n{"image": "t/0.jpg",\n "image_id": "a"\n "caption": ["x"]}]')
    with raises("line 4: invalid JSON"):
        read_test_annotation(f)


def test_not_a_list_and_missing_file(tmp_path):
    with raises("expected a JSON list of test records, found a JSON object"):
        read_test_annotation(write(tmp_path / "attr.json", "{}"))
    with raises("file not found"):
        read_test_annotation(tmp_path / "nope.json")
    with raises("expected a file, found a folder"):
        read_test_annotation(tmp_path)


# ------------------------------------------------------------------------------------------- train annotation
def test_train_record_fields(tmp_path):
    anomalous = dict(TRAIN_RECORD, image_id="0_1")
    del anomalous["normal"]
    anomalous["anomaly"] = "Falling"
    minimal = {"image": "train/x.jpg", "caption": "c", "image_id": 5}
    f = write(tmp_path / "attr_0.json", json.dumps([TRAIN_RECORD, anomalous, minimal]))
    recs = read_train_annotation(f)
    assert recs[0] == TrainRecord(
        "train/imgs_0/goal/0.jpg",
        "The image shows a man",
        "0_0",
        "imgs_0/full/0.jpg",
        "The image shows a man falling",
        "0_8954",
        "1_0",
        "band was performing under a big tent",
        "Performing",
        False,
        "outdoor concert",
    )
    assert (recs[1].action, recs[1].is_anomaly) == ("Falling", True)
    assert recs[2] == TrainRecord("train/x.jpg", "c", "5")
    assert recs[2].is_anomaly is None and recs[2].hard_i is None


def test_train_folder_and_glob_read_in_natural_order(tmp_path):
    d = tmp_path / "train"
    for n in (10, 2, 0):
        write(d / f"attr_{n}.json", json.dumps([dict(TRAIN_RECORD, image_id=f"id{n}")]))
    write(d / "pair_1.json", json.dumps([dict(TRAIN_RECORD, image_id="pair1")]))
    write(d / "notes.json", "not json at all")  # ignored: not attr_*/pair_*
    assert [r.image_id for r in read_train_annotation(d)] == ["id0", "id2", "id10", "pair1"]
    assert [r.image_id for r in read_train_annotation(str(d / "attr_*.json"))] == ["id0", "id2", "id10"]
    assert [r.image_id for r in read_train_annotation([d / "attr_2.json", d / "attr_0.json"])] == ["id2", "id0"]
    with raises("no file matches"):
        read_train_annotation(str(d / "zzz_*.json"))
    (tmp_path / "empty").mkdir()
    with raises("holds no attr_"):
        read_train_annotation(tmp_path / "empty")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"caption": None}, "expected field 'caption'"),
        ({"image_id": 1.5}, "expected field 'image_id'"),
        ({"anomaly": "Falling"}, "either 'normal' or 'anomaly', not both"),
        ({"scene": ["a"]}, "expected field 'scene' to be a string"),
    ],
)
def test_train_malformed_record_names_file_record_and_field(tmp_path, change, expected):
    f = write(tmp_path / "pair_3.json", json.dumps([TRAIN_RECORD, TRAIN_RECORD, dict(TRAIN_RECORD, **change)]))
    with raises(expected) as e:
        read_train_annotation(tmp_path)
    assert e.value.path == f and e.value.where == "record 2 (0-based)"


# ------------------------------------------------------------------------------------------- queries
def test_name_masked_query_json_keeps_numeric_looking_ids_as_strings(tmp_path):
    f = write(
        tmp_path / "query.json",
        '{"query_index": "0012", "caption": "a"}\r\n\n{"query_index": "100018684969009", "caption": "b"}\n',
    )
    assert read_queries(f) == [Query("0012", "a"), Query("100018684969009", "b")]


def test_query_json_numeric_index_is_refused(tmp_path):
    f = write(tmp_path / "query.json", '{"query_index": "A", "caption": "a"}\n{"query_index": 12, "caption": "b"}')
    with raises("line 2: expected field 'query_index'.*leading zeros"):
        read_queries(f)


def test_query_json_bad_line_and_duplicate(tmp_path):
    with raises("line 2: invalid JSON"):
        read_queries(write(tmp_path / "q.json", '{"query_index": "A", "caption": "a"}\n{"query_index": "B",'))
    with raises("line 2: duplicate query id 'A'"):
        read_queries(
            write(tmp_path / "q.json", '{"query_index": "A", "caption": "a"}\n{"query_index": "A", "caption": "b"}')
        )


def test_queries_from_test_annotation_use_image_id_and_caption_index(tmp_path):
    f = write(tmp_path / "attr.json", json.dumps(TEST_RECORDS))
    assert read_queries(f) == [
        Query("p0:0", "a man falls"),
        Query("p0:1", "a man slips"),
        Query("p1:0", "a woman walks"),
    ]


def test_queries_from_string_list_and_text(tmp_path):
    assert read_queries(write(tmp_path / "q.json", '["x", "y"]')) == [Query("0", "x"), Query("1", "y")]
    assert read_queries(write(tmp_path / "q.txt", "\ufeffa red coat\r\n[bracket first]\r\n\r\n")) == [
        Query("0", "a red coat"),
        Query("1", "[bracket first]"),
    ]
    with raises("line 2: blank line"):
        read_queries(write(tmp_path / "q.txt", "a\n\nb\n"))


# ------------------------------------------------------------------------------------------- query index
def test_query_index_crlf_bom_and_strings(tmp_path):
    f = write(tmp_path / "query_index.txt", "\ufeffIGMVCNHLXVJKBLN\r\n00123\r\n")
    assert read_query_index(f) == ["IGMVCNHLXVJKBLN", "00123"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A\nB\nA\n", "line 3: duplicate query id 'A' \\(first on line 1\\)"),
        ("A\n B\n", "line 2: expected exactly one query id"),
        ("A\nB C\n", "line 2: expected exactly one query id"),
        ("A\n\nB\n", "line 2: blank line"),
        ("\n\n", "holds no query ids"),
    ],
)
def test_query_index_errors_name_the_line(tmp_path, text, expected):
    with raises(expected):
        read_query_index(write(tmp_path / "query_index.txt", text))


# ------------------------------------------------------------------------------------------- gallery
def test_gallery_recursive_sorted_by_stem(tmp_path):
    for rel in ("b/Z9.jpg", "a/0001.PNG", "c.jpeg", "readme.txt"):
        write(tmp_path / "g" / rel, "x")
    got = list_gallery(tmp_path / "g")
    assert got == [
        GalleryImage("0001", tmp_path / "g/a/0001.PNG"),
        GalleryImage("Z9", tmp_path / "g/b/Z9.jpg"),
        GalleryImage("c", tmp_path / "g/c.jpeg"),
    ]
    assert read_gallery_ids(tmp_path / "g") == ["0001", "Z9", "c"]
    assert read_gallery_ids(write(tmp_path / "ids.txt", "x\ny\n")) == ["x", "y"]


def test_gallery_duplicate_stem_missing_and_empty(tmp_path):
    write(tmp_path / "g/a/1.jpg", "x")
    write(tmp_path / "g/b/1.png", "x")
    with raises("two images share the id '1'"):
        list_gallery(tmp_path / "g")
    with raises("gallery folder not found"):
        list_gallery(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with raises("no image files"):
        list_gallery(tmp_path / "empty")


# ------------------------------------------------------------------------------------------- ground truth
def test_ground_truth_ids_relevant_and_frame(tmp_path):
    gt = load_ground_truth(write(tmp_path / "attr.json", json.dumps(TEST_RECORDS)))
    assert gt.query_ids == ["p0:0", "p0:1", "p1:0"]
    assert gt.relevant == {"p0:0": "0", "p0:1": "0", "p1:0": "1"}
    f = gt.frame
    assert list(f.index) == gt.query_ids
    assert list(f["behaviour"]) == ["anomaly", "anomaly", "normal"]
    assert list(f["action"]) == ["Falling", "Falling", "Walking"]
    assert list(f["scene"]) == ["street", "street", "park"]
    assert f.loc["p0:1", "caption"] == "a man slips"
    assert gt.identity_groups() == {"p0": ["0"], "p1": ["1"]}


def test_ground_truth_missing_attribute_is_empty_string(tmp_path):
    recs = [TEST_RECORDS[0], {"image": "test/9.jpg", "image_id": "p9", "caption": ["c"]}]
    gt = load_ground_truth(write(tmp_path / "attr.json", json.dumps(recs)))
    assert list(gt.frame["scene"]) == ["street", "street", ""]
    assert list(gt.frame["behaviour"]) == ["anomaly", "anomaly", ""]


def test_ground_truth_repeated_image_id_is_an_error(tmp_path):
    recs = [TEST_RECORDS[0], dict(TEST_RECORDS[1], image_id="p0")]
    with raises("record 1 \\(0-based\\): query id 'p0:0' repeats record 0"):
        load_ground_truth(write(tmp_path / "attr.json", json.dumps(recs)))


def test_ground_truth_uses_a_records_query_index_as_its_query_id(tmp_path):
    """A name-masked ground truth scores the matrix rows `tpas infer` wrote from query.json (ids = query_index)."""
    recs = [
        {"image": "gallery/AB12.jpg", "image_id": "p0", "caption": ["a man falls"], "query_index": "007"},
        {"image": "gallery/CD34.jpg", "image_id": "p1", "caption": ["a woman walks"], "query_index": "QX"},
    ]
    path = write(tmp_path / "ground_truth.json", json.dumps(recs))
    gt = load_ground_truth(path)
    assert gt.query_ids == ["007", "QX"] and gt.relevant == {"007": "AB12", "QX": "CD34"}
    assert "query_index" not in gt.frame.columns
    recs[1]["caption"] = ["one", "two"]
    with raises("record 1 \\(0-based\\): a record with a 'query_index' must hold exactly one caption, found 2"):
        load_ground_truth(write(tmp_path / "bad.json", json.dumps(recs)))


def test_test_record_is_not_collected_as_a_test():
    assert TestRecord.__test__ is False
