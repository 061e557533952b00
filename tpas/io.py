"""Files: atomic writes, the one YAML reader with dotted `--set` overrides, and the packaged config presets.

Configs live in the top-level `configs/{models,ensemble,train}/` folder of the repository and ship inside the wheel as
the package `tpas.configs`, so every command can take a preset by name (`--config www25_iterative`) as well as a path.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import TpasInputError

CONFIG_KINDS = ("models", "ensemble", "train")
_YAML_SUFFIXES = (".yaml", ".yml")
_PACKAGE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ atomic writes
def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it into place (no half-written files).

    A failed write removes its temp file and raises the OSError naming `path` (not the temp file). The temp file is
    named `.<name>.<pid>@<host>.<random>.tmp`, so one left by a writer killed hard (SIGKILL, a lost node) is removed
    by the next write into the same folder from this host, once that pid is gone.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file gets the mode open() would give it
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _naming(e: OSError, path: Path) -> OSError:
    """The same error about `path` (the CLI prints its filename): the temp file's name would only confuse."""
    return e if e.errno is None else type(e)(e.errno, e.strerror, str(path))


_HOST = os.uname().nodename.replace("/", "_")[:32]  # short enough to keep temp names within NAME_MAX
# mkstemp's random part is 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>.+)\.[a-z0-9_]{8}\.tmp$")
_swept: set[Path] = set()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def _remove_dead_temps(folder: Path) -> None:
    """Remove temp files of atomic writes into `folder` whose writer (on this host) no longer runs; once per folder
    and process, so a folder with many files is listed once, not at every write."""
    folder = folder.resolve()
    if folder in _swept:
        return
    _swept.add(folder)
    for entry in os.scandir(folder):
        m = _TEMP_NAME.match(entry.name)
        if m and m["host"] == _HOST and not process_exists(int(m["pid"])):
            Path(entry.path).unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    """Whether a process with this id runs on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class _WriteRecorder:
    """A file wrapper that remembers the OSError of a failed write: torch.save reports one as a RuntimeError
    ("unexpected pos ...") that no longer says the disk was full."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`; a write the file system refuses (disk full, file size limit) raises its OSError."""
    import torch  # here, not at the top: `tpas --help` and the YAML readers need no torch

    with open(path, "wb") as f:
        out = _WriteRecorder(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


# ------------------------------------------------------------------------------------------------ YAML
def read_yaml(path: str | Path, expected: str = "a YAML mapping") -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is {}); TpasInputError for a missing file, bad YAML or a non-mapping.

    `expected` says what the file should hold, for the error when it holds something else.
    """
    import yaml  # here, not at the top: `tpas evaluate` imports this module and reads no YAML

    path = Path(path)
    if not path.is_file():
        raise TpasInputError("config file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # some YAML errors span several lines
        raise TpasInputError(f"not valid YAML ({problem})", path, where) from None
    except UnicodeDecodeError as e:
        raise TpasInputError(f"is not UTF-8 text (byte {e.start})", path) from None
    except RecursionError:  # the YAML composer recurses once per nesting level
        raise TpasInputError("not valid YAML (nested too deeply)", path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TpasInputError(f"expected {expected}, found {type(data).__name__}", path)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` -> (key path, YAML value; an empty value is null); TpasInputError without `=` or a key."""
    import yaml

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise TpasInputError(f"--set {text!r}: expected key=value (e.g. fuse.weights=[0.1,0.9,0.9])")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # a ReaderError has no .problem
        raise TpasInputError(f"--set {key}: value {value!r} is not valid YAML ({problem})") from None
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


def resolve_against(path: str | Path, base_dir: Path | None) -> Path:
    """`path` itself when absolute (or without a base), else `base_dir / path` normalised lexically: a packaged preset's
    `../../sims_score/x.pt` must mean `sims_score/x.pt` even where its notional folder does not exist."""
    path = Path(path)
    if path.is_absolute() or base_dir is None:
        return path
    return Path(os.path.normpath(base_dir / path))
