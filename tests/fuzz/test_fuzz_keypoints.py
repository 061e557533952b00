"""Fuzz the keypoint readers of `tpas pose --keypoints` (OpenPose JSON, COCO keypoint JSON) with broken files."""

from __future__ import annotations

import json

import numpy as np
from fuzzlib import dumps, fuzz_settings, json_objects_with, json_values, text_variants, valid_or_refused
from hypothesis import example, given
from hypothesis import strategies as st

from tpas.pose.keypoints import load_keypoints

_numbers = st.lists(st.integers(-5, 5) | st.floats(allow_nan=True, allow_infinity=True) | json_values, max_size=80)
_flat = st.sampled_from([51, 54, 75]).flatmap(lambda n: st.lists(st.floats(0, 100), min_size=n, max_size=n))
PERSON = {"pose_keypoints_2d": _flat | _numbers}
OPENPOSE = {"people": st.lists(json_objects_with(PERSON), max_size=3)}
IMAGE = {"id": st.integers(0, 3) | json_values, "file_name": st.sampled_from(["a.jpg", "b/c.png", "", ".", "x"])}
ANNOTATION = {"image_id": st.integers(0, 3) | json_values, "keypoints": _flat | _numbers}
COCO = {
    "images": st.lists(json_objects_with(IMAGE), max_size=3),
    "annotations": st.lists(json_objects_with(ANNOTATION), max_size=3) | json_values,
}
VALID_OPENPOSE = json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 54}]})
VALID_COCO = json.dumps(
    {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "keypoints": [1] * 51}]}
)


def _check(path):
    out = load_keypoints(path)
    for arr in out.values():
        assert isinstance(arr, np.ndarray) and arr.ndim == 3 and arr.shape[1:] == (18, 3)
    return out


# Crashes the fuzzer found (before the fix: TypeError, TypeError, ValueError, OverflowError, ValueError).
@example(content=b'{"images": [], "annotations": null}')
@example(content=b'{"images": [{"id": [1], "file_name": "a.jpg"}]}')
@example(content=b'{"images": [{"id": 1, "file_name": ""}]}')
@example(content=b'{"people": [{"pose_keypoints_2d": [1' + b"0" * 400 + b"]}]}")
@example(
    content=b'{"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 1, "keypoints": '
    + dumps(["x"] * 51)
    + b"}]}"
)
@fuzz_settings(300)
@given(
    content=json_objects_with(OPENPOSE).map(dumps)
    | json_objects_with(COCO).map(dumps)
    | text_variants(VALID_OPENPOSE)
    | text_variants(VALID_COCO)
)
def test_keypoint_files_give_keypoints_or_name_the_file(content, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz_keypoints.json"
    path.write_bytes(content)
    valid_or_refused(_check, path)


def test_deeply_nested_keypoint_json_is_refused(tmp_path):
    path = tmp_path / "deep_keypoints.json"
    path.write_text('{"people": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert valid_or_refused(_check, path) is None
