"""On-disk store of encoded gallery features, so an interrupted `tpas infer` resumes where it stopped.

Layout: `<cache root>/<key digest>/` holds `key.json` (what the digest was made from: family, checkpoint sha256, the
model's `describe()` including preprocessing, precision, device type) and chunk files `chunk-*.safetensors`. Each
chunk holds the features of one encoded batch (every key the model's `encode_images` returned, item axis first) and,
in its metadata, the item key of every row: the image's absolute path, mtime and size (plus its pose map's), and
whether the chunk is `complete` (every feature `encode_images` returned) or holds `embed` only: the per-image states a
matching head needs can be large (ViT tokens), so they are kept only by runs that re-rank. An image
that changes gets a new item key and is encoded again; a different checkpoint, preprocessing or precision gets a
different directory. Chunks are written to a temp name and renamed, so a killed run never leaves a torn chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import TpasInputError
from ..io import atomic_write
from .checkpoint import sha256_file

CACHE_FORMAT = 1
_CHUNK_GLOB = "chunk-*.safetensors"


def default_cache_dir() -> Path:
    """`$TPAS_CACHE_DIR`, else `$XDG_CACHE_HOME/tpas`, else `~/.cache/tpas`."""
    if env := os.environ.get("TPAS_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tpas"


def item_key(path: Path, pose: Path | None = None) -> str:
    """Identity of one gallery item for the cache: absolute path, mtime (ns) and size of the image (and pose map)."""
    parts = []
    for p in (path, pose):
        if p is None:
            continue
        st = p.stat()
        parts.append(f"{p.resolve()}|{st.st_mtime_ns}|{st.st_size}")
    return "||".join(parts)


def cached_sha256(path: Path, cache_root: Path | None) -> str:
    """sha256 of a checkpoint file or directory, remembered under `cache_root/sha256/` by (path, mtime, size).

    Hashing a 1 GB checkpoint takes seconds; re-runs of the same file reuse the digest.
    """
    path = Path(path)
    if cache_root is None:
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = "\n".join(f"{f.resolve()}|{f.stat().st_mtime_ns}|{f.stat().st_size}" for f in files)
    memo = cache_root / "sha256" / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".txt")
    if memo.is_file():
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    digest = sha256_file(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs the re-hash next time
        atomic_write(memo, lambda tmp: tmp.write_text(digest + "\n"))
    return digest


class FeatureStore:
    """Chunked feature files of one (model, checkpoint, preprocessing, precision) combination.

    Args:
        root: the cache root (`--cache-dir`); the store lives in a sub-directory named by the key's digest.
        key: JSON-able identity of everything that changes the features.
    """

    def __init__(self, root: Path, key: dict[str, Any]):
        blob = json.dumps({"cache_format": CACHE_FORMAT, **key}, sort_keys=True, default=str)
        self.digest = hashlib.sha256(blob.encode()).hexdigest()[:32]
        self.dir = Path(root) / self.digest
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            key_file = self.dir / "key.json"
            if not key_file.is_file():
                atomic_write(key_file, lambda tmp: tmp.write_text(blob + "\n"))
        except OSError as e:
            raise TpasInputError(
                f"cannot write the feature cache ({e.strerror}); pass another --cache-dir", root
            ) from None
        self._index: dict[str, tuple[Path, int, bool]] = {}

    # ------------------------------------------------------------------ index
    def scan(self) -> dict[str, tuple[Path, int, bool]]:
        """Re-read every chunk's item list; returns item key -> (chunk file, row, complete). A complete chunk wins
        over an embed-only one for the same item. Unreadable chunks are ignored (their items get encoded again)."""
        from safetensors import safe_open

        index: dict[str, tuple[Path, int, bool]] = {}
        for f in sorted(self.dir.glob(_CHUNK_GLOB)):
            try:
                with safe_open(str(f), framework="pt") as fh:
                    meta = fh.metadata() or {}
                items = json.loads(meta.get("items", "[]"))
                complete = meta.get("complete", "1") == "1"
            except Exception:  # a chunk from a crashed foreign writer or a full disk: just encode those items again
                continue
            for row, k in enumerate(items):
                if k not in index or (complete and not index[k][2]):
                    index[k] = (f, row, complete)
        self._index = index
        return index

    def has(self, key: str, complete: bool = False) -> bool:
        """Whether the store holds `key` (with every feature, when `complete`)."""
        entry = self._index.get(key)
        return entry is not None and (entry[2] or not complete)

    # ------------------------------------------------------------------ write
    def write_chunk(self, keys: Sequence[str], features: dict[str, torch.Tensor], complete: bool = True) -> Path:
        """Store one batch (rows in `keys` order) atomically and add it to the index; `complete=False` marks a chunk
        that holds only some of the features (`embed` without the match states)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in features.items()}
        for name, t in tensors.items():
            if t.shape[0] != len(keys):
                raise ValueError(f"feature {name!r} has {t.shape[0]} rows for {len(keys)} items")
        name = f"chunk-{uuid.uuid4().hex}.safetensors"
        path = atomic_write(
            self.dir / name,
            lambda tmp: save_file(
                tensors, str(tmp), metadata={"items": json.dumps(list(keys)), "complete": "1" if complete else "0"}
            ),
        )
        for row, k in enumerate(keys):
            self._index[k] = (path, row, complete)
        return path

    # ------------------------------------------------------------------ read
    def load(self, keys: Sequence[str], names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Features of `keys` (in that order), stacked; only the feature `names` given (all by default).

        Reads only the needed rows of each chunk (safetensors slices), so large per-image states (e.g. ViT tokens
        for a matching head) can be gathered for a few images without loading whole chunks.
        """
        from safetensors import safe_open

        if not keys:
            return {}
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise KeyError(f"{len(missing)} item(s) not in the feature cache, e.g. {missing[0]}")
        by_file: dict[Path, list[tuple[int, int]]] = defaultdict(list)  # file -> [(row, output position)]
        for pos, k in enumerate(keys):
            f, row, _ = self._index[k]
            by_file[f].append((row, pos))
        out: dict[str, torch.Tensor] = {}
        for f, rows in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                wanted = list(fh.keys()) if names is None else [n for n in names if n in set(fh.keys())]
                for name in wanted:
                    part = _read_rows(fh, name, [r for r, _ in rows])
                    if name not in out:
                        out[name] = torch.empty((len(keys), *part.shape[1:]), dtype=part.dtype)
                    out[name][torch.tensor([p for _, p in rows])] = part
        return out


def _read_rows(fh: Any, name: str, rows: list[int]) -> torch.Tensor:
    """Rows of one tensor in a safetensors file, read as contiguous slices (rows are usually consecutive)."""
    sl = fh.get_slice(name)
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and r == runs[-1][1]:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return torch.cat([sl[a:b] for a, b in runs]) if len(runs) > 1 else sl[runs[0][0] : runs[0][1]]
