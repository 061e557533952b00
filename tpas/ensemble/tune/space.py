"""The search space of `tpas tune`: tunable config keys, their candidate values, and configs built from a point."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ...errors import TpasInputError
from ...io import get_key, set_key
from ..config import EnsembleConfig, build_config


@dataclass
class Dimension:
    """One tunable config key and its candidate values (numeric ones generated without float drift)."""

    key: str
    values: list[Any]
    numeric: bool


def decimal_range(low: float, high: float, step: float) -> list[float]:
    """low, low + step, ..., high using integer arithmetic: 0.075 is 75/1000, never 0.07500000000000001."""
    decs = [Decimal(str(x)) for x in (low, high, step)]
    places = max(max(0, -d.as_tuple().exponent) for d in decs)
    scale = 10**places
    lo, hi, st = (int(d * scale) for d in decs)
    if st <= 0 or hi < lo:
        raise ValueError("need step > 0 and high >= low")
    return [(lo + i * st) / scale for i in range((hi - lo) // st + 1)]


def _dimension(key: str, spec: Any, default_step: float | None) -> Dimension:
    where = f"tune.space.{key}"
    if isinstance(spec, list):
        if not spec:
            raise TpasInputError(f"{where}: empty list of values")
        return Dimension(key, list(spec), all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec))
    if isinstance(spec, dict):
        bad = set(spec) - {"low", "high", "step"}
        if bad or "low" not in spec or "high" not in spec:
            raise TpasInputError(f"{where}: expected {{low, high, step}} or a list of values")
        step = default_step if default_step is not None else spec.get("step", 0.05)
        try:
            values = decimal_range(float(spec["low"]), float(spec["high"]), float(step))
        except (TypeError, ValueError) as e:
            raise TpasInputError(f"{where}: {e}") from None
        if all(isinstance(spec[k], int) for k in ("low", "high")) and float(step).is_integer():
            values = [int(v) for v in values]
        return Dimension(key, values, True)
    raise TpasInputError(f"{where}: expected {{low, high, step}} or a list of values, got {spec!r}")


def build_space(cfg: EnsembleConfig, step: float | None = None) -> list[Dimension]:
    """The dimensions of `tune.space`, or every fusion weight on [0, 1] when the config lists none."""
    space = cfg.tune.get("space")
    if space is None:
        spec = cfg.fuse
        space = {}
        if spec.method == "iterative":
            space = {f"fuse.weights.{i}": {"low": 0.0, "high": 1.0} for i in range(len(spec.order) - 1)}
        else:
            space = {f"fuse.weights.{n}": {"low": 0.0, "high": 1.0} for n in spec.order}
            if spec.method == "rrf":
                space["fuse.k"] = [10, 20, 40, 60, 80, 100]
    if not isinstance(space, dict) or not space:
        raise TpasInputError("tune.space: expected a mapping of config keys to value ranges")
    dims = [_dimension(str(k), v, step) for k, v in space.items()]
    for d in dims:  # every value must make a valid config; check each once now rather than fail mid-search
        for v in d.values:
            apply_params(cfg, {d.key: v})
    return dims


def apply_params(cfg: EnsembleConfig, params: dict[str, Any]) -> EnsembleConfig:
    """The config with `params` (dotted key -> value) set, validated again."""
    raw = copy.deepcopy(cfg.raw)
    tunes_named_weights = cfg.fuse.method != "iterative" and any(k.startswith("fuse.weights.") for k in params)
    if tunes_named_weights and not isinstance(raw.get("fuse", {}).get("weights"), dict):
        raw.setdefault("fuse", {})["weights"] = {n: 1.0 for n in cfg.fuse.order}
    for k, v in params.items():
        try:
            set_key(raw, k, v)
        except TpasInputError as e:
            raise TpasInputError(f"tune.space.{k}: {e.message}") from None
    return build_config(raw, cfg.base_dir)


def start_point(cfg: EnsembleConfig, dims: list[Dimension]) -> dict[str, Any]:
    """The config's own values (snapped to the nearest candidate), so a search never starts worse than the preset."""
    out = {}
    for d in dims:
        try:
            cur = get_key(cfg.raw, d.key)
        except (KeyError, IndexError, TypeError, ValueError):
            cur = None
        if cur in d.values:
            out[d.key] = cur
        elif d.numeric and isinstance(cur, (int, float)):
            out[d.key] = min(d.values, key=lambda v: abs(v - cur))
        else:
            out[d.key] = d.values[0]
    return out
