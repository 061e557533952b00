"""Fusion of aligned score matrices: `iterative` (the seed's nested weighting), `wsum` and `rrf` (ranx names).

Every method works on blocks of query rows: a normalised input is produced block by block (`Prepared.rows`), so
the only full-size allocation is the fused output, and a tuning trial can score a block and throw it away.

iterative: s = norm(m_1); s = w_k * s + (1 - w_k) * norm(m_k) for k = 2..n, one weight per step, each taken by name
from the config. With order [itm, beit3, blip2, clip] and weights [1 - wb, wl, wc] this is, operation for operation,
the seed's `(((1-wb)*ITM + wb*BEiT3)*wl + (1-wl)*BLIP2)*wc + (1-wc)*CLIP`.
wsum: s = sum_k w_k * norm(m_k).
Both are linear in the inputs: the fused cell is sum_k a_k * x_k + b_row, with a_k = (effective weight of k) / (k's
normalisation scale). By default they run in that form, one multiply-add per input and cell, a top-K input adding only
its K cells (its fill is a per-row constant folded into b). `exact: true` instead repeats the seed's float operations
one by one (sub, div, mul, mul, add per input), so a preset is bit-identical to the seed. The two agree to a few ulp
of the largest term a_k * x_k, which exceeds the result when an input's shift is large against its scale (z-scored
scores far from zero): 2.4e-6 for scores 0.3 +- 0.02, against 3e-7 on uniform scores.
rrf: s = sum_k w_k / (k + rank_k), rank over each input's top-`depth` cells (1-based, stable ties); cells beyond
that depth add nothing. Normalisation does not change ranks, so rrf ignores it.
best-rank: s = depth + 1 - min_k rank_k, each cell scored by its best rank over the inputs (ranks as rrf's; 0 beyond
every input's depth). Its top-(n x k) holds every input's top-k (the union candidate pool of the AICity'26 winner):
a cell within some input's top-k scores above any that is in none. Weights and normalisation do not apply.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TpasInputError
from ..parallel import map_row_ranges
from ..ranking import topk_stable
from ..sims import SimsMatrix
from .normalize import AffineParams, affine_params, check_method, minmax_params_from_stats, normalize
from .rerank_fill import FilledTopK

FUSIONS: dict[str, Callable[..., None]] = {}
BLOCK_BYTES = 1 << 20  # one block of rows ~ 1 MiB: stays in L2 across the per-input passes


def register_fusion(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a block fusion `fn(inputs, spec, start, stop, out)` under `name` (the config's `fuse.method`)."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        FUSIONS[name] = fn
        return fn

    return deco


@dataclass
class Prepared:
    """One input ready for fusion: raw scores (dense or top-K with fill) plus its normalisation.

    `params` is the affine normalisation; when None, `dense` already holds normalised scores (non-affine methods).
    """

    name: str
    dense: torch.Tensor | None = None
    topk: FilledTopK | None = None
    params: AffineParams | None = None
    method: str = "min-max"
    scope: str = "global"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense.shape) if self.dense is not None else self.topk.shape  # type: ignore[return-value]

    def rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised dense rows [start, stop), written into `out` when given."""
        if self.topk is not None:
            return self.topk.rows(start, stop, self.params, out=out)
        x = self.dense[start:stop]
        if self.params is None:
            return x if out is None else out.copy_(x)
        return self.params.rows(start, stop).apply(x, out=out)

    def raw_topk(self, start: int, stop: int, depth: int) -> tuple[torch.Tensor, int]:
        """Columns [b, d] of each row's best cells (stable ties), best first, and d (<= depth; <= K for top-K)."""
        if self.topk is not None:
            idx, vals = self.topk.indices[start:stop], self.topk.values[start:stop]
            d = min(depth, idx.shape[1])
            # Stable rule on the kept cells: by score, then by gallery column.
            by_col = idx.sort(dim=1)
            vals_by_col = vals.gather(1, by_col.indices)
            order = vals_by_col.sort(dim=1, descending=True, stable=True).indices[:, :d]
            return by_col.values.gather(1, order), d
        d = min(depth, self.dense.shape[1])
        return topk_stable(self.dense[start:stop], d), d


