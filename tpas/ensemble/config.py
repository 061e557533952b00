"""The ensemble config (YAML): inputs, normalisation, fusion, post-processing, and an optional tuning space.

```yaml
inputs:                      # name -> SimsMatrix file, or {path, format: sims|trec|csv, fill: row-min|<number>}
  cmp_itm: sims_score/cmp.pt
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
from .fusion import FuseSpec
from .normalize import check_method
from .post import get_post_step
from .rerank_fill import check_fill

INPUT_FORMATS = ("sims", "trec", "csv")
TOP_KEYS = ("inputs", "normalize", "normalize_per_input", "fuse", "post", "tune")


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

    @property
    def transductive(self) -> bool:
        """True when a post step uses the whole query set (every post step does)."""
        return bool(self.post)


# ------------------------------------------------------------------------------------------------ overrides
def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` -> (key path, YAML value); TpasInputError when there is no `=` or no key."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise TpasInputError(f"--set {text!r}: expected key=value (e.g. fuse.weights=[0.1,0.9,0.9])")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise TpasInputError(f"--set {key}: value {value!r} is not valid YAML ({e.problem})") from None
    return key, parsed


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a nested mapping/list structure, creating mappings on the way."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            try:
                idx = int(part)
            except ValueError:
                raise TpasInputError(f"--set {key}: {where!r} indexes a list; use a position (0, 1, ...)") from None
            if not -len(node) <= idx < len(node):
                raise TpasInputError(f"--set {key}: position {idx} is outside the list of {len(node)} items")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        else:
            raise TpasInputError(f"--set {key}: {'.'.join(parts[:i])!r} is a value, not a mapping or list")


def get_key(raw: Any, key: str) -> Any:
    """Read a dotted key (KeyError when absent)."""
    node = raw
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


# ------------------------------------------------------------------------------------------------ loading
def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path` (TpasInputError for a missing file, bad YAML, or a non-mapping)."""
    path = Path(path)
    if not path.is_file():
        raise TpasInputError("config file not found", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        raise TpasInputError(f"not valid YAML ({getattr(e, 'problem', e)})", path, where) from None
    if not isinstance(raw, dict):
        raise TpasInputError("expected a YAML mapping with `inputs` and `fuse`", path)
    return raw


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> EnsembleConfig:
    """Read, override (`--set`), resolve and validate an ensemble config."""
    path = Path(path)
    raw = read_yaml(path)
    for text in overrides:
        set_key(raw, *parse_override(text))
    try:
        return build_config(raw, path.resolve().parent)
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
        p = p if p.is_absolute() else base_dir / p
        fmt = v.get("format")
        if fmt is None:
            suffix = p.suffix.lower()
            fmt = "csv" if suffix == ".csv" else "trec" if suffix in (".run", ".trec", ".txt", ".tsv") else "sims"
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
    return EnsembleConfig(inputs, normalize, spec, post, raw, base_dir, tune)


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
    for item in raw.get("post") or []:
        if isinstance(item, dict):
            for params in item.values():
                if isinstance(params, dict):
                    for k in PATH_PARAMS:
                        if params.get(k):
                            params[k] = rebase(params[k])
    text = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=120)
    return header + text
