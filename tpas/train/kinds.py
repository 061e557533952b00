"""The kinds of model one trainer trains: what `tpas train cmp` and `tpas train xvlm` do differently, and nothing else.

A kind names its config defaults (`tpas.train.config.KIND_DEFAULTS`), its model builder (`model_setup`), its loss
switches, what its dataset yields and its checkpoint format; the loop, optimiser, schedule, evaluation, checkpoints,
resume and DDP are the trainer's, shared. X-VLM is CMP's loss with CMP's additions off (no pose, IHNM, EDA or MLM;
ITC without label smoothing), on the (image, caption, id) pairs alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TpasInputError
from .checkpoints import CHECKPOINT_FORMAT
from .losses import LossConfig
from .masking import MaskingConfig
from .model_setup import BuiltModel, build_cmp, build_xvlm


@dataclass(frozen=True)
class TrainKind:
    """One kind of training run: `name` is the CLI command and the `tpas infer` family that loads its checkpoints."""

    name: str
    checkpoint_format: str
    build: Callable[[dict[str, Any], Path], BuiltModel]
    loss_config: Callable[[dict[str, Any]], LossConfig]
    dataset_options: Callable[[dict[str, Any]], dict[str, Any]]  # CMPTrainDataset keywords (pose, views, ...)


def _cmp_loss(loss: dict[str, Any]) -> LossConfig:
    return LossConfig(**loss)


def _cmp_data(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"pose": bool(cfg["data"]["pose"]), "masking": MaskingConfig(**cfg["masking"]),
            "ihnm": bool(cfg["loss"]["ihnm"])}  # fmt: skip


def _xvlm_loss(loss: dict[str, Any]) -> LossConfig:
    return LossConfig(**loss, eda=False, ihnm=False, mlm=False)


def _xvlm_data(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"pose": False, "ihnm": False, "pair_only": True}


KINDS: dict[str, TrainKind] = {
    "cmp": TrainKind("cmp", CHECKPOINT_FORMAT, build_cmp, _cmp_loss, _cmp_data),
    "xvlm": TrainKind("xvlm", "tpas-xvlm-train/1", build_xvlm, _xvlm_loss, _xvlm_data),
}


def get_kind(name: str) -> TrainKind:
    """The kind called `name`; TpasInputError naming the known ones otherwise."""
    if name not in KINDS:
        raise TpasInputError(f"unknown training kind {name!r}; expected one of {', '.join(KINDS)}")
    return KINDS[name]
