"""Reading checkpoint files safely: one loader for every family, and one classifier that says what a file is.

Before anything is deserialised, `sniff` looks at the file's first bytes and says what it is: empty, an HTML page or
other text (what a failed download or a Git LFS pointer leaves), JSON, gzip/tar/zip archives, a torch.save zip or
legacy (pre-zip) pickle, a TorchScript archive, safetensors, or something else. Only the four weight formats are
deserialised; everything else is refused with one line that says what the file looks like.

`torch.load(..., weights_only=True)` never runs pickled code. A torch pickle that needs full unpickling (a training
checkpoint holding an argparse Namespace, say) is refused unless the user opts in with `--trust-checkpoint`; that hint
is given only when the safe loader refused a real torch pickle for the globals it holds. TorchScript archives (OpenAI
CLIP releases) are read with `torch.jit.load`, which restores tensors without running pickled Python. Any exception
raised while deserialising is reported as a damaged file, never as a traceback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TpasInputError

# The first pickled object of a legacy (pre-1.6, `_use_new_zipfile_serialization=False`) torch.save file is
# torch.serialization.MAGIC_NUMBER; these are its little-endian bytes (LONG1 payload) at any pickle protocol.
_TORCH_LEGACY_MAGIC = bytes.fromhex("6cfc9c46f9206aa85019")
_HEAD_BYTES = 4096
# Kinds whose contents tpas deserialises; every other kind is refused before anything is read.
WEIGHT_KINDS = frozenset({"torch-zip", "torch-legacy", "torchscript", "safetensors"})
_REDOWNLOAD = "download it again"


@dataclass(frozen=True)
class FileKind:
    """What a file looks like: a `kind` name and a phrase for messages (`looks_like`), plus advice when refused."""

    kind: str
    looks_like: str
    advice: str = ""

    def refusal(self) -> str:
        """The one-line reason a file of this kind is not loaded as weights."""
        return f"{self.looks_like}: {self.advice}" if self.advice else f"{self.looks_like}, not a checkpoint"


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


# ------------------------------------------------------------------------------------------------ classification
def sniff(path: str | Path) -> FileKind:
    """Classify a file by its contents (not its suffix); never deserialises anything. OSError if it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return FileKind("empty", "empty file (0 bytes)", f"the download probably failed; {_REDOWNLOAD}")
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path, size)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        if _TORCH_LEGACY_MAGIC in head[:32]:
            return FileKind("torch-legacy", f"legacy torch.save file ({size:,} bytes)")
        return FileKind(
            "pickle", f"Python pickle that torch.save did not write ({size:,} bytes)", "tpas reads only torch files"
        )
    if head.startswith(b"\x1f\x8b"):
        return FileKind("gzip", f"gzip archive ({size:,} bytes)", "unpack it and pass the checkpoint inside")
    if head[257:262] == b"ustar":
        return FileKind("tar", f"tar archive ({size:,} bytes)", "unpack it (tar -xf) and pass the checkpoint inside")
    if _is_safetensors(head, size):
        return FileKind("safetensors", f"safetensors file ({size:,} bytes)")
    if len(head) >= 10 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > size - 8:
        return FileKind(
            "safetensors-truncated",
            f"truncated safetensors file ({size:,} bytes, shorter than its own header)",
            f"the download was probably cut off; {_REDOWNLOAD}",
        )
    if head.startswith(b"\x93NUMPY"):
        return FileKind("numpy", f"NumPy .npy array ({size:,} bytes)")
    return _sniff_text(head, size)


def _sniff_zip(path: Path, size: int) -> FileKind:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception:  # zipfile raises several types (BadZipFile, ValueError, struct.error...) on damaged archives
        return FileKind(
            "zip-damaged",
            f"truncated or damaged zip archive ({size:,} bytes)",
            f"the download was probably cut off; {_REDOWNLOAD}",
        )
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return FileKind("torchscript", f"TorchScript archive ({size:,} bytes)")
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return FileKind("torch-zip", f"torch checkpoint (zip archive, {size:,} bytes)")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return FileKind(
        "zip",
        f"zip archive that torch.save did not write ({len(names)} entries: {shown or 'none'})",
        "unpack it and pass the checkpoint inside",
    )


