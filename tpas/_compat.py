"""Make torchvision importable beside a CPU-only torch.

PyPI's Linux torchvision wheels are CUDA builds: their compiled ops (`_C.so`) link libtorch_cuda and cannot load
with a CPU torch. torchvision then still imports its pure-Python parts (transforms, which open_clip, timm and
transformers use) except that two `register_fake` calls assume the `nms`/`qnms` schemas exist and raise. Defining
those two schemas when the compiled ops are missing lets the import succeed; the detection ops themselves stay
unavailable, and tpas never calls them. With a working torchvision this does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_done = False


def ensure_torchvision_importable() -> None:
    """Register the torchvision op schemas its import needs if its compiled ops cannot be loaded."""
    global _done
    if _done or "torchvision" in sys.modules:
        return
    _done = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    libs = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    try:
        if libs:
            torch.ops.load_library(str(libs[0]))
            return
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep the Library object alive: dropping it would unregister the schemas.
    sys.modules[__name__].__dict__["_torchvision_fragment"] = lib
