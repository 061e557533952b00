"""ITM re-rank matrices: scores only at each query's top-k cells, every other cell filled, never densified.

The seed's rule (CMP's re-rank): every unscored cell of a row takes that row's minimum match score, then the whole
matrix is min-max normalised. A `FilledTopK` keeps the top-K cells plus one fill value per row and answers the
statistics a normalisation needs (min, max, mean, std over the implied dense matrix) from those alone, so a
1,978 x 36,773 fusion never allocates a dense copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TpasInputError
from ..sims import SimsMatrix
from .normalize import AffineParams, check_method, minmax_params_from_stats, zmuv_params_from_stats

FILL_RULES = ("row-min",)


def check_fill(fill: object, key: str) -> float | str:
    """Validate a fill setting: "row-min" or a finite number; TpasInputError naming `key` otherwise."""
    if isinstance(fill, str):
        if fill in FILL_RULES:
            return fill
        raise TpasInputError(f"{key}: unknown fill {fill!r}; use 'row-min' or a number")
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or fill != fill or abs(fill) == float("inf"):
        raise TpasInputError(f"{key}: fill must be 'row-min' or a finite number, got {fill!r}")
    return float(fill)


@dataclass
class FilledTopK:
    """A top-K score matrix whose unscored cells hold a per-row fill value.

    Attributes:
        indices: [Q, K] gallery columns of the scored cells.
        values: [Q, K] their scores.
        fill: [Q, 1] the value of every other cell of the row.
        n_cols: gallery size G.
    """

    indices: torch.Tensor
    values: torch.Tensor
    fill: torch.Tensor
    n_cols: int

    @classmethod
    def from_sims(cls, m: SimsMatrix, fill: float | str = "row-min") -> FilledTopK:
        """Wrap a top-K SimsMatrix; `fill` is "row-min" (the seed's rule) or a number."""
        if m.is_dense:
            raise ValueError("FilledTopK needs a top-K SimsMatrix")
        vals = m.values
        q = vals.shape[0]
        if fill == "row-min":
            f = vals.min(dim=1, keepdim=True).values if vals.shape[1] else torch.zeros(q, 1, dtype=vals.dtype)
        else:
            f = torch.full((q, 1), float(fill), dtype=vals.dtype)
        return cls(m.indices.long(), vals, f, len(m.gallery_ids))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.values.shape[0]), self.n_cols

    @property
    def has_fill_cells(self) -> bool:
        return self.values.shape[1] < self.n_cols

    def rows(self, start: int, stop: int, params: AffineParams | None = None, out: torch.Tensor | None = None):
        """Dense rows [start, stop), normalised by `params` when given, written into `out` when given."""
        fill = self.fill[start:stop]
        vals = self.values[start:stop]
        if params is not None:
            p = params.rows(start, stop)
            fill = p.apply(fill)
            vals = p.apply(vals)
        b = stop - start
        if out is None:
            out = torch.empty(b, self.n_cols, dtype=self.values.dtype)
        out.copy_(fill.expand(b, self.n_cols))
        out.scatter_(1, self.indices[start:stop], vals.to(out.dtype))  # `out` may be wider (mixed-precision fusion)
        return out

    def dense(self) -> torch.Tensor:
        """The implied dense [Q, G] matrix."""
        return self.rows(0, self.shape[0])

    def affine_params(self, method: str, scope: str) -> AffineParams | None:
        """Normalisation parameters over the implied dense matrix, computed from the K cells and the fill only."""
        check_method(method, scope)
        if method == "none":
            return AffineParams(torch.zeros((), dtype=self.values.dtype), torch.ones((), dtype=self.values.dtype))
        use_fill = self.has_fill_cells
        if method == "min-max":
            if scope == "global":
                mn, mx = torch.aminmax(self.values) if self.values.numel() else (self.fill.min(), self.fill.max())
                if use_fill:
                    mn, mx = torch.minimum(mn, self.fill.min()), torch.maximum(mx, self.fill.max())
            else:
                if self.values.shape[1]:
                    mn, mx = torch.aminmax(self.values, dim=1, keepdim=True)
                else:
                    mn, mx = self.fill, self.fill
                if use_fill:
                    mn, mx = torch.minimum(mn, self.fill), torch.maximum(mx, self.fill)
            return minmax_params_from_stats(mn, mx)
        if method == "zmuv":
            v = self.values.double()
            f = self.fill.double()
            n_fill = self.n_cols - v.shape[1]
            s = v.sum(dim=1, keepdim=True) + n_fill * f
            ss = (v * v).sum(dim=1, keepdim=True) + n_fill * f * f
            if scope == "global":
                n = self.n_cols * v.shape[0]
                mean = s.sum() / n
                var = ss.sum() / n - mean * mean
            else:
                mean = s / self.n_cols
                var = ss / self.n_cols - mean * mean
            dt = self.values.dtype
            return zmuv_params_from_stats(mean.to(dt), var.clamp_min(0).sqrt().to(dt))
        return None
