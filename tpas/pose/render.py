"""OpenPose-style skeleton maps (COCO-18 keypoints) on a black canvas, the pose input of CMP.

Drawing follows the OpenPose / ControlNet body-pose annotator: 17 limbs as filled ellipses (half-width `stick_width`)
in the standard limb colours at 60 % intensity, then the 18 joints as filled discs (radius `radius`) in the full
joint colours. Keypoints whose confidence is not above `min_confidence` (OpenPose writes 0, 0, 0 for a missed joint)
are skipped with every limb that touches them. Pure PIL + numpy, deterministic: the same keypoints give the same
pixels on every machine.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# OpenPose COCO-18 order.
KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip", "r_knee",
    "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip

# Limbs as (joint, joint), 0-based, in OpenPose's drawing order (the 17 it draws; ear-shoulder links are not drawn).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (1, 0),
    (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip

# The standard OpenPose colours (RGB), one per joint; limb i uses colour i.
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip

LIMB_INTENSITY = 0.6


# cos / sin of every whole degree 0..360, from `math` (as the per-point loop this replaces computed them).
_UNIT_COS = np.array([math.cos(math.radians(d)) for d in range(361)])
_UNIT_SIN = np.array([math.sin(math.radians(d)) for d in range(361)])


def _ellipse_polygon(cx: float, cy: float, half_len: float, half_width: float, angle_deg: float) -> list[tuple]:
    """Integer polygon of a rotated ellipse sampled every degree (as OpenCV's ellipse2Poly with delta 1), with
    consecutive repeated points dropped. Vectorised; the same float operations and half-to-even rounding as
    Python's `round`, so the points are exactly those of a per-degree loop."""
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    x = half_len * _UNIT_COS
    y = half_width * _UNIT_SIN
    px = np.round(cx + x * ca - y * sa).astype(np.int64)
    py = np.round(cy + x * sa + y * ca).astype(np.int64)
    keep = np.ones(len(px), dtype=bool)
    keep[1:] = (px[1:] != px[:-1]) | (py[1:] != py[:-1])
    return list(zip(px[keep].tolist(), py[keep].tolist(), strict=True))


def _as_people(keypoints: np.ndarray) -> np.ndarray:
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim == 2:
        kp = kp[None]
    if kp.ndim != 3 or kp.shape[1:] != (18, 3):
        raise ValueError(f"keypoints must be [18, 3] or [N, 18, 3] (x, y, confidence; COCO-18), got {kp.shape}")
    return kp


def render_pose_map(
    keypoints: np.ndarray,
    size: tuple[int, int],
    *,
    stick_width: int = 4,
    radius: int = 4,
    min_confidence: float = 0.0,
) -> Image.Image:
    """Draw one person's ([18, 3]) or several people's ([N, 18, 3]) COCO-18 keypoints on black.

    Args:
        keypoints: pixel x, y and a confidence per joint, OpenPose COCO-18 order (see KEYPOINT_NAMES).
        size: (width, height) of the map; normally the image's own size.
        stick_width: half-width of the limb ellipses in pixels.
        radius: joint disc radius in pixels.
        min_confidence: joints with confidence <= this are treated as missing.

    Returns:
        An RGB PIL image. An empty array ([0, 18, 3]) gives an all-black map.
    """
    width, height = int(size[0]), int(size[1])
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    people = _as_people(keypoints) if np.asarray(keypoints).size else np.zeros((0, 18, 3))
    draw = ImageDraw.Draw(canvas)
    for person in people:
        ok = person[:, 2] > min_confidence
        for i, (a, b) in enumerate(LIMBS):
            if not (ok[a] and ok[b]):
                continue
            xa, ya, xb, yb = (float(v) for v in (person[a, 0], person[a, 1], person[b, 0], person[b, 1]))
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(yb - ya, xb - xa))
            poly = _ellipse_polygon((xa + xb) / 2, (ya + yb) / 2, length / 2, stick_width, angle)
            color = tuple(int(c * LIMB_INTENSITY) for c in COLORS[i])
            if len(poly) >= 2:
                draw.polygon(poly, fill=color)
    for person in people:
        ok = person[:, 2] > min_confidence
        for j in range(18):
            if ok[j]:
                x, y = round(float(person[j, 0])), round(float(person[j, 1]))
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=COLORS[j])
    return canvas
