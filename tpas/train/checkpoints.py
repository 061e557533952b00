"""Training checkpoints: tensors and plain values only (`torch.load(..., weights_only=True)` opens them), written
atomically, with every rank's RNG state so a resumed run continues bit-for-bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import TpasInputError
from ..runtime import Distributed

CHECKPOINT_FORMAT = "tpas-cmp-train/1"
LAST, BEST = "checkpoint_last.pth", "checkpoint_best.pth"


def rng_state(device: torch.device, dist: Distributed) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG states, stacked in rank order (tensors only, so weights_only-loadable).

    Gathered as objects over the CPU group: the states are CPU tensors, which an nccl-only group cannot move.
    """
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    every = dist.all_gather(state)
    return {k: torch.stack([s[k] for s in every]) for k in state}


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device, dist: Distributed) -> None:
    """Restore this rank's RNG states from `rng_state`'s output; the world size must be the one that wrote it."""
    if state["cpu"].shape[0] != dist.world:
        raise TpasInputError(
            f"the checkpoint was written by {state['cpu'].shape[0]} process(es); resume with the same number "
            f"(now {dist.world}) to continue bit-for-bit"
        )
    torch.set_rng_state(state["cpu"][dist.rank].clone())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"][dist.rank].clone(), device)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temp file beside `path`, then rename (never a half-written checkpoint)."""
    from ..io import atomic_write

    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_training_checkpoint(path: Path, fmt: str = CHECKPOINT_FORMAT) -> dict[str, Any]:
    """Open a training checkpoint of format `fmt` with weights_only=True; TpasInputError if it is not one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TpasInputError("no checkpoint to resume from", path) from None
    except Exception as e:
        raise TpasInputError(f"cannot load training checkpoint ({e})", path) from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else None
        detail = f", found {found!r}" if isinstance(found, str) else ""
        raise TpasInputError(f"not a tpas training checkpoint (expected format {fmt!r}{detail})", path)
    return obj
