"""Files: atomic writes, the one YAML reader with dotted `--set` overrides, and the packaged config presets.

Configs live in the top-level `configs/{models,ensemble,train}/` folder of the repository and ship inside the wheel as
the package `tpas.configs`, so every command can take a preset by name (`--config www25_iterative`) as well as a path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import TpasInputError

CONFIG_KINDS = ("models", "ensemble", "train")
_YAML_SUFFIXES = (".yaml", ".yml")
_PACKAGE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ atomic writes
def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it into place (no half-written files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------ YAML
def read_yaml(path: str | Path, expected: str = "a YAML mapping") -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is {}); TpasInputError for a missing file, bad YAML or a non-mapping.

    `expected` says what the file should hold, for the error when it holds something else.
    """
    path = Path(path)
    if not path.is_file():
        raise TpasInputError("config file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        raise TpasInputError(f"not valid YAML ({getattr(e, 'problem', None) or e})", path, where) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TpasInputError(f"expected {expected}, found {type(data).__name__}", path)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` -> (key path, YAML value; an empty value is null); TpasInputError without `=` or a key."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise TpasInputError(f"--set {text!r}: expected key=value (e.g. fuse.weights=[0.1,0.9,0.9])")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise TpasInputError(f"--set {key}: value {value!r} is not valid YAML ({e.problem})") from None
    return key, parsed


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a nested mapping/list structure (list items by position), creating mappings on the way."""
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
    """Read a dotted key (KeyError / IndexError when absent)."""
    node = raw
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `--set key=value` texts to `raw` in order (in place); returns `raw`."""
    for text in overrides:
        set_key(raw, *parse_override(text))
    return raw


# ------------------------------------------------------------------------------------------------ packaged configs
def configs_root() -> Path:
    """The folder of the packaged configs: `tpas.configs`, or `<checkout>/configs` when tpas runs from a checkout.

    An installed wheel holds them as the package `tpas.configs`; a source checkout (editable install or PYTHONPATH)
    has them beside the package. The checkout is asked first, so a checkout on PYTHONPATH reads its own configs even
    when another copy of tpas is installed in the same environment.
    """
    checkout = _PACKAGE.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs" / "__init__.py").is_file():
        return checkout / "configs"
    try:
        return Path(str(resources.files("tpas.configs")))
    except ModuleNotFoundError:
        raise TpasInputError("the packaged configs (tpas.configs) are missing; reinstall tpas", _PACKAGE) from None


def config_names(kind: str) -> list[str]:
    """Names of the packaged presets of one kind (models, ensemble, train), sorted."""
    if kind not in CONFIG_KINDS:
        raise ValueError(f"config kind must be one of {CONFIG_KINDS}, got {kind!r}")
    folder = configs_root() / kind
    return sorted(p.stem for p in folder.iterdir() if p.suffix == ".yaml")


def find_config(name_or_path: str | Path, kind: str) -> Path:
    """An existing file as given, else the packaged preset of that name (`www25_iterative`, `cmp_tiny.yaml`).

    TpasInputError naming the packaged presets of `kind` when it is neither.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = config_names(kind)
    stem = path.stem if path.suffix in _YAML_SUFFIXES else path.name
    if len(path.parts) == 1 and stem in names:
        return configs_root() / kind / f"{stem}.yaml"
    raise TpasInputError(f"file not found, nor a packaged {kind} config ({', '.join(names)})", path)


def read_config(
    name_or_path: str | Path, kind: str, overrides: Sequence[str] = (), expected: str = "a YAML mapping"
) -> dict[str, Any]:
    """A config file or packaged preset as a mapping, `--set` overrides applied (`expected`: as for `read_yaml`)."""
    return apply_overrides(read_yaml(find_config(name_or_path, kind), expected), overrides)
