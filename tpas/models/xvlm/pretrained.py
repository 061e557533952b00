"""X-VLM's pre-training checkpoint (e.g. 16m_base_model_state_step_199999.th) as the initialisation of another model.

CMP's trainer starts from it exactly so (Shuyu-XJTU/CMP models/cmp.py `load_pretrained`: the file's `model` dict, or
the file itself, loaded with strict=False): Swin, BERT text + fusion layers, MLM head, `temp` and `itm_head` share
names and shapes with CMP and are copied; X-VLM's Linear projections and `bbox_head` have no place in CMP; CMP's
BatchNorm projections and pose branch keep their fresh initialisation. X-VLM's own fine-tuning (models/xvlm.py
`load_pretrained`) also drops BERT's `bert.` level for its BertModel text encoder; that rename applies when the
target model has the X-VLM retrieval layout. A shape mismatch stops the original (PyTorch's size-mismatch error),
and stops here too, except for buffers the model recomputes (shifted-window masks, position indices).

X-VLM's fine-tuning loader also resamples every Swin `relative_position_bias_table` to the target window
(models/swin_transformer.py `interpolate_relative_pos_embed`, BEiT's rule): the source table's (2w-1) x (2w-1) offsets
are placed on a grid whose spacing grows geometrically from the centre, so that its outermost offset reaches the
target's, and each head is resampled at the target's integer offsets with a bicubic spline (scipy's `interp2d(kind=
'cubic')` there, FITPACK's interpolating spline, constant beyond the outermost offset; `RectBivariateSpline` here, the
same spline). `interpolate_tables=True` does that (the 16M model's window 7 at 224 px -> window 12 at 384 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...errors import TpasInputError
from ..checkpoint import extract_state_dict, load_checkpoint, strip_prefix

RECOMPUTED = ("attn_mask", "relative_position_index", "position_ids")


@dataclass
class PretrainedReport:
    """What loading a pre-training checkpoint did, key by key (model key names; file names for `unexpected`).

    Attributes:
        loaded: copied from the file.
        missing: the model's keys the file lacks; they keep the model's fresh initialisation.
        unexpected: the file's keys the model has no place for; ignored.
        reinitialised: in both, but with another shape in the file (a buffer for another input size); the model's
            own recomputed value is kept.
        renamed: {file key: model key} for the keys renamed before matching.
        interpolated: relative-position tables resampled to the model's window (`interpolate_tables=True`).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    interpolated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the count of each kind."""
        resampled = f", {len(self.interpolated)} interpolated (new window)" if self.interpolated else ""
        return (
            f"{len(self.loaded)} loaded, {len(self.missing)} missing (fresh initialisation), "
            f"{len(self.unexpected)} unexpected (ignored), {len(self.reinitialised)} re-initialised (recomputed)"
            + resampled
        )

    def lines(self) -> list[str]:
        """One line per key: `<status> <key>`, statuses in the order loaded, missing, unexpected, re-initialised,
        interpolated."""
        kinds = (("loaded", self.loaded), ("missing", self.missing), ("unexpected", self.unexpected),
                 ("re-initialised", self.reinitialised), ("interpolated", self.interpolated))  # fmt: skip
        return [f"{name} {k}" for name, keys in kinds for k in keys]


def _is_resizable_table(key: str, table: torch.Tensor, own: torch.Tensor) -> bool:
    """Both are square-offset relative-position tables with the same number of heads."""
    return (
        key.endswith("relative_position_bias_table")
        and table.ndim == own.ndim == 2
        and table.shape[1] == own.shape[1]
        and all(math.isqrt(n) ** 2 == n and math.isqrt(n) % 2 == 1 for n in (table.shape[0], own.shape[0]))
    )


def _rename_for(model_keys: set[str], state: dict[str, torch.Tensor]) -> dict[str, str]:
    """X-VLM's fine-tuning rename: `text_encoder.bert.X` -> `text_encoder.X` when the model has no `bert.` level."""
    if any(k.startswith("text_encoder.bert.") for k in model_keys):
        return {}
    return {k: "text_encoder." + k[len("text_encoder.bert.") :] for k in state if k.startswith("text_encoder.bert.")}


