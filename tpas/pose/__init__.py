"""Pose maps for CMP: OpenPose-style skeleton rendering, keypoint readers, detector backends, the `tpas pose` run."""

from __future__ import annotations

from .detect import PoseDetector, get_detector, list_detectors, register_detector
from .keypoints import KeypointIndex, coco17_to_coco18, load_keypoints, read_coco_keypoints, read_openpose_json
from .maps import PoseRunReport, make_pose_maps
from .render import COLORS, KEYPOINT_NAMES, LIMBS, render_pose_map

__all__ = [
    "COLORS",
    "KEYPOINT_NAMES",
    "LIMBS",
    "KeypointIndex",
    "PoseDetector",
    "PoseRunReport",
    "coco17_to_coco18",
    "get_detector",
    "list_detectors",
    "load_keypoints",
    "make_pose_maps",
    "read_coco_keypoints",
    "read_openpose_json",
    "register_detector",
    "render_pose_map",
]