def prepare(
    name: str, m: SimsMatrix, method: str = "min-max", scope: str = "global", fill: float | str = "row-min"
) -> Prepared:
    """Wrap an (aligned) SimsMatrix for fusion with its normalisation; a top-K matrix stays top-K."""
    check_method(method, scope, key=f"normalize ({name})")
    if m.is_dense:
        if method == "min-max" and scope == "global" and m.scores.numel():
            params = minmax_params_from_stats(*m.value_range())  # known since validation: no pass over the matrix
        else:
            params = affine_params(m.scores, method, scope)
        if params is None:
            return Prepared(name, dense=normalize(m.scores, method, scope), method=method, scope=scope)
        return Prepared(name, dense=m.scores, params=params, method=method, scope=scope)
    ftk = FilledTopK.from_sims(m, fill)
    params = ftk.affine_params(method, scope)
    if params is None:
        return Prepared(name, dense=normalize(ftk.dense(), method, scope), method=method, scope=scope)
    return Prepared(name, topk=ftk, params=params, method=method, scope=scope)


@dataclass
class FuseSpec:
    """What to fuse and how: `method`, input `order`, `weights` (list for iterative, {name: w} for wsum/rrf),
    rrf's `k` and `depth`, and `exact` (iterative/wsum: the seed's float operations one by one)."""

    method: str = "iterative"
    order: list[str] = field(default_factory=list)
    weights: list[float] | dict[str, float] | None = None
    k: float = 60.0
    depth: int = 1000
    exact: bool = False

    def validate(self, names: Sequence[str] | None = None) -> None:
        """TpasInputError naming the config key for every inconsistency."""
        if self.method not in FUSIONS:
            raise TpasInputError(f"fuse.method: unknown fusion {self.method!r}; choose one of {sorted(FUSIONS)}")
        if not self.order:
            raise TpasInputError("fuse.order: the fusion list is empty; name at least one input")
        if len(set(self.order)) != len(self.order):
            raise TpasInputError(f"fuse.order: an input is listed twice ({self.order})")
        if names is not None:
            for n in self.order:
                if n not in names:
                    raise TpasInputError(f"fuse.order: unknown input {n!r}; inputs are {list(names)}")
        if self.method == "iterative":
            w = self.weights if self.weights is not None else []
            if not isinstance(w, (list, tuple)):
                raise TpasInputError(
                    "fuse.weights: iterative fusion takes a list, one weight per input after the first"
                )
            if len(w) != len(self.order) - 1:
                raise TpasInputError(
                    f"fuse.weights: iterative fusion of {len(self.order)} inputs needs {len(self.order) - 1} "
                    f"weights, got {len(w)}"
                )
            for i, v in enumerate(w):
                _check_weight(v, f"fuse.weights[{i}]")
        elif self.weights is not None:
            w = self.weights
            if not isinstance(w, Mapping):
                raise TpasInputError(f"fuse.weights: {self.method} takes weights by name, {{name: w}}")
            for n, v in w.items():
                if n not in self.order:
                    raise TpasInputError(f"fuse.weights.{n}: {n!r} is not in fuse.order {self.order}")
                _check_weight(v, f"fuse.weights.{n}")
        if not isinstance(self.exact, bool):
            raise TpasInputError(f"fuse.exact: must be true or false, got {self.exact!r}")
        bad_k = isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not self.k >= 0
        if self.method == "rrf" and bad_k:
            raise TpasInputError(f"fuse.k: must be a number >= 0, got {self.k!r}")
        if self.method == "best-rank" and self.weights:
            raise TpasInputError("fuse.weights: best-rank takes no weights (a cell's best rank over the inputs)")
        bad_depth = isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1
        if self.method in ("rrf", "best-rank") and bad_depth:
            raise TpasInputError(f"fuse.depth: must be an integer >= 1, got {self.depth!r}")

    def weight_of(self, name: str) -> float:
        """The weight of input `name` for wsum/rrf (1.0 when not given)."""
        if isinstance(self.weights, Mapping):
            return float(self.weights.get(name, 1.0))
        return 1.0

    def effective_weights(self, rounded: bool = True) -> dict[str, float]:
        """The linear coefficient each input ends up with (iterative/wsum); rounded to 12 digits for reports."""
        if self.method == "iterative":
            ws = [float(w) for w in (self.weights or [])]
            out = {}
            for j, n in enumerate(self.order):
                c = 1.0 if j == 0 else 1.0 - ws[j - 1]
                for w in ws[j:]:
                    c *= w
                out[n] = round(c, 12) if rounded else c  # rounding drops noise such as 0.060750000000000005
            return out
        return {n: self.weight_of(n) for n in self.order}


