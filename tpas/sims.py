"""SimsMatrix: a query x gallery score matrix that carries its row and column ids.

It is the one artefact that flows between stages (models -> ensemble -> submit/scoring). On disk it is
`torch.save` of one plain dict, read back with `weights_only=True`, so opening a file never runs code.

File format `tpas-sims/2` (what `save` writes): each id list is packed into two tensors, `{"utf8": uint8 [n bytes],
"offsets": int64 [N + 1]}` (id i is bytes offsets[i]:offsets[i+1]), so loading 38k ids costs one decode instead of
38k strings through the pure-Python safe unpickler; scores are memory-mapped on load (`mmap=True`: pages are read
when first touched, and validation touches each once). `tpas-sims/1` files (ids as lists of str) still load.
Scores may be stored as float16 (`save(dtype="fp16")`, half the file): see `save` for what rounding does to ties.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import pickle
import re
import weakref
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import TpasInputError
from .io import atomic_write, torch_save

FORMAT = "tpas-sims/2"
"""The format `save` writes."""
FORMAT_V1 = "tpas-sims/1"
READ_FORMATS = (FORMAT, FORMAT_V1)
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
"""Score storage types of `save(dtype=...)` by their CLI names."""


def _first_duplicate(ids: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    """Describe the first ids in one list but not the other (for error messages)."""
    sa, sb = set(a), set(b)
    only_a = [i for i in a if i not in sb][:3]
    only_b = [i for i in b if i not in sa][:3]
    parts = []
    if only_a:
        parts.append(f"only in the first: {', '.join(map(repr, only_a))}")
    if only_b:
        parts.append(f"only in the second: {', '.join(map(repr, only_b))}")
    return "; ".join(parts)


def _check_meta(meta: Any, where: str = "meta") -> None:
    """Meta must hold only plain values, so the file stays loadable with weights_only=True."""
    if meta is None or isinstance(meta, (str, int, float, bool)):
        return
    if isinstance(meta, (list, tuple)):
        for i, v in enumerate(meta):
            _check_meta(v, f"{where}[{i}]")
        return
    if isinstance(meta, dict):
        for k, v in meta.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {type(k).__name__}")
            _check_meta(v, f"{where}.{k}")
        return
    raise TypeError(f"{where}: {type(meta).__name__} is not a plain value (str/int/float/bool/list/dict/None)")


@dataclass
class SimsMatrix:
    """Scores of every query against the gallery, with ids.

    Dense form: `scores` [Q, G]. Top-K form (for galleries too large to hold densely): `indices` [Q, K] (gallery
    column of each kept cell) and `values` [Q, K]; cells not listed are unscored.
    """

    query_ids: list[str]
    gallery_ids: list[str]
    scores: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    _range: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.query_ids = [str(q) for q in self.query_ids]
        self.gallery_ids = [str(g) for g in self.gallery_ids]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, path: str | Path | None = None) -> None:
        """Check shapes against ids, unique ids, finite scores; TpasInputError naming `path` otherwise."""

        def fail(msg: str) -> None:
            raise TpasInputError(msg, path)

        q, g = len(self.query_ids), len(self.gallery_ids)
        dup = _first_duplicate(self.query_ids)
        if dup is not None:
            fail(f"duplicate query id {dup!r}")
        dup = _first_duplicate(self.gallery_ids)
        if dup is not None:
            fail(f"duplicate gallery id {dup!r}")
        if self.scores is not None:
            if self.indices is not None or self.values is not None:
                fail("a matrix is either dense (scores) or top-K (indices + values), not both")
            s = self.scores
            if not isinstance(s, torch.Tensor) or s.ndim != 2 or not s.is_floating_point():
                fail("scores must be a 2-D floating-point tensor")
            if tuple(s.shape) != (q, g):
                fail(f"scores have shape {tuple(s.shape)} but there are {q} query ids and {g} gallery ids")
            self._check_finite(s, fail)
        else:
            if self.indices is None or self.values is None:
                fail("a matrix needs scores, or indices and values")
            idx, val = self.indices, self.values
            if idx.ndim != 2 or val.ndim != 2 or idx.shape != val.shape:
                fail(f"indices {tuple(idx.shape)} and values {tuple(val.shape)} must be equal-shaped 2-D tensors")
            if idx.is_floating_point() or idx.dtype == torch.bool:
                fail("indices must be an integer tensor")
            if not val.is_floating_point():
                fail("values must be a floating-point tensor")
            if idx.shape[0] != q:
                fail(f"top-K matrix has {idx.shape[0]} rows but there are {q} query ids")
            if idx.shape[1] > g:
                fail(f"top-K matrix keeps {idx.shape[1]} cells per row but the gallery has only {g} ids")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= g):
                fail(f"indices must lie in [0, {g})")
            if idx.numel() and idx.shape[1] > 1:
                srt = idx.sort(dim=1).values
                bad = (srt[:, 1:] == srt[:, :-1]).any(dim=1).nonzero()
                if len(bad):
                    fail(f"query {self.query_ids[int(bad[0])]!r} lists a gallery column twice")
            self._check_finite(val, fail)
        _check_meta(self.meta)

    def _check_finite(self, t: torch.Tensor, fail: Any) -> None:
        # aminmax propagates NaN and exposes inf in one cheap pass; locate the culprit only when it fails.
        if t.numel() == 0 or all(math.isfinite(v) for v in (x.item() for x in self.value_range())):
            return
        bad_rows = (~torch.isfinite(t)).any(dim=1).nonzero()
        if len(bad_rows):
            row = int(bad_rows[0])
            col = int((~torch.isfinite(t[row])).nonzero()[0])
            what = "gallery id " + repr(self.gallery_ids[col]) if self.scores is not None else f"top-K slot {col}"
            fail(f"non-finite score {t[row, col].item()} at query {self.query_ids[row]!r}, {what}")

    def value_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) of the scores (dense) or of the kept values (top-K), as 0-d tensors.

        Validation computes them anyway, so they are kept: a global min-max normalisation then costs no extra pass
        over a large matrix. The cache follows the tensor: replacing it or changing it in place recomputes.
        """
        t = self.scores if self.scores is not None else self.values
        cached = self._range
        if cached is None or cached[0]() is not t or cached[1] != t._version:
            cached = (weakref.ref(t), t._version, tuple(torch.aminmax(t)))
            self._range = cached
        return cached[2]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_range": None}  # the cache holds a weak reference, which cannot be pickled

    # ------------------------------------------------------------------ properties
    @property
    def is_dense(self) -> bool:
        return self.scores is not None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.query_ids), len(self.gallery_ids)

    @property
    def k(self) -> int | None:
        """Cells kept per row in top-K form; None for a dense matrix."""
        return None if self.indices is None else int(self.indices.shape[1])

    def __repr__(self) -> str:
        form = "dense" if self.is_dense else f"top-{self.k}"
        return f"SimsMatrix({self.shape[0]} queries x {self.shape[1]} gallery, {form}, source={self.source!r})"

    # ------------------------------------------------------------------ conversions
    def to_dense(self, fill: float | str = "row-min") -> torch.Tensor:
        """Dense [Q, G] scores. Top-K form: unscored cells get `fill` (a number, or "row-min" of the kept cells)."""
        if self.scores is not None:
            return self.scores
        q, g = self.shape
        if fill == "row-min":
            base = self.values.min(dim=1, keepdim=True).values if self.k else torch.zeros(q, 1)
            out = base.to(self.values.dtype).expand(q, g).clone()
        elif isinstance(fill, (int, float)):
            out = torch.full((q, g), float(fill), dtype=self.values.dtype)
        else:
            raise ValueError(f"fill must be a number or 'row-min', got {fill!r}")
        out.scatter_(1, self.indices.long(), self.values)
        return out

    def top_k(self, k: int) -> SimsMatrix:
        """The top-K form keeping each row's k best cells under the stable tie rule (see `tpas.ranking`)."""
        from .ranking import topk_stable

        if self.scores is None:
            if k > (self.k or 0):
                raise ValueError(f"cannot keep {k} cells per row from a top-{self.k} matrix")
            # Put kept cells in gallery-column order first: the tie rule is gallery order, not storage-slot order.
            cols, by_col = self.indices.sort(dim=1)
            vals = self.values.gather(1, by_col)
            order = topk_stable(vals, k)
            return SimsMatrix(
                self.query_ids,
                self.gallery_ids,
                indices=cols.gather(1, order),
                values=vals.gather(1, order),
                source=self.source,
                meta=dict(self.meta),
            )
        idx = topk_stable(self.scores, k)
        return SimsMatrix(
            self.query_ids,
            self.gallery_ids,
            indices=idx,
            values=self.scores.gather(1, idx),
            source=self.source,
            meta=dict(self.meta),
        )

    # ------------------------------------------------------------------ ids
    def align(
        self,
        other: SimsMatrix | None = None,
        *,
        query_ids: Sequence[str] | None = None,
        gallery_ids: Sequence[str] | None = None,
    ) -> SimsMatrix:
        """Reorder rows/columns to another matrix's (or the given) id order.

        The id sets must be equal; otherwise TpasInputError names the first differing ids.
        """
        if other is not None:
            query_ids, gallery_ids = other.query_ids, other.gallery_ids
        query_ids = self.query_ids if query_ids is None else [str(q) for q in query_ids]
        gallery_ids = self.gallery_ids if gallery_ids is None else [str(g) for g in gallery_ids]
        if query_ids == self.query_ids and gallery_ids == self.gallery_ids:
            return self
        for kind, mine, theirs in (("query", self.query_ids, query_ids), ("gallery", self.gallery_ids, gallery_ids)):
            if len(mine) != len(theirs) or set(mine) != set(theirs):
                raise TpasInputError(
                    f"{self.source or 'matrix'}: {kind} ids differ ({_first_difference(mine, theirs)})"
                )
        return self.select(query_ids, gallery_ids)

    def select(self, query_ids: Sequence[str] | None = None, gallery_ids: Sequence[str] | None = None) -> SimsMatrix:
        """Sub-matrix (or reordering) by ids; unknown ids raise TpasInputError naming the first one."""
        q_pos = {q: i for i, q in enumerate(self.query_ids)}
        g_pos = {g: i for i, g in enumerate(self.gallery_ids)}
        qs = self.query_ids if query_ids is None else [str(q) for q in query_ids]
        gs = self.gallery_ids if gallery_ids is None else [str(g) for g in gallery_ids]
        for kind, ids, pos in (("query", qs, q_pos), ("gallery", gs, g_pos)):
            missing = next((i for i in ids if i not in pos), None)
            if missing is not None:
                raise TpasInputError(f"{kind} id {missing!r} is not in the matrix ({self.source or 'unnamed'})")
        rows = torch.tensor([q_pos[q] for q in qs], dtype=torch.long)
        if self.scores is not None:
            scores = self.scores.index_select(0, rows)
            if gallery_ids is not None:
                scores = scores.index_select(1, torch.tensor([g_pos[g] for g in gs], dtype=torch.long))
            return SimsMatrix(qs, gs, scores=scores, source=self.source, meta=dict(self.meta))
        indices, values = self.indices.index_select(0, rows), self.values.index_select(0, rows)
        if gallery_ids is not None:
            remap = torch.full((len(self.gallery_ids),), -1, dtype=torch.long)
            remap[torch.tensor([g_pos[g] for g in gs], dtype=torch.long)] = torch.arange(len(gs))
            new = remap[indices.long()]
            if (new < 0).any():
                # Dropping gallery columns leaves rows with fewer kept cells; keep the form rectangular.
                raise TpasInputError("cannot drop gallery ids from a top-K matrix; densify it first")
            indices = new
        return SimsMatrix(qs, gs, indices=indices, values=values, source=self.source, meta=dict(self.meta))

    # ------------------------------------------------------------------ files
    def to_dict(self, dtype: str | torch.dtype | None = None) -> dict[str, Any]:
        """The `tpas-sims/2` dict that `save` writes (ids packed, scores optionally cast to `dtype`)."""
        d: dict[str, Any] = {
            "format": FORMAT,
            "query_ids": pack_ids(self.query_ids),
            "gallery_ids": pack_ids(self.gallery_ids),
            "source": self.source,
            "meta": self.meta,
        }
        cast = _storage_dtype(dtype)
        if self.scores is not None:
            d["scores"] = _compact(_cast_scores(self.scores, cast))
        else:
            d["indices"] = _compact(self.indices)
            d["values"] = _compact(_cast_scores(self.values, cast))
        return d

    def save(self, path: str | Path, dtype: str | torch.dtype | None = None) -> Path:
        """Write atomically (temp file + rename); adds tool version and creation time to meta.

        `dtype` ("fp32" | "fp16" or a torch dtype; default: as held) is the score storage type. float16 keeps 11
        significant bits: scores closer than about 1/2048 of their magnitude (2.4e-4 for cosines near 0.3) become
        equal, and the stable tie rule then orders them by gallery column, so rankings, metrics and ranking files made
        from an fp16 file can differ from the float32 matrix's wherever scores were that close. Values beyond
        +-65504 are refused (they would become inf).
        """
        self.meta.setdefault("tool_version", __version__)
        self.meta.setdefault("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        self.validate()
        data = self.to_dict(dtype)
        return atomic_write(path, lambda tmp: torch_save(data, tmp))

    @classmethod
    def load(cls, path: str | Path) -> SimsMatrix:
        """Read a tpas-sims file (format 2 or 1) safely; TpasInputError for missing, foreign, unsafe or malformed
        files. Scores are memory-mapped from the file; validation reads them once."""
        obj = _safe_torch_load(path, mmap=True)
        if not isinstance(obj, dict) or obj.get("format") not in READ_FORMATS:
            if isinstance(obj, torch.Tensor):
                raise TpasInputError(
                    "is a bare tensor without ids (a legacy matrix); import it with "
                    "`tpas import-legacy` / SimsMatrix.from_legacy and explicit query and gallery id lists",
                    path,
                )
            raise TpasInputError(f"is not a {FORMAT} file", path)
        if not isinstance(obj.get("meta") or {}, dict):
            raise TpasInputError(f"malformed {FORMAT} file (meta must be a dict)", path)
        try:
            m = cls(
                query_ids=unpack_ids(obj["query_ids"], "query_ids"),
                gallery_ids=unpack_ids(obj["gallery_ids"], "gallery_ids"),
                scores=obj.get("scores"),
                indices=obj.get("indices"),
                values=obj.get("values"),
                source=str(obj.get("source", "")),
                meta=dict(obj.get("meta") or {}),
            )
        except TpasInputError as e:
            raise TpasInputError(e.message, path) from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise TpasInputError(f"malformed {obj['format']} file ({e})", path) from None
        return m

    @classmethod
    def from_legacy(
        cls,
        data: str | Path | torch.Tensor | np.ndarray,
        query_ids: Sequence[str],
        gallery_ids: Sequence[str],
        source: str = "legacy",
        transpose: bool = False,
    ) -> SimsMatrix:
        """Import a bare [Q, G] tensor/array (the seed repos' `.pt`/`.npy` files) with explicit id lists.

        `transpose=True` for files saved gallery-major ([G, Q]).
        """
        path = None
        if isinstance(data, (str, Path)):
            path = Path(data)
            if path.suffix == ".npy":
                if not path.is_file():
                    raise TpasInputError("file not found", path)
                try:
                    data = np.load(path, allow_pickle=False)
                except ValueError as e:
                    raise TpasInputError(f"not a plain numeric .npy array ({e})", path) from None
            else:
                data = _safe_torch_load(path)
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(np.ascontiguousarray(data))
        if not isinstance(data, torch.Tensor):
            raise TpasInputError(f"expected a bare score tensor, found {type(data).__name__}", path)
        scores = data.float()
        if transpose:
            scores = scores.T.contiguous()
        try:
            return cls(
                list(query_ids),
                list(gallery_ids),
                scores=scores,
                source=source,
                meta={"imported_from": str(path) if path else "tensor"},
            )
        except TpasInputError as e:
            raise TpasInputError(e.message, path) from None


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor owning exactly its own bytes: torch.save writes a view's whole storage, so a matrix sliced
    out of a larger one would otherwise carry the larger one into its file."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def pack_ids(ids: Sequence[str]) -> dict[str, torch.Tensor]:
    """Ids as two tensors: their UTF-8 bytes end to end and the N + 1 byte offsets that split them."""
    encoded = [i.encode("utf-8") for i in ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()  # a writable copy: torch wants one
    return {"utf8": torch.from_numpy(blob), "offsets": torch.from_numpy(offsets)}


def unpack_ids(packed: Any, key: str = "ids") -> list[str]:
    """The id list of `pack_ids` (or a plain list of str, the `tpas-sims/1` form); ValueError when malformed."""
    if isinstance(packed, (list, tuple)):
        return list(packed)
    if not isinstance(packed, dict) or set(packed) != {"utf8", "offsets"}:
        raise ValueError(f"{key} must be a list of str or {{'utf8', 'offsets'}} tensors")
    blob, offsets = packed["utf8"], packed["offsets"]
    if not (isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8 and blob.ndim == 1):
        raise ValueError(f"{key}.utf8 must be a 1-D uint8 tensor")
    if not (isinstance(offsets, torch.Tensor) and offsets.dtype == torch.int64 and offsets.ndim == 1):
        raise ValueError(f"{key}.offsets must be a 1-D int64 tensor")
    if len(offsets) == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != len(blob) or bool((offsets.diff() < 0).any()):
        raise ValueError(f"{key}.offsets must rise from 0 to the byte count {len(blob)}")
    data = blob.numpy().tobytes()
    bounds = offsets.tolist()
    try:
        text = data.decode("utf-8")
        if len(text) == len(data):  # ASCII (every PAB id): byte offsets are character offsets
            return [text[a:b] for a, b in itertools.pairwise(bounds)]
        return [data[a:b].decode("utf-8") for a, b in itertools.pairwise(bounds)]
    except UnicodeDecodeError as e:
        raise ValueError(f"{key} is not valid UTF-8 split at character boundaries ({e.reason})") from None


def _storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in STORAGE_DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in STORAGE_DTYPES:
        return STORAGE_DTYPES[dtype]
    raise ValueError(f"score storage dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")


def _cast_scores(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or t.dtype == dtype:
        return t
    out = t.to(dtype)
    if out.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(out)):
        raise TpasInputError(f"scores beyond +-{torch.finfo(torch.float16).max:.0f} cannot be stored as fp16")
    return out


def _safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    path = Path(path)
    if not path.is_file():
        raise TpasInputError("file not found", path)
    try:
        mmap = mmap and zipfile.is_zipfile(path)  # files in torch's pre-1.6 serialization cannot be mapped
    except zipfile.BadZipFile as e:  # is_zipfile itself raises on some damaged end records (found by fuzzing)
        raise TpasInputError(f"cannot be read as a torch file (damaged zip archive: {e})", path) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None and "global" not in str(e).lower():
            # Not a refused object but bytes that are no pickle at all (a truncated or foreign file).
            raise TpasInputError("cannot be read as a torch file (not a torch.save archive)", path) from None
        what = f" ({found.group(1)})" if found else ""
        raise TpasInputError(
            f"holds pickled Python objects{what} that a safe load refuses (only tensors and plain values are read)",
            path,
        ) from None
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise TpasInputError("is a TorchScript archive, not a score file", path) from None
        raise TpasInputError(f"cannot be read as a torch file ({str(e).splitlines()[0]})", path) from None
    except MemoryError:
        raise
    except Exception as e:  # torch's unpickler fails on damaged bytes with IndexError, KeyError, ... : one line
        raise TpasInputError(f"cannot be read as a torch file ({type(e).__name__}: {e})", path) from None
