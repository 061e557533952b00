"""`tpas pose`: a pose map for every image of a folder, from precomputed keypoints or a detector backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.pab import IMAGE_SUFFIXES
from ..errors import TpasInputError
from ..io import atomic_write
from .detect import PoseDetector
from .keypoints import KeypointIndex, load_keypoints
from .render import render_pose_map

LOG_NAME = "pose_log.json"
_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


@dataclass
class PoseRunReport:
    """What `make_pose_maps` did. `no_person` lists (relative paths) the images that got an all-black map."""

    images: int = 0
    with_person: int = 0
    no_person: list[str] = field(default_factory=list)
    no_keypoints: list[str] = field(default_factory=list)
    source: str = ""
    log_path: Path | None = None


def list_images(images_dir: Path) -> list[Path]:
    """Image files under `images_dir` (recursive), sorted by relative path."""
    if not images_dir.is_dir():
        raise TpasInputError("image folder not found", images_dir)
    files = [p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        raise TpasInputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found", images_dir)
    return sorted(files, key=lambda p: p.relative_to(images_dir).as_posix())


def make_pose_maps(
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    keypoints: str | Path | None = None,
    detector: PoseDetector | None = None,
    stick_width: int = 4,
    radius: int = 4,
    min_confidence: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> PoseRunReport:
    """Render `out_dir/<relative path>` (same name, same size) for every image under `images_dir`.

    Keypoints come from `keypoints` (OpenPose folder/file or COCO file, see `tpas.pose.keypoints`) or, for images it
    does not cover and when given, from `detector`. Images with no person (or no keypoints) get an all-black map and
    are listed in `out_dir/pose_log.json`. Each map is written to a temp file and renamed into place.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if keypoints is None and detector is None:
        raise TpasInputError("tpas pose needs keypoints: pass --keypoints FILE-or-DIR or --detector NAME --weights F")
    if out_dir.resolve() == images_dir.resolve():
        raise TpasInputError("--out must differ from --images (pose maps would overwrite the images)", out_dir)
    index = KeypointIndex(load_keypoints(keypoints)) if keypoints is not None else None
    files = list_images(images_dir)
    report = PoseRunReport(images=len(files))
    report.source = " + ".join(
        s for s in (f"keypoints:{keypoints}" if index else "", f"detector:{detector.name}" if detector else "") if s
    )
    for n, path in enumerate(files):
        rel = path.relative_to(images_dir)
        try:
            with Image.open(path) as im:
                size = im.size
                people = index.get(rel) if index is not None else None
                if people is None and detector is not None:
                    people = detector.detect(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise TpasInputError(f"unreadable image ({e})", path) from None
        if people is None:
            report.no_keypoints.append(rel.as_posix())
            people = np.zeros((0, 18, 3), dtype=np.float32)
        present = people.shape[0] > 0 and bool((people[..., 2] > min_confidence).any())
        if present:
            report.with_person += 1
        else:
            report.no_person.append(rel.as_posix())
        pose = render_pose_map(people, size, stick_width=stick_width, radius=radius, min_confidence=min_confidence)
        fmt = _FORMATS.get(path.suffix.lower(), "PNG")
        kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        atomic_write(out_dir / rel, lambda tmp, pose=pose, fmt=fmt, kwargs=kwargs: pose.save(tmp, format=fmt, **kwargs))
        if progress is not None:
            progress(n + 1, len(files))
    log = {
        "format": "tpas-pose-log/1",
        "images": report.images,
        "with_person": report.with_person,
        "no_person": report.no_person,
        "no_keypoints": report.no_keypoints,
        "source": report.source,
        "render": {"stick_width": stick_width, "radius": radius, "min_confidence": min_confidence},
    }
    report.log_path = atomic_write(out_dir / LOG_NAME, lambda tmp: tmp.write_text(json.dumps(log, indent=1) + "\n"))
    return report
