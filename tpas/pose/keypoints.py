"""Reading precomputed keypoints: OpenPose `*_keypoints.json` files and COCO-format keypoint annotations.

Everything is returned in OpenPose COCO-18 order as float arrays [N_people, 18, 3] (x, y, confidence), keyed by the
image's path relative to the image folder without its suffix (posix), e.g. `imgs_0/abc`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TpasInputError

# COCO-17 index for each COCO-18 joint; the neck (index 1) is the mid-point of the shoulders.
COCO17_TO_18 = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# BODY_25 index for each COCO-18 joint (BODY_25 adds mid-hip at 8 and the feet).
BODY25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

OPENPOSE_SUFFIX = "_keypoints.json"


def coco17_to_coco18(kp17: np.ndarray) -> np.ndarray:
    """[..., 17, 3] COCO keypoints (x, y, score-or-visibility) -> [..., 18, 3] OpenPose order with a neck joint.

    The neck is the mid-point of the two shoulders when both are present (confidence = the smaller of the two),
    otherwise missing (0, 0, 0).
    """
    kp17 = np.asarray(kp17, dtype=np.float32)
    out = np.zeros((*kp17.shape[:-2], 18, 3), dtype=np.float32)
    for j18, j17 in enumerate(COCO17_TO_18):
        if j17 is not None:
            out[..., j18, :] = kp17[..., j17, :]
    ls, rs = kp17[..., 5, :], kp17[..., 6, :]
    both = (ls[..., 2] > 0) & (rs[..., 2] > 0)
    neck = np.concatenate([(ls[..., :2] + rs[..., :2]) / 2, np.minimum(ls[..., 2:], rs[..., 2:])], axis=-1)
    out[..., 1, :] = np.where(both[..., None], neck, 0.0)
    return out


def _finite_array(values: Any, path: Path, where: str, what: str) -> np.ndarray:
    """A JSON list of numbers as float32; TpasInputError for anything else, or for a value float32 cannot hold."""
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise TpasInputError(f"{what} must be a list of numbers", path, where)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except OverflowError:  # an integer beyond float range
        arr = np.array([np.inf])
    if not np.isfinite(arr).all() or (np.abs(arr) > np.finfo(np.float32).max).any():
        raise TpasInputError(f"{what} holds a value that is not a finite number", path, where)
    return arr.astype(np.float32)


def _person_from_flat(values: Any, path: Path, where: str) -> np.ndarray:
    arr = _finite_array(values, path, where, "pose_keypoints_2d")
    if arr.size == 54:
        return arr.reshape(18, 3)
    if arr.size == 75:
        return arr.reshape(25, 3)[list(BODY25_TO_18)]
    if arr.size == 51:
        return coco17_to_coco18(arr.reshape(17, 3))
    raise TpasInputError(
        f"pose_keypoints_2d has {arr.size} values; expected 54 (COCO-18), 75 (BODY_25) or 51 (COCO-17)", path, where
    )


def _read_json(path: Path, kind: str) -> Any:
    """A keypoint file's JSON; one clear error naming the file and the expected format otherwise."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TpasInputError(f"not a readable {kind} keypoint JSON ({e})", path) from None
    except RecursionError:  # json.loads gives up on deep nesting with RecursionError, not JSONDecodeError
        raise TpasInputError(f"not a readable {kind} keypoint JSON (nested too deeply)", path) from None


def read_openpose_json(path: str | Path) -> np.ndarray:
    """One OpenPose output file (`{"people": [{"pose_keypoints_2d": [...]}, ...]}`) -> [N, 18, 3]."""
    path = Path(path)
    data = _read_json(path, "OpenPose")
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise TpasInputError('expected an OpenPose object with a "people" list', path)
    people = []
    for i, person in enumerate(data["people"]):
        if not isinstance(person, dict) or "pose_keypoints_2d" not in person:
            raise TpasInputError('person has no "pose_keypoints_2d"', path, f"people[{i}]")
        people.append(_person_from_flat(person["pose_keypoints_2d"], path, f"people[{i}]"))
    return np.stack(people) if people else np.zeros((0, 18, 3), dtype=np.float32)


