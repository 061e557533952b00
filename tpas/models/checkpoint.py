"""Reading checkpoint files safely: one loader for every family.

`torch.load(..., weights_only=True)` never runs pickled code. A file that needs full unpickling (a training checkpoint
holding an argparse Namespace, say) is refused unless the user opts in with `--trust-checkpoint`. TorchScript archives
(OpenAI CLIP releases) are read with `torch.jit.load`, which restores tensors without running pickled Python.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import TpasInputError

TRUST_HINT = (
    "it holds pickled Python objects (e.g. a training checkpoint with an argparse Namespace); a safe load refuses "
    "them. If you trust where the file came from, pass --trust-checkpoint"
)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (or of a directory's files, sorted by relative path)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript zip archive (it has a `constants.pkl` / `code/` entry)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: str | Path, *, trust: bool = False) -> Any:
    """Load a checkpoint file's object (dict of tensors, nested dicts) on CPU.

    Handles `.safetensors`, TorchScript archives (returns the module's state_dict), and torch pickles
    (weights_only unless `trust`). Missing or unreadable files raise TpasInputError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise TpasInputError("checkpoint file not found", path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise TpasInputError(f"not a readable safetensors file ({e})", path) from None
    if is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as e:
            raise TpasInputError(f"unreadable TorchScript archive ({str(e).splitlines()[0]})", path) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError:
        raise TpasInputError(TRUST_HINT, path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise TpasInputError(f"cannot be read as a checkpoint ({str(e).splitlines()[0]})", path) from None


def extract_state_dict(obj: Any, path: str | Path, keys: tuple[str, ...] = ("model", "state_dict", "module")) -> dict:
    """The tensor dict inside a loaded checkpoint: the object itself, or under one of `keys` (first found)."""
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and isinstance(obj[k], dict):
                return extract_state_dict(obj[k], path, keys)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise TpasInputError(f"no state dict found (looked for a tensor dict, or one under {', '.join(keys)})", path)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop `prefix` from every key that has it (e.g. 'module.' from DDP checkpoints) when all keys have it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state