def _geometric_offsets(src_size: int, dst_size: int) -> list[float]:
    """Positions of the source table's offsets -n..n (n = src_size // 2): gaps 1, q, q^2, ... from the centre, q found
    by bisection in [1.01, 1.5] so that 1 + q + ... + q^(n-1) comes up to dst_size // 2 (the original's search)."""
    n, target = src_size // 2, dst_size // 2
    lo, hi = 1.01, 1.5
    q = lo
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q**n) / (1.0 - q) > target:
            hi = q
        else:
            lo = q
    positive, cur = [], 1.0
    for i in range(n):
        positive.append(cur)
        cur += q ** (i + 1)
    return [-p for p in reversed(positive)] + [0.0] + positive


def interpolate_relative_position_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """A Swin `relative_position_bias_table` [(2w-1)^2, heads] resampled for `window` (see the module docstring)."""
    from scipy.interpolate import RectBivariateSpline

    src_size, dst_size = math.isqrt(table.shape[0]), 2 * window - 1
    if src_size == dst_size:
        return table
    grid = np.asarray(_geometric_offsets(src_size, dst_size))
    half = dst_size // 2
    targets = np.arange(-half, half + 0.1, 1.0)
    # Beyond the outermost source offset the original's spline evaluation holds the edge value: clip, as FITPACK does.
    targets = np.clip(targets, grid[0], grid[-1])
    heads = []
    for h in range(table.shape[1]):
        z = table[:, h].reshape(src_size, src_size).double().numpy()
        spline = RectBivariateSpline(grid, grid, z, kx=3, ky=3, s=0)
        heads.append(torch.from_numpy(spline(targets, targets)).reshape(-1))
    return torch.stack(heads, dim=1).to(table.dtype)


@torch.no_grad()
def load_xvlm_pretrained(
    model: nn.Module, path: str | Path, *, trust_checkpoint: bool = False, interpolate_tables: bool = False
) -> PretrainedReport:
    """Copy the tensors of an X-VLM pre-training checkpoint into a freshly initialised `model` (CMP, X-VLM, APTM).

    Keys present in both with equal shapes are loaded; the rest is reported (see `PretrainedReport`). A learnable
    tensor whose shape differs raises TpasInputError naming the keys (the original stops there as well), except,
    with `interpolate_tables` (X-VLM's fine-tuning loader), Swin relative-position tables of another window with the
    same heads, which are resampled to the model's window.
    """
    path = Path(path)
    state = strip_prefix(extract_state_dict(load_checkpoint(path, trust=trust_checkpoint), path), "module.")
    own = model.state_dict()
    renamed = _rename_for(set(own), state)
    state = {renamed.get(k, k): v for k, v in state.items()}
    report = PretrainedReport(renamed=renamed)
    inverse = {v: k for k, v in renamed.items()}
    report.unexpected = [inverse.get(k, k) for k in state if k not in own]
    clash = []
    take: dict[str, torch.Tensor] = {}
    for k, v in own.items():
        if k not in state:
            report.missing.append(k)
        elif tuple(state[k].shape) == tuple(v.shape):
            take[k] = state[k]
            report.loaded.append(k)
        elif k.rsplit(".", 1)[-1] in RECOMPUTED:
            report.reinitialised.append(k)
        elif interpolate_tables and _is_resizable_table(k, state[k], v):
            take[k] = interpolate_relative_position_table(state[k], (math.isqrt(v.shape[0]) + 1) // 2)
            report.interpolated.append(k)
        else:
            clash.append(f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})")
    if clash:
        raise TpasInputError(
            f"{len(clash)} tensor(s) of the pre-training checkpoint do not fit the model: {'; '.join(clash[:3])}", path
        )
    # Tied tensors (CMP's MLM decoder and word embeddings) are one parameter under two names; both names carry the
    # same values in the file, so loading both is loading one.
    model.load_state_dict(take, strict=False)
    return report
