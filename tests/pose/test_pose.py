"""Pose maps: golden rendering, keypoint readers (OpenPose COCO-18 / BODY_25, COCO-17), `make_pose_maps`, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tpas.cli import app, main
from tpas.errors import TpasInputError
from tpas.pose import (
    COLORS,
    LIMBS,
    coco17_to_coco18,
    get_detector,
    load_keypoints,
    make_pose_maps,
    read_openpose_json,
    register_detector,
    render_pose_map,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# The golden image's keypoints: a standing figure without its right ear, and a smaller one without right elbow/wrist.
FIGURE = np.array(
    [[60, 20, 1], [60, 40, 1], [45, 40, 1], [40, 60, 1], [38, 80, 1], [75, 40, 1], [80, 60, 1], [82, 80, 1],
     [50, 85, 1], [48, 110, 1], [47, 135, 1], [70, 85, 1], [72, 110, 1], [73, 135, 1], [56, 17, 1], [64, 17, 1],
     [52, 19, 0.0], [68, 19, 1]],
    dtype=np.float32,
)  # fmt: skip


def two_people() -> np.ndarray:
    second = FIGURE.copy()
    second[:, :2] = second[:, :2] * 0.4 + np.array([95, 80])
    second[3:5, 2] = 0
    return np.stack([FIGURE, second])


def test_golden_image_pixel_exact():
    got = np.asarray(render_pose_map(two_people(), (140, 150)))
    want = np.asarray(Image.open(FIXTURES / "pose_golden_two_people.png").convert("RGB"))
    assert got.shape == want.shape == (150, 140, 3)
    assert np.array_equal(got, want)


def test_rendering_facts():
    img = np.asarray(render_pose_map(FIGURE, (140, 150)))
    # Every present joint is a disc of its full OpenPose colour; the missing right ear (16) is not drawn.
    for j in (0, 1, 4, 7, 10, 13, 17):
        x, y = FIGURE[j, :2].astype(int)
        assert tuple(img[y, x]) == COLORS[j]
    assert not (img == np.array(COLORS[16], dtype=np.uint8)).all(-1).any()
    # A limb's middle has the limb colour at 60 %: neck (1) -> right hip (8) is limb 6.
    assert LIMBS[6] == (1, 8)
    mx, my = ((FIGURE[1, :2] + FIGURE[8, :2]) / 2).astype(int)
    assert tuple(img[my, mx]) == tuple(int(c * 0.6) for c in COLORS[6])
    # Background stays black; no person -> all black.
    assert tuple(img[0, 0]) == (0, 0, 0) and tuple(img[149, 139]) == (0, 0, 0)
    assert not np.asarray(render_pose_map(np.zeros((0, 18, 3)), (30, 20))).any()
    with pytest.raises(ValueError, match=r"\[18, 3\]"):
        render_pose_map(np.zeros((17, 3)), (10, 10))


def test_openpose_and_coco_readers(tmp_path):
    flat18 = FIGURE.reshape(-1).tolist()
    body25 = np.zeros((25, 3), dtype=np.float32)
    body25[[0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]] = FIGURE
    body25[8] = (99, 99, 1)  # mid-hip: not a COCO-18 joint
    (tmp_path / "a_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": flat18}]}))
    (tmp_path / "b_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": body25.ravel().tolist()}]}))
    (tmp_path / "c_keypoints.json").write_text(json.dumps({"people": []}))
    kps = load_keypoints(tmp_path)
    assert set(kps) == {"a", "b", "c"}
    assert np.array_equal(kps["a"][0], FIGURE) and np.array_equal(kps["b"][0], FIGURE)
    assert kps["c"].shape == (0, 18, 3)
    # COCO-17 -> 18: joint order and a neck at the mid-shoulders.
    kp17 = np.zeros((17, 3), dtype=np.float32)
    kp17[5] = (10, 20, 2)  # left shoulder
    kp17[6] = (30, 20, 1)  # right shoulder
    kp17[0] = (20, 5, 2)
    kp18 = coco17_to_coco18(kp17)
    assert tuple(kp18[1]) == (20, 20, 1) and tuple(kp18[5]) == (10, 20, 2) and tuple(kp18[2]) == (30, 20, 1)
    kp17[6, 2] = 0
    assert tuple(coco17_to_coco18(kp17)[1]) == (0, 0, 0)
    coco = {
        "images": [{"id": 7, "file_name": "sub/x.jpg"}, {"id": 8, "file_name": "y.jpg"}],
        "annotations": [{"image_id": 7, "keypoints": np.concatenate([kp17[:, :2], np.full((17, 1), 2)], 1).ravel()
                         .tolist()}],
    }  # fmt: skip
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    got = load_keypoints(tmp_path / "coco.json")
    assert got["sub/x"].shape == (1, 18, 3) and got["y"].shape == (0, 18, 3)
    assert got["sub/x"][0, 1, 2] == 1.0  # both shoulders labelled -> neck present
    # Malformed input names file and record.
    (tmp_path / "bad_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": [1, 2, 3]}]}))
    with pytest.raises(TpasInputError, match=r"people\[0\].*3 values"):
        read_openpose_json(tmp_path / "bad_keypoints.json")


def _gallery(root: Path) -> tuple[Path, Path]:
    images, kpdir = root / "images", root / "kp"
    (images / "cam1").mkdir(parents=True)
    kpdir.mkdir()
    Image.new("RGB", (140, 150), (90, 90, 90)).save(images / "cam1" / "p1.jpg")
    Image.new("RGB", (60, 40), (10, 200, 10)).save(images / "empty.png")
    Image.new("RGB", (50, 50), (0, 0, 200)).save(images / "nokp.png")
    people = {"people": [{"pose_keypoints_2d": p.ravel().tolist()} for p in two_people()]}
    (kpdir / "p1_keypoints.json").write_text(json.dumps(people))  # found by stem (no cam1/ folder in kp/)
    (kpdir / "empty_keypoints.json").write_text(json.dumps({"people": []}))
    return images, kpdir


def test_make_pose_maps_from_keypoints(tmp_path):
    images, kpdir = _gallery(tmp_path)
    out = tmp_path / "pose"
    seen = []
    report = make_pose_maps(images, out, keypoints=kpdir, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (3, 3)
    assert report.images == 3 and report.with_person == 1
    assert report.no_person == ["empty.png", "nokp.png"] and report.no_keypoints == ["nokp.png"]
    p1 = Image.open(out / "cam1" / "p1.jpg")
    assert p1.size == (140, 150)
    golden = np.asarray(Image.open(FIXTURES / "pose_golden_two_people.png").convert("RGB")).astype(int)
    # Same drawing through JPEG: the error is a small fraction of the drawing's own energy.
    assert np.abs(np.asarray(p1.convert("RGB")).astype(int) - golden).mean() < 0.25 * golden.mean()
    empty = Image.open(out / "empty.png")
    assert empty.size == (60, 40) and not np.asarray(empty).any()
    log = json.loads((out / "pose_log.json").read_text())
    assert log["no_person"] == ["empty.png", "nokp.png"] and log["with_person"] == 1
    assert not [p for p in out.rglob("*.tmp")]


def test_detector_backend_is_pluggable(tmp_path):
    @register_detector("fake-test")
    class Fake:
        name = "fake-test"

        def __init__(self, weights: Path, **options):
            self.weights = weights

        def detect(self, image):
            return FIGURE[None] if image.size == (140, 150) else np.zeros((0, 18, 3), np.float32)

    images, _ = _gallery(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    det = get_detector("fake-test", tmp_path / "w.bin")
    report = make_pose_maps(images, tmp_path / "out", detector=det)
    assert report.with_person == 1 and report.no_person == ["empty.png", "nokp.png"] and report.no_keypoints == []
    with pytest.raises(TpasInputError, match="unknown pose detector"):
        get_detector("nope", tmp_path / "w.bin")
    with pytest.raises(TpasInputError, match="weights file not found"):
        get_detector("keypointrcnn", tmp_path / "missing.pth")
    (tmp_path / "lfs.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n")
    with pytest.raises(TpasInputError, match="LFS"):
        get_detector("keypointrcnn", tmp_path / "lfs.pth")


def test_cli_pose(tmp_path):
    images, kpdir = _gallery(tmp_path)
    res = CliRunner().invoke(app, ["pose", "--images", str(images), "--out", str(tmp_path / "o"), "--keypoints",
                                   str(kpdir)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "3 pose maps, 1 with a person, 2 all-black" in res.output
    assert (tmp_path / "o" / "cam1" / "p1.jpg").is_file()
    for argv in (
        ["pose", "--images", str(images), "--out", str(tmp_path / "o2")],  # neither keypoints nor detector
        ["pose", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o3"), "--keypoints", str(kpdir)],
        ["pose", "--images", str(images), "--out", str(tmp_path / "o4"), "--detector", "keypointrcnn"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o4").exists()