def _check_weight(v: Any, key: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
        raise TpasInputError(f"{key}: weight must be a number in [0, 1], got {v!r}")


@register_fusion("iterative")
def _iterative(inputs: Sequence[Prepared], spec: FuseSpec, start: int, stop: int, out: torch.Tensor) -> None:
    tmp = torch.empty_like(out)
    s = inputs[0].rows(start, stop, out=out)
    for p, w in zip(inputs[1:], spec.weights or [], strict=True):
        w = float(w)
        t = p.rows(start, stop, out=tmp)
        # Same float operations, in the same order, as w * s + (1 - w) * t.
        s.mul_(w)
        t.mul_(1.0 - w)
        s.add_(t)


@register_fusion("wsum")
def _wsum(inputs: Sequence[Prepared], spec: FuseSpec, start: int, stop: int, out: torch.Tensor) -> None:
    tmp = torch.empty_like(out)
    s = inputs[0].rows(start, stop, out=out)
    s.mul_(spec.weight_of(inputs[0].name))
    for p in inputs[1:]:
        t = p.rows(start, stop, out=tmp)
        t.mul_(spec.weight_of(p.name))
        s.add_(t)


@register_fusion("rrf")
def _rrf(inputs: Sequence[Prepared], spec: FuseSpec, start: int, stop: int, out: torch.Tensor) -> None:
    out.zero_()
    for p in inputs:
        cols, d = p.raw_topk(start, stop, int(spec.depth))
        ranks = torch.arange(1, d + 1, dtype=out.dtype)
        contrib = (spec.weight_of(p.name) / (float(spec.k) + ranks)).expand(stop - start, d)
        out.scatter_add_(1, cols, contrib.contiguous())


@register_fusion("best-rank")
def _best_rank(inputs: Sequence[Prepared], spec: FuseSpec, start: int, stop: int, out: torch.Tensor) -> None:
    out.zero_()
    for p in inputs:
        cols, d = p.raw_topk(start, stop, int(spec.depth))
        points = float(spec.depth) + 1.0 - torch.arange(1, d + 1, dtype=out.dtype)
        out.scatter_reduce_(1, cols, points.expand(stop - start, d).contiguous(), reduce="amax")


def fused_dtype(inputs: Sequence[Prepared]) -> torch.dtype:
    """float32, or wider when an input is wider (half-precision inputs are widened, never the other way)."""
    dtype = torch.float32
    for p in inputs:
        dtype = torch.promote_types(dtype, p.dense.dtype if p.dense is not None else p.topk.values.dtype)
    return dtype


def block_rows(n_cols: int) -> int:
    """Rows per block so one float32 block is about BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // max(1, 4 * n_cols))


class LinearFusion:
    """iterative/wsum as one linear map: block = sum_k a_k * x_k + b, the fused rows without per-input passes.

    Coefficients are computed in float64 from the effective weights and each input's normalisation, then applied in
    the output dtype: a dense input costs one multiply-add per cell; a top-K input adds a_k * fill_k to the row's b
    and a_k * (value - fill_k) at its K cells.
    """

    def __init__(self, inputs: Sequence[Prepared], spec: FuseSpec, dtype: torch.dtype):
        coef = spec.effective_weights(rounded=False)
        q = inputs[0].shape[0]
        bias = torch.zeros(q, 1, dtype=torch.float64)
        self.dense: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scores [Q, G], a: 0-d or [Q, 1])
        self.sparse: list[tuple[torch.Tensor, torch.Tensor]] = []  # (columns [Q, K], a * (value - fill) [Q, K])
        for p in inputs:
            shift, scale = (p.params.shift, p.params.scale) if p.params is not None else (0.0, 1.0)
            a = coef[p.name] / torch.as_tensor(scale, dtype=torch.float64)
            if p.topk is not None:
                bias = bias + a * (p.topk.fill.double() - shift)
                self.sparse.append((p.topk.indices, (a * (p.topk.values.double() - p.topk.fill.double())).to(dtype)))
            else:
                bias = bias - a * shift
                self.dense.append((p.dense, a.to(dtype)))
        self.bias = bias.to(dtype)

    def __call__(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        rows = slice(start, stop)
        b = self.bias[rows]
        if not self.dense:
            out.copy_(b.expand_as(out))
        for i, (x, a) in enumerate(self.dense):
            xa, ar = x[rows], (a if a.ndim == 0 else a[rows])
            if i == 0:
                if xa.dtype == out.dtype:
                    torch.mul(xa, ar, out=out)
                else:  # a narrower input: widen first, so the product is computed in the output dtype
                    out.copy_(xa).mul_(ar)
            elif a.ndim == 0:
                out.add_(xa, alpha=float(a))
            else:
                out.addcmul_(xa, ar)
        if self.dense:
            out.add_(b)
        for cols, v in self.sparse:
            out.scatter_add_(1, cols[rows], v[rows])
        return out


def fusion_kernel(inputs: Sequence[Prepared], spec: FuseSpec) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
    """`fn(start, stop, out)` writing fused rows [start, stop) into `out` [stop - start, G]."""
    if spec.method in ("iterative", "wsum") and not spec.exact:
        return LinearFusion(inputs, spec, fused_dtype(inputs))

    def run(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        FUSIONS[spec.method](inputs, spec, start, stop, out)
        return out

    return run


def fuse_prepared(
    inputs: Sequence[Prepared], spec: FuseSpec, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """Fuse prepared inputs (in `spec.order`) into one dense [Q, G] tensor, block by block, rows in parallel."""
    q, g = inputs[0].shape
    out = torch.empty(q, g, dtype=fused_dtype(inputs))
    kernel = fusion_kernel(inputs, spec)
    step = block_rows(g)
    done = [0]
    lock = threading.Lock()

    def run(lo: int, hi: int) -> None:
        for start in range(lo, hi, step):
            stop = min(hi, start + step)
            kernel(start, stop, out[start:stop])
            if progress is not None:
                with lock:
                    done[0] += stop - start
                    progress(done[0], q)

    map_row_ranges(run, q)
    return out


def fuse(
    matrices: Mapping[str, SimsMatrix],
    spec: FuseSpec,
    normalization: Mapping[str, tuple[str, str]] | tuple[str, str] = ("min-max", "global"),
    fill: Mapping[str, float | str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimsMatrix:
    """Fuse SimsMatrix inputs by name; every input is aligned by ids to the first of `spec.order`.

    Args:
        matrices: name -> SimsMatrix (dense or top-K).
        spec: the fusion (method, order, weights, rrf k/depth).
        normalization: (method, scope) for every input, or a mapping name -> (method, scope).
        fill: name -> fill rule of top-K inputs ("row-min" by default).
    Returns:
        A dense SimsMatrix with source "fused".
    """
    spec.validate(list(matrices))
    ref = matrices[spec.order[0]]
    prepared = []
    for name in spec.order:
        m = matrices[name].align(ref)
        method, scope = normalization[name] if isinstance(normalization, Mapping) else normalization
        prepared.append(prepare(name, m, method, scope, (fill or {}).get(name, "row-min")))
    scores = fuse_prepared(prepared, spec, progress)
    meta = {
        "fusion": {
            "method": spec.method,
            "order": list(spec.order),
            "weights": _plain(spec.weights),
            **({"exact": True} if spec.exact else {}),
        },
        "effective_weights": spec.effective_weights() if spec.method in ("iterative", "wsum") else {},
        "normalize": {p.name: {"method": p.method, "scope": p.scope} for p in prepared},
    }
    if spec.method == "rrf":
        meta["fusion"].update({"k": float(spec.k), "depth": int(spec.depth)})
    elif spec.method == "best-rank":
        meta["fusion"]["depth"] = int(spec.depth)
    return SimsMatrix(ref.query_ids, ref.gallery_ids, scores=scores, source="fused", meta=meta)


def _plain(w: Any) -> Any:
    if w is None:
        return None
    if isinstance(w, Mapping):
        return {str(k): float(v) for k, v in w.items()}
    return [float(v) for v in w]