def read_coco_keypoints(path: str | Path) -> dict[str, np.ndarray]:
    """COCO keypoint annotations (`images` + `annotations` with 17 keypoints, visibility 0/1/2) -> {key: [N, 18, 3]}.

    Keys are the images' `file_name` without suffix; a visible or occluded-but-labelled joint (v > 0) gets
    confidence 1, an unlabelled one 0. Images without annotations map to an empty array.
    """
    path = Path(path)
    data = _read_json(path, "COCO")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise TpasInputError('expected a COCO object with "images" and "annotations" lists', path)
    names: dict[int | str, str] = {}
    for i, img in enumerate(data["images"]):
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(img, dict) or not _is_id(img.get("id")) or not isinstance(file_name, str):
            raise TpasInputError('image entry needs "id" (a number or string) and "file_name"', path, f"images[{i}]")
        if Path(file_name).name in ("", ".", ".."):
            raise TpasInputError(f"file_name {file_name!r} names no file", path, f"images[{i}]")
        names[img["id"]] = Path(file_name).with_suffix("").as_posix()
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise TpasInputError('"annotations" must be a list', path)
    people: dict[str, list[np.ndarray]] = {n: [] for n in names.values()}
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")) or ann["image_id"] not in names:
            raise TpasInputError("annotation refers to no listed image", path, where)
        kp = ann.get("keypoints")
        if not isinstance(kp, list) or len(kp) != 51:
            raise TpasInputError("keypoints must be 51 numbers (17 x (x, y, v))", path, where)
        arr = _finite_array(kp, path, where, "keypoints").reshape(17, 3)
        arr[:, 2] = (arr[:, 2] > 0).astype(np.float32)
        people[names[ann["image_id"]]].append(coco17_to_coco18(arr))
    return {k: np.stack(v) if v else np.zeros((0, 18, 3), dtype=np.float32) for k, v in people.items()}


def _is_id(v: Any) -> bool:
    """COCO ids are numbers (strings from some exporters); anything else cannot key the image table."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def load_keypoints(source: str | Path) -> dict[str, np.ndarray]:
    """Keypoints from a folder of OpenPose `*_keypoints.json` files (searched recursively; key = relative path minus
    `_keypoints.json`), one OpenPose file, or a COCO annotation file. Returns {key: [N, 18, 3]}."""
    source = Path(source)
    if source.is_dir():
        out = {}
        for f in sorted(source.rglob(f"*{OPENPOSE_SUFFIX}")):
            rel = f.relative_to(source).as_posix()
            out[rel[: -len(OPENPOSE_SUFFIX)]] = read_openpose_json(f)
        if not out:
            raise TpasInputError(f"no OpenPose *{OPENPOSE_SUFFIX} files found", source)
        return out
    if not source.is_file():
        raise TpasInputError("keypoint file or folder not found", source)
    head = _read_json(source, "OpenPose or COCO")
    if isinstance(head, dict) and "people" in head:
        name = source.name
        key = name[: -len(OPENPOSE_SUFFIX)] if name.endswith(OPENPOSE_SUFFIX) else source.stem
        return {key: read_openpose_json(source)}
    if isinstance(head, dict) and "images" in head:
        return read_coco_keypoints(source)
    raise TpasInputError('expected OpenPose ("people") or COCO ("images"/"annotations") keypoint JSON', source)


class KeypointIndex:
    """Find an image's keypoints by its path relative to the image folder: exact relative path minus suffix first,
    else the bare file stem when exactly one entry has it."""

    def __init__(self, keypoints: dict[str, np.ndarray]) -> None:
        self.keypoints = keypoints
        self._by_stem: dict[str, str | None] = {}
        for k in keypoints:
            stem = k.rsplit("/", 1)[-1]
            # None marks an ambiguous stem: two entries share it, so only exact paths can match.
            self._by_stem[stem] = None if stem in self._by_stem else k

    def get(self, rel_path: Path) -> np.ndarray | None:
        """Keypoints [N, 18, 3] of the image at `rel_path`, or None when absent or ambiguous."""
        key = rel_path.with_suffix("").as_posix()
        if key in self.keypoints:
            return self.keypoints[key]
        found = self._by_stem.get(rel_path.stem)
        return self.keypoints[found] if found is not None else None
