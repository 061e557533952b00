"""Score normalisation before fusion: `min-max`, `zmuv`, `rank`, `none`, over the whole matrix or per query row.

Names follow ranx. `min-max` and `zmuv` are affine maps `(x - shift) / scale`; they are described by their
parameters (`AffineParams`) so that fusion can apply them chunk by chunk without a normalised copy of each matrix,
and so that a top-K (ITM re-rank) matrix can be normalised as if it were dense without densifying it.
`rank` is not affine and materialises its result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import TpasInputError
from ..parallel import map_row_ranges

SCOPES = ("global", "query")
NORMALIZERS: dict[str, Callable[..., torch.Tensor]] = {}


def register_normalizer(name: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a dense normaliser `fn(x [Q, G], scope) -> [Q, G]` under `name` (the config's `normalize.method`)."""

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        NORMALIZERS[name] = fn
        return fn

    return deco


def check_method(method: str, scope: str, key: str = "normalize") -> None:
    """TpasInputError naming `key` when the method or scope is unknown."""
    if method not in NORMALIZERS:
        raise TpasInputError(f"{key}.method: unknown normalisation {method!r}; choose one of {sorted(NORMALIZERS)}")
    if scope not in SCOPES:
        raise TpasInputError(f"{key}.scope: unknown scope {scope!r}; choose one of {list(SCOPES)}")


@dataclass
class AffineParams:
    """norm(x) = (x - shift) / scale; shift/scale are 0-d tensors (global) or [Q, 1] (per query)."""

    shift: torch.Tensor
    scale: torch.Tensor

    def rows(self, start: int, stop: int) -> AffineParams:
        """The parameters for rows [start, stop) (global parameters are shared by every row)."""
        if self.shift.ndim == 0:
            return self
        return AffineParams(self.shift[start:stop], self.scale[start:stop])

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(x - shift) / scale, written into `out` when given (same float operations as the out-of-place form)."""
        out = torch.sub(x, self.shift, out=out) if out is not None else x - self.shift
        return out.div_(self.scale)


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # A constant matrix (or row) has no spread: map it to 0 instead of dividing by zero (the seed produced NaN).
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def minmax_params_from_stats(mn: torch.Tensor, mx: torch.Tensor) -> AffineParams:
    """Min-max parameters from precomputed minima and maxima (any broadcastable shape)."""
    return AffineParams(mn, _safe_scale(mx - mn))


def zmuv_params_from_stats(mean: torch.Tensor, std: torch.Tensor) -> AffineParams:
    """Z-score parameters from precomputed means and standard deviations."""
    return AffineParams(mean, _safe_scale(std))


def affine_params(x: torch.Tensor, method: str, scope: str) -> AffineParams | None:
    """The affine parameters of `method` on dense `x`, or None when the method is not affine (`rank`)."""
    check_method(method, scope)
    if method == "none":
        z = torch.zeros((), dtype=x.dtype)
        return AffineParams(z, torch.ones((), dtype=x.dtype))
    if method == "min-max":
        # Per row range in parallel; min and max are exact whatever the split.
        if scope == "global":
            parts = map_row_ranges(lambda lo, hi: torch.aminmax(x[lo:hi]), x.shape[0])
            mn = torch.stack([p[0] for p in parts]).min()
            mx = torch.stack([p[1] for p in parts]).max()
        else:
            parts = map_row_ranges(lambda lo, hi: torch.aminmax(x[lo:hi], dim=1, keepdim=True), x.shape[0])
            mn, mx = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return minmax_params_from_stats(mn, mx)
    if method == "zmuv":
        if scope == "global":
            std, mean = torch.std_mean(x.double(), correction=0) if x.numel() < 2**24 else _std_mean_chunked(x)
            return zmuv_params_from_stats(mean.to(x.dtype), std.to(x.dtype))
        parts = map_row_ranges(lambda lo, hi: torch.std_mean(x[lo:hi], dim=1, keepdim=True, correction=0), x.shape[0])
        std, mean = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return zmuv_params_from_stats(mean, std)
    return None


def _std_mean_chunked(x: torch.Tensor, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    # Float64 accumulation without a float64 copy of a large matrix.
    s = torch.zeros((), dtype=torch.float64)
    ss = torch.zeros((), dtype=torch.float64)
    for i in range(0, x.shape[0], rows):
        c = x[i : i + rows].double()
        s += c.sum()
        ss += (c * c).sum()
    n = x.numel()
    mean = s / n
    return (ss / n - mean * mean).clamp_min(0).sqrt(), mean


@register_normalizer("min-max")
def min_max(x: torch.Tensor, scope: str = "global") -> torch.Tensor:
    """(x - min) / (max - min) over the matrix (`global`) or each row (`query`); a constant scope maps to 0."""
    return affine_params(x, "min-max", scope).apply(x)


@register_normalizer("zmuv")
def zmuv(x: torch.Tensor, scope: str = "global") -> torch.Tensor:
    """Zero mean, unit variance (population std) over the matrix or each row."""
    return affine_params(x, "zmuv", scope).apply(x)


@register_normalizer("none")
def identity(x: torch.Tensor, scope: str = "global") -> torch.Tensor:
    """The scores unchanged."""
    return x


@register_normalizer("rank")
def rank(x: torch.Tensor, scope: str = "global") -> torch.Tensor:
    """(number of strictly lower cells + 1) / N within the scope: the best cell gets 1, ties share a value."""
    check_method("rank", scope)
    if scope == "global":
        flat = x.reshape(-1)
        srt = flat.sort().values
        lower = torch.searchsorted(srt, flat, side="left")
        return ((lower + 1).to(x.dtype) / flat.numel()).reshape(x.shape)
    srt = x.sort(dim=1).values
    lower = torch.searchsorted(srt, x.contiguous(), side="left")
    return (lower + 1).to(x.dtype) / x.shape[1]


def normalize(x: torch.Tensor, method: str = "min-max", scope: str = "global") -> torch.Tensor:
    """Normalise dense scores `x` [Q, G] with a registered method over `scope` (`global` or `query`)."""
    check_method(method, scope)
    return NORMALIZERS[method](x, scope)
