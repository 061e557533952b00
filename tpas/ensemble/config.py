"""The ensemble config (YAML): inputs, normalisation, fusion, post-processing, and an optional tuning space.

```yaml
inputs:                      # name -> SimsMatrix file, or {path, format: sims|trec|csv|ranking, fill: row-min|<number>}
  cmp_itm: sims_score/cmp.pt
ids: {query_index: query_index.txt, gallery: gallery/}   # optional: the ids of run-only ensembles (see pipeline)
normalize: {method: min-max, scope: global}
normalize_per_input: {clip: {method: zmuv}}
fuse: {method: iterative, order: [cmp_itm, beit3, blip2, clip], weights: [0.075, 0.9, 0.9]}  # exact: true = seed's ops
post: [{sca: {confidence: margin, tau: 0.0, depth: 10}}]
tune: {space: {fuse.weights.0: {low: 0, high: 0.2, step: 0.005}}}
```
Relative paths resolve against the config file's folder. `--set key=value` overrides any key (dotted path; list
items by position: `fuse.weights.1=0.8`, `post.0.sca.tau=0.1`); the value is read as YAML (`[0.1,0.9,0.9]`).
Every mistake is a TpasInputError naming the key.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import TpasInputError
from ..io import apply_overrides, find_config, read_yaml, resolve_against
from .external import RUN_FORMATS, detect_format
from .fusion import FuseSpec
from .normalize import check_method
from .post import get_post_step
from .rerank_fill import check_fill

INPUT_FORMATS = ("sims", *RUN_FORMATS)
TOP_KEYS = ("inputs", "ids", "normalize", "normalize_per_input", "fuse", "post", "tune")
ID_KEYS = ("query_index", "gallery")


@dataclass
class InputSpec:
    """One fusion input: its file, format, and fill rule for top-K matrices."""

    name: str
    path: Path
    format: str = "sims"
    fill: float | str = "row-min"


@dataclass
class EnsembleConfig:
    """A validated ensemble config. `raw` is the (overridden) YAML mapping it was built from."""

    inputs: dict[str, InputSpec]
    normalize: dict[str, tuple[str, str]]  # per input name: (method, scope)
    fuse: FuseSpec
    post: list[tuple[str, dict[str, Any]]]
    raw: dict[str, Any]
    base_dir: Path
    tune: dict[str, Any] = field(default_factory=dict)
    ids: dict[str, Path] = field(default_factory=dict)  # `query_index` / `gallery` files, resolved

    @property
    def transductive(self) -> bool:
        """True when a post step uses the whole query set (every post step does)."""
        return bool(self.post)


# ------------------------------------------------------------------------------------------------ loading
def load_config(path: str | Path, overrides: Sequence[str] = ()) -> EnsembleConfig:
    """Read a config file or packaged preset (`www25_iterative`), override (`--set`), resolve and validate it.

    Relative paths resolve against the file's folder. A packaged preset, which has no folder of the user's, reads
    them as if it sat in `configs/ensemble/` of the current directory: its `../../sims_score/x.pt` is `sims_score/x.pt`.
    """
    given = Path(path)
    path = find_config(given, "ensemble")
    raw = apply_overrides(read_yaml(path, expected="a YAML mapping with `inputs` and `fuse`"), overrides)
    base_dir = path.resolve().parent if path == given else Path.cwd() / "configs" / "ensemble"
    try:
        return build_config(raw, base_dir)
    except TpasInputError as e:
        raise TpasInputError(e.message, path, e.where) from None


def _mapping(v: Any, key: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise TpasInputError(f"{key}: expected a mapping, got {type(v).__name__}")
    return v


def _norm_spec(v: Any, key: str, default: tuple[str, str]) -> tuple[str, str]:
    if isinstance(v, str):
        v = {"method": v}
    v = _mapping(v, key)
    unknown = set(v) - {"method", "scope"}
    if unknown:
        raise TpasInputError(f"{key}.{sorted(unknown)[0]}: unknown key; use `method` and `scope`")
    method, scope = str(v.get("method", default[0])), str(v.get("scope", default[1]))
    check_method(method, scope, key)
    return method, scope


def build_config(raw: dict[str, Any], base_dir: Path) -> EnsembleConfig:
    """Validate a raw config mapping; relative paths resolve against `base_dir`."""
    raw = copy.deepcopy(raw)
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise TpasInputError(f"{unknown[0]}: unknown top-level key; known: {list(TOP_KEYS)}")
    inputs_raw = _mapping(raw.get("inputs"), "inputs")
    if not inputs_raw:
        raise TpasInputError("inputs: no inputs; name at least one SimsMatrix file")
    inputs: dict[str, InputSpec] = {}
    for name, v in inputs_raw.items():
        key = f"inputs.{name}"
        if isinstance(v, (str, Path)):
            v = {"path": str(v)}
        v = _mapping(v, key)
        bad = set(v) - {"path", "format", "fill"}
        if bad:
            raise TpasInputError(f"{key}.{sorted(bad)[0]}: unknown key; use path, format, fill")
        if not v.get("path"):
            raise TpasInputError(f"{key}.path: missing file path")
        p = Path(str(v["path"]))
        p = resolve_against(p, base_dir)
        fmt = v.get("format") or detect_format(p)
        if fmt not in INPUT_FORMATS:
            raise TpasInputError(f"{key}.format: {fmt!r} is not one of {list(INPUT_FORMATS)}")
        fill = check_fill(v.get("fill", "row-min"), f"{key}.fill")
        inputs[str(name)] = InputSpec(str(name), p, fmt, fill)
    default = _norm_spec(raw.get("normalize"), "normalize", ("min-max", "global"))
    per = _mapping(raw.get("normalize_per_input"), "normalize_per_input")
    for name in per:
        if name not in inputs:
            raise TpasInputError(f"normalize_per_input.{name}: unknown input; inputs are {list(inputs)}")
    normalize = {n: _norm_spec(per[n], f"normalize_per_input.{n}", default) if n in per else default for n in inputs}
    fuse_raw = _mapping(raw.get("fuse"), "fuse")
    bad = set(fuse_raw) - {"method", "order", "weights", "k", "depth", "exact"}
    if bad:
        raise TpasInputError(f"fuse.{sorted(bad)[0]}: unknown key; use method, order, weights, k, depth, exact")
    order = fuse_raw.get("order", list(inputs))
    if not isinstance(order, list):
        raise TpasInputError("fuse.order: expected a list of input names")
    spec = FuseSpec(
        method=str(fuse_raw.get("method", "iterative")),
        order=[str(o) for o in order],
        weights=fuse_raw.get("weights"),
        k=fuse_raw.get("k", 60.0),
        depth=fuse_raw.get("depth", 1000),
        exact=fuse_raw.get("exact", False),
    )
    spec.validate(list(inputs))
    if spec.method == "iterative":
        spec.weights = [float(w) for w in spec.weights]
    elif isinstance(spec.weights, Mapping):
        spec.weights = {str(k): float(w) for k, w in spec.weights.items()}
    post_raw = raw.get("post") or []
    if not isinstance(post_raw, list):
        raise TpasInputError("post: expected a list of steps, e.g. [{sca: {tau: 0.0}}]")
    post = []
    for i, item in enumerate(post_raw):
        key = f"post.{i}"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise TpasInputError(f"{key}: expected one step name mapped to its parameters, e.g. {{sca: {{tau: 0}}}}")
        ((name, params),) = item.items()
        step = get_post_step(name, key)
        post.append((name, step.validate(_mapping(params, f"{key}.{name}"), f"{key}.{name}", base_dir)))
    tune = _mapping(raw.get("tune"), "tune")
    return EnsembleConfig(inputs, normalize, spec, post, raw, base_dir, tune, _ids(raw.get("ids"), base_dir))


def _ids(v: Any, base_dir: Path) -> dict[str, Path]:
    v = _mapping(v, "ids")
    bad = set(v) - set(ID_KEYS)
    if bad:
        raise TpasInputError(f"ids.{sorted(bad)[0]}: unknown key; use {', '.join(ID_KEYS)}")
    out = {}
    for k, p in v.items():
        if not p:
            raise TpasInputError(f"ids.{k}: missing file path")
        out[k] = resolve_against(Path(str(p)), base_dir)
    return out


PATH_PARAMS = ("text_features", "captions", "bank")


def dump_config(raw: dict[str, Any], base_dir: Path, out_path: Path, header: str = "") -> str:
    """YAML text of `raw` for writing at `out_path`: file paths re-expressed relative to the new file's folder."""
    raw = copy.deepcopy(raw)
    out_dir = out_path.resolve().parent

    def rebase(value: Any) -> str:
        p = Path(str(value))
        p = p if p.is_absolute() else (base_dir / p).resolve()
        try:
            return os.path.relpath(p, out_dir)
        except ValueError:  # another drive (Windows): keep it absolute
            return str(p)

    for name, v in (raw.get("inputs") or {}).items():
        if isinstance(v, dict):
            v["path"] = rebase(v["path"])
        else:
            raw["inputs"][name] = rebase(v)
    for k, v in (raw.get("ids") or {}).items():
        raw["ids"][k] = rebase(v)
    for item in raw.get("post") or []:
        if isinstance(item, dict):
            for params in item.values():
                if isinstance(params, dict):
                    for k in PATH_PARAMS:
                        if params.get(k):
                            params[k] = rebase(params[k])
    text = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=120)
    return header + text