def _is_safetensors(head: bytes, size: int) -> bool:
    """8-byte little-endian header length, then a JSON object of that length."""
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _sniff_text(head: bytes, size: int) -> FileKind:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A cut in the middle of a multi-byte character at the end of the sample is still text.
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else None
    if text is None or any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return FileKind(
            "other",
            f"unrecognised binary file ({size:,} bytes, starts with {head[:8].hex(' ')})",
            "not a torch, TorchScript or safetensors checkpoint",
        )
    body = text.lstrip().lower()
    if body.startswith("version https://git-lfs"):
        return FileKind(
            "git-lfs-pointer",
            f"Git LFS pointer ({size:,} bytes), not the weights",
            "run `git lfs pull` in its repository, or download the file itself",
        )
    if body.startswith(("<!doctype html", "<html", "<?xml", "<head", "<body")) or "<html" in body[:512]:
        return FileKind(
            "html",
            f"HTML page ({size:,} bytes)",
            f"the download saved a web page (a login, redirect or error page) instead of the file; {_REDOWNLOAD}",
        )
    if body[:1] in ("{", "["):
        return FileKind(
            "json",
            f"JSON text ({size:,} bytes)",
            "a config or index file? pass the weights file itself, or the folder that holds config and weights",
        )
    return FileKind("text", f"text file ({size:,} bytes)")


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript zip archive (it has a `constants.pkl` / `code/` entry)."""
    try:
        return sniff(path).kind == "torchscript"
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ loading
def load_checkpoint(path: str | Path, *, trust: bool = False) -> Any:
    """Load a checkpoint file's object (dict of tensors, nested dicts) on CPU.

    Reads safetensors files, TorchScript archives (returns the module's state_dict) and torch pickles (weights_only
    unless `trust`), whatever their suffix. Anything else, or a file that fails to deserialise, raises TpasInputError
    naming the file and what it looks like.
    """
    path = Path(path)
    if not path.is_file():
        raise TpasInputError(
            "expected a checkpoint file, found a folder" if path.is_dir() else "checkpoint file not found", path
        )
    try:
        kind = sniff(path)
    except OSError as e:
        raise TpasInputError(f"cannot be read ({e.strerror})", path) from None
    if kind.kind not in WEIGHT_KINDS:
        raise TpasInputError(kind.refusal(), path)
    try:
        return _deserialise(path, kind.kind, trust)
    except MemoryError:
        raise  # not the file's fault: the CLI reports memory exhaustion as such
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused is not None and kind.kind in ("torch-zip", "torch-legacy"):
            raise TpasInputError(_refused_message(refused, kind), path) from None
        raise TpasInputError(_damaged(kind, e), path) from None
    except Exception as e:  # any failure inside a deserialiser means a damaged file, reported as one line
        raise TpasInputError(_damaged(kind, e), path) from None


def check_weight_files(folder: Path) -> None:
    """TpasInputError naming the first weight file of a model folder (`*.safetensors`, `*.bin`) that is not weights
    (empty, a web page, a Git LFS pointer, truncated), before a library with its own error types opens it."""
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        kind = sniff(f)
        if kind.kind not in WEIGHT_KINDS:
            raise TpasInputError(kind.refusal(), f)


def _deserialise(path: Path, kind: str, trust: bool) -> Any:
    if kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if kind == "torchscript":
        with warnings.catch_warnings():
            # torch.jit is deprecated, but OpenAI's release is a TorchScript archive and jit.load is its safe reader.
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    return torch.load(path, map_location="cpu", weights_only=not trust)


def _refused_global(message: str) -> str | None:
    """The global the weights-only unpickler refused ('argparse.Namespace'), or None for any other failure."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


def _refused_message(refused: str, kind: FileKind) -> str:
    """Why the safe load refused `refused` (module.name), and whether --trust-checkpoint can help."""
    module, _, name = refused.rpartition(".")
    loaded = sys.modules.get(module)
    if loaded is not None and not hasattr(loaded, name):
        # Not an object a trusted load could rebuild either: the pickle names something that does not exist.
        return f"damaged or incomplete {kind.looks_like}: it names {refused}, which does not exist; {_REDOWNLOAD}"
    top = module.split(".", 1)[0]
    if loaded is None and (not top or importlib.util.find_spec(top) is None):
        return (
            f"a torch checkpoint that holds pickled Python objects ({refused}) of a module that is not installed "
            f"here ({top or module}); not even --trust-checkpoint can read it without that module"
        )
    return (
        f"a torch checkpoint that holds pickled Python objects ({refused}; training checkpoints often do) which a "
        "safe load refuses. If you trust where the file came from, pass --trust-checkpoint"
    )


def _damaged(kind: FileKind, e: BaseException) -> str:
    """'damaged <kind> (<error>): ...' with the deserialiser's own first line (torch's wrapped reason when present)."""
    text = str(e)
    inner = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    # The first sentence only: torch appends "This is an internal miniz error..." and similar paragraphs.
    first = (inner.group(1) if inner else text.strip().split("\n", 1)[0]).split(". ", 1)[0][:160]
    return (
        f"damaged or incomplete {kind.looks_like}: {type(e).__name__}: {first or 'no detail'}; "
        f"the file was probably cut off or corrupted, {_REDOWNLOAD}"
    )


def extract_state_dict(obj: Any, path: str | Path, keys: tuple[str, ...] = ("model", "state_dict", "module")) -> dict:
    """The tensor dict inside a loaded checkpoint: the object itself, or under one of `keys` (first found)."""
    for _ in range(8):  # a bounded descent: a pickle can hold a dict that contains itself
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in keys if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
                return obj
            break
        obj = inner
    raise TpasInputError(f"no state dict found (looked for a tensor dict, or one under {', '.join(keys)})", path)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop `prefix` from every key that has it (e.g. 'module.' from DDP checkpoints) when all keys have it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state
