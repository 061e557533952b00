"""Pluggable keypoint detectors for `tpas pose --detector NAME --weights FILE`.

A backend turns one RGB image into COCO-18 keypoints [N_people, 18, 3] (x, y, confidence in pixels of that image).
Weights are always a local file the user provides; nothing is downloaded.

Built-in backend `keypointrcnn` (torchvision's Keypoint R-CNN, ResNet-50 FPN, COCO person keypoints):
weights file `keypointrcnn_resnet50_fpn_coco-fc266e95.pth` (torchvision's
`KeypointRCNN_ResNet50_FPN_Weights.COCO_V1`, from download.pytorch.org/models/). It needs torchvision's compiled
detection ops (roi_align, nms); when they cannot load (a torchvision built for another torch), the backend says so
and precomputed keypoints (`--keypoints`) are the way.
Other detectors (OpenPose itself, MMPose, ...) plug in with `register_detector`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..errors import TpasInputError
from .keypoints import coco17_to_coco18


class PoseDetector(Protocol):
    """What a detector backend provides."""

    name: str

    def detect(self, image: Image.Image) -> np.ndarray:
        """COCO-18 keypoints [N, 18, 3] (x, y, confidence) of every person found in `image`; [0, 18, 3] if none."""
        ...


_DETECTORS: dict[str, Callable[..., PoseDetector]] = {}


def register_detector(name: str) -> Callable[[Callable[..., PoseDetector]], Callable[..., PoseDetector]]:
    """Register a factory `factory(weights: Path, **options) -> PoseDetector` under `name`."""

    def wrap(factory: Callable[..., PoseDetector]) -> Callable[..., PoseDetector]:
        _DETECTORS[name] = factory
        return factory

    return wrap


def list_detectors() -> list[str]:
    """Names of the registered detector backends."""
    return sorted(_DETECTORS)


def get_detector(name: str, weights: str | Path | None, **options: Any) -> PoseDetector:
    """Build detector `name` from a local weights file; TpasInputError for unknown names or missing files."""
    if name not in _DETECTORS:
        raise TpasInputError(f"unknown pose detector {name!r}; expected one of {', '.join(list_detectors())}")
    if weights is None:
        raise TpasInputError(f"detector {name!r} needs --weights FILE (a local weights file; nothing is downloaded)")
    weights = Path(weights)
    if not weights.is_file():
        raise TpasInputError("detector weights file not found", weights)
    return _DETECTORS[name](weights, **options)


@register_detector("keypointrcnn")
class KeypointRCNNDetector:
    """torchvision Keypoint R-CNN (ResNet-50 FPN) on CPU or GPU.

    People with a box score below `box_threshold` are dropped; a joint's confidence is 1 when its keypoint score is
    above `keypoint_threshold` (torchvision's visibility rule), else 0 (missing in the rendered map).
    """

    name = "keypointrcnn"

    def __init__(
        self, weights: Path, *, device: str = "cpu", box_threshold: float = 0.7, keypoint_threshold: float = 0.0
    ) -> None:
        from ..models.checkpoint import extract_state_dict, load_checkpoint

        state = extract_state_dict(load_checkpoint(weights), weights)  # damaged / foreign files: one line
        try:
            from torchvision.models.detection import keypointrcnn_resnet50_fpn

            model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_keypoints=17)
            model.load_state_dict(state)
        except (RuntimeError, ImportError, KeyError) as e:
            raise TpasInputError(
                f"cannot build torchvision Keypoint R-CNN from this file ({str(e).splitlines()[0]})", weights
            ) from None
        self.model = model.eval().to(device)
        self.device = device
        self.box_threshold = box_threshold
        self.keypoint_threshold = keypoint_threshold

    def detect(self, image: Image.Image) -> np.ndarray:
        """Keypoints [N, 18, 3] of the people found in `image`."""
        import torch

        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        try:
            with torch.inference_mode():
                out = self.model([x.to(self.device)])[0]
        except (RuntimeError, NotImplementedError) as e:
            raise TpasInputError(
                "torchvision's compiled detection ops are unavailable here (CPU torch beside a CUDA torchvision "
                f"wheel?): {str(e).splitlines()[0]}; use precomputed keypoints with --keypoints instead"
            ) from None
        keep = out["scores"] >= self.box_threshold
        kp = out["keypoints"][keep].cpu().numpy()  # [N, 17, 3]: x, y, visibility
        ks = out["keypoints_scores"][keep].cpu().numpy()  # [N, 17]
        if kp.shape[0] == 0:
            return np.zeros((0, 18, 3), dtype=np.float32)
        kp = kp.copy()
        kp[..., 2] = (ks > self.keypoint_threshold).astype(np.float32)
        return coco17_to_coco18(kp)
